"""The C allocator's settings for a process of ours that moves bulk bytes and then exits (the `prefetch warm` CLI).

The native transport hands each block it reads over in a fresh buffer of up to 1 MiB, allocated by Rust and freed
as soon as it is written and hashed. With glibc's defaults a freed block does not stay for the next one: buffers
above the (adaptive) mmap threshold are unmapped, and a heap whose free top exceeds the trim threshold gives it back
to the kernel; either way the next block faults its pages in again and the kernel zeroes them. Measured on a cold
514 MiB fetch: 60k page faults instead of 26k, and 0.15-0.2 CPU-s (about 12% of the process) on either link.
Raising both thresholds keeps freed blocks in the heap, so the transfer reuses a few dozen MiB.

Process-global, so it is set only where the process is ours and ends with the transfer (the CLI's one-shot
commands); a library caller's process (a Serve replica calling prefetch.warm) keeps its own allocator settings.
"""
from __future__ import annotations

import os

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); blocks are 1 MiB, ranges 8 MiB.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def keep_freed_buffers() -> bool:
    """Keep freed transfer buffers in the heap for reuse (glibc's mallopt); True if set. A no-op where the C
    library has no mallopt, and when the user already tunes glibc's malloc (GLIBC_TUNABLES): theirs stands."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # (setting either threshold turns glibc's adaptive threshold off, so both are set, mmap first)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
