"""Lazy view of a HuggingFace safetensors checkpoint (single file or sharded), grouped by decoder layer.

Nothing is read at open but the headers; `get(name)` memory-maps one tensor at a time, so the
compressor holds about one decoder layer in memory whatever the model size.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import rss

# A decoder layer is whatever lives under "<prefix>layers.<N>." (model.layers.3., model.language_model.layers.3., ...).
# bytes per element of the safetensors dtypes a checkpoint may hold
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
LAYER_RE = re.compile(r"^(?P<prefix>(?:[\w.]*\.)?layers\.)(?P<index>\d+)\.")

# Files copied verbatim from the checkpoint into the pack when present.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "added_tokens.json",
)


class CheckpointError(Exception):
    """The source checkpoint cannot be compressed; the message says why."""


class SourceCheckpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: no config.json; expected a HuggingFace checkpoint folder")
        self.config = json.loads((self.path / "config.json").read_text())
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self.layers: dict[int, list[str]] = {}
        self.nonlayer: list[str] = []
        prefixes = set()
        for name in sorted(self.weight_map):
            m = LAYER_RE.match(name)
            if m:
                prefixes.add(m["prefix"])
                self.layers.setdefault(int(m["index"]), []).append(name)
            else:
                self.nonlayer.append(name)
        if not self.layers:
            raise CheckpointError(
                f"{self.path}: no decoder layers found (tensor names under '*.layers.N.'); "
                f"architecture {self.config.get('model_type', '?')!r} is not supported"
            )
        if len(prefixes) != 1:
            raise CheckpointError(f"{self.path}: decoder layers under several prefixes {sorted(prefixes)}; not supported")
        self.layer_prefix = prefixes.pop()
        n = len(self.layers)
        if sorted(self.layers) != list(range(n)):
            raise CheckpointError(f"{self.path}: layer indices are not 0..{n - 1}: {sorted(self.layers)[:8]}...")
        self.num_layers = n

    def _weight_map(self) -> dict[str, str]:
        if (self.path / "manifest.json").is_file():
            return self._pack_weight_map()
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            missing = {f for f in wm.values() if not (self.path / f).is_file()}
            if missing:
                raise CheckpointError(f"{self.path}: shards named in the index are missing: {sorted(missing)}")
            return dict(wm)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = list(self.path.glob("*.bin")) + list(self.path.glob("*.pt"))
            hint = " (only pickle .bin/.pt weights, which are never loaded: convert them to safetensors)" if bins else ""
            raise CheckpointError(f"{self.path}: no *.safetensors weights{hint}")
        wm: dict[str, str] = {}
        for f in files:
            with self._open(f.name) as h:
                for k in h.keys():
                    wm[k] = f.name
        return wm

    def _pack_weight_map(self) -> dict[str, str]:
        """A finished uc pack whose tensors are all raw (a distilled student, SPEC.md section 8) is a checkpoint
        too: its manifest says which file holds each tensor, so `uc pack` can quantize it."""
        from ucformat import PackReader
        from ucformat.errors import PackError

        try:
            reader = PackReader(self.path, check_hashes=False)
        except PackError as exc:
            raise CheckpointError(f"{self.path}: a pack that cannot be read ({exc})") from None
        quantized = [n for n, e in reader.manifest.tensors.items() if e.kind != "raw"]
        if quantized:
            raise CheckpointError(f"{self.path}: a pack with quantized tensors ({quantized[0]}, ...) is not a source; "
                                  "pack the checkpoint it was made from")
        return {n: e.file for n, e in reader.manifest.tensors.items()}

    def _open(self, file: str):
        try:
            return safe_open(str(self.path / file), framework="pt", device="cpu")
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path / file}: unreadable safetensors file ({exc})") from None

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._open(file).__enter__()
        return self._handles[file]

    def release(self) -> None:
        """Unmap every open file, so pages of tensors already read stop counting in this process's memory, and
        give back the heap freed since (rss.trim). Passes call it after each layer: what they hold stays one layer."""
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()
        rss.trim()

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._meta:
            sl = self._handle(self.weight_map[name]).get_slice(name)
            self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return self._meta[name]

    def tensor_bytes(self, name: str) -> int:
        """The stored bytes of one tensor (its shape and safetensors dtype, read from the header)."""
        shape, dtype = self.shape_dtype(name)
        return math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]

    def total_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))

    def dtype(self) -> torch.dtype:
        """The checkpoint's float dtype (of its first floating tensor)."""
        for name in self.layers[0]:
            t = self.get(name)
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def aux_files(self) -> list[Path]:
        return [self.path / f for f in AUX_FILES if (self.path / f).is_file()]


def _state_dict(ckpt: SourceCheckpoint, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: ckpt.get(n) for n in names}


def layer_state_dict(ckpt: SourceCheckpoint, index: int) -> dict[str, torch.Tensor]:
    return _state_dict(ckpt, ckpt.layers[index])


def nonlayer_state_dict(ckpt: SourceCheckpoint) -> dict[str, torch.Tensor]:
    return _state_dict(ckpt, ckpt.nonlayer)
