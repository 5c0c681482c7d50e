"""What `uc info` and `uc verify` report about a pack."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from . import assets, conformance
from .errors import PackError, TensorError
from .reader import PackReader


def summary(reader: PackReader) -> dict:
    m = reader.manifest
    tensors = []
    for name, e in m.tensors.items():
        numel = 1
        for s in e.shape:
            numel *= s
        tensors.append({
            "name": name, "kind": e.kind, "codec": e.codec, "bits": e.bits, "block_size": e.block_size,
            "rank": e.rank, "rotation": e.rotation, "shape": list(e.shape), "dtype": e.dtype,
            "stored_bytes": e.stored_bytes,
            "bpw": e.stored_bytes * 8 / numel if numel else None, "file": e.file,
        })
    q = [t for t in tensors if t["kind"] == "quantized"]
    qparams = sum(_numel(t["shape"]) for t in q)
    pack_bytes = sum(f.bytes for f in m.files.values())
    return {
        "path": str(reader.path), "format": m.format, "version": m.version, "model_type": m.model_type,
        "num_layers": m.num_layers, "quant": m.quant, "created_by": m.created_by,
        "bpw_allin": sum(t["stored_bytes"] * 8 for t in q) / qparams if qparams else None,
        "quantized_params": qparams,
        "raw_params": sum(_numel(t["shape"]) for t in tensors if t["kind"] == "raw"),
        "pack_bytes": pack_bytes, "source_bytes": m.source.get("bytes"),
        "ratio": m.source["bytes"] / pack_bytes if m.source.get("bytes") else None,
        "files": len(m.files), "tensors": tensors,
    }


def verify(reader: PackReader, deep: bool = False) -> Iterator[tuple[str, PackError | None]]:
    """Yield (file, error or None) for every file; deep also checks the pack against the model its config.json
    builds (conformance.py; one (file, error) per difference, first) and rebuilds every tensor and checks it."""
    if deep:
        try:
            differences = conformance.check(reader)
        except PackError as exc:  # config.json unusable: nothing to check the tensors against
            differences = [exc]
        if not differences and assets.has_tokenizer(reader):
            try:
                assets.load_tokenizer(reader)
            except PackError as exc:
                differences = [exc]
        for exc in differences:
            yield _rel(reader, exc), exc
    else:
        differences = []
    said = {str(exc) for exc in differences}
    for rel in reader.manifest.files:
        try:
            reader.check_file(rel, deep=True)
            if deep and rel.endswith(".safetensors"):
                for name, t in reader.read_file(rel, dtype=torch.float32).items():
                    if tuple(t.shape) != reader.manifest.tensors[name].shape:
                        raise TensorError(str(reader.path / rel), name, "reconstructed shape differs from manifest")
                    if not torch.isfinite(t).all():
                        raise TensorError(str(reader.path / rel), name, "reconstructed tensor has NaN or Inf")
            yield rel, None
        except PackError as exc:
            if str(exc) not in said:  # a truncated file is also a conformance difference: said once
                yield rel, exc


def _rel(reader: PackReader, exc: PackError) -> str:
    """The pack file an error names, relative to the pack ("" when it names none)."""
    path = getattr(exc, "path", None)
    if path is None:
        return ""
    return os.path.relpath(path, reader.path)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
