"""A process's resident memory as Linux's /proc reports it: its peak so far (VmHWM) and now (VmRSS).

VmHWM rather than ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started by a big parent would
report the parent's size. Where /proc does not say (another OS, a process gone), the peak of this process falls
back to ru_maxrss and everything else reads 0.
"""

from __future__ import annotations

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
