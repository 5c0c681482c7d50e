"""`uc distill`: the student architecture (shared block, per-application gamma/beta, KV cache), the loss, the
teacher targets, the pack it writes (verify, load, eval), resume after kill -9, and its CLI errors. A tiny random
Llama teacher with SmolLM2's tokenizer keeps every test to seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import WIKITEXT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


@pytest.fixture(scope="session")
def tiny_teacher(smollm2, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama over SmolLM2's 49152-token vocabulary, with SmolLM2's tokenizer files."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)  # logits of a few nats, not a near-uniform distribution
    model.to(torch.bfloat16).save_pretrained(str(path))
    for f in TOKENIZER_FILES:
        if (smollm2 / f).is_file():
            shutil.copy(smollm2 / f, path / f)
    return path


def small(**kw) -> "object":
    from compressor.distiller import DistillConfig

    base = dict(student="frr", width=64, scales=2, iters=2, layers=1, calib=str(WIKITEXT), articles="1-2",
                seq_len=32, samples=8, steps=6, batch=2, lr=3e-3, warmup=2, topk=16, save_every=2)
    return DistillConfig(**{**base, **kw})


def cli_args(cfg) -> list[str]:
    return ["--student", cfg.student, "--width", str(cfg.width), "--scales", str(cfg.scales), "--iters",
            str(cfg.iters), "--layers", str(cfg.layers), "--calib", cfg.calib, "--calib-articles", cfg.articles,
            "--seq-len", str(cfg.seq_len), "--calib-samples", str(cfg.samples), "--steps", str(cfg.steps),
            "--batch", str(cfg.batch), "--lr", str(cfg.lr), "--warmup", str(cfg.warmup), "--topk", str(cfg.topk),
            "--save-every", str(cfg.save_every), "--seed", str(cfg.seed), "-q"]


# -- the loss -------------------------------------------------------------------------------------------
def test_topk_kl_is_the_full_kl_when_k_is_the_vocabulary_and_a_lower_bound_below():
    from compressor.objective import topk_kl

    torch.manual_seed(0)
    t, s = torch.randn(5, 7, 40) * 3, torch.randn(5, 7, 40) * 3
    tl = torch.log_softmax(t, -1)
    full = torch.nn.functional.kl_div(torch.log_softmax(s, -1), tl, log_target=True, reduction="none").sum(-1).mean()
    v, i = tl.topk(40, -1)
    assert torch.allclose(topk_kl(s, i, v), full, atol=1e-5)
    v, i = tl.topk(8, -1)
    low = topk_kl(s, i, v)
    assert 0 < low < full
    assert topk_kl(t, i, v).abs() < 1e-5  # the teacher itself: no loss
    # a student that puts (numerically) all its mass on the teacher's top-k still feels the tail term
    peaked = torch.full((1, 1, 40), -200.0)
    peaked[0, 0, i[0, 0]] = 0.0
    peaked.requires_grad_(True)
    loss = topk_kl(peaked, i[:1, :1], v[:1, :1])
    loss.backward()
    assert torch.isfinite(loss) and loss > 1 and peaked.grad.abs().sum() > 0


# -- the student architecture ---------------------------------------------------------------------------
def tiny_student(kind="frr"):
    from ucformat.student import StudentConfig, StudentForCausalLM

    n = 6 if kind == "frr" else 2
    cfg = StudentConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=n, num_attention_heads=4,
                        num_key_value_heads=4, teacher_hidden_size=32, scales=2 if kind == "frr" else 1,
                        iters=3 if kind == "frr" else 1, tie_word_embeddings=True, student_kind=kind)
    torch.manual_seed(0)
    return StudentForCausalLM(cfg).eval()


def test_frr_student_holds_one_block_and_per_application_gamma_beta():
    m = tiny_student()
    names = dict(m.named_parameters())
    assert {n for n in names if n.startswith("model.layers.")} == {f"model.layers.{k}.{p}" for k in range(6)
                                                                     for p in ("gamma", "beta")}
    assert sum(n.startswith("model.shared.") for n in names) == 9  # q k v o gate up down + 2 norms, once
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied like the teacher
    # gamma/beta act: zeroing an application's gamma changes the output
    ids = torch.randint(0, 300, (1, 9))
    before = m(ids).logits
    with torch.no_grad():
        m.model.layers[3].gamma.zero_()
    assert not torch.allclose(before, m(ids).logits)


@pytest.mark.parametrize("kind", ["frr", "dense"])
def test_student_decodes_with_its_kv_cache_as_without(kind):
    """Each application has its own cache slot: cached greedy decoding equals full forwards."""
    m = tiny_student(kind)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
        full = m(out.sequences).logits[0, ids.shape[1] - 1:-1]
    assert torch.equal(out.sequences[0, ids.shape[1]:], full.argmax(-1))
    assert torch.allclose(torch.stack(out.logits)[:, 0], full, atol=1e-4)


# -- teacher targets ------------------------------------------------------------------------------------
def test_targets_match_the_whole_teacher(tiny_teacher, tmp_path):
    """Targets streamed one layer at a time (and spilled: 0 MiB in memory) equal the whole model's forward."""
    from transformers import AutoModelForCausalLM

    from compressor.targets import TargetSpec, compute

    ids = torch.randint(0, 49152, (3, 16))
    t = compute(tiny_teacher, ids, tmp_path / "t", TargetSpec(topk=5, depths=(1, 2), chunk=2), spill_mb=0,
                progress=False)
    assert len(t.files) == 2 and t.meta["spilled_bytes"] > 0
    got = t.sequences([2, 0], depths=(1, 2))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_teacher), dtype=torch.float32)
    with torch.no_grad():
        out = ref(ids[[2, 0]], output_hidden_states=True)
    logp = torch.log_softmax(out.logits, -1)
    v, i = logp.topk(5, -1)
    assert torch.equal(got["ids"], ids[[2, 0]])
    assert torch.allclose(got["topk_logp"], v, atol=1e-4)
    assert (got["topk_idx"].long() == i).float().mean() > 0.99  # ties may order differently
    # depth 2 is the head's input: the final norm of the last layer's output
    assert torch.allclose(got["hidden.2"].float(), out.hidden_states[-1], atol=2e-2, rtol=1e-2)
    normed1 = ref.model.norm(out.hidden_states[1]).detach()
    assert torch.allclose(got["hidden.1"].float(), normed1, atol=2e-2, rtol=1e-2)
    # a second call with the same settings reuses the files
    mtime = t.files[0].stat().st_mtime_ns
    compute(tiny_teacher, ids, tmp_path / "t", TargetSpec(topk=5, depths=(1, 2), chunk=2), progress=False)
    assert t.files[0].stat().st_mtime_ns == mtime


def test_the_teacher_pass_gives_each_layers_pages_and_heap_back(tiny_teacher, tmp_path, monkeypatch):
    """Like the pack loop: one layer of the teacher resident at a time, not every layer read so far."""
    from compressor.checkpoint import SourceCheckpoint
    from compressor.targets import TargetSpec, compute

    released = []
    real = SourceCheckpoint.release
    monkeypatch.setattr(SourceCheckpoint, "release", lambda self: (released.append(1), real(self)))
    compute(tiny_teacher, torch.randint(0, 49152, (2, 8)), tmp_path / "t", TargetSpec(topk=5, depths=(2,), chunk=2),
            progress=False)
    assert len(released) == 2  # after each of the 2 layers


# -- the pack -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frr_pack(tiny_teacher, tmp_path_factory):
    from compressor.distiller import distill

    dst = tmp_path_factory.mktemp("st") / "frr"
    r = distill(tiny_teacher, dst, small(steps=12, hidden_weight=0.5), progress=False)
    return dst, r


def test_distill_trains_and_writes_a_verifiable_student_pack(frr_pack):
    from ucformat import PackReader
    from ucformat.inspect import verify

    dst, r = frr_pack
    assert r.loss_last < r.loss_first
    assert not (dst / ".uc-work").exists()
    reader = PackReader(dst)
    m = reader.manifest
    assert m.model_type == "uc_student" and "student" in m.requires and m.num_layers == 4
    assert all(e.kind == "raw" for e in m.tensors.values())
    assert set(reader.tensor_names("layers/layer-00002.safetensors")) == {"model.layers.2.gamma", "model.layers.2.beta"}
    assert [str(e) for _, e in verify(reader, deep=True) if e is not None] == []
    s = m.stats
    assert s["trainable_params"] == r.trainable_params > 0
    assert s["body_bytes"] < s["teacher_body_bytes"] * 10 and s["whole_bytes"] == sum(e.stored_bytes for e in
                                                                                         m.tensors.values())


def test_student_pack_loads_generates_and_evaluates(frr_pack, tiny_teacher):
    import ucformat
    from compressor.evaluate import EvalConfig, evaluate

    dst, _ = frr_pack
    model = ucformat.load(dst)
    ids = torch.tensor([[1, 520, 3000, 17]])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert gen.shape == (1, 8)
    r = evaluate(dst, WIKITEXT.read_text(encoding="utf-8"), base=tiny_teacher,
                 cfg=EvalConfig(ctx=64, max_windows=2, articles="17-62"), progress=False)
    assert r.ppl_ratio is not None and 0 <= r.top1_agreement <= 1 and r.kl > 0
    assert r.top1_agreement_last is not None and r.top10_overlap_last is not None
    b = r.bytes
    stats = ucformat.PackReader(dst).manifest.stats
    assert (b["pack_body"], b["pack_whole"]) == (stats["body_bytes"], stats["whole_bytes"])
    assert (b["base_body"], b["base_whole"]) == (stats["teacher_body_bytes"], stats["teacher_whole_bytes"])


def test_eval_last_position_metrics_read_each_windows_last_prediction():
    from compressor.evaluate import TokenStats, compare

    base = torch.arange(6 * 10).reshape(6, 10)  # 2 windows x 3 predictions
    pack = base.clone()
    pack[2] = base[2].flip(0)  # window 0's last prediction: same ten tokens, another order
    pack[4, 0] = -1  # window 1's middle prediction: top-1 differs, 9 of 10 shared
    last = torch.tensor([False, False, True, False, False, True])
    nll = torch.ones(6, dtype=torch.float64)
    r = compare(TokenStats(nll, pack, last=last), TokenStats(nll, base, last=last), ctx=4, windows=2, seconds=0)
    assert r.top1_agreement == pytest.approx(4 / 6) and r.top10_overlap == pytest.approx((5 + 0.9) / 6)
    assert r.top1_agreement_last == 0.5 and r.top10_overlap_last == 1.0


def test_uc_pack_quantizes_a_student_pack(frr_pack, tmp_path):
    """The mechanisms compose: a student pack is a source for `uc pack`, which quantizes its shared block."""
    import ucformat
    from compressor.config import PackConfig
    from compressor.pack import pack
    from ucformat import PackReader
    from ucformat.inspect import verify

    src, _ = frr_pack
    r = pack(src, tmp_path / "q4", PackConfig(bits=4), progress=False)
    reader = PackReader(tmp_path / "q4")
    m = reader.manifest
    assert "student" in m.requires and m.model_type == "uc_student"
    kinds = {n: e.kind for n, e in m.tensors.items()}
    assert kinds["model.shared.mlp.down_proj.weight"] == "quantized" and kinds["model.layers.0.gamma"] == "raw"
    assert kinds["model.embed_tokens.weight"] == "raw"
    assert [str(e) for _, e in verify(reader, deep=True) if e is not None] == []
    assert r.stats["pack_bytes"] < sum(f.bytes for f in PackReader(src).manifest.files.values())
    ids = torch.tensor([[1, 520, 3000, 17, 99]])
    with torch.no_grad():
        raw = ucformat.load(src)(ids).logits
        q = ucformat.load(tmp_path / "q4")(ids).logits
    assert (q.argmax(-1) == raw.argmax(-1)).float().mean() >= 0.6 and torch.isfinite(q).all()


def test_a_student_pack_must_list_the_student_feature(frr_pack, tmp_path):
    from ucformat import PackReader
    from ucformat.errors import ManifestError

    dst, _ = frr_pack
    copy = Path(shutil.copytree(dst, tmp_path / "p"))
    man = json.loads((copy / "manifest.json").read_text())
    man["requires"] = [f for f in man["requires"] if f != "student"]
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match="student"):
        PackReader(copy)


def test_a_frr_config_whose_loop_does_not_match_its_layers_is_refused(frr_pack, tmp_path):
    import hashlib

    from ucformat import PackReader, conformance
    from ucformat.errors import ConfigError

    copy = Path(shutil.copytree(frr_pack[0], tmp_path / "p"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["scales"] = 3  # 3 x 2 applications, 4 layers
    data = json.dumps(cfg).encode()
    (copy / "config.json").write_bytes(data)
    man = json.loads((copy / "manifest.json").read_text())
    man["files"]["config.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="scales \\* iters"):
        conformance.require(PackReader(copy))


def test_dense_baseline_distills(tiny_teacher, tmp_path):
    from compressor.distiller import distill
    from ucformat import PackReader

    r = distill(tiny_teacher, tmp_path / "dense", small(student="dense", layers=2, steps=4), progress=False,
                targets_dir=tmp_path / "shared-targets")
    assert (tmp_path / "shared-targets" / "targets.json").is_file()  # kept for the next student of this teacher
    reader = PackReader(tmp_path / "dense")
    assert reader.manifest.num_layers == 2
    assert any(n.endswith("self_attn.q_proj.weight") for n in reader.tensor_names("layers/layer-00001.safetensors"))
    assert r.loss_last < r.loss_first


def test_block_lr_is_the_shared_blocks_share_of_every_step(tiny_teacher, tmp_path):
    """--block-lr scales the shared block's steps only: at a negligible share the block leaves training as it
    was initialised (up to the pack's bfloat16) while its gammas, betas and projections moved. Both loop settings
    default to 1 / applications (the gammas start there)."""
    from compressor.checkpoint import SourceCheckpoint
    from compressor.distiller import build_student, distill, param_groups, trainable
    from ucformat import PackReader

    cfg = small(block_lr=1e-12, steps=3)
    init = build_student(SourceCheckpoint(tiny_teacher), cfg)
    groups = param_groups(trainable(init, cfg), cfg)
    assert [g["share"] for g in groups] == [1e-12, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in init.model.shared.parameters()}
    assert param_groups(trainable(init, small(student="dense")), small(student="dense"))[0]["share"] == 1.0
    assert all(torch.equal(a.gamma, torch.full((64,), 0.25)) for a in init.model.layers)  # 2 x 2 applications
    default = small()
    student = build_student(SourceCheckpoint(tiny_teacher), default)
    assert [g["share"] for g in param_groups(trainable(student, default), default)] == [0.25, 1.0]
    gamma1 = build_student(SourceCheckpoint(tiny_teacher), small(gamma_init=1.0))
    assert all(torch.equal(a.gamma, torch.ones(64)) for a in gamma1.model.layers)

    distill(tiny_teacher, tmp_path / "s", cfg, progress=False, targets_dir=tmp_path / "t")
    reader = PackReader(tmp_path / "s")
    stored = {**reader.nonlayer_state_dict(torch.float32), **reader.layer_state_dict(0, torch.float32)}
    shared = [n for n, _ in init.named_parameters() if n.startswith("model.shared.")]
    assert shared and all(n in stored for n in shared)
    for name, p in init.named_parameters():
        if name in shared:
            assert torch.equal(stored[name], p.detach().bfloat16().float()), name
    assert not torch.equal(stored["model.layers.0.gamma"], torch.full((64,), 0.25))
    proj = init.model.embed_tokens.proj.weight.bfloat16().float()
    assert not torch.equal(stored["model.embed_tokens.proj.weight"], proj)


def test_asvd_head_is_exact_at_full_rank_and_weights_the_error_by_input_energy():
    from compressor.lowrank_head import asvd_factors

    torch.manual_seed(0)
    w = torch.randn(50, 12)
    scales = torch.ones(12)
    scales[:3] = 30.0  # three loud input channels
    u, v = asvd_factors(w, scales, 12)
    assert torch.allclose(u @ v, w, atol=1e-4)
    x = torch.randn(1000, 12) * scales
    err = lambda a: ((a - w) @ x.T).square().mean().item()  # noqa: E731  output error on inputs of that energy
    u, v = asvd_factors(w, scales, 4)
    plain_u, plain_v = asvd_factors(w, torch.ones(12), 4)
    assert err(u @ v) < 0.5 * err(plain_u @ plain_v)


def test_low_rank_head_on_a_frr_body(tiny_teacher, tmp_path):
    import ucformat
    from compressor.distiller import distill
    from ucformat import PackReader
    from ucformat.inspect import verify

    r = distill(tiny_teacher, tmp_path / "lr", small(steps=4, head_rank=8), progress=False)
    reader = PackReader(tmp_path / "lr")
    shapes = {n: e.shape for n, e in reader.manifest.tensors.items()}
    assert shapes["lm_head.u"] == (49152, 8) and shapes["lm_head.v"] == (8, 64) and "lm_head.weight" not in shapes
    assert [str(e) for _, e in verify(reader, deep=True) if e is not None] == []
    assert r.trainable_params == 8 * (49152 + 64) + sum(
        e.stored_bytes // 2 for n, e in reader.manifest.tensors.items()
        if n not in ("model.embed_tokens.weight", "lm_head.u", "lm_head.v", "lm_head.norm.weight"))
    assert ucformat.load(tmp_path / "lr")(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 49152)


def test_head_alone_fine_tuned_on_the_teachers_body_lowers_its_kl(tiny_teacher, tmp_path):
    """finetune_head: the ASVD head trained on the teacher's own head inputs gets closer to the teacher's
    distribution than the ASVD start, on sequences it did not train on, and two runs give the same factors."""
    from compressor.distiller import training_ids
    from compressor.lowrank_head import asvd_factors, channel_scales, finetune_head
    from compressor.objective import topk_kl
    from compressor.targets import TargetSpec, compute

    cfg = small(steps=30, batch=2, lr=1e-2, samples=10)
    spec = TargetSpec(topk=16, depths=(2,), chunk=4)
    t = compute(tiny_teacher, training_ids(tiny_teacher, cfg), tmp_path / "t", spec, progress=False)
    with safe_open(str(tiny_teacher / "model.safetensors"), framework="pt") as h:
        w = h.get_tensor("model.embed_tokens.weight").float()
    u0, v0 = asvd_factors(w, channel_scales(t), 4)
    train = [i for i in range(t.num_sequences) if i < 8]
    held = t.sequences([8, 9], depths=(2,))

    def kl(u, v):
        return topk_kl(held["hidden.2"].float() @ v.T @ u.T, held["topk_idx"], held["topk_logp"]).item()

    class Only8:  # train on the first 8 sequences; 8 and 9 are held out
        depths, num_sequences = t.depths, len(train)
        sequences = t.sequences

    u, v, stats = finetune_head(u0, v0, Only8, cfg)
    assert stats["loss_last"] < stats["loss_first"]
    assert kl(u, v) < 0.95 * kl(u0, v0)  # measured: 9.23 -> 7.88 nats
    u2, v2, _ = finetune_head(u0, v0, Only8, cfg)
    assert torch.equal(u, u2) and torch.equal(v, v2)


# -- resume after kill -9 -------------------------------------------------------------------------------
def _uc(*args):
    # one thread: a tiny model gains nothing from more, and a CPU shared with other jobs makes spinning threads
    # crawl; the interrupted and the uninterrupted run compute with the same thread count either way
    return subprocess.Popen([sys.executable, "-m", "uc", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _tensors(pack: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in [pack / "nonlayer.safetensors", *sorted((pack / "layers").glob("*.safetensors"))]:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_does(tiny_teacher, tmp_path):
    cfg = small(steps=30, save_every=3, samples=16)
    args = cli_args(cfg)
    whole = _uc("distill", str(tiny_teacher), str(tmp_path / "whole"), *args)
    killed = _uc("distill", str(tiny_teacher), str(tmp_path / "killed"), *args)
    state = tmp_path / "killed" / ".uc-work" / "train-state.safetensors"
    deadline = time.monotonic() + 240
    step = 0
    while time.monotonic() < deadline and killed.poll() is None:
        if state.is_file():
            try:
                with safe_open(str(state), framework="pt") as h:
                    step = int(h.metadata()["step"])
            except Exception:  # noqa: BLE001  (renamed into place between our stat and open)
                step = 0
            if step >= 6:
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, f"not killed mid-training (step {step}): {killed.stderr.read()[-2000:]}"
    assert not (tmp_path / "killed" / "manifest.json").exists() and step < cfg.steps
    out, err = _uc("distill", str(tiny_teacher), str(tmp_path / "killed"), *args, "--resume", "--json").communicate()
    assert err == "" or "Traceback" not in err, err
    result = json.loads(out)
    assert result["steps_resumed"] >= 6 and result["steps_resumed"] + result["steps_done"] == cfg.steps
    assert whole.wait() == 0, whole.stderr.read()
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# -- CLI errors -----------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tiny_teacher, tmp_path, capsys):
    from uc.cli import main

    def run(*args):
        capsys.readouterr()
        assert main(["distill", *args]) == 2
        return capsys.readouterr().err.strip().splitlines()

    args = cli_args(small(steps=2))
    err = run(str(tiny_teacher), str(tmp_path / "a"), *args, "--width", "100")
    assert len(err) == 1 and err[0].startswith("uc: error: --width 100")
    err = run(str(tiny_teacher), str(tmp_path / "a"), *args, "--block-lr", "0")
    assert len(err) == 1 and err[0].startswith("uc: error: --block-lr 0")
    err = run(str(tiny_teacher), str(tmp_path / "b"), "--steps", "2")
    assert len(err) == 1 and "--calib" in err[0]
    err = run(str(tmp_path / "nowhere"), str(tmp_path / "c"), *args)
    assert len(err) == 1 and "config.json" in err[0]
    assert not (tmp_path / "c").exists()
    # an unfinished run resumed with other settings is refused, naming the setting
    (tmp_path / "d").mkdir()
    from ucformat.writer import PackWriter

    PackWriter(tmp_path / "d", {"distill": {"width": 128}, "teacher": str(tiny_teacher.resolve())})
    err = run(str(tiny_teacher), str(tmp_path / "d"), *args, "--resume")
    assert len(err) == 1 and "cannot resume" in err[0] and "distill" in err[0]
