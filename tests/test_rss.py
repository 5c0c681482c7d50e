"""compressor/rss.py against the kernel's own accounting, in a fresh process (a test runner's heap is not ours)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FREED_BUT_HELD = """
import ctypes
from compressor import rss
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 10  # under the mmap threshold: these come from the heap
blocks = [libc.malloc(size) for _ in range(4096)]  # 256 MiB
for b in blocks:
    ctypes.memset(b, 1, size)
for b in blocks[:-1]:  # the last block pins the heap's top, so free() cannot shrink the heap by itself
    libc.free(b)
before = rss.current()
rss.trim()
print(before, rss.current())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_trim_gives_freed_heap_pages_back():
    out = subprocess.run([sys.executable, "-c", FREED_BUT_HELD], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 200 << 20  # of the 256 MiB freed (and still resident before the trim)


def test_peak_is_at_least_current():
    from compressor import rss

    assert rss.peak() >= rss.current() > 0
