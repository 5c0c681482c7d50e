"""Budgeted allocation: exact costs, the knapsack solver, presets, and --target-bpw end to end."""

import json
import subprocess
import sys

import pytest
import torch

from compressor import allocate
from compressor.allocate import Choice, Option
from compressor.config import PRESETS, build_config
from compressor.pack import pack
from compressor.qweight import quantize_matrix
from compressor import lowrank, overlay
from ucformat import PackReader


@pytest.mark.parametrize("bits,rank,rows,dtype", [(2, 0, 0, "int8"), (3, 4, 2, "int8"), (5, 8, 0, "float16"), (8, 0, 3, "int8")])
def test_stored_bits_is_exact(bits, rank, rows, dtype):
    w = torch.randn(20, 70)
    q = quantize_matrix(w, bits, 32, "gsq", lowrank_dtype=dtype)
    if rows:
        overlay.add_overlay(q, w, rows, None)
    if rank:
        q.u, q.v = lowrank.weighted_svd(w - q.base(), rank)
    assert q.freeze().stored_bits() == allocate.stored_bits((20, 70), Choice(bits, rank, rows), 32, dtype)


def _opts(losses: dict[int, float], numel=1000):
    return [Option(Choice(b), b * numel, l) for b, l in losses.items()]


def test_allocate_respects_the_budget_and_prefers_sensitive_tensors():
    opts = {
        "sensitive": _opts({2: 100.0, 3: 25.0, 4: 6.0, 5: 1.5, 6: 0.4, 8: 0.0}),
        "robust": _opts({2: 1.0, 3: 0.25, 4: 0.06, 5: 0.015, 6: 0.004, 8: 0.0}),
    }
    plan = allocate.allocate(opts, budget_bits=8000)
    assert plan["sensitive"].bits > plan["robust"].bits
    assert sum(b.bits * 1000 for b in plan.values()) <= 8000
    # brute force agrees on this small instance
    best = min(((a, b) for a in allocate.BITS for b in allocate.BITS if (a + b) * 1000 <= 8000),
               key=lambda ab: dict(zip(allocate.BITS, [100.0, 25.0, 6.0, 1.5, 0.4, 0.0]))[ab[0]]
               + dict(zip(allocate.BITS, [1.0, 0.25, 0.06, 0.015, 0.004, 0.0]))[ab[1]])
    assert (plan["sensitive"].bits, plan["robust"].bits) == best
    with pytest.raises(allocate.BudgetError, match="raise --target-bpw"):
        allocate.allocate(opts, budget_bits=3000)


def test_options_price_overlays_and_ranks():
    w = torch.randn(64, 96)
    w[3] *= 30
    p = allocate.profile(w, None, 32, "gsq", False, [8])
    opts = allocate.options(p, 32, "int8", [8], overlay=True)
    two = {(o.choice.rank, o.choice.overlay_rows): o for o in opts if o.choice.bits == 2}
    assert (0, 1) in two and two[(0, 1)].loss < two[(0, 0)].loss  # the outlier row is worth restoring
    assert two[(8, 0)].loss < two[(0, 0)].loss and two[(8, 0)].cost > two[(0, 0)].cost
    assert not any(o.choice.overlay_rows for o in opts if o.choice.bits > 3)


def test_presets_and_flags_resolve_in_order():
    assert build_config("prod-5").target_bpw == 5.0
    assert build_config("prod-5", target_bpw=4.5).target_bpw == 4.5
    assert build_config("seed").rank == 32 and build_config("seed").calib.steps == 200
    assert build_config(None, steps=3).calib.steps == 3
    assert set(PRESETS) >= {"lossless-6", "prod-5", "light-4", "aggressive-3", "extreme-2.8"}
    with pytest.raises(ValueError, match="--preset"):
        build_config("nope")
    # the block-scale search is part of what --resume checks (stored scales depend on it), for gsq only
    assert build_config(scale_search=True).settings() != build_config().settings()
    assert build_config(codec="uniform", scale_search=True).settings() == build_config(codec="uniform").settings()
    # searched by default with calibration data, absmax without (plain packs as the foundation measured them)
    assert build_config(file="calib.txt").searches_scales and not build_config().searches_scales
    assert not build_config(file="calib.txt", scale_search=False).searches_scales
    assert build_config(file="calib.txt").settings() == build_config(file="calib.txt", scale_search=True).settings()


@pytest.mark.parametrize("target", [2.8, 4.0])
def test_target_bpw_is_met_without_data(tiny_templates, tmp_path, target):
    dst = tmp_path / "p"
    r = pack(tiny_templates("qwen2"), dst, build_config(target_bpw=target, block_size=32), progress=False)
    assert r.stats["bpw_allin"] <= target
    assert r.stats["bpw_allin"] > target - 0.6  # and the budget is used
    bits = {e.bits for e in PackReader(dst).manifest.tensors.values() if e.kind == "quantized"}
    assert len(bits) > 1  # mixed


def test_uc_info_shows_the_allocation(tiny_templates, tmp_path):
    dst = tmp_path / "p"
    pack(tiny_templates("llama"), dst, build_config(target_bpw=3.5, block_size=32), progress=False)
    out = subprocess.run([sys.executable, "-m", "uc", "info", str(dst)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "target_bpw 3.5" in out.stdout and "-bit codes:" in out.stdout
    info = json.loads(subprocess.run([sys.executable, "-m", "uc", "info", str(dst), "--json"],
                                     capture_output=True, text=True).stdout)
    alloc = info["allocation"]
    assert sum(a["tensors"] for a in alloc) == sum(t["kind"] == "quantized" for t in info["tensors"])
    assert abs(sum(a["params_share"] for a in alloc) - 1) < 1e-9
