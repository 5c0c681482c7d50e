"""The pack manifest (SPEC.md, "Manifest"): typed, validated on read, written as canonical JSON."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bitpack import WIDTHS
from .errors import ManifestError, UnsupportedFeature, UnsupportedVersion
from .rotation import BLOCKS as ROTATION_BLOCKS

FORMAT = "ucpack"
VERSION = "0.3"
MAJOR = VERSION.split(".")[0]
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".uc-progress.json"
NONLAYER_FILE = "nonlayer.safetensors"
KNOWN_FEATURES = frozenset({"lowrank", "lowrank-int8", "overlay", "scales-u8", "rotation", "student"})
STUDENT_MODEL_TYPE = "uc_student"  # a student pack (SPEC.md section 8) MUST list feature `student`
DTYPES = ("float32", "float16", "bfloat16")  # source dtypes a tensor entry may name



def layer_file(index: int) -> str:
    return f"layers/layer-{index:05d}.safetensors"


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """One source tensor. kind 'raw' is stored as is under its own name; 'quantized' as its parts."""

    file: str
    kind: str  # "raw" | "quantized"
    shape: tuple[int, ...]
    dtype: str  # source dtype, e.g. "bfloat16"; what a reader reconstructs to by default
    codec: str | None = None
    bits: int | None = None
    block_size: int | None = None
    rank: int = 0
    stored_bytes: int = 0
    lowrank_dtype: str = "float16"  # "int8": factors stored as .lr_uq/.lr_vq with row scales (feature lowrank-int8)
    overlay_rows: int = 0  # rows restored at 8 bits (.ov_rows/.ov_q/.ov_s; feature overlay)
    scale_bits: int = 16  # 8: block scales stored as uint8 codes plus .qsmax row maxima (feature scales-u8)
    rotation: int = 0  # Hadamard block size of the input rotation, signs in .rsigns (feature rotation); 0: none

    @staticmethod
    def from_json(name: str, d: dict[str, Any], path: str) -> "TensorEntry":
        try:
            e = TensorEntry(
                file=str(d["file"]), kind=str(d["kind"]), shape=tuple(_count(s) for s in d["shape"]),
                dtype=str(d["dtype"]), codec=d.get("codec"), bits=d.get("bits"),
                block_size=d.get("block_size"), rank=int(d.get("rank", 0)),
                stored_bytes=int(d.get("stored_bytes", 0)), lowrank_dtype=str(d.get("lowrank_dtype", "float16")),
                overlay_rows=int(d.get("overlay_rows", 0)), scale_bits=int(d.get("scale_bits", 16)),
                rotation=int(d.get("rotation", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(path, f"tensor {name!r}: bad entry ({exc})") from None
        if e.kind not in ("raw", "quantized"):
            raise ManifestError(path, f"tensor {name!r}: unknown kind {e.kind!r}")
        if e.dtype not in DTYPES:
            raise ManifestError(path, f"tensor {name!r}: dtype {e.dtype!r} is not one of {', '.join(DTYPES)}")
        if e.kind == "quantized" and (e.bits not in WIDTHS or type(e.bits) is not int or type(e.block_size) is not int
                                      or e.block_size < 1 or len(e.shape) < 2):
            raise ManifestError(path, f"tensor {name!r}: a quantized entry needs bits in {', '.join(map(str, WIDTHS))}, "
                                      f"a block_size >= 1 and a >=2-D shape")
        if (e.lowrank_dtype not in ("float16", "int8") or e.rank < 0 or e.overlay_rows < 0 or e.scale_bits not in (16, 8)
                or e.rotation < 0):
            raise ManifestError(path, f"tensor {name!r}: bad rank, lowrank_dtype, overlay_rows or scale_bits")
        if e.rotation and (e.kind != "quantized" or e.rotation not in ROTATION_BLOCKS or e.shape[-1] % e.rotation):
            raise ManifestError(path, f"tensor {name!r}: rotation {e.rotation} must be one of "
                                      f"{', '.join(map(str, ROTATION_BLOCKS))} and divide the {e.shape[-1]} inputs")
        return e

    def features(self) -> set[str]:
        """Format features a reader needs to rebuild this tensor (SPEC.md section 3, `requires`)."""
        out = set()
        if self.rank:
            out.add("lowrank")
            if self.lowrank_dtype == "int8":
                out.add("lowrank-int8")
        if self.overlay_rows:
            out.add("overlay")
        if self.scale_bits == 8:
            out.add("scales-u8")
        if self.rotation:
            out.add("rotation")
        return out


def _count(v: Any) -> int:
    """A JSON integer >= 0 (a dimension); anything else is a malformed entry."""
    if type(v) is not int or v < 0:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


def required_features(tensors: dict[str, "TensorEntry"]) -> tuple[str, ...]:
    return tuple(sorted(set().union(*(e.features() for e in tensors.values()))))


@dataclass(frozen=True)
class Manifest:
    model_type: str
    num_layers: int
    layer_prefix: str  # e.g. "model.layers."
    quant: dict[str, Any]  # codec, bits, block_size, and any other settings used
    source: dict[str, Any]  # path, bytes, dtype of the checkpoint it was made from
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    stats: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    created_by: str = ""
    format: str = FORMAT
    version: str = VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": d.pop("format"), "version": d.pop("version"), **d}
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @staticmethod
    def from_json(text: str | bytes, path: str) -> "Manifest":
        try:
            d = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            raise ManifestError(path, f"not JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(path, f"'format' must be {FORMAT!r}")
        version = str(d.get("version", ""))
        if version.split(".")[0] != MAJOR or len(version.split(".")) != 2:
            raise UnsupportedVersion(path, version, MAJOR)
        requires = d.get("requires", [])
        if not isinstance(requires, list) or not all(isinstance(f, str) for f in requires):
            raise ManifestError(path, "'requires' must be a list of strings")
        for feature in requires:
            if feature not in KNOWN_FEATURES:
                raise UnsupportedFeature(path, feature)
        try:
            files = {k: FileEntry(int(v["bytes"]), str(v["sha256"])) for k, v in d["files"].items()}
            tensors = {k: TensorEntry.from_json(k, v, path) for k, v in d["tensors"].items()}
            m = Manifest(
                model_type=str(d["model_type"]), num_layers=int(d["num_layers"]),
                layer_prefix=str(d["layer_prefix"]), quant=dict(d["quant"]), source=dict(d["source"]),
                files=files, tensors=tensors, stats=dict(d.get("stats", {})),
                requires=tuple(requires), created_by=str(d.get("created_by", "")),
                version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(path, f"missing or malformed field ({exc!r})") from None
        missing = set().union(*(t.features() for t in tensors.values())) - set(m.requires)
        if m.model_type == STUDENT_MODEL_TYPE:
            missing.add("student")
            missing -= set(m.requires)
        if missing:
            raise ManifestError(path, f"the pack uses features {sorted(missing)} that 'requires' does not list")
        layers = {layer_file(i) for i in range(m.num_layers)} if 0 <= m.num_layers <= len(files) else None
        if layers is None or set(files) & layers != layers or any(f.startswith("layers/") and f not in layers for f in files):
            raise ManifestError(path, f"'files' must hold {layer_file(0)} .. layer-NNNNN for exactly the "
                                      f"{m.num_layers} layers 'num_layers' gives, and no other layer file")
        if NONLAYER_FILE not in files:
            raise ManifestError(path, f"'files' has no {NONLAYER_FILE}")
        for rel, fe in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts or rel in ("", ".", MANIFEST_NAME):
                raise ManifestError(path, f"file name {rel!r} must be relative, inside the pack")
            if fe.bytes < 0 or len(fe.sha256) != 64:
                raise ManifestError(path, f"file {rel!r}: 'bytes' must be >= 0 and 'sha256' 64 hex digits")
        for name, t in tensors.items():
            if t.file not in files:
                raise ManifestError(path, f"tensor {name!r} lives in {t.file!r}, which is not in 'files'")
        return m


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
