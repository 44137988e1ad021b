"""The receiver's session store: decoded context caches by (session id, message id).

Only a complete, verified and decoded message is ever put here (the servicer
never stores a partial one), so an Ask can only be answered from what arrived.
Entries expire `ttl_s` seconds after their last use, and the store holds at
most `max_bytes` of tensors: putting a new entry evicts the least recently
used ones until it fits. Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvlink.cache import ContextKV

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (session_id, message_id)


def kv_nbytes(kv: ContextKV) -> int:
    """Bytes held by a ContextKV's tensors (keys, values, positions)."""
    tensors = [*kv.keys, *kv.values, *kv.positions]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() in seen:  # shared position tensors count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@dataclass
class Entry:
    kv: ContextKV
    nbytes: int
    created: float
    last_used: float
    config_label: str = ""


@dataclass(frozen=True)
class StoreStats:
    sessions: int
    messages: int
    bytes: int
    max_bytes: int
    ttl_s: float
    evicted: int
    expired: int
    peak_bytes: int = 0  # the most bytes ever held at once (never above max_bytes)


class SessionStore:
    """LRU + TTL store of decoded caches, capped at `max_bytes`."""

    def __init__(
        self, ttl_s: float = 600.0, max_bytes: int = 2 << 30, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.ttl_s = float(ttl_s)
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._evicted = 0
        self._expired = 0
        self._peak = 0

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` can be held at all (after evicting everything else)."""
        return nbytes <= self.max_bytes

    def put(self, session_id: str, message_id: str, kv: ContextKV, config_label: str = "") -> list[Key]:
        """Store a decoded cache; returns the keys evicted to make room. ValueError if it can never fit."""
        nbytes = kv_nbytes(kv)
        if not self.fits(nbytes):
            raise ValueError(f"a cache of {nbytes} bytes exceeds the store's cap of {self.max_bytes} bytes")
        key = (session_id, message_id)
        evicted: list[Key] = []
        with self._lock:
            now = self._clock()
            self._expire(now)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + nbytes > self.max_bytes:
                victim, entry = self._entries.popitem(last=False)
                self._bytes -= entry.nbytes
                self._evicted += 1
                evicted.append(victim)
            self._entries[key] = Entry(kv, nbytes, now, now, config_label)
            self._bytes += nbytes
            self._peak = max(self._peak, self._bytes)
        for victim in evicted:
            logger.info("evicted session %s message %s (memory cap %d bytes)", *victim, self.max_bytes)
        return evicted

    def get(self, session_id: str, message_id: str) -> ContextKV | None:
        """The cache of a message (refreshing its TTL and LRU rank), or None if unknown/expired/evicted."""
        key = (session_id, message_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.last_used = now
            self._entries.move_to_end(key)
            return entry.kv

    def discard(self, session_id: str, message_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop((session_id, message_id), None)
            if entry is None:
                return False
            self._bytes -= entry.nbytes
            return True

    def purge_expired(self) -> int:
        """Drop the entries not used for ttl_s; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        stale = [k for k, e in self._entries.items() if now - e.last_used >= self.ttl_s]
        for key in stale:
            self._bytes -= self._entries.pop(key).nbytes
        self._expired += len(stale)
        return len(stale)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and self._clock() - entry.last_used < self.ttl_s

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> StoreStats:
        with self._lock:
            self._expire(self._clock())
            return StoreStats(
                sessions=len({s for s, _ in self._entries}), messages=len(self._entries), bytes=self._bytes,
                max_bytes=self.max_bytes, ttl_s=self.ttl_s, evicted=self._evicted, expired=self._expired,
                peak_bytes=self._peak,
            )  # fmt: skip
