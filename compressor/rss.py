"""A process's resident memory as Linux's /proc reports it: its peak so far (VmHWM) and now (VmRSS); and
handing the heap memory it has freed back to the system (`trim`).

VmHWM rather than ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started by a big parent would
report the parent's size. Where /proc does not say (another OS, a process gone), the peak of this process falls
back to ru_maxrss and everything else reads 0.
"""

from __future__ import annotations

import ctypes
import functools
import resource
from pathlib import Path


def _status(key: str, pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def peak(pid: int | str = "self") -> int:
    """Peak resident bytes so far."""
    got = _status("VmHWM", pid)
    if not got and pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return got


def current(pid: int | str = "self") -> int:
    """Resident bytes now."""
    return _status("VmRSS", pid)


@functools.cache
def _malloc_trim():
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only
    except (AttributeError, OSError, TypeError):  # no such symbol; no C library to open (CDLL(None) on Windows)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> None:
    """Give the pages glibc's allocator holds free back to the system (malloc_trim; a no-op without glibc).

    Freed blocks under glibc's mmap threshold (which grows up to 32 MiB as large blocks are freed) stay in its
    heaps, and a pass that allocates and frees a layer's working set at a time leaves more of them behind each
    layer: resident memory creeps up though nothing is in use. Called between layers it costs well under a second.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
