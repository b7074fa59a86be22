"""The CPU memory allocator, tuned for streaming decode (the console script's process only).

A streaming step allocates and frees the same activation-sized buffers every chunk. glibc's malloc
hands blocks above its mmap threshold (128 KiB, growing to at most 32 MiB as blocks are freed)
straight to the kernel and unmaps them on free, and trims the heap's top when it frees more than
its trim threshold: each step then pays page faults for memory it just gave back (about 10^5 per
steady step of flash-wan2.1 at 256x256). With the mmap threshold at its 32 MiB ceiling and trimming
effectively off, freed buffers are reused: flash-wan2.1 decodes about 1.3x faster on a CPU, its
teacher alike (benchmarks/RESULTS.md, issue 23). The cost is that the process keeps its peak heap
until it exits, which a decode process does anyway.

It is process-wide, so the library never does it on its own: ``flashvaed`` (the CLI) calls
``tune_allocator`` at start; in your own process set, before Python starts,
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = (1 << 31) - 1  # an int: trimming effectively off
OPT_OUT = "FLASHVAED_TUNE_MALLOC"  # "0": leave the allocator as it is


def tune_allocator(env: dict[str, str] | None = None) -> bool:
    """Raise glibc malloc's mmap and trim thresholds (see the module docstring). Nothing happens off
    Linux/glibc, where the user set ``GLIBC_TUNABLES`` (their settings win) or ``FLASHVAED_TUNE_MALLOC=0``.
    Returns whether both settings took."""
    env = dict(os.environ if env is None else env)
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in env or env.get(OPT_OUT, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
