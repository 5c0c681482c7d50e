"""A trained student written as a student pack (SPEC.md section 8): its config.json, the teacher's tokenizer
files, every weight raw in the config's dtype, decoder-layer state (frr: gamma and beta; dense: the layer) in
the layer files, the rest (the shared block, projections, norms, the teacher's embeddings and head) in
nonlayer.safetensors; `requires` lists `student`. Stats give the all-in bytes of the body (everything but the
token embeddings and the output head) and of the whole model, next to the teacher's."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import ucformat
from ucformat.manifest import NONLAYER_FILE, TensorEntry, layer_file
from ucformat.writer import PackWriter

from .checkpoint import SourceCheckpoint

LAYER_PREFIX = "model.layers."
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.u", "lm_head.v")  # not part of a body
_LAYER = re.compile(re.escape(LAYER_PREFIX) + r"(\d+)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def body_and_whole(sizes: dict[str, int]) -> tuple[int, int]:
    """(bytes of every tensor but the vocabulary ones, bytes of all) of a name -> bytes map."""
    return sum(b for n, b in sizes.items() if n not in VOCAB_TENSORS), sum(sizes.values())


def teacher_sizes(teacher: SourceCheckpoint) -> dict[str, int]:
    return {name: teacher.tensor_bytes(name) for name in teacher.weight_map}


def write_student(writer: PackWriter, model, teacher: SourceCheckpoint, src: Path, extra: dict) -> dict:
    cfg = model.config
    dtype = _DTYPES[str(cfg.dtype).removeprefix("torch.")] if cfg.dtype is not None else torch.float32
    work = writer.dst / ".uc-work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(cfg.to_json_string(use_diff=False))
    writer.copy_file(work / "config.json", "config.json")
    for aux in teacher.aux_files():
        if aux.name != "config.json":
            writer.copy_file(aux)
    named = dict(model.named_parameters())  # tied aliases once, under their first name
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in named.items():
        m = _LAYER.match(name)
        rel = layer_file(int(m[1])) if m else NONLAYER_FILE
        files.setdefault(rel, {})[name] = p.detach().to("cpu", dtype).contiguous()
    for rel in [NONLAYER_FILE] + [layer_file(i) for i in range(cfg.num_hidden_layers)]:
        tensors = files.get(rel, {})
        entries = {n: TensorEntry(file=rel, kind="raw", shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                                  stored_bytes=t.numel() * t.element_size()) for n, t in tensors.items()}
        writer.write_tensors(rel, tensors, entries)
    body, whole = body_and_whole({n: e.stored_bytes for n, e in writer.tensors.items()})
    t_body, t_whole = body_and_whole(teacher_sizes(teacher))
    pack_bytes = sum(f.bytes for f in writer.files.values())
    stats = {"bpw_allin": None, "quantized_params": 0, "raw_params": sum(t.numel() for t in named.values()),
             "pack_bytes": pack_bytes, "source_bytes": teacher.total_bytes(),
             "ratio": teacher.total_bytes() / pack_bytes, "body_bytes": body, "whole_bytes": whole,
             "teacher_body_bytes": t_body, "teacher_whole_bytes": t_whole, "body_ratio": t_body / body,
             "whole_ratio": t_whole / whole, **extra}
    student = {"kind": cfg.student_kind, "width": cfg.hidden_size, "applications": cfg.num_hidden_layers,
               "scales": cfg.scales, "iters": cfg.iters, "head_rank": cfg.head_rank}
    writer.finish(model_type=cfg.model_type, num_layers=cfg.num_hidden_layers, layer_prefix=LAYER_PREFIX,
                  quant={"codec": "none", "bits": None, "block_size": None, "student": student},
                  source={"path": str(src.resolve()), "bytes": teacher.total_bytes(),
                          "dtype": str(teacher.dtype()).removeprefix("torch.")},
                  stats=stats, requires=("student",), created_by=f"ultracompress {ucformat.__version__} uc distill")
    return stats
