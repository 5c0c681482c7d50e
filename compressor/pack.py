"""`uc pack`: streaming compression of a checkpoint into a uc pack, one decoder layer at a time."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ucformat
from ucformat.manifest import NONLAYER_FILE, STUDENT_MODEL_TYPE, TensorEntry, layer_file
from ucformat.writer import PackWriter

from . import codecs, rss
from .checkpoint import CheckpointError, SourceCheckpoint
from .config import PackConfig

log = logging.getLogger(__name__)

# MoE routers stay in the source dtype (as in llama.cpp): tiny, and they choose which experts run.
ROUTER_RE = re.compile(r"\.(gate|router)(\.weight)?$|\.router\.")
EMBEDDING_RE = re.compile(r"(embed_tokens|lm_head|wte|embed_out)\.weight$")
# a distilled student's shared block lives outside the decoder layers (SPEC.md section 8): its linears are quantized
SHARED_BLOCK_RE = re.compile(r"^model\.shared\..*_proj\.weight$")


@dataclass
class PackResult:
    path: Path
    seconds: float
    layers_done: int
    layers_resumed: int
    peak_rss_bytes: int
    baseline_rss_bytes: int  # peak RSS before the first weight was read (interpreter + libraries)
    peak_device_bytes: int | None
    stats: dict
    calib: dict | None = None  # what the calibrated pipeline did (CalibReport), when it ran


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
    student = ckpt.config.get("model_type") == STUDENT_MODEL_TYPE
    if student and cfg.calibrated:
        raise CheckpointError(f"{src}: calibrated packing of a distilled student is not supported yet; pack it "
                              "without --calib and --target-bpw")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked but CUDA is not available")
        torch.cuda.reset_peak_memory_stats(device)
    settings = {**cfg.settings(), "source_bytes": ckpt.total_bytes(), "format_version": ucformat.VERSION}
    if cfg.calib.file is not None:
        calib_path = Path(cfg.calib.file)
        if not calib_path.is_file():
            raise FileNotFoundError(f"--calib {calib_path}: no such file")
        settings["calib_sha256"] = hashlib.sha256(calib_path.read_bytes()).hexdigest()
    writer = PackWriter(dst, settings, resume=resume)
    for aux in ckpt.aux_files():
        if not writer.has(aux.name):
            writer.copy_file(aux)

    def plain(name: str) -> ucformat.qtensor.QuantizedTensor | torch.Tensor:
        t = ckpt.get(name)
        if not quantize_fn(name, *ckpt.shape_dtype(name)):
            return t
        return codecs.quantize(t.to(device), cfg.bits, cfg.block_size, cfg.codec, cfg.scale_bits, cfg.rotation_block,
                               cfg.calib.seed, name, cfg.searches_scales)

    def write(rel: str, tensors: dict[str, ucformat.qtensor.QuantizedTensor | torch.Tensor]) -> None:
        stored, entries = {}, {}
        for name, t in tensors.items():
            parts, entries[name] = encode(rel, name, t, ckpt.shape_dtype(name)[1], cfg.codec)
            stored.update(parts)
        writer.write_tensors(rel, stored, entries)

    quantize_fn = is_quantized_layer_tensor
    baseline_rss = rss.peak()  # interpreter, torch and transformers; everything above it is the job's
    if not writer.has(NONLAYER_FILE):
        embeddings = lambda n, s, d: len(s) == 2 and bool(  # noqa: E731
            (cfg.quantize_embeddings and EMBEDDING_RE.search(n)) or (student and SHARED_BLOCK_RE.search(n)))
        write(NONLAYER_FILE, {n: (plain(n) if embeddings(n, *ckpt.shape_dtype(n)) else ckpt.get(n)) for n in ckpt.nonlayer})
    resumed = sum(writer.has(layer_file(i)) for i in range(ckpt.num_layers))
    calibrated = None
    if cfg.calibrated:
        from .calibrated import WORK_DIR, CalibratedLayers, read_stored_layer

        calibrated = CalibratedLayers(ckpt, cfg, dst / WORK_DIR, quantize_fn, progress)
        calibrated.prepare()
    label = f"{cfg.codec}{cfg.bits}" if cfg.target_bpw is None else f"{cfg.codec}@{cfg.target_bpw:g}bpw"
    def stored(i: int) -> dict:
        rel = layer_file(i)
        return read_stored_layer(dst / rel, {n: e for n, e in writer.tensors.items() if e.file == rel})

    bar = tqdm(range(ckpt.num_layers), desc=f"pack {src.name} -> {label}", unit="layer", disable=not progress)
    for i in bar:
        rel = layer_file(i)
        if writer.has(rel):
            if calibrated is not None:
                calibrated.skip(i, stored(i))
        elif calibrated is not None:
            write(rel, calibrated.compress(i))
        else:
            write(rel, {n: plain(n) for n in ckpt.layers[i]})
        ckpt.release()  # unmap what this layer touched and trim the heap, so resident memory stays about one layer
    bar.close()
    if calibrated is not None:
        calibrated.finetune(stored, lambda i, tensors: write(layer_file(i), tensors))

    stats = pack_stats(writer.tensors, writer.files, ckpt.total_bytes())
    quant = {"codec": cfg.codec, "bits": cfg.bits, "block_size": cfg.block_size, "scale_bits": cfg.scale_bits,
             "scales": "searched" if cfg.searches_scales else "absmax",
             "rotation": cfg.rotation_block}
    if cfg.calibrated:
        quant.update(target_bpw=cfg.target_bpw, rank=cfg.rank, lowrank_dtype=cfg.lowrank_dtype,
                     calib={k: v for k, v in cfg.settings()["calib"].items()} if cfg.calib.file else None)
    writer.finish(
        model_type=str(ckpt.config.get("model_type", "")), num_layers=ckpt.num_layers,
        layer_prefix=ckpt.layer_prefix, quant=quant,
        source={"path": str(src.resolve()), "bytes": ckpt.total_bytes(), "dtype": str(ckpt.dtype()).removeprefix("torch.")},
        stats=stats, created_by=f"ultracompress {ucformat.__version__}", requires=("student",) if student else (),
    )
    report = None
    if calibrated is not None:
        calibrated.close()
        report = calibrated.report.to_dict()
        shutil.rmtree(dst / WORK_DIR, ignore_errors=True)
    peak_dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return PackResult(dst, time.perf_counter() - t0, ckpt.num_layers - resumed, resumed, rss.peak(), baseline_rss,
                      peak_dev, stats, report)


def encode(rel: str, name: str, t: ucformat.qtensor.QuantizedTensor | torch.Tensor, src_dtype: str,
           codec: str) -> tuple[dict[str, torch.Tensor], TensorEntry]:
    """The stored parts of one tensor and its manifest entry."""
    if not isinstance(t, ucformat.qtensor.QuantizedTensor):
        return {name: t}, TensorEntry(file=rel, kind="raw", shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                                      stored_bytes=t.numel() * t.element_size())
    parts = {name + ucformat.qtensor.SUFFIX[k]: v for k, v in t.parts().items()}
    return parts, TensorEntry(file=rel, kind="quantized", shape=tuple(t.shape), dtype=_DTYPE_NAMES.get(src_dtype, src_dtype),
                              codec=codec, bits=t.bits, block_size=t.block_size, rank=t.rank,
                              lowrank_dtype=t.lowrank_dtype, overlay_rows=t.overlay_rows,
                              scale_bits=t.scale_bits, rotation=t.rotation, stored_bytes=t.stored_bits() // 8)


# safetensors dtype names (checkpoint headers) -> torch names (manifest entries)
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


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
