"""Teacher targets for `uc distill`, computed once by streaming the teacher one decoder layer at a time
and written to disk as safetensors (never pickle), so the teacher is never loaded whole.

For N training sequences [N, T] of token ids the teacher's hidden states flow through its layers in an
ActivationStore (kept in memory up to `spill_mb`, spilled to disk beyond it); at every alignment depth
the states are copied aside (same budget). At the end each chunk of sequences becomes one file

    chunk-NNNNN.safetensors
        ids         int64   [b, T]       the sequences
        topk_idx    int32   [b, T, k]    the teacher's k most likely next tokens at every position, best first
        topk_logp   float32 [b, T, k]    their log-probabilities under the teacher's whole vocabulary
        hidden.D    float16 [b, T, Ht]   for every alignment depth D (1..L): the teacher's residual stream after
                                         its layer D-1 put through its final norm, i.e. the head's input had the
                                         teacher stopped there (D = L is the head's real input)

and `targets.json` (the settings and the list of files) is written last: targets whose json is present and
whose settings match are reused by a resumed run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ucformat.manifest import atomic_write_bytes
from ucformat.skeleton import Skeleton

from . import layerwise
from .activations import ActivationStore, SpillBudget
from .calibrate import embed_stream, forward_stream
from .checkpoint import SourceCheckpoint, layer_state_dict, nonlayer_state_dict

META_NAME = "targets.json"
LOGIT_ROWS = 256  # positions per logits chunk: bounds the [rows, vocab] float32 buffer


@dataclass(frozen=True)
class TargetSpec:
    topk: int  # teacher tokens kept per position
    depths: tuple[int, ...]  # alignment depths (1..L), always ending with L
    chunk: int  # sequences per file


def align_depths(num_layers: int, points: int) -> tuple[int, ...]:
    """`points` evenly spaced depths of an L-layer teacher, the last one L (0 points: just L)."""
    points = max(points, 1)
    return tuple(sorted({max(1, round(j * num_layers / points)) for j in range(1, points + 1)}))


def _settings(teacher: SourceCheckpoint, ids: torch.Tensor, spec: TargetSpec) -> dict:
    # the ids' own hash: a different text or windowing never reuses stale targets
    digest = hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"teacher": str(teacher.path.resolve()), "teacher_bytes": teacher.total_bytes(),
            "shape": list(ids.shape), "ids_digest": digest, **asdict(spec), "depths": list(spec.depths)}


class Targets:
    """The targets in a directory (read lazily, one chunk file at a time)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / META_NAME).read_text())
        self.files = [self.root / f for f in self.meta["files"]]
        self.depths = tuple(self.meta["depths"])
        self.topk = int(self.meta["topk"])
        self.num_sequences, self.seq_len = self.meta["shape"]
        self.chunk = int(self.meta["chunk"])

    def sequences(self, index: list[int], depths: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """The targets of these sequences (global indices), stacked: ids, topk_idx, topk_logp, hidden.D."""
        parts: dict[str, list[torch.Tensor]] = {}
        by_file: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(index):
            by_file.setdefault(i // self.chunk, []).append((pos, i % self.chunk))
        order = []
        for f, rows in by_file.items():
            with safe_open(str(self.files[f]), framework="pt", device="cpu") as h:
                keys = ["ids", "topk_idx", "topk_logp"] + [f"hidden.{d}" for d in depths]
                take = torch.tensor([r for _, r in rows])
                for k in keys:
                    parts.setdefault(k, []).append(h.get_tensor(k)[take])
            order += [pos for pos, _ in rows]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return {k: torch.cat(v)[inverse] for k, v in parts.items()}


def compute(teacher_dir: str | Path, ids: torch.Tensor, out: Path, spec: TargetSpec, spill_mb: int = 1024,
            device: str = "cpu", progress: bool = True) -> Targets:
    """Teacher targets of ids [N, T] into `out` (reused when already there with the same settings)."""
    teacher = SourceCheckpoint(teacher_dir)
    settings = _settings(teacher, ids, spec)
    out = Path(out)
    meta = out / META_NAME
    if meta.is_file():
        old = json.loads(meta.read_text())
        if {k: old.get(k) for k in settings} == settings and all((out / f).is_file() for f in old["files"]):
            return Targets(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    budget = SpillBudget(spill_mb << 20, out / "spill")
    sk = Skeleton(teacher_dir, dtype=torch.float32, device=device)
    sk.load(nonlayer_state_dict(teacher))
    stream = embed_stream(sk, ids, spec.chunk, ActivationStore(budget, "h-in"))
    kept: dict[int, ActivationStore] = {}
    idx_store, logp_store = ActivationStore(budget, "topk-idx"), ActivationStore(budget, "topk-logp")
    bar = tqdm(range(teacher.num_layers), desc="teacher targets", unit="layer", disable=not progress)
    for i in bar:
        sk.load(layer_state_dict(teacher, i))
        nxt = forward_stream(sk.layers[i], i, stream, ActivationStore(budget, f"h-{i}"))
        sk.unload_layer(i)
        teacher.release()  # unmap this layer's pages and trim the heap, as the pack loop does
        stream.store.clear()
        stream = nxt
        if i + 1 in spec.depths:
            store = kept[i + 1] = ActivationStore(budget, f"keep-{i + 1}")
            for h, b in stream.chunks():
                normed = _normed(sk, h, b)
                store.append(normed.half())
                if i + 1 == teacher.num_layers:  # the teacher's distribution, from the float32 head input
                    top_idx, top_logp = _topk(sk, normed.float(), spec.topk)
                    idx_store.append(top_idx)
                    logp_store.append(top_logp)
    files = []
    for c, (_, b) in enumerate(stream.chunks()):
        tensors = {"ids": b.input_ids.contiguous()}
        tensors.update({f"hidden.{d}": kept[d][c].cpu().contiguous() for d in spec.depths})
        tensors.update(topk_idx=idx_store[c].contiguous(), topk_logp=logp_store[c].contiguous())
        name = f"chunk-{c:05d}.safetensors"
        tmp = out / f".{name}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / name)
        files.append(name)
    for store in (stream.store, idx_store, logp_store, *kept.values()):
        store.clear()
    budget.cleanup()
    record = {**settings, "files": files, "seconds": time.perf_counter() - t0,
              "spilled_bytes": budget.spilled_bytes, "peak_in_memory_bytes": budget.peak}
    atomic_write_bytes(meta, json.dumps(record, indent=1).encode())
    return Targets(out)


@torch.inference_mode()
def _normed(sk: Skeleton, hidden: torch.Tensor, batch: layerwise.Batch) -> torch.Tensor:
    """The teacher's final norm applied to a residual stream [b, T, Ht] (the head's input at that depth)."""
    return layerwise.final_hidden(sk, hidden, batch)


@torch.inference_mode()
def _topk(sk: Skeleton, normed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next tokens [b, T, k] (int32) and their full-vocabulary log-probabilities (float32)."""
    idx, val = [], []
    rows = normed.reshape(-1, normed.shape[-1])
    for part in rows.split(LOGIT_ROWS):
        logp = torch.log_softmax(layerwise.logits(sk, part.to(sk.device)), dim=-1)
        v, i = logp.topk(k, dim=-1)
        idx.append(i.to(torch.int32).cpu())
        val.append(v.float().cpu())
    shape = (*normed.shape[:-1], k)
    return torch.cat(idx).reshape(shape), torch.cat(val).reshape(shape)
