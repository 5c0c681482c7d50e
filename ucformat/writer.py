"""PackWriter: writes a pack file by file, atomically, and the manifest last (SPEC.md, "Writing").

States: open -> (files written in any order) -> finished. A journal (.uc-progress.json) records every
finished file with its hash, so an interrupted run resumes where it stopped; the manifest, written last,
is what makes a directory a pack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file as st_save_file

from .errors import PackError
from .manifest import (
    MANIFEST_NAME, PROGRESS_NAME, FileEntry, Manifest, TensorEntry, atomic_write_bytes, required_features,
    sha256_file,
)

log = logging.getLogger(__name__)


class ResumeMismatch(PackError):
    def __init__(self, path: str, key: str, old: Any, new: Any) -> None:
        super().__init__(
            f"{path}: cannot resume: it was started with {key}={old!r}, this run asks {key}={new!r}. "
            "Use the original settings, or a new output directory."
        )


class PackWriter:
    def __init__(self, dst: Path, settings: dict[str, Any], resume: bool = False) -> None:
        self.dst = Path(dst)
        self.settings = settings
        self.files: dict[str, FileEntry] = {}
        self.tensors: dict[str, TensorEntry] = {}
        self._finished = False
        if (self.dst / MANIFEST_NAME).exists():
            raise PackError(f"{self.dst}: already holds a finished pack; choose another output directory")
        journal = self.dst / PROGRESS_NAME
        if self.dst.exists() and any(self.dst.iterdir()):
            if not journal.exists():
                raise PackError(f"{self.dst}: exists and is not an unfinished pack; refusing to write into it")
            if not resume:
                raise PackError(f"{self.dst}: holds an unfinished pack; pass --resume to finish it, or remove it")
            self._load_journal(journal)
        self.dst.mkdir(parents=True, exist_ok=True)
        self._save_journal()

    # -- resume ---------------------------------------------------------------------------------------
    def _load_journal(self, journal: Path) -> None:
        state = json.loads(journal.read_text())
        for key, new in self.settings.items():
            old = state["settings"].get(key)
            if old != new:
                raise ResumeMismatch(str(self.dst), key, old, new)
        kept = 0
        for rel, fe in state["files"].items():
            p = self.dst / rel
            if p.exists() and p.stat().st_size == fe["bytes"] and sha256_file(p) == fe["sha256"]:
                self.files[rel] = FileEntry(**fe)
                kept += 1
            else:
                log.warning("%s: changed or missing since it was written; it will be redone", rel)
        for name, te in state["tensors"].items():
            if te["file"] in self.files:
                self.tensors[name] = TensorEntry(**{**te, "shape": tuple(te["shape"])})
        log.info("resuming %s: %d finished files kept (hashes checked)", self.dst, kept)

    def _save_journal(self) -> None:
        state = {
            "settings": self.settings,
            "files": {k: asdict(v) for k, v in self.files.items()},
            "tensors": {k: asdict(v) for k, v in self.tensors.items()},
        }
        atomic_write_bytes(self.dst / PROGRESS_NAME, json.dumps(state).encode())

    # -- writing --------------------------------------------------------------------------------------
    def has(self, rel: str) -> bool:
        return rel in self.files

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], entries: dict[str, TensorEntry]) -> None:
        """Write one safetensors file and record the source tensors it holds."""
        self._check_open()
        # Serialised straight into a temporary sibling (no second in-memory copy), then renamed.
        path = self.dst / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        st_save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.files[rel] = FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
        self.tensors.update(entries)
        self._save_journal()

    def copy_file(self, src: Path, rel: str | None = None) -> None:
        self._check_open()
        rel = rel or src.name
        self._commit(rel, src.read_bytes())
        self._save_journal()

    def _commit(self, rel: str, data: bytes) -> None:
        path = self.dst / rel
        atomic_write_bytes(path, data)
        self.files[rel] = FileEntry(bytes=len(data), sha256=sha256_file(path))

    def finish(self, **manifest_fields: Any) -> Manifest:
        """Write manifest.json last and atomically; the pack is complete from this moment."""
        self._check_open()
        # every feature a tensor uses is listed in `requires` (SPEC.md section 4)
        requires = tuple(sorted(set(manifest_fields.pop("requires", ())) | set(required_features(self.tensors))))
        manifest = Manifest(files=dict(sorted(self.files.items())), tensors=self.tensors, requires=requires,
                            **manifest_fields)
        atomic_write_bytes(self.dst / MANIFEST_NAME, manifest.to_json().encode())
        (self.dst / PROGRESS_NAME).unlink(missing_ok=True)
        self._finished = True
        return manifest

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("PackWriter: the manifest is written; the pack is closed")


def remove_partial(dst: Path) -> None:
    """Delete an unfinished pack (one with a journal and no manifest)."""
    if (dst / PROGRESS_NAME).exists() and not (dst / MANIFEST_NAME).exists():
        shutil.rmtree(dst)
