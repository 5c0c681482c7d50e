"""`uc pack`: streaming compression of a checkpoint into a uc pack, one decoder layer at a time."""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ucformat
from ucformat.manifest import NONLAYER_FILE, TensorEntry, layer_file
from ucformat.writer import PackWriter

from . import codecs
from .checkpoint import SourceCheckpoint
from .config import PackConfig

log = logging.getLogger(__name__)

# MoE routers stay in the source dtype (as in llama.cpp): tiny, and they choose which experts run.
ROUTER_RE = re.compile(r"\.(gate|router)(\.weight)?$|\.router\.")
EMBEDDING_RE = re.compile(r"(embed_tokens|lm_head|wte|embed_out)\.weight$")


@dataclass
class PackResult:
    path: Path
    seconds: float
    layers_done: int
    layers_resumed: int
    peak_rss_bytes: int
    peak_device_bytes: int | None
    stats: dict


def is_quantized_layer_tensor(name: str, shape: tuple[int, ...], dtype: str) -> bool:
    """Linears inside decoder layers: 2-D weights and 3-D fused expert stacks, routers excepted."""
    if dtype not in ("F32", "F16", "BF16") or len(shape) not in (2, 3):
        return False
    return not ROUTER_RE.search(name)


def pack(src: str | Path, dst: str | Path, cfg: PackConfig = PackConfig(), resume: bool = False,
         progress: bool = True) -> PackResult:
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt = SourceCheckpoint(src)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked but CUDA is not available")
        torch.cuda.reset_peak_memory_stats(device)
    settings = {**cfg.settings(), "source_bytes": ckpt.total_bytes(), "format_version": ucformat.VERSION}
    writer = PackWriter(dst, settings, resume=resume)
    for aux in ckpt.aux_files():
        if not writer.has(aux.name):
            writer.copy_file(aux)

    def encode(rel: str, name: str, quantize: bool) -> tuple[dict[str, torch.Tensor], TensorEntry]:
        t = ckpt.get(name)
        shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        if not quantize:
            return {name: t}, TensorEntry(file=rel, kind="raw", shape=shape, dtype=dtype,
                                          stored_bytes=t.numel() * t.element_size())
        q = codecs.quantize(t.to(device), cfg.bits, cfg.block_size, cfg.codec)
        parts = {name + ucformat.qtensor.SUFFIX[k]: v for k, v in q.parts().items()}
        return parts, TensorEntry(file=rel, kind="quantized", shape=shape, dtype=dtype, codec=cfg.codec,
                                  bits=cfg.bits, block_size=cfg.block_size, rank=q.rank,
                                  stored_bytes=q.stored_bits() // 8)

    def write(rel: str, names: list[str], quantize_fn) -> None:
        tensors, entries = {}, {}
        for name in names:
            shape, dtype = ckpt.shape_dtype(name)
            parts, entry = encode(rel, name, quantize_fn(name, shape, dtype))
            tensors.update(parts)
            entries[name] = entry
        writer.write_tensors(rel, tensors, entries)

    if not writer.has(NONLAYER_FILE):
        write(NONLAYER_FILE, ckpt.nonlayer, lambda n, s, d: cfg.quantize_embeddings and len(s) == 2 and bool(EMBEDDING_RE.search(n)))
    resumed = sum(writer.has(layer_file(i)) for i in range(ckpt.num_layers))
    bar = tqdm(range(ckpt.num_layers), desc=f"pack {src.name} -> {cfg.codec}{cfg.bits}", unit="layer",
               disable=not progress, initial=0)
    for i in bar:
        if not writer.has(layer_file(i)):
            write(layer_file(i), ckpt.layers[i], is_quantized_layer_tensor)
    bar.close()

    stats = pack_stats(writer.tensors, writer.files, ckpt.total_bytes())
    writer.finish(
        model_type=str(ckpt.config.get("model_type", "")), num_layers=ckpt.num_layers,
        layer_prefix=ckpt.layer_prefix, quant={"codec": cfg.codec, "bits": cfg.bits, "block_size": cfg.block_size},
        source={"path": str(src.resolve()), "bytes": ckpt.total_bytes(), "dtype": str(ckpt.dtype()).removeprefix("torch.")},
        stats=stats, created_by=f"ultracompress {ucformat.__version__}",
    )
    peak_dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return PackResult(dst, time.perf_counter() - t0, ckpt.num_layers - resumed, resumed,
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_dev, stats)


def pack_stats(tensors: dict[str, TensorEntry], files, source_bytes: int) -> dict:
    qbits = sum(e.stored_bytes * 8 for e in tensors.values() if e.kind == "quantized")
    qparams = sum(_numel(e.shape) for e in tensors.values() if e.kind == "quantized")
    pack_bytes = sum(f.bytes for f in files.values())
    return {
        "bpw_allin": qbits / qparams if qparams else None,
        "quantized_params": qparams,
        "raw_params": sum(_numel(e.shape) for e in tensors.values() if e.kind == "raw"),
        "pack_bytes": pack_bytes,
        "source_bytes": source_bytes,
        "ratio": source_bytes / pack_bytes if pack_bytes else None,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
