"""Who may call the receiver, and how many calls it serves at once.

    guard = Guard(token="...", max_calls=64, per_peer=4)
    guard.authorized(metadata)             # gRPC: ("authorization", "Bearer <token>") in the metadata
    bearer_ok(request.headers.get("authorization"), token)      # REST
    with guard.acquire(context.peer()):    # Busy when all calls, or this peer's, are taken
        ...

The token is compared in constant time (hmac.compare_digest) and is never
logged, echoed in an error or kept anywhere but here. A peer is the client's
address without its port ("ipv4:10.0.0.7:53211" -> "10.0.0.7"), so that one
sender cannot take more slots by opening more connections. Behind a proxy or
load balancer that does not preserve client addresses, every sender is one peer.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

AUTH_METADATA_KEY = "authorization"
"""gRPC metadata key (lower case, as HTTP/2 requires) of the bearer token."""


class Busy(Exception):
    """No slot for another call: `scope` is "all" (max_calls) or "peer" (per_peer)."""

    def __init__(self, scope: str, message: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.message = message


def bearer_ok(header: str | bytes | None, token: str) -> bool:
    """Whether an Authorization value is `Bearer <token>` (scheme case-insensitive, constant-time compare)."""
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def peer_host(peer: str) -> str:
    """The address of a gRPC peer string without its port: ipv4:1.2.3.4:5 -> 1.2.3.4, ipv6:[::1]:5 -> ::1."""
    kind, sep, rest = peer.partition(":")
    if not sep:
        return peer
    if kind == "ipv6":
        if rest.startswith("["):
            return rest[1 : rest.find("]")] if "]" in rest else rest
        return rest.rsplit(":", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer  # unix:/path, unix-abstract:..., or an unknown form: the whole string


@dataclass(frozen=True)
class GuardStats:
    calls: int  # Transfer and Ask calls in progress
    peers: int  # peers with a call in progress
    busiest_peer_calls: int
    refused_busy: int
    refused_auth: int
    max_calls: int
    per_peer: int


class Slot:
    """One admitted call; release() (idempotent) or leaving `with` gives the slot back."""

    def __init__(self, guard: Guard, host: str) -> None:
        self._guard: Guard | None = guard
        self.host = host

    def release(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard._release(self.host)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Guard:
    """Bearer-token check and admission of Transfer/Ask calls: at most `max_calls` at once over all peers,
    `per_peer` at once for one peer. token None: no authentication. Thread-safe."""

    def __init__(self, token: str | None = None, max_calls: int = 64, per_peer: int = 4) -> None:
        for name, value in (("max_calls", max_calls), ("per_peer", per_peer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if token is not None and not token.strip():
            raise ValueError("the bearer token is empty")
        self._token = token.strip() if token is not None else None
        self.max_calls = max_calls
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._by_peer: dict[str, int] = {}
        self._calls = 0
        self._refused_busy = 0
        self._refused_auth = 0

    def __repr__(self) -> str:  # never shows the token
        auth = "token" if self._token is not None else "none"
        return f"Guard(auth={auth}, max_calls={self.max_calls}, per_peer={self.per_peer})"

    @property
    def requires_token(self) -> bool:
        return self._token is not None

    @property
    def token(self) -> str | None:
        """The expected token (for the REST app's check); None when authentication is off."""
        return self._token

    def authorized(self, metadata: Iterable[Any] | None) -> str | None:
        """None when the call may proceed, else why not (a message that never contains a token)."""
        if self._token is None:
            return None
        values = [v for k, v in (metadata or ()) if str(k).lower() == AUTH_METADATA_KEY]
        if not values:
            reason = "missing bearer token: send metadata 'authorization: Bearer <token>'"
        elif len(values) == 1 and bearer_ok(values[0], self._token):
            return None
        else:
            reason = "invalid bearer token"
        with self._lock:
            self._refused_auth += 1
        return reason

    def acquire(self, peer: str) -> Slot:
        """One call slot for `peer` (a gRPC peer string), released by Slot.release() or on leaving
        `with`; raises Busy when all slots, or this peer's, are taken."""
        host = peer_host(peer)
        with self._lock:
            mine = self._by_peer.get(host, 0)
            if self._calls >= self.max_calls:
                self._refused_busy += 1
                raise Busy(
                    "all",
                    f"the receiver is serving its maximum of {self.max_calls} concurrent calls "
                    "(--max-concurrent-sessions); retry later",
                )
            if mine >= self.per_peer:
                self._refused_busy += 1
                raise Busy(
                    "peer",
                    f"peer {host} already has {mine} calls in progress, the limit per peer is "
                    f"{self.per_peer} (--per-peer-concurrency); retry when one finishes",
                )
            self._calls += 1
            self._by_peer[host] = mine + 1
        return Slot(self, host)

    def _release(self, host: str) -> None:
        with self._lock:
            self._calls -= 1
            left = self._by_peer[host] - 1
            if left:
                self._by_peer[host] = left
            else:
                del self._by_peer[host]

    def stats(self) -> GuardStats:
        with self._lock:
            return GuardStats(
                calls=self._calls, peers=len(self._by_peer), busiest_peer_calls=max(self._by_peer.values(), default=0),
                refused_busy=self._refused_busy, refused_auth=self._refused_auth, max_calls=self.max_calls,
                per_peer=self.per_peer,
            )  # fmt: skip
