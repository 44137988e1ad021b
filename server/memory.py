"""The receiver's memory hygiene on glibc: freed memory goes back to the system promptly.

    return_freed_memory_promptly()   # once, at start-up
    trim()                           # after a call freed a lot (a refused large frame, a decode)

Left to itself, glibc's malloc raises its mmap threshold to 32 MiB as large
blocks are freed, then serves decode temporaries and parsed headers from heaps
whose freed holes it keeps: a receiver's resident memory would grow with every
large message, refused or not, and stay grown. Both calls are no-ops off glibc.
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


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
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
