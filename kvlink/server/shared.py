"""The fleet's shared message store on Redis or Valkey: verified messages in their wire form, by owner.

    store = SharedStore.from_url("redis://redis:6379/0", ttl_s=600, max_bytes=4 << 30)
    store.holds(owner, message_id)                   # the id was used (kept ID_RETENTION_S past its end)
    store.put(owner, session_id, message_id, frames, record, family)   # a list of evicted "owner:id"
    store.touch(owner, message_id)                   # StoredEntry (its TTL and LRU rank refreshed) | None
    store.frames(owner, message_id, count)           # the message's frames, as stored | None
    store.discard(owner, message_id, session_id)     # stored bytes dropped | None
    store.stats(owner)                               # fleet-wide aggregates (owner None: everyone's)

What is stored is a message as the sender put it on the wire: the frames of kvlink.wire.to_frames
(header with its payload table of CRC32Cs, chunks, trailer with the header's CRC32C), serialized
protobuf and nothing else; never a pickle, never a decoded cache. The store is not trusted more than
a peer: the replica that reads a message feeds the frames through a fresh kvlink.wire.Assembler
(kvlink.server.fleet), which checks the fingerprint, every limit, every chunk's CRC32C and the header's,
before anything is decoded. Its record (JSON: owner, session, id, fingerprint, config, sizes) is for
operators and is never needed to answer.

Every operation that changes more than one key is one Lua script, which Redis runs atomically: a
message is written under a temporary key first, then renamed into place by the script that also
checks its id, evicts, indexes it and counts it, so a message is visible to the fleet only whole.
TTL, eviction and the per-owner share are fleet-wide, measured in stored bytes by the Redis clock:
entries expire `ttl_s` after their last use by any replica (Redis drops the data itself, the scripts
drop the index); past `owner_max_bytes` an owner's own least recently used messages go first, past
`max_bytes` everyone's. Keys (PREFIX, owners percent-quoted so that ':' separates fields):

    msg:{owner}:{id}      hash: record (JSON), session, n, and the frames as fields "0" .. "n-1"; TTL
    id:{owner}:{id}       the put's token: the id is used (EXISTS) for ID_RETENTION_S, even once dropped
    lru, lru:{owner}      sorted sets of "{owner}:{id}" by last use (µs)
    size                  hash "{owner}:{id}" -> stored bytes;  owners: hash owner -> stored bytes
    state                 hash: bytes (held), evicted, expired, released
    fleet:{owner|*}       hash: messages, payload, metadata, framing, signaling, total, fp16_bytes,
                          stored_bytes, tokens (atomic increments on each stored message)
    fleet:{owner|*}:families, fleet:{owner|*}:family:{family}   the same per config family

One Redis or Valkey server (or a primary with replicas), not a Cluster: the scripts touch keys they
compute. Every replica of a fleet should run with the same --session-ttl and --store-max-bytes: the
caps and the TTL are applied by whichever replica writes or reads.
"""

from __future__ import annotations

import json
import logging
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlink import wire

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

PREFIX = f"kvlink:v{wire.PROTOCOL_VERSION}:"
"""Every key's prefix: the protocol version, so that another version's layout never meets this one."""
ID_RETENTION_S = 86_400.0
"""How long a message id stays used (a new message with it is EXISTS) after the message expired, was
evicted or released: at least this, and at least the TTL."""
TMP_TTL_MS = 300_000
"""A message written under its temporary key and never renamed (the writer died) is gone after this."""
SCHEMES = ("redis", "rediss", "unix")
COUNTS = ("messages", "payload", "metadata", "framing", "signaling", "total", "fp16_bytes", "stored_bytes",
          "tokens")  # fmt: skip
"""The fleet-wide counters of each stored message (see SharedStore.put)."""


class StoreUnavailable(Exception):
    """The store cannot be reached (down, restarting, a timeout, refused credentials) or cannot take a
    write now (out of memory, a read-only replica). `message` says which store and why, never a password."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


CREDENTIALS = ("username", "password")
"""Query parameters of a store URL that redis-py reads as credentials (redis://HOST/0?password=...)."""


def redacted(url: str) -> str:
    """`url` without its user name and password, in the address or as query parameters (for logs and
    errors)."""
    parts = urllib.parse.urlsplit(url)
    query = parts.query
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k.lower() not in CREDENTIALS]
    if len(kept) < len(pairs):
        query = urllib.parse.urlencode(kept)
    if parts.username is None and parts.password is None and query == parts.query:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    # Not urlunsplit: it drops the "//" of an empty address (unix:///PATH).
    query, fragment = (f"?{query}" if query else ""), (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{query}{fragment}"


def check_url(text: str, where: str | None = None) -> str:
    """A usable --store URL (redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss:// for TLS, or
    unix:///PATH?db=N), or ValueError saying what is wrong. `where` names the URL in the error (default:
    `--store 'URL'`, quoted without its password); a URL read from a file is named by its file, and then
    nothing of the URL is quoted (the file may hold a bare password by mistake)."""
    url = str(text).strip()
    parts = urllib.parse.urlsplit(url)
    quote = where is None
    where = where or f"--store {redacted(url)!r}"
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"{where}: expected redis://HOST:PORT/DB, rediss://... (TLS) or unix:///PATH, scheme one of "
            f"{SCHEMES}"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{where}: the port is not a number in [0, 65535]") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{where}: a unix:// URL names the socket's path")
        return url
    if not parts.hostname:
        raise ValueError(f"{where}: no host (redis://HOST:PORT/DB)")
    if port == 0:
        raise ValueError(f"{where}: port 0")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and int(db) < 1 << 16):
        got = f", got {db!r}" if quote else ""
        raise ValueError(f"{where}: the database is a number (redis://HOST:PORT/0){got}")
    return url


def read_url_file(path: str, flag: str = "--store-url-file") -> str:
    """The store URL held by the file at `path` (one line; blank lines and surrounding whitespace are
    ignored), checked by check_url. ValueError names the file and never quotes what it holds."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ValueError(f"cannot read {flag} {path!r}: {why}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        held = "nothing" if not lines else f"{len(lines)} lines"
        raise ValueError(f"{flag} {path!r} holds {held}: one line, the store's URL, was expected")
    return check_url(lines[0], where=f"{flag} {path!r}")


def owner_key(owner: str) -> str:
    """An owner as a key component: percent-quoted, so it holds no ':' (nor '*', the all-owners scope)."""
    return urllib.parse.quote(owner, safe="")


# --- the scripts -------------------------------------------------------------------------------------------
# ARGV[1] is always the prefix. Sizes are stored bytes; TTLs are in milliseconds; last uses (the scores of
# the LRU sets) are Redis's clock in microseconds, so that uses a millisecond apart keep their order.
_COMMON = """
local P = ARGV[1]
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function owner_of(member)
  return string.sub(member, 1, string.find(member, ':', 1, true) - 1)
end
local function drop(member, why)
  local size = tonumber(redis.call('HGET', P .. 'size', member) or '0')
  local owner = owner_of(member)
  redis.call('HDEL', P .. 'size', member)
  redis.call('ZREM', P .. 'lru', member)
  redis.call('ZREM', P .. 'lru:' .. owner, member)
  if redis.call('HINCRBY', P .. 'owners', owner, -size) <= 0 then redis.call('HDEL', P .. 'owners', owner) end
  redis.call('HINCRBY', P .. 'state', 'bytes', -size)
  redis.call('HINCRBY', P .. 'state', why, 1)
  redis.call('DEL', P .. 'msg:' .. member)
  return size
end
local function purge(now, ttl)
  local stale = redis.call('ZRANGEBYSCORE', P .. 'lru', '-inf', now - ttl * 1000)
  for _, member in ipairs(stale) do drop(member, 'expired') end
  return #stale
end
"""

_PUT = (
    _COMMON
    + """
local o, m, tmp, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n, ttl, idttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local cap, share, family, counts = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11], cjson.decode(ARGV[12])
local member = o .. ':' .. m
local now = now_us()
purge(now, ttl)
local used = redis.call('GET', P .. 'id:' .. member)
if used then
  if used == token then return {'OK'} end  -- a retried call whose first try went through
  redis.call('DEL', tmp)
  return {'EXISTS'}
end
if redis.call('EXISTS', tmp) == 0 then return {'LOST'} end
local out = {'OK'}
while tonumber(redis.call('HGET', P .. 'owners', o) or '0') + n > share do
  local victim = redis.call('ZRANGE', P .. 'lru:' .. o, 0, 0)[1]
  if not victim then break end
  drop(victim, 'evicted')
  table.insert(out, victim)
end
while tonumber(redis.call('HGET', P .. 'state', 'bytes') or '0') + n > cap do
  local victim = redis.call('ZRANGE', P .. 'lru', 0, 0)[1]
  if not victim then break end
  drop(victim, 'evicted')
  table.insert(out, victim)
end
redis.call('RENAME', tmp, P .. 'msg:' .. member)
redis.call('PEXPIRE', P .. 'msg:' .. member, ttl)
redis.call('SET', P .. 'id:' .. member, token, 'PX', idttl)
redis.call('ZADD', P .. 'lru', now, member)
redis.call('ZADD', P .. 'lru:' .. o, now, member)
redis.call('HSET', P .. 'size', member, n)
redis.call('HINCRBY', P .. 'owners', o, n)
redis.call('HINCRBY', P .. 'state', 'bytes', n)
for _, scope in ipairs({'*', o}) do
  local base = P .. 'fleet:' .. scope
  redis.call('SADD', base .. ':families', family)
  for field, value in pairs(counts) do
    redis.call('HINCRBY', base, field, value)
    redis.call('HINCRBY', base .. ':family:' .. family, field, value)
  end
end
return out
"""
)

_TOUCH = (
    _COMMON
    + """
local o, m, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local member = o .. ':' .. m
local key = P .. 'msg:' .. member
local now = now_us()
purge(now, ttl)
if redis.call('EXISTS', key) == 0 then
  if redis.call('ZSCORE', P .. 'lru', member) then drop(member, 'expired') end  -- dropped by Redis itself
  return false
end
redis.call('PEXPIRE', key, ttl)
redis.call('ZADD', P .. 'lru', 'XX', now, member)
redis.call('ZADD', P .. 'lru:' .. o, 'XX', now, member)
return redis.call('HMGET', key, 'session', 'n')
"""
)

_DISCARD = (
    _COMMON
    + """
local o, m, session = ARGV[2], ARGV[3], ARGV[4]
local member = o .. ':' .. m
local key = P .. 'msg:' .. member
if redis.call('EXISTS', key) == 0 then
  if redis.call('ZSCORE', P .. 'lru', member) then drop(member, 'expired') end
  return -1
end
if session ~= '' and redis.call('HGET', key, 'session') ~= session then return -1 end
return drop(member, 'released')
"""
)

_PURGE = _COMMON + "return purge(now_us(), tonumber(ARGV[2]))\n"


@dataclass(frozen=True)
class StoredEntry:
    """What touch() learns of a stored message: its session and how many frames it has (unverified: the
    frames are checked when they are read)."""

    session_id: str
    frames: int


class SharedStore:
    """Messages in their wire form on one Redis/Valkey server, shared by a fleet of receivers.

    client: a redis.Redis (bytes replies). ttl_s: after the last use by any replica. max_bytes: stored
    bytes of the whole fleet; owner_max_bytes: of one owner (default: all of it). where: the URL shown
    in messages (no password). Thread-safe (redis-py's connection pool); every method blocks on the
    network, so async callers run it in a thread. Any method raises StoreUnavailable when the store
    cannot be reached; the next call reconnects by itself."""

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: float = 600.0,
        max_bytes: int = 4 << 30,
        owner_max_bytes: int | None = None,
        where: str = "the shared store",
        prefix: str = PREFIX,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        for name, value in (("max_bytes", max_bytes), ("owner_max_bytes", owner_max_bytes or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.client = client
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.id_ttl_ms = int(max(ttl_s, ID_RETENTION_S) * 1000)
        self.max_bytes = max_bytes
        self.owner_max_bytes = min(owner_max_bytes or max_bytes, max_bytes)
        self.where = where
        self.prefix = prefix
        self._put = client.register_script(_PUT)
        self._touch = client.register_script(_TOUCH)
        self._discard = client.register_script(_DISCARD)
        self._purge = client.register_script(_PURGE)

    @classmethod
    def from_url(
        cls,
        url: str,
        ttl_s: float = 600.0,
        max_bytes: int = 4 << 30,
        owner_max_bytes: int | None = None,
        prefix: str = PREFIX,
    ) -> SharedStore:
        """A store at `url` (check_url). Connections are made on first use: a store that is down now makes
        calls fail with StoreUnavailable until it is back. A lost connection is retried twice, quickly,
        then reported; each later call tries a fresh one."""
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        url = check_url(url)
        client = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=30.0, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )  # fmt: skip
        return cls(client, ttl_s, max_bytes, owner_max_bytes, f"--store {redacted(url)}", prefix)

    # --- the calls ------------------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), with the store's failures as StoreUnavailable."""
        import redis
        from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError

        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            reason = f"unreachable ({type(exc).__name__}: {str(exc)[:200]})"
        # Not the server's text for these: redis-py quotes the command in it, frames and all.
        except OutOfMemoryError:
            reason = "full (it refused the call: OOM, used memory is at its maxmemory)"
        except ReadOnlyError:
            reason = "read-only (it refused the call: a replica, not the primary)"
        except NoPermissionError:
            reason = "closed to this user (it refused the call: its ACL)"
        raise StoreUnavailable(f"{self.where} is {reason} while trying to {what}")

    def ping(self) -> str:
        """The server's name and version (StoreUnavailable if it does not answer)."""
        info = self._call("greet it", self.client.info, "server")
        name = "valkey" if "valkey_version" in info else "redis"
        return f"{name} {info.get(name + '_version', info.get('redis_version', '?'))}"

    def _member(self, owner: str, message_id: str) -> str:
        wire.check_id("message_id", message_id)  # ids reach the keys only in their checked alphabet
        return f"{owner_key(owner)}:{message_id}"

    def holds(self, owner: str, message_id: str) -> bool:
        """Whether `owner` used this message id in the fleet (held, or dropped less than ID_RETENTION_S ago)."""
        key = f"{self.prefix}id:{self._member(owner, message_id)}"
        return bool(self._call(f"check message id {message_id!r}", self.client.exists, key))

    def put(
        self,
        owner: str,
        session_id: str,
        message_id: str,
        frames: Sequence[bytes],
        record: dict[str, Any],
        family: str = "other",
        counts: dict[str, int] | None = None,
    ) -> list[str]:
        """Store a verified message's frames for the fleet (visible only once complete); returns the
        "owner:id" members evicted to make room. `record`: JSON-able facts for operators; `counts`:
        added to the fleet's counters (COUNTS; stored_bytes is this message's). KeyError when the owner
        already used this id anywhere in the fleet; ValueError when it can never fit the caps."""
        wire.check_id("message_id", message_id)
        wire.check_id("session_id", session_id)
        nbytes = sum(len(f) for f in frames)
        if nbytes > self.owner_max_bytes:
            raise ValueError(
                f"a message of {nbytes} stored bytes exceeds the shared store's cap of {self.owner_max_bytes} "
                "bytes for one identity (--store-max-bytes)"
            )
        totals = {name: 0 for name in COUNTS} | dict(counts or {})
        unknown = set(totals) - set(COUNTS)
        if unknown:
            raise ValueError(f"unknown fleet counters {sorted(unknown)}; known: {COUNTS}")
        totals.update(messages=1, stored_bytes=nbytes)
        token = secrets.token_hex(16)
        tmp = f"{self.prefix}tmp:{token}"
        fields: dict[str | bytes, bytes | str | int] = {
            "record": json.dumps(record, sort_keys=True), "session": session_id, "n": len(frames),
        }  # fmt: skip
        fields.update({str(i): bytes(f) for i, f in enumerate(frames)})
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(tmp, mapping=fields)  # type: ignore[arg-type]
        pipe.pexpire(tmp, TMP_TTL_MS)
        what = f"store message {message_id!r}"
        self._call(what, pipe.execute)
        args = [self.prefix, owner_key(owner), message_id, tmp, token, nbytes, self.ttl_ms, self.id_ttl_ms,
                self.max_bytes, self.owner_max_bytes, family, json.dumps({k: int(v) for k, v in totals.items()})]  # fmt: skip
        reply = [_text(r) for r in self._call(what, self._put, keys=[], args=args)]
        if reply[0] == "EXISTS":
            raise KeyError(f"{owner} already used message id {message_id!r} in this fleet")
        if reply[0] != "OK":  # the temporary copy expired before it was renamed: the write took minutes
            raise StoreUnavailable(f"{self.where} lost message {message_id!r} before it was complete")
        for victim in reply[1:]:
            logger.info("the shared store evicted %s (cap %d stored bytes)", victim, self.max_bytes)
        return reply[1:]

    def touch(self, owner: str, message_id: str) -> StoredEntry | None:
        """The stored message's session and frame count, refreshing its TTL and LRU rank fleet-wide; None
        when the owner has no such message (never held, another owner's, expired, evicted, released)."""
        wire.check_id("message_id", message_id)
        args = [self.prefix, owner_key(owner), message_id, self.ttl_ms]
        reply = self._call(f"look up message {message_id!r}", self._touch, keys=[], args=args)
        if not reply:
            return None
        session, count = (_text(r) if r is not None else "" for r in reply)
        try:
            frames = int(count)
        except ValueError:
            frames = -1  # what a damaged entry claims is checked by the reader (kvlink.server.fleet)
        return StoredEntry(session, frames)

    def frames(self, owner: str, message_id: str, count: int) -> list[bytes] | None:
        """The message's `count` frames as stored (None if it went meanwhile or has fewer)."""
        key = f"{self.prefix}msg:{self._member(owner, message_id)}"
        if count < 1:
            return None
        values = self._call(
            f"read message {message_id!r}", self.client.hmget, key, [str(i) for i in range(count)]
        )
        if any(v is None for v in values):
            return None
        return [bytes(v) for v in values]

    def discard(self, owner: str, message_id: str, session_id: str = "") -> int | None:
        """Drop `owner`'s message (of `session_id`, unless empty) from the fleet: its stored bytes, or None
        when there is no such message (nothing is dropped). Its id stays used."""
        wire.check_id("message_id", message_id)
        args = [self.prefix, owner_key(owner), message_id, session_id]
        freed = int(self._call(f"release message {message_id!r}", self._discard, keys=[], args=args))
        return None if freed < 0 else freed

    def purge_expired(self) -> int:
        """Drop the index entries of messages unused for the TTL; how many."""
        return int(self._call("expire messages", self._purge, keys=[], args=[self.prefix, self.ttl_ms]))

    def stats(self, owner: str | None = None) -> dict[str, Any]:
        """Fleet-wide aggregates from the store: of `owner`'s messages, or everyone's (None). Counters
        of every message stored since the store started (messages, bytes by category, FP16 bytes, stored
        bytes, tokens; per config family) and what is held now."""
        self.purge_expired()
        scope = "*" if owner is None else owner_key(owner)
        base = f"{self.prefix}fleet:{scope}"
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(base)
        pipe.smembers(f"{base}:families")
        pipe.hgetall(f"{self.prefix}state")
        pipe.zcard(f"{self.prefix}lru" if owner is None else f"{self.prefix}lru:{scope}")
        pipe.hget(f"{self.prefix}owners", scope)
        totals, families, state, held, owner_bytes = self._call("read the fleet's statistics", pipe.execute)
        names = sorted(_text(f) for f in families)
        pipe = self.client.pipeline(transaction=False)
        for family in names:
            pipe.hgetall(f"{base}:family:{family}")
        per_family = self._call("read the fleet's statistics", pipe.execute) if names else []
        state = {_text(k): int(v) for k, v in state.items()}
        out: dict[str, Any] = {
            "store": self.where.removeprefix("--store "),
            **_summary(totals),
            "families": {name: _summary(counts) for name, counts in zip(names, per_family)},
            "held": {
                "messages": int(held),
                "bytes": state.get("bytes", 0) if owner is None else int(owner_bytes or 0),
                "max_bytes": self.max_bytes if owner is None else self.owner_max_bytes,
                "ttl_s": self.ttl_ms / 1000,
            },
        }
        if owner is None:
            out["held"].update({k: state.get(k, 0) for k in ("evicted", "expired", "released")})
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _summary(counts: dict[Any, Any]) -> dict[str, Any]:
    """Counters (bytes from Redis) as the fleet section of /v1/stats shows them."""
    c = {name: 0 for name in COUNTS} | {_text(k): int(v) for k, v in counts.items() if _text(k) in COUNTS}
    return {
        "messages": c["messages"], "tokens": c["tokens"], "fp16_bytes": c["fp16_bytes"],
        "stored_bytes": c["stored_bytes"],
        "bytes": {k: c[k] for k in ("payload", "metadata", "framing", "signaling", "total")},
        "compression_ratio": c["fp16_bytes"] / c["total"] if c["total"] else None,
    }  # fmt: skip
