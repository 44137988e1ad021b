"""Who may call the receiver, who they are, and how many calls it serves at once.

    guard = Guard(token="...", max_calls=64, per_peer=4)          # one token: one identity
    guard = Guard(tenants=read_tenants(path))                      # one token per tenant
    who = guard.identify(metadata, auth_context)   # gRPC: ("authorization", "Bearer <token>")
    who = guard.identify_bearer(request.headers.getlist("authorization"))        # REST
    with guard.acquire(context.peer()):            # Busy when all calls, or this peer's, are taken
        ...

Isolation model. Every call is made by an Identity: the tenant whose token it
presents (--tenants-file), the single token's holder ("default", --auth-token-file),
the client certificate's common name under mutual TLS without tokens, or
"anonymous" when the receiver has no authentication at all. An identity owns
the messages it sends: their ids are its own namespace, it alone can ask about
them, and it sees only its own records over REST. An operator (a tenant marked
`operator`, a certificate name given by --operator, or the single token's
holder) sees every identity's records and the receiver's global state.

Tokens are compared in constant time (hmac.compare_digest) and are never
logged, echoed in an error or kept anywhere but here. A request with two
authorization values is refused on gRPC and REST alike. A peer is the client's
address without its port ("ipv4:10.0.0.7:53211" -> "10.0.0.7"), so that one
sender cannot take more slots by opening more connections. When identities are
told apart (tenants, client certificates), the per-sender limit counts calls per
identity instead, so that senders behind one address (a proxy, a load balancer,
loopback) do not share one allowance and one tenant cannot take another's.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTH_METADATA_KEY = "authorization"
"""gRPC metadata key (lower case, as HTTP/2 requires) of the bearer token."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
"""A tenant or certificate identity: what may appear in logs and in the store's keys."""


@dataclass(frozen=True)
class Identity:
    """Who made a call. operator: may see every identity's records and the receiver's state."""

    name: str
    operator: bool = False


ANONYMOUS = Identity("anonymous", operator=True)
"""The caller of a receiver without authentication: one user, who sees everything."""
SINGLE = Identity("default", operator=True)
"""The holder of the single token (--auth-token-file): one user, who sees everything."""


class Unauthorized(Exception):
    """The call has no usable credential; `message` says why and never contains a token."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def read_tenants(path: str | Path) -> dict[str, Identity]:
    """Tenants from a file of lines `NAME TOKEN [operator]` ('#' starts a comment): token -> Identity.

    NAME: letters, digits and ._@- (at most 64); TOKEN: printable ASCII without spaces. Names and
    tokens must be unique. ValueError says which line is wrong and never quotes a token."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read --tenants-file {str(path)!r}: {why}") from None
    tenants: dict[str, Identity] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"--tenants-file {str(path)!r} line {number}"
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "operator"):
            raise ValueError(f"{where}: expected 'NAME TOKEN' or 'NAME TOKEN operator'")
        name, token = fields[0], fields[1]
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"{where}: tenant name {name[:64]!r} must be letters, digits and ._@- (64 at most)"
            )
        if not (token.isascii() and token.isprintable()):
            raise ValueError(f"{where}: the token must be printable ASCII")
        if name in names:
            raise ValueError(f"{where}: tenant {name!r} is listed twice")
        if token in tenants:
            raise ValueError(f"{where}: tenant {name!r} has the same token as tenant {tenants[token].name!r}")
        names.add(name)
        tenants[token] = Identity(name, operator=len(fields) == 3)
    if not tenants:
        raise ValueError(f"--tenants-file {str(path)!r} lists no tenant")
    return tenants


class Busy(Exception):
    """No slot for another call: `scope` is "all" (max_calls) or "peer" (per_peer)."""

    def __init__(self, scope: str, message: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.message = message


def bearer_value(header: str | bytes | None) -> str | None:
    """The token of an Authorization value `Bearer <token>` (scheme case-insensitive), else None."""
    if header is None:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def bearer_ok(header: str | bytes | None, token: str) -> bool:
    """Whether an Authorization value is `Bearer <token>` (scheme case-insensitive, constant-time compare)."""
    value = bearer_value(header)
    return value is not None and hmac.compare_digest(value.encode(), token.encode())


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
    """Identities and admission of Transfer/Ask calls: at most `max_calls` at once over all peers,
    `per_peer` at once for one peer. Thread-safe.

    token: the single token (its holder is SINGLE). tenants: token -> Identity (read_tenants); not
    with `token`. Neither: callers are anonymous, or, under mutual TLS (`client_certs`), named by
    their certificate's common name, operators when listed in `operators`.
    """

    def __init__(
        self,
        token: str | None = None,
        max_calls: int = 64,
        per_peer: int = 4,
        *,
        tenants: Mapping[str, Identity] | None = None,
        client_certs: bool = False,
        operators: Sequence[str] = (),
    ) -> None:
        for name, value in (("max_calls", max_calls), ("per_peer", per_peer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if token is not None and not token.strip():
            raise ValueError("the bearer token is empty")
        if token is not None and tenants:
            raise ValueError("give either one bearer token or a tenants file, not both")
        self._token = token.strip() if token is not None else None
        self._tenants: dict[str, Identity] = dict(tenants or {})
        if self._token is not None:
            self._tenants = {self._token: SINGLE}
        self.client_certs = client_certs
        self.operators = frozenset(operators)
        self.max_calls = max_calls
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._by_peer: dict[str, int] = {}
        self._calls = 0
        self._refused_busy = 0
        self._refused_auth = 0

    def __repr__(self) -> str:  # never shows a token
        auth = (
            "token" if self._token is not None
            else f"{len(self._tenants)} tenants" if self._tenants
            else "client certificates" if self.client_certs else "none"
        )  # fmt: skip
        return f"Guard(auth={auth}, max_calls={self.max_calls}, per_peer={self.per_peer})"

    @property
    def requires_token(self) -> bool:
        return bool(self._tenants)

    @property
    def token(self) -> str | None:
        """The single token, when there is one (None with tenants or without authentication)."""
        return self._token

    @property
    def mode(self) -> str:
        """How identities are told apart: "tenants", "token", "certificates" or "none"."""
        if self._token is not None:
            return "token"
        return "tenants" if self._tenants else "certificates" if self.client_certs else "none"

    def _by_token(self, values: Sequence[Any]) -> Identity:
        """The identity of the authorization values of one request; Unauthorized otherwise."""
        if not values:
            raise Unauthorized("missing bearer token: send 'authorization: Bearer <token>'")
        if len(values) > 1:
            raise Unauthorized(f"{len(values)} authorization values; send exactly one")
        presented = bearer_value(values[0])
        found: Identity | None = None
        if presented is not None:
            for token, identity in self._tenants.items():  # every one compared: constant time in all
                if hmac.compare_digest(presented.encode(), token.encode()):
                    found = identity
        if found is None:
            raise Unauthorized("invalid bearer token")
        return found

    def _counted(self, identify: Any) -> Identity:
        try:
            return identify()  # type: ignore[no-any-return]
        except Unauthorized:
            with self._lock:
                self._refused_auth += 1
            raise

    def identify(
        self, metadata: Iterable[Any] | None, auth_context: Mapping[str, Any] | None = None
    ) -> Identity:
        """The identity of a gRPC call (Unauthorized, whose message never contains a token)."""
        values = [v for k, v in (metadata or ()) if str(k).lower() == AUTH_METADATA_KEY]
        return self._counted(lambda: self._identify(values, auth_context))

    def _identify(self, values: Sequence[Any], auth_context: Mapping[str, Any] | None) -> Identity:
        if self._tenants:
            return self._by_token(values)
        if len(values) > 1:
            raise Unauthorized(f"{len(values)} authorization values; send exactly one")
        if self.client_certs:
            names = (auth_context or {}).get("x509_common_name") or []
            name = names[0].decode("utf-8", "replace") if names and isinstance(names[0], bytes) else ""
            if not _NAME.fullmatch(name or ""):
                raise Unauthorized(
                    f"the client certificate's common name {name[:64]!r} is not a usable identity "
                    "(letters, digits and ._@-, at most 64)"
                )
            return Identity(name, operator=name in self.operators)
        return ANONYMOUS

    def identify_bearer(self, values: Sequence[str]) -> Identity:
        """The identity of a REST request from its Authorization header values (Unauthorized)."""

        def identify() -> Identity:
            if self._tenants:
                return self._by_token(values)
            if len(values) > 1:
                raise Unauthorized(f"{len(values)} authorization values; send exactly one")
            return ANONYMOUS  # no tokens: REST serves one user (it binds loopback unless told otherwise)

        return self._counted(identify)

    def authorized(self, metadata: Iterable[Any] | None) -> str | None:
        """None when the call may proceed, else why not (a message that never contains a token)."""
        try:
            self.identify(metadata)
        except Unauthorized as exc:
            return exc.message
        return None

    def acquire(self, peer: str, who: Identity | None = None) -> Slot:
        """One call slot for a sender, released by Slot.release() or on leaving `with`; raises Busy when
        all slots, or this sender's, are taken. The sender is its identity when identities are told apart
        (tenants, client certificates), else `peer`'s address (a gRPC peer string)."""
        host = who.name if who is not None and self.mode in ("tenants", "certificates") else peer_host(peer)
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
                    f"sender {host} already has {mine} calls in progress, the limit per sender is "
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


class ByteBudget:
    """Bytes that calls in progress may hold at once (e.g. the chunk data of transfers in flight):
    take() reserves or raises Busy, the returned Slot gives them back. Thread-safe."""

    def __init__(self, max_bytes: int, what: str, flag: str) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.what, self.flag = what, flag
        self._lock = threading.Lock()
        self._held = 0
        self.peak = 0
        self.refused = 0

    @property
    def held(self) -> int:
        return self._held

    def take(self, nbytes: int) -> _Bytes:
        with self._lock:
            if self._held + nbytes > self.max_bytes:
                self.refused += 1
                raise Busy(
                    "bytes",
                    f"{self.what} in progress hold {self._held} of the receiver's {self.max_bytes} bytes "
                    f"({self.flag}); this one needs {nbytes}: retry later",
                )
            self._held += nbytes
            self.peak = max(self.peak, self._held)
        return _Bytes(self, nbytes)

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


class _Bytes:
    """Bytes taken from a ByteBudget; release() (idempotent) gives them back."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget: ByteBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give(self.nbytes)


class FairLock:
    """A lock that threads get in the order they asked for it (a ticket lock), usable with `with`.

    The receiver holds it around each model forward: answers sharing the model take turns forward
    by forward, so a long one delays the others by one forward at a time, never by its whole length.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Threads holding or waiting for the lock."""
        with self._cond:
            return self._next - self._serving

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
