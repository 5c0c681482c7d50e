"""Per-expert streaming of MoE layers: only the experts the router picked are reconstructed.

transformers keeps a MoE layer's experts as fused 3-D parameters (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) that its loader builds from per-expert checkpoint tensors
(`experts.{e}.gate_proj.weight`, ...) by stacking them and concatenating gate and up. The pack keeps
the per-expert tensors, so an expert can be reconstructed alone.

For a layer that is not dense, the runtime attaches everything but the experts at the layer's pre-hook.
At the experts module's own pre-hook the routing is known: the experts hit by `top_k_index` are
reconstructed into compact stacks [n_hit, ...], the module's parameters point at them, its
`num_experts` is n_hit for the call, and `top_k_index` is remapped into the compact numbering (the
sentinel E, used for dropped tokens, becomes n_hit). Every experts implementation of transformers
(eager loop, batched or grouped matmul) indexes the stacks with `top_k_index` and treats
`num_experts` as the sentinel, so the result is the same floats as with the full stacks.

Which checkpoint tensors make which fused parameter is read from the model's own conversion mapping
(transformers' `WeightConverter`s). Only the plain layout is handled: stack over experts (dim 0),
optionally concatenated along the output dimension; any other conversion keeps the layer streamed
whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass
class FusedParam:
    attr: str  # parameter of the experts module, e.g. "gate_up_proj"
    sources: list[list[str]]  # per expert: checkpoint names concatenated along dim 0, in order


@dataclass
class ExpertGroup:
    module: torch.nn.Module  # the experts module
    num_experts: int
    params: list[FusedParam]
    meta: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # the meta placeholders
    attached: int = 0  # bytes of the compact stacks attached for the current call

    def names(self) -> set[str]:
        return {n for p in self.params for per in p.sources for n in per}

    def names_of(self, experts: list[int]) -> list[str]:
        return [n for p in self.params for e in experts for n in p.sources[e]]


def _plain_ops(converter) -> bool:
    """Stack over experts, optionally then concatenate along dim 1 of the stack (the output rows)."""
    ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(converter, "operations", [])]
    return ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def _pattern(src: str) -> re.Pattern:
    """A converter source pattern ('.experts.*.w1.weight') as a regex over checkpoint names, expert id captured."""
    return re.compile(re.escape(src.lstrip("^")).replace(r"\*", r"(\d+)") + "$")


def find_groups(model: torch.nn.Module, mapping, layer_prefix: str, names: list[str]) -> list[ExpertGroup]:
    """The fused-expert modules of one decoder layer (`layer_prefix`, e.g. 'model.layers.3.') that can be
    streamed per expert, given the layer's checkpoint tensor `names`; [] when there are none."""
    converters = [c for c in mapping or [] if type(c).__name__ == "WeightConverter" and _plain_ops(c)
                  and len(getattr(c, "target_patterns", [])) == 1]
    groups: dict[int, ExpertGroup] = {}
    for pname, param in model.named_parameters():
        if not pname.startswith(layer_prefix) or param.dim() < 3:
            continue
        mod_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(mod_name)
        e = int(getattr(module, "num_experts", 0) or 0)
        conv = [c for c in converters if pname.endswith(c.target_patterns[0].lstrip("^").lstrip("."))]
        if e <= 0 or param.shape[0] != e or len(conv) != 1:
            return []  # a 3-D expert parameter we cannot rebuild per expert: stream the layer whole
        sources: list[list[str]] = [[] for _ in range(e)]
        for src in conv[0].source_patterns:
            rx = _pattern(src)
            found = {}
            for n in names:
                m = rx.search(n)
                if m and n.startswith(layer_prefix):
                    found.setdefault(int(m.group(1)), []).append(n)
            if sorted(found) != list(range(e)) or any(len(v) != 1 for v in found.values()):
                return []
            for i in range(e):
                sources[i].append(found[i][0])
        g = groups.setdefault(id(module), ExpertGroup(module, e, []))
        g.params.append(FusedParam(attr, sources))
        g.meta[attr] = param
    return list(groups.values())


def compact_stacks(group: ExpertGroup, experts: list[int], tensors: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """{attr: [len(experts), ...] stack} from reconstructed per-expert tensors, in the order of `experts`."""
    out = {}
    for p in group.params:
        rows = [torch.cat([tensors[n] for n in p.sources[e]], 0) if len(p.sources[e]) > 1 else tensors[p.sources[e][0]]
                for e in experts]
        stack = torch.stack(rows)
        want = tuple(group.meta[p.attr].shape[1:])
        if tuple(stack.shape[1:]) != want:
            raise RuntimeError(f"{p.attr}: per-expert tensors give {tuple(stack.shape[1:])}, the model expects {want}")
        out[p.attr] = stack
    return out


def routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """The experts call's top_k_index and whether it came as a keyword."""
    if "top_k_index" in kwargs:
        return kwargs["top_k_index"], True
    return args[1], False


def remap(top_k_index: torch.Tensor, experts: list[int], num_experts: int) -> torch.Tensor:
    """Original expert ids -> positions in the compact stacks; the sentinel `num_experts` -> len(experts)."""
    lut = torch.full((num_experts + 1,), len(experts), dtype=top_k_index.dtype, device=top_k_index.device)
    lut[torch.tensor(experts, dtype=torch.long, device=top_k_index.device)] = torch.arange(
        len(experts), dtype=top_k_index.dtype, device=top_k_index.device)
    return lut[top_k_index]
