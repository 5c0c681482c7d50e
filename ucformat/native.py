"""Build and load the project's C++ CPU kernels (torch C++ extensions), once per source and torch version.

Each extension is one C++ source compiled on first use with torch's extension builder (needs a C++
compiler and ninja) into UC_CACHE/torch_extensions/<name>-torch<version>/. The build is stamped with the
SHA-256 of its source, so a later process imports the built module directly (load_inline would re-run
ninja, about 5 s) and an edited source is rebuilt. Where building fails, or UC_NATIVE=0, `load` returns
None with the reason and callers take their torch path. No -march=native: one build must run on every
x86-64 CPU that shares the cache; the kernels pick their instruction set at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_built: dict[str, tuple[object | None, str | None]] = {}  # name -> (module, why not)


def cache_root() -> Path:
    return Path(os.environ.get("UC_CACHE", Path.home() / ".cache" / "ultracompress")) / "torch_extensions"


def load(name: str, source: str, what: str) -> tuple[object | None, str | None]:
    """(module, None) or (None, why not). `what` names the kernel in the one-time compile message."""
    done = _built.get(name)
    if done is not None:  # every call after the first: no lock on the hot path
        return done
    with _lock:
        if name not in _built:
            _built[name] = _build(name, source, what)
        return _built[name]


def _build(name: str, source: str, what: str) -> tuple[object | None, str | None]:
    if os.environ.get("UC_NATIVE", "1") == "0":
        return None, "disabled by UC_NATIVE=0"
    try:
        from torch.utils.cpp_extension import load_inline

        build = cache_root() / f"{name}-torch{torch.__version__.split('+')[0]}"
        build.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(source.encode()).hexdigest()
        so, stamp = build / f"{name}.so", build / "source.sha256"
        if so.is_file() and stamp.is_file() and stamp.read_text() == digest:
            spec = importlib.util.spec_from_file_location(name, so)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, None
        print(f"uc: compiling the native {what} (once per torch version, about a minute)", file=sys.stderr, flush=True)
        module = load_inline(name, cpp_sources=[source], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                             build_directory=str(build), verbose=False)
        stamp.write_text(digest)
        return module, None
    except Exception as exc:  # no compiler, no ninja, headers missing: the torch path still works
        text = str(exc).strip()
        why = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        log.warning("native %s unavailable (%s); using the torch path", what, why)
        return None, why
