"""The `uc` command line: one-line errors with non-zero exits, verify exit codes, info and --help."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import replace_file
from ucformat.manifest import layer_file


def uc(*args):
    return subprocess.run([sys.executable, "-m", "uc", *map(str, args)], capture_output=True, text=True)


def _one_line_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("uc: error:"), out.stderr
    for n in needles:
        assert n in lines[0]


def test_pack_info_verify(tiny_llama, tmp_path):
    dst = tmp_path / "p"
    out = uc("pack", tiny_llama, dst, "--bits", "5", "--block-size", "32", "--codec", "uniform", "-q")
    assert out.returncode == 0, out.stderr
    assert "bpw_allin" in out.stdout and "peak process memory" in out.stdout
    info = json.loads(uc("info", dst, "--json").stdout)
    assert info["quant"] == {"codec": "uniform", "bits": 5, "block_size": 32, "scale_bits": 16, "scales": "absmax",
                             "rotation": 0}
    # all-in: 5-bit codes + one fp16 scale per 32 weights + the 32-level fp32 grid, per tensor
    q = [t for t in info["tensors"] if t["kind"] == "quantized"]
    bits = sum(r * (-(-c // 8) * 5 * 8 + -(-c // 32) * 16) + 32 * 32 for r, c in (t["shape"] for t in q))
    assert info["bpw_allin"] == pytest.approx(bits / sum(r * c for r, c in (t["shape"] for t in q)))
    assert 5.5 < info["bpw_allin"] < 5.8
    assert info["ratio"] > 1.5
    assert uc("verify", dst, "--deep").returncode == 0
    # a reader that goes away (`uc info PACK | head -1`; `true` reads nothing, so the pipe is surely closed
    # before uc writes): a quiet exit 141, as for SIGPIPE, no error text
    piped = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" -m uc info "$1" | true', sys.executable, str(dst)],
                           capture_output=True, text=True)
    assert (piped.returncode, piped.stderr) == (141, ""), piped
    p = dst / layer_file(1)
    p.write_bytes(p.read_bytes()[:-2] + b"xx")
    bad = uc("verify", dst)
    assert bad.returncode == 1 and "layer-00001" in bad.stdout and "FAIL" in bad.stdout


@pytest.mark.parametrize("args,needles", [
    (("pack", "/nonexistent", "/tmp/x"), ["/nonexistent", "config.json"]),
    (("info", "/nonexistent"), ["not a uc pack"]),
    (("verify", "/tmp"), ["not a uc pack"]),
])
def test_bad_input_is_one_line(args, needles):
    _one_line_error(uc(*args), *needles)


def test_bad_flags(tiny_llama, tmp_path):
    out = uc("pack", tiny_llama, tmp_path / "p", "--bits", "7")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr
    _one_line_error(uc("pack", tiny_llama, tmp_path / "q", "--block-size", "3"), "--block-size")
    _one_line_error(uc("pack", tiny_llama, tmp_path / "r", "--e2e-warmup", "-1"), "--e2e-warmup")
    _one_line_error(uc("pack", tiny_llama, tmp_path / "s", "--e2e-len", "4"), "--e2e-len")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _one_line_error(uc("pack", tmp_path, tmp_path / "out"), "never loaded")


def test_help_explains():
    out = uc("pack", "--help")
    assert out.returncode == 0 and "--resume" in out.stdout and "default 4" in out.stdout


# -- damaged config.json and tokenizer files: every command ends in one line -----------------------------------
def _config_with(pack, **changes):
    cfg = json.loads((pack / "config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    return json.dumps(cfg).encode()


# damage -> (how, what the error line says); "consistent" ones refresh the manifest's size and hash
DAMAGE = {
    "config not JSON": (lambda p: replace_file(p, "config.json", b"{nope"), "config.json: not JSON"),
    "config without model_type": (lambda p: replace_file(p, "config.json", _config_with(p, model_type=None)),
                                  "Should have a `model_type` key"),
    "config with a string size": (lambda p: replace_file(p, "config.json", _config_with(p, hidden_size="64")),
                                  "config.json: not a config transformers can load (StrictDataclassFieldValidationError"),
    "config of another width": (lambda p: replace_file(p, "config.json", _config_with(p, hidden_size=128)),
                                "needs [49152, 128]"),
    "config altered": (lambda p: replace_file(p, "config.json", _config_with(p, rope_theta=1.0), consistent=False),
                       "config.json: size is"),
    "tokenizer unloadable": (lambda p: replace_file(p, "tokenizer.json", b"{}"),
                             "the pack's tokenizer cannot be loaded (KeyError: 'added_tokens')"),
    "tokenizer altered": (lambda p: replace_file(p, "tokenizer.json", b"{}", consistent=False), "tokenizer.json: size is"),
    "tokenizer missing": (lambda p: (p / "tokenizer.json").unlink(), "tokenizer.json: file listed in the manifest is "
                                                                     "missing"),
}


@pytest.fixture(scope="module")
def damaged(tiny_chat_pack, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for label, (how, _) in DAMAGE.items():
        pack = Path(shutil.copytree(tiny_chat_pack, root / label.replace(" ", "-")))
        how(pack)
        out[label] = pack
    return out


def run_main(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """`uc ARGS` in this process (a subprocess each would cost seconds of imports): its exit code and output."""
    import logging

    from uc.cli import main

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # no root handler bound to capsys' stream
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("label", DAMAGE)
@pytest.mark.parametrize("command", ["generate", "eval", "info", "verify", "chat"])
def test_damaged_config_or_tokenizer_ends_in_one_line(command, label, damaged, tmp_path, monkeypatch, capsys):
    pack, needle = damaged[label], DAMAGE[label][1]
    if command == "info" and label.startswith("tokenizer"):
        assert run_main(monkeypatch, capsys, "info", pack).returncode == 0  # info shows the pack; it needs no tokenizer
        return
    if command == "verify":
        out = run_main(monkeypatch, capsys, "verify", pack, "--deep")
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert needle in next(ln for ln in out.stdout.splitlines() if ln.startswith("FAIL"))
        return
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 20)
    args = {"generate": [pack, "Hi", "--max-tokens", "2"],
            "eval": [pack, "--text", text, "--max-windows", "1", "--ctx", "16", "-q"], "info": [pack],
            "chat": [pack]}[command]  # (`uc serve`: tests/test_server_faults.py, a process of its own)
    _one_line_error(run_main(monkeypatch, capsys, command, *args), needle)


def test_undamaged_pack_runs_every_command(tiny_chat_pack, tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 20)
    assert run_main(monkeypatch, capsys, "generate", tiny_chat_pack, "Hi", "--max-tokens", "2").returncode == 0
    assert run_main(monkeypatch, capsys, "eval", tiny_chat_pack, "--text", text, "--max-windows", "1", "--ctx", "16",
                    "-q").returncode == 0
    assert run_main(monkeypatch, capsys, "info", tiny_chat_pack).returncode == 0
    assert run_main(monkeypatch, capsys, "verify", tiny_chat_pack, "--deep").returncode == 0


def test_damaged_pack_is_one_line_in_a_real_process(damaged):
    _one_line_error(uc("generate", damaged["config without model_type"], "Hi"), "Should have a `model_type` key")
