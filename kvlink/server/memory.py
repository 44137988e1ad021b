"""The receiver's memory hygiene on glibc: freed memory goes back to the system promptly.

    return_freed_memory_promptly()   # once, at start-up
    trim()                           # after a call freed a lot (a refused large frame, a decode)

Left to itself, glibc's malloc raises its mmap threshold to 32 MiB as large
blocks are freed, then serves decode temporaries and parsed headers from heaps
whose freed holes it keeps: a receiver's resident memory would grow with every
large message, refused or not, and stay grown. Both calls are no-ops off glibc.

The threshold sits above one chunk frame (1 MiB of data plus its envelope): the
buffers of a chunk in flight come from the heap, whose freed blocks the next
chunks reuse, and trim() returns them once a message is done. At 1 MiB every
chunk was a fresh mapping, faulted in and zeroed page by page, and one Transfer
stream was received 5x slower (1.1 against 5-7 Gbit/s on two CPU cores).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""
MMAP_THRESHOLD = 4 << 20
"""Allocations of this size or more get their own mapping: above a chunk frame (see the module docstring)."""

_trimming = threading.Lock()


@cache
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory_promptly(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mapping, unmapped when freed
    (this also stops glibc from raising the threshold by itself). Returns whether it took effect."""
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        logger.debug("malloc keeps its own mmap threshold (not glibc, or mallopt refused)")
        return False
    return True


def trim() -> None:
    """Give the free memory of every malloc arena back to the system (blocking; a few ms). Calls that
    come while one is running return at once: that one does their work."""
    libc = _libc()
    if libc is None or not _trimming.acquire(blocking=False):
        return
    try:
        libc.malloc_trim(0)
    finally:
        _trimming.release()


def _status_kib(key: str) -> int | None:
    """A `key: N kB` line of /proc/self/status, in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_memory() -> dict[str, int | None]:
    """This process's resident memory now and at its peak since start-up or the last reset_peaks()."""
    return {"rss_bytes": _status_kib("VmRSS"), "peak_rss_bytes": _status_kib("VmHWM")}


def reset_peak_rss() -> bool:
    """Start a new peak of resident memory (Linux: /proc/self/clear_refs); whether it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def available_host_bytes() -> int | None:
    """Memory the system can give without swapping (MemAvailable of /proc/meminfo; None off Linux)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
