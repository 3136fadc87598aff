"""glibc malloc settings for a process whose requests carry megabytes (bodies, their decoded tensors, padded
batches), set by `r2m serve` and `r2m worker` at start.

glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, so after the first large requests
their buffers come from the heap instead of their own mappings, and a heap freed in the middle stays resident: the
process grows past the in-flight budget under load and does not shrink when the load ends. A fixed threshold
(which also stops that adjustment) gives every large buffer its own mapping, returned to the kernel when freed;
two arenas instead of eight per core keep the threads' small allocations from spreading over many heaps, and once a
replica is idle after a burst its heaps' free pages go back to the kernel (`release_free_memory`).
bench/README.md (section 11) has the resident memory measured with and without these settings.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD", "release_free_memory", "tune_allocator"]

log = logging.getLogger("r2m.service")

MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's own starting value, kept fixed
ARENA_MAX = 2
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # malloc.h
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator() -> str:
    """Set the mmap threshold and the arena count (glibc only); what was done, for the log. The user's own MALLOC_*
    variables win: then nothing is changed."""
    if not sys.platform.startswith("linux"):
        return "not glibc: allocator left as it is"
    given = [name for name in _ENV if name in os.environ]
    if given:
        return f"allocator left to the environment's {', '.join(given)}"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt here: allocator left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_ARENA_MAX, ARENA_MAX) != 1:
        return "mallopt refused: allocator left as it is"
    return f"malloc: mmap threshold {MMAP_THRESHOLD // 1024} KiB, {ARENA_MAX} arenas"


def release_free_memory() -> bool:
    """Hand the heaps' free pages back to the kernel (glibc's malloc_trim); whether anything was released. The
    blocks under the mmap threshold that a burst of requests left free in the middle of a heap stay resident
    otherwise. Takes the heaps' locks for a few milliseconds: call it when the process is idle."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
