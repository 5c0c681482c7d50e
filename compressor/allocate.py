"""Budgeted allocation: per tensor, the code width, low-rank rank and overlay rows that minimise the
estimated calibration loss under an all-in bits-per-weight budget.

Loss model. Quantizing linear t with residual E adds to the calibration NLL, to second order,
    D_t = sum_r f_r * e_r H e_r^T
with H = E[x x^T] of its inputs and f_r = E[(dL/dy_r)^2] the (empirical Fisher) sensitivity of its
output r. `profile` measures e_r H e_r^T on a fixed sample of rows for every code width (the rounding
as the pack will do it), and the share of weighted residual energy each rank removes; the Fisher
weights arrive later (a backward pass) and enter in `options`. Without calibration data H = I and
f = 1: plain weight MSE.

Costs are exact stored bits (codes, scales, grid, factors, overlay rows). `allocate` solves the
multiple-choice knapsack by Lagrangian relaxation (bisection on the price of a bit), then spends any
slack greedily on the best loss-per-bit upgrades, so the achieved bpw_allin is <= the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ucformat import bitpack, scalecodes
from ucformat import rotation as rot

from . import codecs, gptq, lowrank
from .overlay import row_bits
from .qweight import fit_grid, rotated_group

BITS = bitpack.WIDTHS
# 2-bit codes are offered only to budgets less than this many bits above all-3-bit codes (with their
# scales). The quadratic loss model underrates them: at a 4.0 bpw budget it chose ~25 two-bit tensors
# and the pack came out worse (SmolLM2 ppl ratio 1.22-1.25) than with 3 bits as the floor (1.17-1.18).
TWO_BIT_MARGIN = 0.25
RANKS = (8, 16, 32, 64, 128)  # ranks considered, up to the configured maximum
OVERLAY_SHARES = (1 / 128, 1 / 64, 1 / 32, 1 / 16)  # row shares considered for tensors of <= 3 bits
OVERLAY_MAX_BITS = 3
SAMPLE_ROWS = 64  # rows profiled per tensor
PROFILE_GRID_SAMPLES = 1 << 14  # values the profile's k-means grids are fitted on
RANK_PROBE_BITS = 4  # code width whose residual spectrum prices every rank option


@dataclass(frozen=True)
class Choice:
    bits: int
    rank: int = 0
    overlay_rows: int = 0


@dataclass
class Profile:
    """What the allocator knows of one tensor. shape [*lead, R, C]."""

    shape: tuple[int, ...]
    rows: torch.Tensor | None = None  # [m] sampled row indices
    row_err: dict[int, torch.Tensor] = field(default_factory=dict)  # bits -> [m] e_r H e_r^T (as rounded)
    row_err_all: dict[int, torch.Tensor] = field(default_factory=dict)  # bits <= 3 -> [R], nearest rounding
    captured: dict[int, dict[int, float]] = field(default_factory=dict)  # bits -> rank -> share removed
    fisher: torch.Tensor | None = None  # [R] output sensitivities (None: 1)
    fixed: Choice | None = None  # tensors without a profile (3-D stacks) get this choice
    rotation: int = 0  # Hadamard block of the input rotation it was profiled (and will be stored) with

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def stored_bits(shape: tuple[int, ...], c: Choice, block_size: int, lowrank_dtype: str, scale_bits: int = 16,
                rotation: int = 0) -> int:
    """Exact bits the pack stores for a tensor of this shape under choice c (QuantizedTensor.stored_bits)."""
    *lead, rows, cols = shape
    n = math.prod(lead)
    bits = (rows * bitpack.packed_row_bytes(cols, c.bits) * 8 + 2**c.bits * 32
            + scalecodes.storage_bits(rows, -(-cols // block_size), scale_bits))
    if rotation:
        bits += rot.packed_bytes(cols) * 8
    if c.rank:
        per = 16 if lowrank_dtype == "float16" else 8
        bits += (rows + cols) * c.rank * per + (0 if lowrank_dtype == "float16" else (rows + c.rank) * 16)
    bits += c.overlay_rows * row_bits(cols)
    return n * bits


def profile(w: torch.Tensor, h: torch.Tensor | None, block_size: int, codec: str, use_gptq: bool,
            ranks: list[int], bits_options=BITS, seed: int = 0, scale_bits: int = 16, rotation: int = 0,
            search: bool = False) -> Profile:
    """Measure one matrix w [R, C] (h: its mean input Gram [C, C] or None) at every code width."""
    return profile_group({"": w}, h, block_size, codec, use_gptq, ranks, bits_options, seed, scale_bits, rotation,
                         search)[""]


def profile_group(ws: dict[str, torch.Tensor], h: torch.Tensor | None, block_size: int, codec: str,
                  use_gptq: bool, ranks: list[int], bits_options=BITS, seed: int = 0,
                  scale_bits: int = 16, rotation: int = 0, search: bool = False) -> dict[str, Profile]:
    """Profiles of matrices that share one input (and h): their GPTQ roundings run as one pass. With
    `rotation`, measured in the rotated basis the pack will round in (errors e H e^T are the same in
    either basis, so every number below keeps its meaning)."""
    ws, h, signs = rotated_group(ws, h, rotation, seed)
    rotation = rotation if signs is not None else 0
    col = torch.diagonal(h).clamp_min(0) if h is not None else None
    probe = RANK_PROBE_BITS if RANK_PROBE_BITS in bits_options else bits_options[len(bits_options) // 2]
    profiles, grids, samples, jobs, owners = {}, {}, {}, [], []
    for name, w in ws.items():
        w = ws[name] = w.float()
        rows, cols = w.shape
        g = torch.Generator().manual_seed(seed)
        m = min(rows, SAMPLE_ROWS)
        sample = torch.sort(torch.randperm(rows, generator=g)[:m]).values.to(w.device)
        samples[name] = w[sample]
        grids[name] = {b: fit_grid(w, b, block_size, codec, col, PROFILE_GRID_SAMPLES, scale_bits) for b in bits_options}
        profiles[name] = Profile(shape=(rows, cols), rows=sample.cpu(), rotation=rotation)
        # The sampled rows at every width; with ranks to price, also every row at RANK_PROBE_BITS: the
        # share a rank removes is measured on that residual (as the pack will round it) and used for
        # every width, the rounding noise having about the same spectrum at each, only its level differing.
        jobs += [(samples[name], grids[name][b]) for b in bits_options] + ([(w, grids[name][probe])] if ranks else [])
        owners += [(name, b) for b in bits_options] + ([(name, None)] if ranks else [])
    deq = _round_all(jobs, h if use_gptq else None, block_size, scale_bits, search, col)
    for (name, b), d in zip(owners, deq):
        p = profiles[name]
        if b is not None:
            p.row_err[b] = _row_err(samples[name] - d, h)
        else:
            shares = lowrank.captured(ws[name] - d, ranks, h)
            p.captured = {bb: shares for bb in bits_options}
    # Which rows an overlay would take, and how much of the error they hold, needs every row: nearest
    # rounding (cheap) gives the shape of that distribution; the sampled rows give its level.
    low = [b for b in bits_options if b <= OVERLAY_MAX_BITS]
    for name, w in ws.items():
        for b, d in zip(low, _round_all([(w, grids[name][b]) for b in low], None, block_size, scale_bits)):
            profiles[name].row_err_all[b] = _row_err(w - d, h)
    return profiles


def _round_all(jobs: list[tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor | None,
               block_size: int, scale_bits: int = 16, search: bool = False,
               col: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Dequantized roundings of each (rows [n, C], grid): GPTQ in one pass with h, else nearest level;
    search: block scales searched as the pack will (codecs.fitted_scales, columns weighted by col)."""
    out = []
    if h is None:
        for x, grid in jobs:
            scales = codecs.fitted_scales(x, grid, block_size, col, scale_bits, search)
            out.append(grid[codecs.nearest(codecs.normalise(x, scales, block_size), grid)]
                       * _expand(scales, block_size, x.shape[1]))
        return out
    for (x, grid), (codes, scales) in zip(jobs, gptq.round_many(jobs, h, block_size, scale_bits=scale_bits,
                                                                search=search)):
        out.append(grid[codes.long()] * _expand(scales, block_size, x.shape[1]))
    return out


def _expand(scales: torch.Tensor, block_size: int, cols: int) -> torch.Tensor:
    return scales.float().repeat_interleave(block_size, 1)[:, :cols]


def _row_err(e: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    e = e.float()
    if h is None:
        return e.square().sum(1).cpu()
    return ((e @ h.float().to(e.device)) * e).sum(1).clamp_min(0).cpu()


@dataclass(frozen=True)
class Option:
    choice: Choice
    cost: int  # stored bits
    loss: float  # estimated calibration-loss increase


def options(p: Profile, block_size: int, lowrank_dtype: str, ranks: list[int], overlay: bool,
            zero_rank: bool = True, scale_bits: int = 16) -> list[Option]:
    """Every choice for one tensor with its exact cost and estimated loss (rank 0 among them if zero_rank)."""
    if p.fixed is not None:
        return [Option(p.fixed, stored_bits(p.shape, p.fixed, block_size, lowrank_dtype, scale_bits, p.rotation), 0.0)]
    rows, cols = p.shape[-2:]
    m = len(p.rows)
    f = p.fisher[p.rows].float() if p.fisher is not None else torch.ones(m)
    out = []
    for b, err in p.row_err.items():
        total = (err.float() * f).sum().item() * rows / m  # estimated over all rows
        overlays = [0]
        if overlay and b in p.row_err_all:
            overlays += [max(1, round(s * rows)) for s in OVERLAY_SHARES]
            every = p.row_err_all[b].float() * (p.fisher.float() if p.fisher is not None else 1.0)
            top = torch.sort(every, descending=True).values.cumsum(0)
            all_sum = max(top[-1].item(), 1e-30)
        for k in overlays:
            base = total * (1 - top[k - 1].item() / all_sum) if k else total
            for r in ([0] if zero_rank else []) + list(ranks):
                share = p.captured.get(b, {}).get(r, 0.0) if r else 0.0
                c = Choice(b, min(r, rows, cols), k)
                out.append(Option(c, stored_bits(p.shape, c, block_size, lowrank_dtype, scale_bits, p.rotation),
                                  base * (1 - share)))
    return out


def widths(target_bpw: float, three_bit_bpw: float) -> tuple[int, ...]:
    """Code widths the allocator may use under this budget, given the all-in bpw of 3-bit codes everywhere
    (scales and grids included: about 3.25 at block 64 with float16 scales, 3.15 with 8-bit ones)."""
    if target_bpw < three_bit_bpw + TWO_BIT_MARGIN:
        return BITS
    return tuple(b for b in BITS if b > 2)


class BudgetError(ValueError):
    pass


def allocate(opts: dict[str, list[Option]], budget_bits: float) -> dict[str, Choice]:
    """The choice per tensor minimising total loss with total cost <= budget_bits."""
    names = list(opts)
    cheapest = sum(min(o.cost for o in opts[n]) for n in names)
    if cheapest > budget_bits:
        raise BudgetError(f"budget too small: the cheapest allocation of {len(names)} tensors needs {cheapest:,} "
                          f"bits, the budget is {budget_bits:,.0f}; raise --target-bpw")

    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts[n], key=lambda o: (o.loss + lam * o.cost, o.cost)) for n in names}

    def cost(sel) -> int:
        return sum(o.cost for o in sel.values())

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget_bits:
        hi *= 4
        if hi > 1e30:
            break
    sel = pick(lo)
    if cost(sel) > budget_bits:
        for _ in range(100):  # bisection in log space: lo over budget, hi within
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1024
            if cost(pick(mid)) > budget_bits:
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1 + 1e-6:
                break
        sel = pick(hi)
    # spend the slack: repeatedly take the upgrade with the best loss decrease per extra bit that fits
    spent = cost(sel)
    while True:
        best, best_rate = None, 0.0
        for n in names:
            cur = sel[n]
            for o in opts[n]:
                extra = o.cost - cur.cost
                gain = cur.loss - o.loss
                if gain > 0 and extra > 0 and spent + extra <= budget_bits and gain / extra > best_rate:
                    best, best_rate = (n, o), gain / extra
        if best is None:
            break
        spent += best[1].cost - sel[best[0]].cost
        sel[best[0]] = best[1]
    return {n: o.choice for n, o in sel.items()}
