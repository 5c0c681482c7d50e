"""Prepacked and fused CPU linears (server/cpu_linear.py): same logits as the stock model, bit for bit,
with q/k/v and gate/up computed as one matmul each."""

import pytest
import torch

from conftest import tiny_config
from server import cpu_linear


def tiny_model(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).to(torch.bfloat16).eval()


def pair(arch: str):
    ref, model = tiny_model(arch), tiny_model(arch)
    if not cpu_linear.supported(model):
        pytest.skip("no oneDNN bf16 linear prepacking here (torch build or CPU: needs AVX-512 or AVX-NE-CONVERT)")
    return ref, model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_logits_equal_stock_bitwise(arch):
    ref, model = pair(arch)
    n = cpu_linear.prepack(model, batch_hint=4, fuse=True)
    assert n == sum(1 for m in ref.modules() if type(m) is torch.nn.Linear)
    attn = next(m for m in model.modules() if hasattr(m, "q_proj"))
    assert isinstance(attn.q_proj, cpu_linear.FusedMember) and isinstance(attn.v_proj, cpu_linear.FusedMember)
    mlp = next(m for m in model.modules() if hasattr(m, "gate_proj"))
    assert isinstance(mlp.up_proj, cpu_linear.FusedMember)
    ids = torch.randint(0, 200, (3, 9))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(out, ref.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_members_called_alone_or_out_of_order_stay_exact():
    ref, model = pair("llama")
    cpu_linear.prepack(model, batch_hint=4, fuse=True)
    a_ref = next(m for m in ref.modules() if hasattr(m, "q_proj"))
    a = next(m for m in model.modules() if hasattr(m, "q_proj"))
    x, y = torch.randn(2, 1, a.q_proj.in_features, dtype=torch.bfloat16), torch.randn(2, 1, a.q_proj.in_features,
                                                                                       dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(a.v_proj(x), a_ref.v_proj(x))  # v first
        assert torch.equal(a.k_proj(y), a_ref.k_proj(y))  # another input: recomputed, not the cached product
        assert torch.equal(a.k_proj(x), a_ref.k_proj(x))
        assert torch.equal(a.q_proj(x), a_ref.q_proj(x))
        assert torch.equal(a.q_proj(x), a_ref.q_proj(x))  # twice in a row: served again, not stale
    group = a.q_proj.group
    assert group._input is None or group._pending  # nothing held once every member was served


def test_fuse_off_packs_one_by_one():
    ref, model = pair("llama")
    cpu_linear.prepack(model, batch_hint=4, fuse=False)
    assert not any(isinstance(m, cpu_linear.FusedMember) for m in model.modules())
    ids = torch.randint(0, 200, (2, 7))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
