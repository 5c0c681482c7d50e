"""Streamed calibration: data, bounded activations (spill to safetensors), distillation, resume, archs,
and one run on the real SmolLM2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import calibrate, finetune
from compressor.activations import ActivationStore, SpillBudget
from compressor.calibrated import WORK_DIR, CalibratedLayers
from compressor.config import E2E_LR_FULL_KL, E2E_LR_MIN_SHARE, E2E_TOPK, build_config
from compressor.distill import native_bf16
from compressor.pack import pack
from conftest import WIKITEXT, make_tiny
from ucformat import PackReader
from ucformat.inspect import verify
from ucformat.manifest import PROGRESS_NAME


def byte_tokenizer(path: Path) -> Path:
    """A 256-token byte-level tokenizer saved next to a tiny checkpoint (whose vocabulary is 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints with a tokenizer, built once per module."""
    root = tmp_path_factory.mktemp("calib")
    made = {}

    def get(arch="llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = byte_tokenizer(make_tiny(root / f"{arch}-{len(made)}", arch, **kw))
        return made[key]

    return get


# the end-to-end stage on the calibration sequences themselves (its own are tested where named)
# e2e_min_kl 0: the random tiny models start closer to their teachers than the default threshold; the stage runs
CAL = dict(file=str(WIKITEXT), articles="1-16", samples=6, seq_len=32, steps=4, fisher_samples=4, e2e_steps=2,
           e2e_samples=0, e2e_len=0, e2e_min_kl=0.0)


def test_calibration_ids_are_spread_and_deterministic(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny()))
    text = WIKITEXT.read_text(encoding="utf-8")
    a = calibrate.calibration_ids(tok, text, 5, 40, "1-16")
    assert a.shape == (5, 40) and torch.equal(a, calibrate.calibration_ids(tok, text, 5, 40, "1-16"))
    assert len({tuple(r.tolist()) for r in a}) == 5
    with pytest.raises(ValueError, match="calib-samples"):
        calibrate.calibration_ids(tok, "short text", 5, 40)


def test_end_to_end_sequences_too_long_for_the_text_name_their_flags(tiny, tmp_path):
    cfg = build_config(target_bpw=4.0, block_size=32, **{**CAL, "e2e_samples": 4, "e2e_len": 1 << 20})
    with pytest.raises(ValueError, match="--e2e-samples 4 asks for more.*--e2e-len"):
        pack(tiny(), tmp_path / "p", cfg, progress=False)


def test_activation_store_spills_to_safetensors(tmp_path):
    budget = SpillBudget(3 * 16 * 4, tmp_path / "spill")  # room for three [4, 4] float32 tensors
    store = ActivationStore(budget, "x")
    ts = [torch.randn(4, 4) for _ in range(5)]
    for t in ts:
        store.append(t)
    assert store.spilled == 2 and budget.used == 3 * 64 and budget.spilled_bytes == 2 * 64
    assert all(torch.equal(a, b) for a, b in zip(store, ts))
    files = sorted((tmp_path / "spill").iterdir())
    assert len(files) == 2
    for f in files:  # safetensors: 8-byte little-endian header length, then a JSON header
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert json.loads(raw[8:8 + n])["x"]["dtype"] == "F32"
    store.clear()
    assert budget.used == 0 and not any((tmp_path / "spill").iterdir())


def _files(dst):
    return {k: v.sha256 for k, v in PackReader(dst).manifest.files.items()}


def test_calibrated_pack_distils_and_verifies(tiny, tmp_path):
    dst = tmp_path / "p"
    r = pack(tiny(), dst, build_config(target_bpw=4.0, block_size=32, **CAL), progress=False)
    assert r.stats["bpw_allin"] <= 4.0
    assert all(e is None for _, e in verify(PackReader(dst), deep=True))
    layers = r.calib["layers"]
    assert len(layers) == 2 and all(row["loss_after"] <= row["loss_before"] for row in layers)
    assert any(row["kept"] for row in layers)  # distillation improved at least one layer
    assert set(r.calib["seconds"]) >= {"setup", "profile", "fisher"}
    assert not (dst / WORK_DIR).exists()
    manifest = PackReader(dst).manifest
    assert manifest.quant["target_bpw"] == 4.0 and manifest.quant["calib"]["samples"] == 6


def test_spilling_activations_changes_nothing(tiny, tmp_path):
    a, b = tmp_path / "mem", tmp_path / "disk"
    pack(tiny(), a, build_config(bits=3, block_size=32, **CAL), progress=False)
    r = pack(tiny(), b, build_config(bits=3, block_size=32, **{**CAL, "spill_mb": 0}), progress=False)
    assert r.calib["spilled_bytes"] > 0 and r.calib["activation_peak_bytes"] == 0
    assert _files(a) == _files(b)


def test_online_and_teacher_inputs_differ(tiny, tmp_path):
    a, b = tmp_path / "online", tmp_path / "teacher"
    cal = {**CAL, "e2e_steps": 0}  # the end-to-end stage would rewrite layer 0 after the layers that differ
    pack(tiny(), a, build_config(bits=3, block_size=32, **cal), progress=False)
    pack(tiny(), b, build_config(bits=3, block_size=32, **{**cal, "inputs": "teacher"}), progress=False)
    fa, fb = _files(a), _files(b)
    assert fa["layers/layer-00000.safetensors"] == fb["layers/layer-00000.safetensors"]  # same inputs at layer 0
    assert fa["layers/layer-00001.safetensors"] != fb["layers/layer-00001.safetensors"]


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    src = tiny("llama", num_hidden_layers=4)
    cfg = build_config(target_bpw=3.0, block_size=32, **CAL)
    ref = tmp_path / "ref"
    peaks = pack(src, ref, cfg, progress=False).calib["peak_rss_bytes"]
    assert list(peaks) == ["setup", "profile", "fisher", "layers", "e2e"]  # which phase set the peak
    assert list(peaks.values()) == sorted(peaks.values()) and peaks["setup"] > 0
    dst = tmp_path / "p"
    real = CalibratedLayers.compress

    def interrupted(self, i):
        if i == 2:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(CalibratedLayers, "compress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(src, dst, cfg, progress=False)
    assert (dst / PROGRESS_NAME).exists() and (dst / WORK_DIR / "plan.json").exists()
    monkeypatch.setattr(CalibratedLayers, "compress", real)
    r = pack(src, dst, cfg, resume=True, progress=False)
    assert r.layers_resumed == 2 and "profile" not in r.calib["seconds"]  # the saved plan was reused
    assert list(r.calib["peak_rss_bytes"]) == ["setup", "layers", "e2e"]
    assert _files(dst) == _files(ref)  # layers 2-3 saw exactly the streams of an uninterrupted run


def test_every_pass_maps_one_layer_of_the_source_at_a_time(tiny, tmp_path, monkeypatch):
    """Profile, Fisher, layer and resume passes unmap the checkpoint after each layer, so the pages they read
    stop counting in resident memory (the 1.5B calibrated prepare stage had held the whole file)."""
    from compressor.checkpoint import LAYER_RE, SourceCheckpoint

    mapped, most = set(), []
    get, release, compress = SourceCheckpoint.get, SourceCheckpoint.release, CalibratedLayers.compress

    def counted_get(self, name):
        if m := LAYER_RE.match(name):
            mapped.add(int(m["index"]))
            most.append(len(mapped))
        return get(self, name)

    def counted_release(self):
        mapped.clear()
        release(self)

    def interrupted(self, i):
        if i == 2:
            raise KeyboardInterrupt
        return compress(self, i)

    monkeypatch.setattr(SourceCheckpoint, "get", counted_get)
    monkeypatch.setattr(SourceCheckpoint, "release", counted_release)
    monkeypatch.setattr(CalibratedLayers, "compress", interrupted)
    src, dst = tiny("llama", num_hidden_layers=4), tmp_path / "p"
    cfg = build_config(target_bpw=3.0, block_size=32, **CAL)
    with pytest.raises(KeyboardInterrupt):
        pack(src, dst, cfg, progress=False)
    monkeypatch.setattr(CalibratedLayers, "compress", compress)
    assert pack(src, dst, cfg, resume=True, progress=False).layers_resumed == 2
    assert most and max(most) == 1


def test_every_layer_of_every_pass_gives_the_freed_heap_back(tiny, tmp_path, monkeypatch):
    """glibc keeps freed blocks in its heaps; without a trim per layer the 1.5B's profile pass grew by gigabytes."""
    from compressor import rss

    trims = []
    monkeypatch.setattr(rss, "trim", lambda: trims.append(1))
    pack(tiny("llama", num_hidden_layers=3), tmp_path / "p", build_config(target_bpw=3.0, block_size=32, **CAL),
         progress=False)
    assert len(trims) == 3 * 3  # profile, Fisher and layer passes, 3 layers each


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_moe"])
def test_other_architectures(tiny, tmp_path, arch):
    dst = tmp_path / "p"
    r = pack(tiny(arch), dst, build_config(target_bpw=4.0, block_size=32, **CAL), progress=False)
    assert r.stats["bpw_allin"] <= 4.0
    assert all(e is None for _, e in verify(PackReader(dst), deep=True))
    from ucformat.runtime import load

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.isfinite(load(dst)(ids).logits).all()


def test_cli_flags_reach_the_config(tiny, tmp_path):
    dst = tmp_path / "p"
    out = subprocess.run([sys.executable, "-m", "uc", "pack", str(tiny()), str(dst), "--preset", "light-4",
                          "--block-size", "32", "--calib", str(WIKITEXT), "--calib-articles", "1-16",
                          "--calib-samples", "4", "--calib-len", "32", "--steps", "2", "--inputs", "teacher",
                          "--fisher-labels", "model", "--json", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["bpw_allin"] <= 4.0 and r["calib"]["allocation"]
    q = PackReader(dst).manifest.quant
    assert q["target_bpw"] == 4.0 and q["calib"]["inputs"] == "teacher" and q["calib"]["steps"] == 2
    assert q["calib"]["fisher_labels"] == "model"
    assert q["scales"] == "searched"  # the default with calibration data
    text = subprocess.run([sys.executable, "-m", "uc", "pack", str(tiny()), str(tmp_path / "t"), "--target-bpw", "4",
                           "--block-size", "32", "--calib", str(WIKITEXT), "--calib-samples", "2", "--calib-len", "16",
                           "--steps", "0", "--e2e-steps", "0", "-q"], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "the peak RSS was reached in the " in text.stdout  # which phase to shrink when a pack does not fit
    bad = subprocess.run([sys.executable, "-m", "uc", "pack", str(tiny()), str(tmp_path / "q"), "--calib",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert bad.returncode != 0 and "uc: error:" in bad.stderr and "missing.txt" in bad.stderr


@pytest.mark.slow
def test_smollm2_calibrated_beats_plain(smollm2, tmp_path):
    """The real model, few samples and steps: calibration must help against the plain codec at 4 bits."""
    from compressor.evaluate import EvalConfig, evaluate

    text = WIKITEXT.read_text(encoding="utf-8")
    ecfg = EvalConfig(ctx=256, max_windows=3, articles="17-62")
    cal = pack(smollm2, tmp_path / "cal", build_config(bits=4, file=str(WIKITEXT), articles="1-16", samples=4,
                                                         seq_len=128, steps=8, e2e_steps=20, e2e_samples=6, e2e_len=256),
               progress=False)
    assert cal.calib["e2e"]["steps"] == 20 and cal.calib["e2e"]["kl_after"] <= cal.calib["e2e"]["kl_before"]
    rc = evaluate(tmp_path / "cal", text, base=smollm2, cfg=ecfg, progress=False)
    # calibrated packs rotate by default (SPEC.md 2.5): the plain one too, so only calibration differs
    assert PackReader(tmp_path / "cal").manifest.quant["rotation"] == 64
    plain = pack(smollm2, tmp_path / "plain", build_config(bits=4, rotation=64), progress=False)
    rp = evaluate(tmp_path / "plain", text, base=smollm2, cfg=ecfg, progress=False)
    assert cal.stats["bpw_allin"] == plain.stats["bpw_allin"]
    assert rc.ppl_ratio < rp.ppl_ratio and rc.top1_agreement > rp.top1_agreement and rc.kl < rp.kl


def test_gptq_beats_nearest_and_grouping_changes_nothing():
    from compressor import codecs, gptq
    from compressor.qweight import fit_grid, quantize_group

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 48, generator=g) + 0.1 * torch.randn(512, 48, generator=g)
    h = x.T @ x / 512
    ws = {"a": torch.randn(20, 48, generator=g), "b": torch.randn(12, 48, generator=g)}
    bits = {"a": 3, "b": 4}
    grouped = quantize_group(ws, bits, 16, "gsq", h)
    searched = quantize_group(ws, bits, 16, "gsq", h, search=True)  # --scale-search
    for n, w in ws.items():
        grid = fit_grid(w, bits[n], 16, "gsq", torch.diagonal(h))
        codes, scales = gptq.round_gptq(w, h, grid, 16)
        assert torch.equal(codes, grouped[n].codes) and torch.equal(scales, grouped[n].scales.half())
        fitted = codecs.fitted_scales(w, grid, 16, torch.diagonal(h))
        codes, scales = gptq.round_gptq(w, h, grid, 16, scales=fitted)
        assert torch.equal(codes, searched[n].codes) and torch.equal(scales, searched[n].scales.half())
        near = quantize_group({n: w}, bits, 16, "gsq", h, use_gptq=False)[n]
        out_err = lambda q: ((w - q.base()) @ x.T).square().mean()  # noqa: E731
        assert out_err(grouped[n]) < 0.8 * out_err(near)


def test_inverse_cholesky_factors_the_damped_inverse_and_damps_more_until_it_factors():
    from compressor import gptq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 96, generator=g)
    h = x @ x.T / 96
    h[:, 5] = h[5, :] = 0.0  # a dead column: diagonal 1
    u = gptq.inverse_cholesky(h).double()
    damped = h.double().clone()
    damped[5, 5] = 1.0
    damped.diagonal().add_(gptq.DAMP * damped.diagonal().mean())
    assert torch.equal(u, u.triu()) and torch.allclose(u.T @ u @ damped, torch.eye(48, dtype=torch.float64), atol=1e-4)
    x = torch.randn(48, 4, generator=g)
    bad = x @ x.T - 0.1 * torch.eye(48) * (x @ x.T).diagonal().mean()  # indefinite: factors only after more damping
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky((bad + gptq.DAMP * bad.diagonal().mean() * torch.eye(48)).double())
    u = gptq.inverse_cholesky(bad)
    assert torch.isfinite(u).all() and torch.equal(u, u.triu()) and (u.diagonal() > 0).all()


def _top_hidden(path, sequences: int):
    """A tiny model's skeleton, its last layer's output on random sequences of 16 tokens, and their batch."""
    from compressor import layerwise
    from compressor.checkpoint import SourceCheckpoint
    from ucformat.skeleton import Skeleton

    ckpt = SourceCheckpoint(path)
    sk = Skeleton(path)
    sk.load({n: ckpt.get(n) for n in ckpt.nonlayer})
    ids = torch.randint(0, 256, (sequences, 16), generator=torch.Generator().manual_seed(0))
    hidden, batch = layerwise.embed(sk, ids)
    for i in range(len(sk.layers)):
        sk.load({n: ckpt.get(n) for n in ckpt.layers[i]})
        hidden = layerwise.layer(sk, i, hidden, batch)
    return sk, hidden, batch


def test_head_gradient_builds_no_weight_gradients(tiny, monkeypatch):
    """The Fisher pass differentiates the loss w.r.t. the last hidden states only: no parameter of the
    skeleton (embeddings, head, norms) may collect a gradient (a 262k-token head's is 0.7 GB in fp32)."""
    sk, hidden, batch = _top_hidden(tiny(), 2)
    grad, nll = calibrate.head_grad(sk, hidden.clone(), batch)  # a normal tensor, as the store holds
    assert grad.shape == hidden.shape and grad.abs().sum() > 0 and nll > 0
    assert [n for n, p in sk.model.named_parameters() if p.grad is not None] == []
    # the head runs in chunks of rows sized by the vocabulary: one row per chunk gives the same result
    monkeypatch.setattr(calibrate, "LOGIT_FLOATS", 1)
    grad1, nll1 = calibrate.head_grad(sk, hidden.clone(), batch)
    torch.testing.assert_close(grad1, grad, rtol=1e-4, atol=1e-6)  # float32 sums in another order
    assert abs(nll1 - nll) < 1e-4 * nll


def test_model_drawn_labels_give_the_true_fisher(tiny):
    """With labels drawn from the model's own distribution the head gradient averages to zero (E_y[p - e_y]
    = 0, so its squares estimate the KL's curvature, not the text's); with the text's labels it does not.
    The draws come from the generator: the same seed gives the same gradient."""
    sk, hidden, batch = _top_hidden(tiny(), 1)
    data, _ = calibrate.head_grad(sk, hidden.clone(), batch)
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([calibrate.head_grad(sk, hidden.clone(), batch, gen)[0] for _ in range(256)])
    one = draws[0].norm()
    assert draws.mean(0).norm() < 3 * one / 256 ** 0.5  # Monte Carlo mean of zero-mean draws
    assert data.norm() > 0.5 * one and not torch.equal(draws[0], draws[1])
    again = calibrate.head_grad(sk, hidden.clone(), batch, torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(again, draws[0])


def test_fisher_labels_reach_the_pack_and_bad_ones_are_refused(tiny, tmp_path):
    cal = {**CAL, "steps": 0, "e2e_steps": 0}
    r = pack(tiny(), tmp_path / "m", build_config(target_bpw=4.0, block_size=32, fisher_labels="model", **cal),
             progress=False)
    assert r.stats["bpw_allin"] <= 4.0 and "fisher" in r.calib["seconds"]
    assert PackReader(tmp_path / "m").manifest.quant["calib"]["fisher_labels"] == "model"
    with pytest.raises(ValueError, match="--fisher-labels must be one of data, model"):
        build_config(target_bpw=4.0, fisher_labels="true", **cal)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_embedded_chunks_keep_their_own_layer_kwargs(tiny, arch):
    """Every chunk of the embedded calibration stream carries the rotary tables and masks of its own
    forward, whatever Python does with the ids of the tensors of earlier chunks (they are addresses, and a
    memo keyed by them once handed chunks the masks or rotary tables of another chunk, or of another
    kind: a crash when shapes differed, silently wrong calibration when they did not)."""
    from compressor import layerwise
    from compressor.checkpoint import SourceCheckpoint
    from ucformat.skeleton import Skeleton

    path = tiny(arch)
    ckpt = SourceCheckpoint(path)
    sk = Skeleton(path)
    sk.load({n: ckpt.get(n) for n in ckpt.nonlayer})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 24), generator=g)
    stream = calibrate.embed_stream(sk, ids, 2, ActivationStore(SpillBudget(1 << 30, Path("unused")), "t"))

    def flat(obj):
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (tuple, list)):
            return [t for o in obj for t in flat(o)]
        if isinstance(obj, dict):
            return [t for k in sorted(obj) for t in flat(obj[k])]
        return []

    for c, batch in zip(ids.split(2), stream.batches):
        _, fresh = layerwise.embed(sk, c)
        for got, want in zip(batch.layer_kwargs, fresh.layer_kwargs):
            a, b = flat(got), flat(want)
            assert len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_end_to_end_distillation_is_skipped_for_a_student_close_to_its_teacher(tiny, tmp_path):
    """Below --e2e-min-kl the stage measures the held-out KL and stops there: no step runs, the report says
    why, and the pack is byte for byte the one without the stage."""
    cal = {**CAL, "samples": 8, "steps": 0}
    src = tiny("llama", initializer_range=0.3)
    a = pack(src, tmp_path / "a", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_steps": 0}), progress=False)
    b = pack(src, tmp_path / "b", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_steps": 8, "e2e_min_kl": 1e9}),
             progress=False)
    e = b.calib["e2e"]
    assert e["steps"] == 0 and not e["kept"] and e["kl_after"] == e["kl_before"] > 0
    assert e["skipped"].startswith("held-out KL") and "--e2e-min-kl 1e+09" in e["skipped"]
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k: v for k, v in fa.items() if k.startswith("layers/")} == {k: v for k, v in fb.items() if k.startswith("layers/")}
    with pytest.raises(ValueError, match="--e2e-min-kl must be >= 0"):
        build_config(e2e_min_kl=-1.0)


@pytest.mark.parametrize("arch,topk", [("llama", 0), ("gemma3", 0), ("llama", 16)])
def test_end_to_end_distillation_lowers_the_held_out_kl(tiny, tmp_path, arch, topk):
    """The e2e stage tunes every layer against the logits, keeps the result only if the held-out KL fell,
    and rewrites the layers it changed (the pack still verifies and the bits are unchanged)."""
    # With the top-16 KL on the rotated pack of this random tiny model, 8 (and 16) steps raised the held-out
    # full KL (0.618 -> 0.628) and the stage was rightly discarded; that case runs unrotated, where it falls.
    # Absmax scales: on the random tiny llama at 3 bpw searched ones start at a higher held-out KL (0.803 against
    # 0.768) that 8 or 16 steps did not lower (measured in stop 24); this test is about the stage, not the scales.
    cal = {**CAL, "samples": 8, "steps": 0, "rotation": 0 if topk else None, "scale_search": False}
    src = tiny(arch, initializer_range=0.3)  # sharp next-token distributions: a random tiny model's are flat
    a = pack(src, tmp_path / "a", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_steps": 0}), progress=False)
    b = pack(src, tmp_path / "b", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_steps": 8, "e2e_topk": topk}),
             progress=False)
    e = b.calib["e2e"]
    assert a.calib["e2e"] == {} and e["steps"] == 8 and e["kept"]
    assert e["kl_after"] < e["kl_before"]
    assert e["recipe"]["lr"] == finetune.learning_rate(e["recipe"]["lr_max"], e["kl_before"])
    assert e["dtype"] == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")  # what the steps ran in
    assert b.stats["bpw_allin"] == a.stats["bpw_allin"]
    assert all(err is None for _, err in verify(PackReader(tmp_path / "b"), deep=True))
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa["layers/layer-00000.safetensors"] != fb["layers/layer-00000.safetensors"]
    if topk:  # the steps' loss is the top-k KL, the held-out check the full one: the same as a full-KL stage's
        c = pack(src, tmp_path / "c", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_steps": 1}), progress=False)
        assert c.calib["e2e"]["kl_before"] == pytest.approx(e["kl_before"], rel=1e-5)


def test_end_to_end_top_k_by_default_only_where_the_output_head_outweighs_the_linears(tiny, tmp_path):
    """Gemma-3-270M (a 262144 x 640 head over 100 M linear weights) steps on the top-k KL, SmolLM2 (49152 x 576
    over 106 M) on the whole vocabulary; a pack records the k it used, an explicit --e2e-topk wins."""
    assert finetune.auto_topk(262144, 640, 100_000_000) == E2E_TOPK
    assert finetune.auto_topk(49152, 576, 106_000_000) == 0
    cal = {**CAL, "samples": 6, "steps": 0, "e2e_steps": 1}
    used = {}
    for vocab, topk in ((256, None), (4096, None), (4096, 0)):  # tiny linears: 61,440 weights; heads 16,384 / 262,144
        src = tiny("llama", vocab_size=vocab)
        out = pack(src, tmp_path / f"{vocab}-{topk}", build_config(target_bpw=4.0, block_size=32, **{**cal, "e2e_topk": topk}),
                   progress=False)
        used[vocab, topk] = out.calib["e2e"]["recipe"]["topk"]
    assert used == {(256, None): 0, (4096, None): E2E_TOPK, (4096, 0): 0}


def test_end_to_end_learning_rate_follows_the_starting_kl():
    """Full rate from E2E_LR_FULL_KL up; below, in proportion to the held-out KL; never under the floor."""
    lr = 3e-3
    assert finetune.learning_rate(lr, 0.5) == finetune.learning_rate(lr, E2E_LR_FULL_KL) == lr
    assert finetune.learning_rate(lr, E2E_LR_FULL_KL / 2) == pytest.approx(lr / 2)
    assert finetune.learning_rate(lr, 1e-6) == pytest.approx(lr * E2E_LR_MIN_SHARE)
    assert finetune.learning_rate(lr, float("nan")) == lr  # nothing held out: the rate as given


def test_end_to_end_distillation_that_raises_the_held_out_kl_is_discarded(tiny, tmp_path):
    """A learning rate far too high: the tuned weights raise the held-out KL (or make it NaN), so the pack
    is the one without the stage, and the report still says what the tuned weights measured."""
    cal = {**CAL, "samples": 8, "steps": 0}
    src = tiny(initializer_range=0.3)
    a = pack(src, tmp_path / "a", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_steps": 0}), progress=False)
    b = pack(src, tmp_path / "b", build_config(target_bpw=3.0, block_size=32,
                                               **{**cal, "e2e_steps": 4, "e2e_lr": 30.0, "e2e_warmup": 0}), progress=False)
    e = b.calib["e2e"]
    assert not e["kept"] and e["kl_before"] == e["kl_after"] and (e["kl_tuned"] is None or e["kl_tuned"] > e["kl_before"])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_end_to_end_distillation_tunes_norms_in_their_stored_dtype(tiny, tmp_path, arch):
    """With e2e_norms the stage also tunes every decoder layer's normalisation weights: they are stored again
    in the source dtype (bf16 here), changed, and the held-out KL is taken with exactly those values."""
    cal = {**CAL, "samples": 8, "steps": 0, "e2e_steps": 8, "scale_search": False}  # absmax: as the test above
    src = tiny(arch, initializer_range=0.3)
    a = pack(src, tmp_path / "a", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_norms": False}),
             progress=False)
    b = pack(src, tmp_path / "b", build_config(target_bpw=3.0, block_size=32, **{**cal, "e2e_norms": True}),
             progress=False)
    assert b.calib["e2e"]["kept"] and b.calib["e2e"]["kl_after"] < b.calib["e2e"]["kl_before"]
    assert all(err is None for _, err in verify(PackReader(tmp_path / "b"), deep=True))
    ra, rb = PackReader(tmp_path / "a"), PackReader(tmp_path / "b")
    norms = [n for n in rb.layer_tensor_names(0) if "norm" in n and rb.manifest.tensors[n].kind == "raw"]
    assert norms
    pa, pb = ra.read_parts("layers/layer-00000.safetensors"), rb.read_parts("layers/layer-00000.safetensors")
    assert all(pb[n].dtype == torch.bfloat16 for n in norms)
    assert any(not torch.equal(pa[n], pb[n]) for n in norms)
    # the linears' stored layout is untouched: the same bits
    assert b.stats["bpw_allin"] == a.stats["bpw_allin"]


@pytest.mark.parametrize("own", [{}, {"e2e_samples": 6, "e2e_len": 48}], ids=["calib-sequences", "own-sequences"])
def test_end_to_end_distillation_resumes(tiny, tmp_path, monkeypatch, own):
    """Interrupted in the e2e stage, a resumed pack redoes it from the stored layers and ends as an
    uninterrupted run; interrupted after it, the resumed pack does not run it again. With sequences of its
    own (not the calibration ones), their fp stream is carried through the skipped layers too."""
    from compressor import finetune

    cfg = build_config(target_bpw=4.0, block_size=32, **{**CAL, "samples": 8, "steps": 0, "e2e_steps": 4, **own})
    pack(tiny(), tmp_path / "ref", cfg, progress=False)
    real = finetune.finetune
    monkeypatch.setattr(finetune, "finetune", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pack(tiny(), tmp_path / "p", cfg, progress=False)
    monkeypatch.setattr(finetune, "finetune", real)
    r = pack(tiny(), tmp_path / "p", cfg, resume=True, progress=False)
    assert r.layers_resumed == 2 and r.calib["e2e"]["steps"] == 4
    assert _files(tmp_path / "p") == _files(tmp_path / "ref")

    from ucformat.writer import PackWriter

    real_finish = PackWriter.finish
    monkeypatch.setattr(PackWriter, "finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pack(tiny(), tmp_path / "q", cfg, progress=False)
    monkeypatch.setattr(PackWriter, "finish", real_finish)
    monkeypatch.setattr(finetune, "finetune", lambda *a, **k: pytest.fail("e2e ran twice"))
    r = pack(tiny(), tmp_path / "q", cfg, resume=True, progress=False)
    assert r.calib["e2e"]["steps"] == 4
    assert _files(tmp_path / "q") == _files(tmp_path / "ref")


def test_stored_weight_round_trips_through_qweight():
    from compressor.qweight import QWeight, int8_rows, quantize_matrix

    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(0))
    q = quantize_matrix(w, 3, 32, "gsq")
    q.u, q.v = torch.randn(24, 2), torch.randn(2, 80)
    q.ov_rows = torch.tensor([1, 5])
    q.ov_q, q.ov_s = int8_rows(w[[1, 5]])
    for dtype in ("int8", "float16"):
        q.lowrank_dtype = dtype
        stored = q.freeze()
        again = QWeight.from_stored(stored).freeze()
        assert stored.parts().keys() == again.parts().keys()
        assert all(torch.equal(x, again.parts()[k]) for k, x in stored.parts().items())


def test_a_bfloat16_training_weight_is_the_float32_weight_rounded_once():
    """Distillation under bfloat16 builds a weight in float32 and rounds only the result, so a trained block
    scale's step far below bfloat16's resolution (0.4%) still moves each block's weights, on average by the
    step (rotated back, a block's 64 weights all differ, and rounding them dithers it). Rounding the scales
    to bfloat16 first hid such steps in most blocks."""
    from compressor.qweight import quantize_matrix

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    q = quantize_matrix(w, 5, 64, "gsq", rotation=64)  # rotation blocks = scale blocks: a scale moves 64 weights
    want = q.weight().to(torch.bfloat16)
    assert torch.equal(q.weight(dtype=torch.bfloat16), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the distillation steps build it
        assert torch.equal(q.weight(dtype=torch.bfloat16), want)
    step = 1e-3
    a = q.weight(dtype=torch.bfloat16).float().reshape(16, 4, 64).abs().sum(-1)
    b = q.weight(q.scales * (1 + step), dtype=torch.bfloat16).float().reshape(16, 4, 64).abs().sum(-1)
    seen = b / a - 1
    assert seen.min() > 0.3 * step and (seen.mean() - step).abs() < 0.1 * step, seen


@pytest.mark.parametrize("short", ["model", "targets"])
def test_end_to_end_distillation_is_skipped_when_the_model_does_not_fit(tiny, tmp_path, monkeypatch, caplog, short):
    """Too little memory for the model's working set, or for it plus the teacher's targets and a step's
    logits (the model alone would fit): the stage is skipped and the pack is the one without it."""
    import math

    from compressor import finetune

    cal = {**CAL, "samples": 8, "steps": 0, "e2e_steps": 4}
    pack(tiny(), tmp_path / "ref", build_config(target_bpw=4.0, block_size=32, **{**cal, "e2e_steps": 0}),
         progress=False)
    layers: dict[str, int] = {}
    for e in PackReader(tmp_path / "ref").manifest.tensors.values():
        if e.kind == "quantized":
            layers[e.file] = layers.get(e.file, 0) + math.prod(e.shape)
    budget = 1 << 10 if short == "model" else finetune.working_bytes(sum(layers.values()), max(layers.values())) + 1
    monkeypatch.setattr(finetune, "auto_budget", lambda device, headroom: budget)
    with caplog.at_level("WARNING"):
        r = pack(tiny(), tmp_path / "p", build_config(target_bpw=4.0, block_size=32, **cal), progress=False)
    assert "needs about" in r.calib["e2e"]["skipped"] and "end-to-end distillation skipped" in caplog.text
    assert _files(tmp_path / "p") == _files(tmp_path / "ref")


def test_top_k_kl_over_the_whole_vocabulary_is_the_full_kl(tiny):
    from compressor import finetune
    from compressor.checkpoint import SourceCheckpoint, nonlayer_state_dict
    from ucformat.skeleton import Skeleton

    src = tiny(initializer_range=0.3)
    sk = Skeleton(src)
    sk.load(nonlayer_state_dict(SourceCheckpoint(src)))
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    full = finetune._Head(sk, 0)
    whole = finetune._Head(sk, 256)  # the tiny vocabulary
    some = finetune._Head(sk, 8)
    assert whole.topk == 256
    kl = full.kl(student, full.targets(teacher))
    assert torch.allclose(kl, whole.kl(student, whole.targets(teacher)), rtol=1e-4)
    assert 0 < some.kl(student, some.targets(teacher)) and full.kl(teacher, full.targets(teacher)).abs() < 1e-5


def test_kl_with_logits_kept_or_recomputed_gives_the_same_loss_and_gradient(tiny, monkeypatch):
    """Small vocabularies keep the step's logits for backward, large ones recompute them chunk by chunk:
    the switch must not change what is learned."""
    from compressor import finetune
    from compressor.checkpoint import SourceCheckpoint, nonlayer_state_dict
    from ucformat.skeleton import Skeleton

    src = tiny(initializer_range=0.3)
    sk = Skeleton(src)
    sk.load(nonlayer_state_dict(SourceCheckpoint(src)))
    g = torch.Generator().manual_seed(0)
    teacher, start = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    monkeypatch.setattr(finetune, "LOGIT_FLOATS", 256 * 3)  # 3 rows a chunk: 5 chunks
    head = finetune._Head(sk, 0)
    out = []
    for limit in (1 << 30, 0):  # kept, recomputed
        monkeypatch.setattr(finetune, "RECOMPUTE_FLOATS", limit)
        s = start.clone().requires_grad_(True)
        kl = head.kl(s, head.targets(teacher))
        kl.backward()
        out.append((kl.detach(), s.grad))
    assert kl > 0 and torch.allclose(out[0][0], out[1][0]) and torch.allclose(out[0][1], out[1][1])


@pytest.mark.parametrize("arch,bpw", [("llama", 5.0), ("gemma3", 5.0), ("qwen3_moe", 6.0)])
def test_end_to_end_steps_that_rerun_each_layer_in_backward_learn_exactly_the_same(tiny, tmp_path, monkeypatch, arch, bpw):
    """The stage's steps keep only each decoder layer's inputs and rebuild its weights and activations in
    backward, instead of holding the whole model's (bench/e2e_memory.py measures what that saves): not one
    byte of the pack may change for it, low-rank factors and tuned norms included."""
    src = tiny(arch, initializer_range=0.3)  # as in the test above: a stage that lowers the held-out KL
    cfg = build_config(target_bpw=bpw, block_size=32, rank=4,
                       **{**CAL, "samples": 8, "steps": 0, "e2e_steps": 8, "scale_search": False})
    a = pack(src, tmp_path / "a", cfg, progress=False)
    real = finetune.finetune
    monkeypatch.setattr(finetune, "finetune", lambda *args, **kw: real(*args, **kw, recompute=False))
    b = pack(src, tmp_path / "b", cfg, progress=False)
    e = a.calib["e2e"]
    assert e["steps"] == 8 and e["kl_tuned"] != e["kl_before"]  # the steps moved the weights (kept or not)
    assert all(rank == 4 for _, rank, _ in a.calib["plan"].values())
    assert b.calib["e2e"]["kl_tuned"] == e["kl_tuned"] and _files(tmp_path / "a") == _files(tmp_path / "b")


def test_end_to_end_distillation_killed_between_steps_resumes_from_its_last_state(tiny, tmp_path, monkeypatch):
    """The stage writes its training state (trainable tensors, Adam moments, step) every SAVE_EVERY steps under
    the pack's work directory; a pack killed in the middle of the steps resumes from the last state, does not
    redo the steps before it, and ends byte for byte as a run never stopped."""
    from compressor import train_state

    src = tiny(initializer_range=0.3)
    cfg = build_config(target_bpw=3.0, block_size=32,
                       **{**CAL, "samples": 8, "steps": 0, "e2e_steps": 8, "scale_search": False})
    monkeypatch.setattr(finetune, "SAVE_EVERY", 3)
    ref = pack(src, tmp_path / "ref", cfg, progress=False)
    assert ref.calib["e2e"]["steps"] == 8 and not (tmp_path / "ref" / WORK_DIR).exists()
    real_save, saved = train_state.save, []

    def save_then_die(path, params, opt, step, settings):
        real_save(path, params, opt, step, settings)
        saved.append(step)
        if step == 6:
            raise KeyboardInterrupt  # killed right after the state of step 6 was written

    monkeypatch.setattr(train_state, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "p", cfg, progress=False)
    assert saved == [3, 6] and (tmp_path / "p" / WORK_DIR / "e2e-state.safetensors").is_file()
    ran, real_finetune = [], finetune.finetune

    def counting(sk, model, ids, teacher, cfg, progress=None, **kw):
        return real_finetune(sk, model, ids, teacher, cfg, lambda step, kl: ran.append(step), **kw)

    monkeypatch.setattr(finetune, "finetune", counting)
    r = pack(src, tmp_path / "p", cfg, resume=True, progress=False)
    assert ran == [6, 7] and saved == [3, 6, 8]
    assert r.calib["e2e"]["kl_before"] == ref.calib["e2e"]["kl_before"]
    assert r.calib["e2e"]["kl_tuned"] == ref.calib["e2e"]["kl_tuned"]
    assert _files(tmp_path / "p") == _files(tmp_path / "ref")
