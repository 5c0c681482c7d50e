"""Every supported architecture: pack a tiny random model; the pack's logits (dense load and layer-by-layer)
equal those of plain transformers running the dequantized weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor import layerwise
from compressor.config import PackConfig
from compressor.pack import pack
from conftest import ARCHS, dequantized_checkpoint
from ucformat import PackReader
from ucformat.runtime import load
from ucformat.skeleton import Skeleton


@pytest.mark.parametrize("arch", ARCHS)
def test_pack_logits_match_dequantized_reference(arch, tiny_templates, tmp_path):
    src = tiny_templates(arch)
    dst = tmp_path / "pack"
    pack(src, dst, PackConfig(bits=4, block_size=32), progress=False)
    r = PackReader(dst)
    m = r.manifest
    quantized = [n for n, e in m.tensors.items() if e.kind == "quantized"]
    assert quantized and all(".layers." in n for n in quantized)
    if arch in ("mixtral", "qwen3_moe"):  # experts quantized one by one, the router kept
        assert any(".experts.3." in n for n in quantized)
        assert not any(n.endswith(".gate.weight") and "experts" not in n for n in quantized)
    ref_dir = dequantized_checkpoint(dst, tmp_path / "ref")
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref(ids).logits
        got_dense = load(dst, device="cpu")(ids).logits
    torch.testing.assert_close(got_dense, want, rtol=1e-4, atol=1e-4)

    # layer by layer, as uc eval runs it
    sk = Skeleton(dst)
    sk.load(r.nonlayer_state_dict(torch.float32))
    h, batch = layerwise.embed(sk, ids)
    for i in range(r.num_layers):
        sk.load(r.layer_state_dict(i, torch.float32))
        h = layerwise.layer(sk, i, h, batch)
        sk.unload_layer(i)
    with torch.inference_mode():
        got_layerwise = layerwise.logits(sk, layerwise.final_hidden(sk, h, batch))
    torch.testing.assert_close(got_layerwise, want, rtol=1e-4, atol=1e-4)

    # and the pack really is a lossy copy of the source (the test would notice a pass-through)
    src_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.inference_mode():
        assert not torch.allclose(src_model(ids).logits, want, atol=1e-4)
    assert json.loads((dst / "config.json").read_text())["model_type"] == m.model_type
