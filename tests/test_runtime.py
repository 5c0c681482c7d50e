"""Running a pack: the three residency modes agree bit for bit, budgets hold, streamed reads are checked."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import ucformat
from compressor.config import PackConfig
from compressor.pack import pack
from conftest import dequantized_checkpoint, make_tiny
from ucformat import cpu_qgemv
from ucformat.errors import HashMismatch, SizeMismatch
from ucformat.manifest import layer_file
from ucformat.residency import BudgetError

MODES = [("dense", None), ("packed", None), ("stream", "40%"), ("stream", "1B")]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    out = {}
    for arch in ("llama", "mixtral", "qwen3_moe", "gemma3"):
        src = make_tiny(root / f"src-{arch}", arch, num_hidden_layers=6)
        pack(src, root / arch, PackConfig(bits=4, block_size=32), progress=False)
        out[arch] = root / arch
    return out


def _run(model, ids):
    """Full forward, then prefill + 3 decode steps with a KV cache: all logits."""
    with torch.inference_mode():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids, cache=cache, use_cache=True).logits]
        nxt = steps[-1][:, -1:].argmax(-1)
        for _ in range(3):
            steps.append(model(input_ids=nxt, cache=cache, use_cache=True).logits)
            nxt = steps[-1][:, -1:].argmax(-1)
    return [full, *steps]


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe", "gemma3"])
def test_modes_agree_and_match_reference(arch, packs, tmp_path, monkeypatch):
    """With kernels=False every mode rebuilds its weights: bit for bit the dense logits. With the kernels
    (the default) the quantized linears compute from the codes: with float activations float32 sums in
    another order, close to float rounding; with integer activations (the CPU default, which also gives a
    float head an 8-bit copy, qhead.py) within 1e-2 of the largest |logit| (these tiny random models' logits
    all lie within +-0.7: about 7e-3 measured, 1e-3 of it from the layers), compared before decode steps
    whose inputs are each model's own argmax, which near-ties of random logits can part)."""
    p = packs[arch]
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))  # batch > 1
    results, from_codes = {}, {}
    for mode, budget in MODES:
        if budget == "1B":  # the floor: every layer streamed
            full = ucformat.plan(p, residency="stream", vram_budget="100%")
            budget = full.min_stream_bytes
        for kernels, act in ((False, "float"), (True, "float"), (True, "int16")):
            if kernels and mode == "dense":
                continue
            monkeypatch.setattr(cpu_qgemv, "ACT", act)
            model = ucformat.load(p, residency=mode, vram_budget=budget, kernels=kernels)
            (from_codes if kernels else results)[(mode, budget, act) if kernels else (mode, budget)] = _run(model, ids)
            s = model.uc_runtime.stats()
            assert (s.linears_from_codes > 0) == kernels  # every arch has plain attention linears
            if mode == "stream" and not isinstance(budget, str):  # at the floor every layer is streamed
                assert s.layers_streamed == s.total_layers and s.bytes_transferred > 0
                assert s.prefetch_hits + s.prefetch_misses >= 5 * s.total_layers
            model.uc_runtime.close()
    first = next(iter(results.values()))
    for key, outs in results.items():
        for a, b in zip(outs, first):
            assert torch.equal(a, b), f"{key} differs from dense"
    for key, outs in from_codes.items():
        for a, b in zip(outs, first):
            if key[-1] == "float":
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key} from the codes: {m}")
            elif a.shape[1] > 1:  # full forward and prefill: decode steps feed each model's own argmax
                err, top = (a - b).abs().max().item(), b.abs().max().item()
                assert err <= 1e-2 * top, f"{key} from the codes: {err:.3g} against max |logit| {top:.3g}"
    ref = AutoModelForCausalLM.from_pretrained(dequantized_checkpoint(p, tmp_path / "ref"), dtype=torch.float32).eval()
    torch.testing.assert_close(first[0], ref(ids).logits.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("mode, budget", [("packed", None), ("stream", "1%")])
def test_moe_experts_are_reconstructed_one_by_one(arch, mode, budget, packs):
    """One token picks 2 of 4 experts per layer: only those are rebuilt, and the rest never are."""
    p = packs[arch]
    if budget == "1%":  # the floor: every layer streamed
        full = ucformat.plan(p, residency="stream", vram_budget="100%")
        budget = full.min_stream_bytes
    model = ucformat.load(p, residency=mode, vram_budget=budget)
    rt = model.uc_runtime
    before = rt.stats()
    with torch.inference_mode():
        model(torch.tensor([[7]]))
    s = rt.stats()
    rt.close()
    layers = s.layers_packed + s.layers_streamed
    assert layers == 6
    assert s.experts_reconstructed - before.experts_reconstructed <= 2 * layers
    assert s.experts_skipped - before.experts_skipped >= 2 * layers
    assert s.resident_bytes == before.resident_bytes  # every compact stack was dropped again
    if mode == "stream":  # only the picked experts' bytes were read: well under the layers' stored bytes
        assert 0 < s.bytes_transferred - before.bytes_transferred < 0.8 * sum(pl.packed_bytes for pl in rt.plan.layers)


def test_peak_stays_within_budget_plus_one_layer(packs):
    p = packs["llama"]
    plan = ucformat.plan(p, residency="stream", vram_budget="35%")
    biggest = max(pl.dense_bytes for pl in plan.layers)
    model = ucformat.load(p, residency="stream", vram_budget="35%")
    _run(model, torch.randint(0, 256, (2, 12)))
    s = model.uc_runtime.stats()
    model.uc_runtime.close()
    assert 0 < s.layers_streamed < 6
    assert s.peak_resident_bytes <= plan.budget_bytes + biggest
    assert s.peak_resident_bytes < plan.dense_model_bytes


def test_budget_smaller_than_a_layer_is_refused(packs):
    p = packs["llama"]
    plan = ucformat.plan(p, residency="stream", vram_budget="100%")
    with pytest.raises(BudgetError, match="smaller than the embeddings/lm_head .* plus one decoder layer"):
        ucformat.load(p, residency="stream", vram_budget=plan.nonlayer_bytes + 10)
    with pytest.raises(BudgetError, match="use --residency stream"):
        ucformat.load(p, residency="dense", vram_budget="10%")
    with pytest.raises(BudgetError, match="expected a size like"):
        ucformat.plan(p, residency="stream", vram_budget="lots")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_pack_altered_after_load_is_caught_when_streamed(packs, tmp_path, damage):
    import shutil

    p = shutil.copytree(packs["llama"], tmp_path / "p")
    model = ucformat.load(p, residency="stream", vram_budget="30%", prefetch=False)
    streamed = [pl.index for pl in model.uc_runtime.plan.layers if pl.where == "host"]
    f = p / layer_file(streamed[-1])
    data = f.read_bytes()
    f.write_bytes(data[:-7] if damage == "truncate" else data[:-7] + bytes([data[-7] ^ 1]) + data[-6:])
    with pytest.raises(SizeMismatch if damage == "truncate" else HashMismatch, match=f.name):
        _run(model, torch.randint(0, 256, (1, 4)))
    model.uc_runtime.close()


def test_plan_and_bench_run_cli(packs):
    p = packs["llama"]
    out = subprocess.run([sys.executable, "-m", "uc", "plan", p, "--vram-budget", "40%"], capture_output=True, text=True)
    assert out.returncode == 0 and "streamed from host" in out.stdout and "bytes moved per forward pass" in out.stdout
    out = subprocess.run([sys.executable, "-m", "uc", "bench-run", p, "--json", "--prefill-tokens", "16",
                          "--decode-steps", "2", "--vram-budget", "40%"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for mode in ("dense", "packed", "stream"):
        assert set(r[mode]) >= {"prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8", "peak_resident_bytes"}
        assert r[mode]["decode_tok_s_b8"] > 0
    assert r["packed"]["peak_resident_bytes"] < r["dense"]["peak_resident_bytes"]
    out = subprocess.run([sys.executable, "-m", "uc", "bench-run", p, "--json", "--prefill-tokens", "16",
                          "--decode-steps", "2", "--vram-budget", "40%", "--modes", "stream", "--cold"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cold = json.loads(out.stdout)["stream"]
    assert cold["bytes_transferred"] > 0 and cold["prefetch_hits"] + cold["prefetch_misses"] > 0
    out = subprocess.run([sys.executable, "-m", "uc", "plan", p, "--vram-budget", "1kB"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("uc: error: --vram-budget") and "Traceback" not in out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_matches_dense(packs):
    p = packs["llama"]
    ids = torch.randint(0, 256, (2, 8)).cuda()
    outs = []
    for mode, budget in (("dense", None), ("stream", "40%")):
        model = ucformat.load(p, device="cuda", residency=mode, vram_budget=budget, dtype=torch.float32)
        outs.append(_run(model, ids))
        model.uc_runtime.close()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
