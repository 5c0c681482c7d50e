"""The `uc` command line: one-line errors with non-zero exits, verify exit codes, info and --help."""

import json
import subprocess
import sys

import pytest

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
