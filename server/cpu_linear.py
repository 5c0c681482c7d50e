"""Prepacked (and fused) linear weights for oneDNN on the CPU.

`F.linear` on a bf16 CPU tensor hands oneDNN a plain row-major weight, which its AMX/AVX-512 matmul
reorders into its blocked layout on every call: for decode-sized inputs (a few rows) that reorder costs
more than the product. Packing each weight once at load (what torch.compile's CPU freezing does) gives the
same results and a faster step.

With `fuse` (`--cpu-prepack fused`), sibling projections that read the same input (q/k/v of an
attention, gate/up of an MLP) are packed as one weight and computed in one matmul: fewer, wider matmuls,
so fewer OpenMP fork/joins per step. It pays only where the OpenMP workers sleep between regions:
`bench/cpu_step.py` measured it 12-19% faster per step under OMP_WAIT_POLICY=PASSIVE, but 1-9% slower
under the bounded spin `uc serve` sets, and the load test agreed (c16: 275 fused against 287 tok/s one
by one, 3 alternating runs each), so it is off by default. The stock model code still calls q_proj,
k_proj and v_proj one after the other; the first call computes the fused product and the others take
their columns of it.

Every packed or fused module is checked at load against `F.linear` on a probe, bit for bit; a group that
differs stays unfused and a weight that differs stays unpacked. Only plain `nn.Linear` modules with real
CPU weights are replaced, so this applies to the dense residency plan, whose weights never change.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Sibling projections computed as one matmul when a module has all of them (data, not code paths).
FUSE_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)


class PackedLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return _linear(x, self.packed, self.bias, self.out_features)


class FusedLinears(torch.nn.Module):
    """Several linears over the same input as one packed weight. Not called directly: its members are."""

    def __init__(self, linears: list[torch.nn.Linear], batch_hint: int) -> None:
        super().__init__()
        self.splits = [lin.out_features for lin in linears]
        self.out_features = sum(self.splits)
        w = torch.cat([lin.weight.detach() for lin in linears])
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
        self.register_buffer("bias", bias, persistent=False)
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # the same input object as the sibling call before: take its columns of the product computed then
        if x is not self._input or index not in self._pending:
            y = _linear(x, self.packed, self.bias, self.out_features)
            self._input, self._parts, self._pending = x, y.split(self.splits, dim=-1), set(range(len(self.splits)))
        out = self._parts[index]
        self._pending.discard(index)
        if not self._pending:  # every member served: drop the references
            self._input, self._parts = None, ()
        return out


class FusedMember(torch.nn.Module):
    """Stands in for one linear of a FusedLinears group (same call signature as nn.Linear)."""

    def __init__(self, group: FusedLinears, index: int, in_features: int) -> None:
        super().__init__()
        self.index, self.in_features, self.out_features = index, in_features, group.splits[index]
        object.__setattr__(self, "group", group)  # not a submodule: the parent holds it once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(self.index, x)


def supported(model) -> bool:
    """Whether this model and CPU can use packed bf16 weights: oneDNN's bf16 reorder needs AVX-512
    (BW/VL/DQ) or AVX-NE-CONVERT, which an AVX2-only CPU (seen: an AMD EPYC) lacks."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and _bf16_cpu())


def _bf16_cpu() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _plain(mod) -> bool:
    return type(mod) is torch.nn.Linear and mod.weight.device.type == "cpu"


def _probe(in_features: int) -> torch.Tensor:
    return (torch.linspace(-1, 1, 3, dtype=torch.bfloat16).unsqueeze(1)
            * torch.linspace(-1, 1, in_features, dtype=torch.bfloat16))


def _fusable(linears: list[torch.nn.Linear]) -> bool:
    first = linears[0]
    return (all(_plain(lin) for lin in linears) and len({lin.in_features for lin in linears}) == 1
            and len({lin.bias is None for lin in linears}) == 1 and len({lin.weight.dtype for lin in linears}) == 1
            and first.weight.dtype == torch.bfloat16)


@torch.inference_mode()
def prepack(model, batch_hint: int = 16, fuse: bool = False) -> int:
    """Replace CPU bf16 nn.Linear modules by packed ones, fusing FUSE_GROUPS where every member exists.
    Returns how many linears now run packed (0 if unsupported)."""
    if not supported(model):
        return 0
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        grouped: set[int] = set()
        parents = list(model.modules())
        for parent in parents:
            for names in FUSE_GROUPS if fuse else ():
                linears = [getattr(parent, n, None) for n in names]
                if any(lin is None for lin in linears) or not _fusable(linears):
                    continue
                group = FusedLinears(linears, batch_hint)
                x = _probe(linears[0].in_features)
                expect = [torch.nn.functional.linear(x, lin.weight, lin.bias) for lin in linears]
                got = [group.part(i, x) for i in range(len(linears))]
                if not all(torch.equal(a, b) for a, b in zip(got, expect)):
                    log.warning("fused %s of %s differ from F.linear; packing them one by one", "/".join(names),
                                type(parent).__name__)
                    continue
                parent.register_module("uc_fused_" + "_".join(names), group)
                for i, (n, lin) in enumerate(zip(names, linears)):
                    swaps.append((parent, n, FusedMember(group, i, lin.in_features)))
                    grouped.add(id(lin))
        for parent in parents:
            for name, child in parent.named_children():
                if _plain(child) and id(child) not in grouped:
                    new = PackedLinear(child, batch_hint)
                    x = _probe(child.in_features)
                    if not torch.equal(new(x), torch.nn.functional.linear(x, child.weight, child.bias)):
                        raise ValueError(f"packed {name} differs from F.linear")
                    swaps.append((parent, name, new))
    except Exception as exc:  # an op missing from this torch build, or a kernel that disagrees
        log.warning("not prepacking linear weights: %s", exc)
        for parent in model.modules():  # undo registered groups; no linear was replaced yet
            for n in [n for n, _ in parent.named_children() if n.startswith("uc_fused_")]:
                delattr(parent, n)
        return 0
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)
