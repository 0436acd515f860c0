"""Host memory for the engine's hot loop on CPU.

Scoring a batch of masks allocates and frees activations of several megabytes in every
block (a 64-row batch of 50 tokens through an MLP is 20 MB). glibc's malloc maps blocks
above its mmap threshold fresh from the kernel and hands a freed heap top above its trim
threshold back, so the same activations page-fault in, zero-filled, batch after batch:
on 2 CPU cores that was a tenth of the scoring time, spent in the kernel. Fixed
thresholds keep freed memory in the heap for the next batch. (PyTorch's CPU guide gets
the same by preloading jemalloc or tcmalloc; this needs no library.)
"""

from __future__ import annotations

import ctypes
import platform
import sys
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts: bigger blocks still get a mapping
TRIM_THRESHOLD = 2**30  # freed memory kept before the heap is trimmed


@cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse; False where there is no glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
