"""The receiver's session store: decoded context caches by (owner, message id), and the memory
budget that decodes in flight share with them.

Only a complete, verified and decoded message is ever put here (the servicer
never stores a partial one), so an Ask can only be answered from what arrived.
A message belongs to the identity that sent it (kvlink.server.guard): message ids are
unique per owner, an id that is held is never overwritten (put raises
KeyError), and a lookup must name the owner and the session too.

Memory: the store holds at most `max_bytes`, counting the decoded caches it
keeps AND the reservations of decodes in flight (reserve(), taken before a
decode starts with kvlink.codec.decode_cost). Room is made by evicting least
recently used entries; when the decodes in flight alone would pass the cap,
reserve() raises StoreBusy (the receiver waits a little for room, then
refuses BUSY) before any decode allocates. One owner holds at most
`owner_max_bytes` (caches and reservations together): past it, its own least
recently used entries go first, so one identity cannot evict the others'
contexts beyond its share. Entries expire `ttl_s` seconds after their last use.
Thread-safe; the clock is injectable for tests.
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

Key = tuple[str, str]  # (owner, message_id)


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
    session_id: str = ""


@dataclass(frozen=True)
class StoreStats:
    sessions: int
    messages: int
    bytes: int
    max_bytes: int
    ttl_s: float
    evicted: int
    expired: int
    peak_bytes: int = 0  # the most bytes ever held or reserved at once (never above max_bytes)
    reserved_bytes: int = 0  # held for decodes in flight
    refused_busy: int = 0  # reservations refused because decodes in flight filled the budget


class StoreBusy(Exception):
    """The decodes in flight already hold so much of the budget that this one cannot start now."""


class Reservation:
    """Bytes of the store's budget held for one decode; release() (idempotent) gives them back."""

    def __init__(self, store: SessionStore, owner: str, nbytes: int) -> None:
        self._store: SessionStore | None = store
        self.owner = owner
        self.nbytes = nbytes

    def release(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store._unreserve(self.owner, self.nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SessionStore:
    """LRU + TTL store of decoded caches; caches and decodes in flight together stay under `max_bytes`."""

    def __init__(
        self,
        ttl_s: float = 600.0,
        max_bytes: int = 2 << 30,
        clock: Callable[[], float] = time.monotonic,
        owner_max_bytes: int | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        for name, value in (("max_bytes", max_bytes), ("owner_max_bytes", owner_max_bytes or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.ttl_s = float(ttl_s)
        self.max_bytes = max_bytes
        self.owner_max_bytes = min(owner_max_bytes or max_bytes, max_bytes)
        self._owner_bytes: dict[str, int] = {}  # held + reserved, per owner
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._reserved = 0
        self._reserving: dict[str, int] = {}  # reserved, per owner
        self._evicted = 0
        self._expired = 0
        self._peak = 0
        self._refused_busy = 0

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` can be held at all (after evicting everything else)."""
        return nbytes <= self.owner_max_bytes

    def _charge(self, owner: str, nbytes: int) -> None:
        left = self._owner_bytes.get(owner, 0) + nbytes
        if left:
            self._owner_bytes[owner] = left
        else:
            self._owner_bytes.pop(owner, None)

    def _evict(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self._charge(key[0], -entry.nbytes)
        self._evicted += 1

    def _make_room(self, owner: str, nbytes: int) -> list[Key]:
        """Evict LRU entries (lock held) until `owner`'s share and then the whole store fit `nbytes`
        more: the owner's own entries first while it is over its share. The keys evicted."""
        evicted: list[Key] = []
        while self._owner_bytes.get(owner, 0) + nbytes > self.owner_max_bytes:
            own = next((k for k in self._entries if k[0] == owner), None)
            if own is None:
                break
            self._evict(own)
            evicted.append(own)
        while self._entries and self._bytes + self._reserved + nbytes > self.max_bytes:
            victim = next(iter(self._entries))
            self._evict(victim)
            evicted.append(victim)
        return evicted

    def _log_evicted(self, evicted: list[Key]) -> None:
        for owner, message_id in evicted:
            logger.info("evicted message %r of %s (memory cap %d bytes)", message_id, owner, self.max_bytes)

    def reserve(self, nbytes: int, owner: str = "") -> Reservation:
        """Hold `nbytes` of the budget for a decode of `owner`'s, evicting LRU entries to make room.

        ValueError when `nbytes` exceeds what one owner may ever hold; StoreBusy when the decodes in
        flight (in all, or `owner`'s) leave too little of it (retry soon: decodes are short)."""
        if not self.fits(nbytes):
            raise ValueError(f"{nbytes} bytes exceed the store's cap of {self.owner_max_bytes} bytes")
        with self._lock:
            self._expire(self._clock())
            mine = sum(r for o, r in self._reserving.items() if o == owner)
            if self._reserved + nbytes > self.max_bytes or mine + nbytes > self.owner_max_bytes:
                self._refused_busy += 1
                raise StoreBusy(
                    f"decodes in flight hold {self._reserved} of this receiver's {self.max_bytes} bytes for "
                    f"contexts (--max-cached-bytes), {mine} of them this sender's; this one needs {nbytes}"
                )
            evicted = self._make_room(owner, nbytes)
            self._reserved += nbytes
            self._reserving[owner] = mine + nbytes
            self._charge(owner, nbytes)
            self._peak = max(self._peak, self._bytes + self._reserved)
        self._log_evicted(evicted)
        return Reservation(self, owner, nbytes)

    def _unreserve(self, owner: str, nbytes: int) -> None:
        with self._lock:
            self._take_back(owner, nbytes)

    def _take_back(self, owner: str, nbytes: int) -> None:
        """Return a reservation's bytes (lock held)."""
        self._reserved -= nbytes
        self._charge(owner, -nbytes)
        left = self._reserving.get(owner, 0) - nbytes
        if left:
            self._reserving[owner] = left
        else:
            self._reserving.pop(owner, None)

    def put(
        self,
        owner: str,
        session_id: str,
        message_id: str,
        kv: ContextKV,
        config_label: str = "",
        reservation: Reservation | None = None,
    ) -> list[Key]:
        """Store a decoded cache, in place of its decode's `reservation` (released here); returns the
        keys evicted to make room. ValueError if it can never fit; KeyError if the owner already holds
        a message with this id (ids are never overwritten)."""
        nbytes = kv_nbytes(kv)
        if not self.fits(nbytes):
            if reservation is not None:
                reservation.release()
            raise ValueError(
                f"a cache of {nbytes} bytes exceeds the store's cap of {self.owner_max_bytes} bytes"
            )
        key = (owner, message_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._entries:
                raise KeyError(f"{owner} already holds message {message_id!r}")
            if reservation is not None:
                reservation._store = None  # released under this lock, with the entry taking its place
                self._take_back(reservation.owner, reservation.nbytes)
            evicted = self._make_room(owner, nbytes)
            self._entries[key] = Entry(kv, nbytes, now, now, config_label, session_id)
            self._bytes += nbytes
            self._charge(owner, nbytes)
            self._peak = max(self._peak, self._bytes + self._reserved)
        self._log_evicted(evicted)
        return evicted

    def get(self, owner: str, session_id: str, message_id: str) -> ContextKV | None:
        """The cache of a message (refreshing its TTL and LRU rank), or None if unknown, another
        owner's or (when `session_id` is not empty) another session's, expired or evicted."""
        key = (owner, message_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None or (session_id and entry.session_id != session_id):
                return None
            entry.last_used = now
            self._entries.move_to_end(key)
            return entry.kv

    def holds(self, owner: str, message_id: str) -> bool:
        """Whether `owner` has a message with this id here (in any session)."""
        with self._lock:
            return (owner, message_id) in self._entries

    def discard(self, owner: str, message_id: str, session_id: str = "") -> int | None:
        """Drop `owner`'s message (of `session_id`, unless empty): the bytes it held, or None when there
        is no such entry (another owner's, another session's, expired or evicted: nothing is dropped)."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get((owner, message_id))
            if entry is None or (session_id and entry.session_id != session_id):
                return None
            del self._entries[(owner, message_id)]
            self._bytes -= entry.nbytes
            self._charge(owner, -entry.nbytes)
            return entry.nbytes

    def purge_expired(self) -> int:
        """Drop the entries not used for ttl_s; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        stale = [k for k, e in self._entries.items() if now - e.last_used >= self.ttl_s]
        for key in stale:
            nbytes = self._entries.pop(key).nbytes
            self._bytes -= nbytes
            self._charge(key[0], -nbytes)
        self._expired += len(stale)
        return len(stale)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and self._clock() - entry.last_used < self.ttl_s

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self, owner: str | None = None) -> StoreStats:
        """Counts of everything held (owner None) or of one owner's messages."""
        with self._lock:
            self._expire(self._clock())
            entries = [(k, e) for k, e in self._entries.items() if owner is None or k[0] == owner]
            return StoreStats(
                sessions=len({(k[0], e.session_id) for k, e in entries}), messages=len(entries),
                bytes=sum(e.nbytes for _, e in entries), max_bytes=self.max_bytes, ttl_s=self.ttl_s,
                evicted=self._evicted, expired=self._expired, peak_bytes=self._peak,
                reserved_bytes=self._reserved, refused_busy=self._refused_busy,
            )  # fmt: skip
