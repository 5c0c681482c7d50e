"""Input rotation (SPEC.md 2.5): the transform against a slow reference, the stored signs' bits, the
reconstruction order, the compressor's use of it, and the format's rules on adversarial packs."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compressor import allocate, codecs
from compressor.allocate import Choice
from compressor.config import build_config
from compressor.pack import pack
from compressor.qweight import QWeight, int8_rows, quantize_matrix
from conftest import rewrite_stored
from ucformat import PackReader, errors, qtensor
from ucformat import rotation as rot
from ucformat.inspect import verify
from ucformat.manifest import MANIFEST_NAME


def reference_rotation(signs: torch.Tensor, block: int) -> torch.Tensor:
    """R = diag(s) blockdiag(H_n / sqrt(n)) [C, C] in float64, H built entry by entry as the spec defines
    it: H[i, j] = (-1)^popcount(i & j) (the Sylvester construction)."""
    n = block
    h = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=torch.float64)
    return signs.double().unsqueeze(1) * torch.block_diag(*[h / math.sqrt(n)] * (signs.numel() // n))


def outlier_matrix(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, 3] *= 25  # an outlier input channel: the case rotation is for
    x = torch.randn(1024, cols, generator=g)
    x[:, 7] *= 6
    return w, x.T @ x / x.shape[0]


@pytest.mark.parametrize("block", rot.BLOCKS)
def test_transform_matches_the_spec_reference(block):
    cols = 2 * block
    s = rot.random_signs(cols, 3, "t")
    w = torch.randn(5, cols, dtype=torch.float64)
    r = reference_rotation(s, block)
    assert torch.allclose(rot.rotate(w, s, block), w @ r, atol=1e-12)
    assert torch.allclose(rot.unrotate(w, s, block), w @ r.T, atol=1e-12)
    assert torch.allclose(rot.unrotate(rot.rotate(w, s, block), s, block), w, atol=1e-12)
    g = torch.randn(cols, 2 * cols, dtype=torch.float64)
    g = g @ g.T
    assert torch.allclose(rot.rotate_gram(g, s, block), r.T @ g @ r, atol=1e-9)


def test_sign_bits_are_pinned():
    s = torch.ones(11)
    s[[0, 9, 10]] = -1
    packed = rot.pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b00000001, 0b00000110]  # first column lowest bit
    assert torch.equal(rot.unpack_signs(packed, 11), s)
    lead = torch.stack([s, -s])  # [*lead, C]
    assert torch.equal(rot.unpack_signs(rot.pack_signs(lead), 11), lead)
    # reproducible from (seed, name), different across names
    assert torch.equal(rot.random_signs(64, 0, "a"), rot.random_signs(64, 0, "a"))
    assert not torch.equal(rot.random_signs(64, 0, "a"), rot.random_signs(64, 0, "b"))


def test_reconstruction_rotates_back_before_overlay_and_low_rank():
    """W = unrotate(grid[code] * scale), overlay rows replaced, + U V (SPEC.md 2.2): against float64 by hand."""
    w, h = outlier_matrix()
    q = quantize_matrix(w, 4, 64, "gsq", h, rotation=64)
    q.ov_rows = torch.tensor([2, 40])
    q.ov_q, q.ov_s = int8_rows(w[q.ov_rows])
    q.u, q.v = torch.randn(64, 4) * 0.01, torch.randn(4, 256) * 0.01
    t = q.freeze()
    assert t.rotation == 64 and t.rot_signs.shape == (32,) and "rot_signs" in t.parts()
    levels = (t.grid.double()[q.codes.long()] * t.scales.double().repeat_interleave(64, 1))
    want = levels @ reference_rotation(q.rot_signs, 64).T
    want[q.ov_rows] = (t.ov_q.double() * t.ov_s.double().unsqueeze(1))
    u = t.lr_uq.double() * t.lr_us.double().unsqueeze(1)
    v = t.lr_vq.double() * t.lr_vs.double().unsqueeze(1)
    want = want + u @ v
    for native in (True, False):
        assert torch.allclose(qtensor.dequantize(t, native=native).double(), want, atol=1e-5)
    # the working form reconstructs the same, and round-trips through storage
    assert torch.allclose(q.weight(), qtensor.dequantize(t), atol=1e-5)
    back = QWeight.from_stored(t)
    assert back.rotation == 64 and torch.equal(back.rot_signs, q.rot_signs)
    assert torch.equal(qtensor.dequantize(back.freeze()), qtensor.dequantize(t))


def test_rotation_lowers_the_output_error_of_outlier_weights():
    w, h = outlier_matrix()

    def err(rotation: int) -> float:
        d = quantize_matrix(w, 3, 64, "gsq", h, rotation=rotation).weight() - w
        return (torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T)).item()

    plain, rotated = err(0), err(64)
    assert rotated < 0.8 * plain, (plain, rotated)
    # plain codec too (no Gram matrix: nearest level)
    e0 = (qtensor.dequantize(codecs.quantize(w, 3, 64, "gsq")) - w).norm()
    e1 = (qtensor.dequantize(codecs.quantize(w, 3, 64, "gsq", rotation=64, name="x")) - w).norm()
    assert e1 < e0


@pytest.mark.parametrize("shape", [(64, 256), (2, 48, 128)])
def test_signs_count_in_the_bits_and_the_allocator_prices_them(shape):
    w = torch.randn(*shape)
    q = codecs.quantize(w, 4, 64, "gsq", rotation=64, name="w")
    plain = codecs.quantize(w, 4, 64, "gsq")
    lead = math.prod(shape[:-2])
    assert q.stored_bits() - plain.stored_bits() == lead * rot.packed_bytes(shape[-1]) * 8
    assert allocate.stored_bits(shape, Choice(4), 64, "int8", 16, 64) == q.stored_bits()


def test_columns_that_do_not_split_are_left_unrotated():
    w = torch.randn(32, 96)  # 96 inputs: no blocks of 64
    assert quantize_matrix(w, 4, 32, "gsq", rotation=64).rotation == 0
    assert codecs.quantize(w, 4, 32, "gsq", rotation=64).rotation == 0
    assert quantize_matrix(w, 4, 32, "gsq", rotation=32).rotation == 32


@pytest.fixture(scope="module")
def rotated_pack(tiny_templates, tmp_path_factory):
    dst = tmp_path_factory.mktemp("rot") / "pack"
    pack(tiny_templates("llama"), dst, build_config(bits=4, rotation=32), progress=False)
    return dst


def test_rotated_pack_reads_verifies_and_reconstructs(rotated_pack, tiny_templates, tmp_path):
    r = PackReader(rotated_pack)
    assert "rotation" in r.manifest.requires and r.manifest.quant["rotation"] == 32
    q = [e for e in r.manifest.tensors.values() if e.kind == "quantized"]
    assert q and all(e.rotation == 32 for e in q)  # 64 and 96 inputs both split into 32s
    assert all(err is None for _, err in verify(r, deep=True))
    name = "model.layers.0.mlp.down_proj.weight"
    assert name + ".rsigns" in load_file(str(rotated_pack / r.manifest.tensors[name].file))
    # the reader gives the weight rotated back: close to the source, not to W R
    from compressor.checkpoint import SourceCheckpoint

    src = SourceCheckpoint(tiny_templates("llama"))
    got = r.layer_state_dict(0)[name].float()
    ref = src.get(name).float()
    assert (got - ref).norm() / ref.norm() < 0.15
    plain = tmp_path / "plain"
    pack(tiny_templates("llama"), plain, build_config(bits=4), progress=False)
    p = PackReader(plain)
    assert "rotation" not in p.manifest.requires and p.manifest.quant["rotation"] == 0
    assert r.manifest.stats["bpw_allin"] > p.manifest.stats["bpw_allin"]  # the signs are counted


@pytest.mark.parametrize("damage,match", [
    (lambda t, n: t.pop(n + ".rsigns"), r"\.rsigns.*missing"),
    (lambda t, n: t.__setitem__(n + ".rsigns", t[n + ".rsigns"][:-1].clone()), r"\.rsigns.*expected"),
    (lambda t, n: t.__setitem__(n + ".rsigns", t[n + ".rsigns"].to(torch.int8)), r"\.rsigns.*expected torch\.uint8"),
])
def test_bad_signs_name_the_tensor(rotated_pack, tmp_path, damage, match):
    dst = shutil.copytree(rotated_pack, tmp_path / "p")
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite_stored(dst, name, lambda t: damage(t, name))
    with pytest.raises(errors.TensorError, match=match):
        PackReader(dst).read_quantized(name)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(requires=[f for f in m["requires"] if f != "rotation"]), "rotation"),
    (lambda m: m["tensors"]["model.layers.0.mlp.down_proj.weight"].update(rotation=64), "rotation 64"),
    (lambda m: m["tensors"]["model.layers.0.mlp.down_proj.weight"].update(rotation=48), "rotation 48"),
    (lambda m: m["tensors"]["model.norm.weight"].update(rotation=32), "rotation 32"),
])
def test_manifest_rules_for_rotation(rotated_pack, tmp_path, edit, match):
    dst = shutil.copytree(rotated_pack, tmp_path / "p")
    m = json.loads((dst / MANIFEST_NAME).read_text())
    edit(m)
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(errors.ManifestError, match=match):
        PackReader(dst)


def test_calibration_rotates_by_default_and_the_flag_turns_it_off(tiny_templates, tmp_path):
    assert build_config(file="x.txt").rotation_block == rot.DEFAULT_BLOCK
    assert build_config(file="x.txt", rotation=0).rotation_block == 0
    assert build_config().rotation_block == 0 and build_config(rotation=16).rotation_block == 16
    with pytest.raises(ValueError, match="--rotation"):
        build_config(rotation=48)
    out = subprocess.run([sys.executable, "-m", "uc", "pack", str(tiny_templates("llama")), str(tmp_path / "p"),
                          "--rotation", "48"], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("uc: error: --rotation must be"), out.stderr


def test_the_cached_transform_serves_training_after_inference():
    """The reader may build the Hadamard matrix first under inference_mode (the server, uc bench-run); the
    compressor's training in the same process must still be able to save it for backward."""
    rot.hadamard.cache_clear()
    with torch.inference_mode():
        rot.unrotate(torch.randn(2, 64), torch.ones(64), 64)
    w = torch.randn(3, 64, requires_grad=True)
    rot.unrotate(w, rot.random_signs(64, 0), 64).square().sum().backward()
    assert w.grad is not None and not rot.hadamard(64).is_inference()
