"""PackReader: lazy, verifying access to a finished pack (SPEC.md, "Reading").

Nothing is loaded at open but the manifest; each tensor is read on demand through a memory-mapped
safe_open. Every file is checked against the manifest the first time it is read (size, then SHA-256)
and again whenever its size or mtime changes, so a pack altered after loading is caught at the read.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import qtensor
from .errors import (
    ConfigError, HashMismatch, IncompletePack, MissingFile, NotAPack, PackError, SizeMismatch, TensorError,
)
from .manifest import MANIFEST_NAME, NONLAYER_FILE, PROGRESS_NAME, Manifest, TensorEntry, layer_file, sha256_file

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PART_DTYPES = {"codes": torch.uint8, "scales": torch.float16, "grid": torch.float32,
                "lr_u": torch.float16, "lr_v": torch.float16,
                "lr_uq": torch.int8, "lr_us": torch.float16, "lr_vq": torch.int8, "lr_vs": torch.float16,
                "ov_rows": torch.int32, "ov_q": torch.int8, "ov_s": torch.float16, "scale_max": torch.float16,
                "rot_signs": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; one of {', '.join(_DTYPES)}") from None


class PackReader:
    def __init__(self, path: str | os.PathLike, check_hashes: bool = True) -> None:
        self.path = Path(path)
        self.check_hashes = check_hashes
        mpath = self.path / MANIFEST_NAME
        if not self.path.is_dir():
            raise NotAPack(str(self.path), "not a directory")
        if not mpath.exists():
            if (self.path / PROGRESS_NAME).exists():
                raise IncompletePack(str(self.path))
            raise NotAPack(str(self.path), f"no {MANIFEST_NAME}")
        self.manifest = Manifest.from_json(mpath.read_bytes(), str(mpath))
        self._checked: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) when last verified
        self._by_file: dict[str, list[str]] = {}
        for name, entry in self.manifest.tensors.items():
            self._by_file.setdefault(entry.file, []).append(name)

    # -- files ----------------------------------------------------------------------------------------
    def check_file(self, rel: str, deep: bool | None = None) -> Path:
        """Size check always; SHA-256 when deep (default: the reader's check_hashes). Raises a named error."""
        deep = self.check_hashes if deep is None else deep
        entry = self.manifest.files.get(rel)
        p = self.path / rel
        if entry is None:
            raise PackError(f"{p}: not listed in the manifest")
        try:
            st = p.stat()
        except FileNotFoundError:
            raise MissingFile(str(p)) from None
        if not stat.S_ISREG(st.st_mode):
            raise MissingFile(str(p))
        if self._checked.get(rel) == (st.st_size, st.st_mtime_ns):
            return p
        if st.st_size != entry.bytes:
            raise SizeMismatch(str(p), entry.bytes, st.st_size)
        if deep:
            digest = sha256_file(p)
            if digest != entry.sha256:
                raise HashMismatch(str(p), entry.sha256, digest)
            self._checked[rel] = (st.st_size, st.st_mtime_ns)
        return p

    def verify_files(self) -> list[PackError]:
        """Hash every file in the manifest; one error per bad file."""
        errors: list[PackError] = []
        for rel in self.manifest.files:
            try:
                self.check_file(rel, deep=True)
            except PackError as exc:
                errors.append(exc)
        return errors

    # -- tensors --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    def tensor_names(self, file: str) -> list[str]:
        return list(self._by_file.get(file, []))

    def layer_tensor_names(self, index: int) -> list[str]:
        return self.tensor_names(layer_file(index))

    def read_parts(self, rel: str, names: list[str] | None = None
                   ) -> dict[str, "qtensor.QuantizedTensor | torch.Tensor"]:
        """Every source tensor of one pack file as stored: raw tensors, or QuantizedTensor (CPU, mmap-backed)."""
        p = self.check_file(rel)
        out: dict[str, qtensor.QuantizedTensor | torch.Tensor] = {}
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                stored = set(f.keys())
                for name in names if names is not None else self.tensor_names(rel):
                    entry = self.manifest.tensors[name]
                    if entry.kind == "raw":
                        t = self._get(f, stored, rel, name)
                        if tuple(t.shape) != entry.shape or t.dtype != torch_dtype(entry.dtype):
                            raise TensorError(str(p), name, f"{t.dtype} {tuple(t.shape)}, manifest says "
                                                            f"{entry.dtype} {entry.shape}")
                        out[name] = t
                    else:
                        out[name] = self._quantized(f, stored, rel, name, entry)
        except SafetensorError as exc:
            raise TensorError(str(p), "*", f"unreadable safetensors file ({exc})") from None
        return out

    def read_file(self, rel: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct every source tensor of one pack file: {source name: tensor}."""
        out = {}
        for name, t in self.read_parts(rel, names).items():
            want = dtype or torch_dtype(self.manifest.tensors[name].dtype)
            if isinstance(t, qtensor.QuantizedTensor):
                out[name] = qtensor.dequantize(t.to(device), want)
            else:
                out[name] = t.to(device=device, dtype=want)
        return out

    def read_quantized(self, name: str) -> qtensor.QuantizedTensor:
        entry = self.manifest.tensors[name]
        p = self.check_file(entry.file)
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return self._quantized(f, set(f.keys()), entry.file, name, entry)
        except SafetensorError as exc:
            raise TensorError(str(p), name, f"unreadable safetensors file ({exc})") from None

    def layer_state_dict(self, index: int, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        return self.read_file(layer_file(index), dtype, device)

    def nonlayer_state_dict(self, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        return self.read_file(NONLAYER_FILE, dtype, device)

    def _get(self, f, stored: set[str], rel: str, key: str) -> torch.Tensor:
        if key not in stored:
            raise TensorError(str(self.path / rel), key, "missing from the file")
        return f.get_tensor(key)

    def _quantized(self, f, stored, rel: str, name: str, entry: TensorEntry) -> qtensor.QuantizedTensor:
        parts = {}
        for part, (key, shape, dtype) in part_layout(name, entry).items():
            t = self._get(f, stored, rel, key)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise TensorError(str(self.path / rel), key, f"{t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            parts[part] = t
        q = qtensor.from_entry(entry, parts)
        bad = qtensor.overlay_error(q)
        if bad:
            raise TensorError(str(self.path / rel), name + qtensor.SUFFIX["ov_rows"], bad)
        return q

    def config_dict(self) -> dict:
        """config.json as a JSON object (its size, and its hash where the reader checks hashes, checked first)."""
        p = self.check_file(CONFIG_NAME)
        try:
            d = json.loads(p.read_bytes())
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(str(p), f"not JSON ({exc})") from None
        if not isinstance(d, dict):
            raise ConfigError(str(p), "not a JSON object")
        return d


def part_layout(name: str, entry: TensorEntry) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """What the file of a quantized entry holds for it (SPEC.md section 2): part -> (key, shape, dtype)."""
    return {part: (name + qtensor.SUFFIX[part], shape,
                   torch.uint8 if part == "scales" and entry.scale_bits == 8 else _PART_DTYPES[part])
            for part, shape in qtensor.entry_part_shapes(entry).items()}


def stored_layout(name: str, entry: TensorEntry) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor the entry's file holds for it: key -> (shape, dtype); a raw entry is itself."""
    if entry.kind == "raw":
        return {name: (entry.shape, torch_dtype(entry.dtype))}
    return {key: (shape, dtype) for key, shape, dtype in part_layout(name, entry).values()}


def open_pack(path: str | os.PathLike, check_hashes: bool = True) -> PackReader:
    return PackReader(path, check_hashes=check_hashes)
