"""A fleet of receivers on one real Redis (kvlink-serve --store; kvlink.server.shared, kvlink.server.fleet).

The tests start Debian's redis-server (or valkey-server) themselves on a free loopback port, without
persistence, in a temporary folder (`make redis-server` installs it); no mock of the store. The first
tests drive kvlink.server.shared.SharedStore directly, as two replicas would; the others run two kvlink-serve
processes (replicas A and B, three tenants) over that Redis with the embedded model, and send with
kvlink.client.sender from this process: a transfer to A is answered by B, by B alone once A is killed and by B
restarted; a byte flipped in Redis is refused; one tenant never reaches another's message; the store
stopped before or during a transfer costs that transfer UNAVAILABLE, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
import torch

from kvlink import wire
from kvlink.cache import Observe, prefill
from kvlink.client.sender import SendError, ask, release, transfer
from kvlink.codec import Codec, EncodedKV
from kvlink.eval.squad import load_squad
from kvlink.generate import greedy_answer
from kvlink.models import LoadedModel
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import build
from kvlink.server.shared import (
    PREFIX,
    SharedStore,
    StoreUnavailable,
    check_url,
    owner_key,
    read_url_file,
    redacted,
)
from netutil import Receiver, free_port, serving

REDIS = shutil.which("redis-server") or shutil.which("valkey-server")
FLEET_DB = 1  # the receivers' database; the SharedStore tests take 2 and up


class RedisServer:
    """redis-server on 127.0.0.1:`port` without persistence, started and stopped by the tests."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        if REDIS is None:
            pytest.fail("no redis-server or valkey-server on PATH: run `make redis-server` (Debian: apt-get install redis-server)")  # fmt: skip
        self.binary = REDIS
        self.dir = directory
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, socket_timeout=10)

    def start(self) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            with contextlib.suppress(redis.ConnectionError):
                if self.client(0).ping():
                    return
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer on port {self.port} within 30 s")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


_dbs = iter(range(2, 16))


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    """A database of its own for one test (flushed)."""
    db = next(_dbs)
    redis_server.client(db).flushdb()
    return redis_server.url(db)


def _frames(n: int, size: int) -> list[bytes]:
    return [bytes([i]) * size for i in range(n)]


# --- the store itself, as two replicas see it ------------------------------------------------------------------
def test_a_message_is_shared_whole_by_owner_and_never_overwritten(url: str) -> None:
    a, b = SharedStore.from_url(url), SharedStore.from_url(url)  # two replicas' connections
    frames = _frames(3, 1000)
    record = {"owner": "alice", "fingerprint": "f" * 64, "stored_bytes": 3000}
    assert a.put("alice", "s1", "m1", frames, record, "q2c/k4v4", {"payload": 2500, "total": 2800}) == []
    entry = b.touch("alice", "m1")
    assert entry is not None and (entry.session_id, entry.frames) == ("s1", 3)
    assert b.frames("alice", "m1", 3) == frames
    assert b.touch("bob", "m1") is None and b.frames("bob", "m1", 3) is None  # the owner is in the key
    assert b.holds("alice", "m1") and not b.holds("bob", "m1")
    with pytest.raises(KeyError, match="already used message id 'm1'"):
        b.put("alice", "s2", "m1", _frames(1, 10), {}, "q2c/k4v4")
    assert b.frames("alice", "m1", 3) == frames  # not overwritten
    b.put("bob", "s1", "m1", _frames(1, 10), {}, "all/fp16")  # ids are per owner
    stored = a.client.hgetall(f"{PREFIX}msg:alice:m1")
    assert json.loads(stored[b"record"]) == record and stored[b"session"] == b"s1"
    assert 0 < a.client.pttl(f"{PREFIX}msg:alice:m1") <= 600_000

    # Visible only whole: a writer that dies between writing the frames and the script leaves nothing.
    def dies(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("the replica died here")

    a._put = dies  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        a.put("alice", "s1", "m2", frames, {}, "q2c/k4v4")
    assert b.touch("alice", "m2") is None and not b.holds("alice", "m2")
    (tmp,) = a.client.keys(f"{PREFIX}tmp:*")
    assert 0 < a.client.pttl(tmp) <= 300_000  # the orphan goes by itself

    fleet = b.stats()
    assert fleet["messages"] == 2 and fleet["stored_bytes"] == 3010
    assert fleet["bytes"]["payload"] == 2500 and fleet["bytes"]["total"] == 2800
    assert set(fleet["families"]) == {"q2c/k4v4", "all/fp16"}
    assert fleet["families"]["q2c/k4v4"]["messages"] == 1 and fleet["held"]["messages"] == 2
    alice = b.stats("alice")
    assert (
        alice["messages"] == 1 and set(alice["families"]) == {"q2c/k4v4"} and alice["held"]["bytes"] == 3000
    )
    assert b.discard("alice", "m1", "another-session") is None and b.touch("alice", "m1") is not None
    assert a.discard("alice", "m1", "s1") == 3000 and b.touch("alice", "m1") is None
    assert b.discard("alice", "m1") is None and b.holds("alice", "m1")  # the id stays used
    assert b.stats()["held"]["released"] == 1


def test_caps_lru_and_ttl_hold_across_replicas(url: str) -> None:
    """Eviction is by last use anywhere in the fleet: an owner past its share loses its own least recently
    used message first, the store past its cap everyone's; entries expire TTL after their last use."""
    a = SharedStore.from_url(url, ttl_s=30, max_bytes=1000, owner_max_bytes=600)
    b = SharedStore.from_url(url, ttl_s=30, max_bytes=1000, owner_max_bytes=600)
    a.put("alice", "s", "a1", _frames(1, 300), {})
    b.put("alice", "s", "a2", _frames(1, 300), {})
    assert b.touch("alice", "a1") is not None  # a1 is now used more recently than a2
    assert a.put("alice", "s", "a3", _frames(1, 300), {}) == ["alice:a2"]  # alice's share: her own LRU
    assert b.put("bob", "s", "b1", _frames(1, 300), {}) == []
    assert a.put("bob", "s", "b2", _frames(1, 300), {}) == ["alice:a1"]  # the cap: everyone's LRU
    assert [m for m in ("a1", "a2", "a3") if b.touch("alice", m)] == ["a3"]
    held = a.stats()["held"]
    assert (held["messages"], held["bytes"], held["evicted"]) == (3, 900, 2)
    with pytest.raises(ValueError, match="exceeds the shared store's cap of 600"):
        a.put("carol", "s", "c1", _frames(1, 601), {})

    short_a = SharedStore.from_url(url, ttl_s=1.5, max_bytes=1000)
    short_b = SharedStore.from_url(url, ttl_s=1.5, max_bytes=1000)
    short_a.client.flushdb()
    short_a.put("alice", "s", "t1", _frames(1, 10), {})
    short_a.put("alice", "s", "t2", _frames(1, 10), {})
    for _ in range(4):  # t1 is kept alive by uses on the other replica
        time.sleep(0.5)
        assert short_b.touch("alice", "t1") is not None
    assert short_b.touch("alice", "t2") is None and short_b.frames("alice", "t2", 1) is None
    time.sleep(1.6)
    assert short_a.touch("alice", "t1") is None
    held = short_a.stats()["held"]
    assert (held["messages"], held["bytes"], held["expired"]) == (0, 0, 2)


def test_a_store_that_goes_away_is_unavailable_then_used_again(redis_server: RedisServer, url: str) -> None:
    store = SharedStore.from_url(url)
    store.put("alice", "s", "m1", _frames(1, 10), {})
    redis_server.stop()
    try:
        for call in (lambda: store.holds("alice", "m2"), lambda: store.touch("alice", "m1"),
                     lambda: store.put("alice", "s", "m2", _frames(1, 10), {}), store.stats):  # fmt: skip
            with pytest.raises(StoreUnavailable, match=f"--store {url} is unreachable"):
                call()
    finally:
        redis_server.start()
    # The same object reconnects by itself (this Redis kept nothing: no persistence).
    assert store.touch("alice", "m1") is None
    store.put("alice", "s", "m2", _frames(1, 10), {})
    assert store.touch("alice", "m2") is not None


def test_a_full_store_refuses_a_write_as_unavailable(redis_server: RedisServer, url: str) -> None:
    """Redis at its maxmemory (noeviction) refuses writes: StoreUnavailable, and the store stays usable."""
    store = SharedStore.from_url(url)
    admin = redis_server.client(0)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + (256 << 10))
    try:
        with pytest.raises(StoreUnavailable, match="is full \\(it refused the call: OOM"):
            store.put("alice", "s", "big", _frames(4, 1 << 20), {})
    finally:
        admin.config_set("maxmemory", 0)
    assert store.touch("alice", "big") is None and not store.holds("alice", "big")
    store.put("alice", "s", "big", _frames(4, 1 << 20), {})
    assert store.touch("alice", "big") is not None


def test_store_urls_are_checked_and_passwords_never_shown() -> None:
    assert check_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert check_url("rediss://:pw@redis.internal:6380/2") == "rediss://:pw@redis.internal:6380/2"
    assert redacted("redis://user:s3cret@host:6379/1") == "redis://host:6379/1"
    for bad, needle in [("http://host:6379", "scheme one of"), ("redis://:s3cret@:6379/0", "no host"),
                        ("redis://host:99999/0", "port"), ("redis://:s3cret@host:6379/zero", "is a number"),
                        ("unix://", "socket's path")]:  # fmt: skip
        with pytest.raises(ValueError, match=needle) as info:
            check_url(bad)
        assert "s3cret" not in str(info.value)
    # redis-py also takes credentials as query parameters: they are dropped too, the rest is kept.
    assert (
        redacted("redis://host:6379/0?password=s3cret&socket_timeout=5")
        == "redis://host:6379/0?socket_timeout=5"
    )
    assert redacted("unix:///run/redis.sock?db=2&username=u&password=s3cret") == "unix:///run/redis.sock?db=2"
    assert owner_key("CN=a:b*") == "CN%3Da%3Ab%2A"  # no ':' (the separator) nor '*' (everyone's scope)


def test_a_store_url_file_is_read_and_never_quoted(tmp_path: Path) -> None:
    """--store-url-file: the URL of a mounted secret, one line; every error names the file, not its text."""
    good = tmp_path / "url"
    good.write_text("\n  redis://:s3cret@store.internal:6379/0  \n\n")
    assert read_url_file(str(good)) == "redis://:s3cret@store.internal:6379/0"
    for text, needle in [("s3cret\n", "scheme one of"), ("redis://:s3cret@:6379/0", "no host"),
                         ("redis://:s3cret@host:6379/s3cret", "the database is a number"), ("", "holds nothing"),
                         ("redis://:s3cret@host/0\nredis://:s3cret@host/1\n", "holds 2 lines"),
                         ("redis://:s3cret@host:99999/0", "port")]:  # fmt: skip
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ValueError, match=needle) as info:
            read_url_file(str(bad))
        assert f"--store-url-file {str(bad)!r}" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match=r"cannot read --store-url-file .*: No such file"):
        read_url_file(str(tmp_path / "missing"))
    (tmp_path / "binary").write_bytes(b"\xff\xfe s3cret")
    with pytest.raises(ValueError, match="not text") as info:
        read_url_file(str(tmp_path / "binary"))
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "argv, env, needle",
    [
        (["--store-url-file", "{bad}"], {}, "--store-url-file '{bad}': expected redis://"),
        (["--store-url-file", "{good}", "--store", "redis://:s3cret@host:6379/0"], {}, "not both"),
        (["--store-url-file", "{good}"], {"KVLINK_STORE": "redis://:s3cret@host:6379/0"}, "not both"),
        ([], {"KVLINK_STORE_URL_FILE": "{bad}"}, "--store-url-file '{bad}': expected redis://"),
    ],
)
def test_kvlink_serve_refuses_a_bad_store_url_file_in_one_line_without_the_password(
    tmp_path: Path, argv: list[str], env: dict[str, str], needle: str
) -> None:
    """Exit 2 before any model loads; neither stdout nor stderr shows the secret."""
    import os
    import sys

    files = {"bad": tmp_path / "bad", "good": tmp_path / "good"}
    files["bad"].write_text("s3cret-without-a-scheme\n")
    files["good"].write_text("redis://:s3cret@127.0.0.1:6379/0\n")
    fill = {name: str(path) for name, path in files.items()}
    argv = [a.format(**fill) for a in argv]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVLINK_STORE")}
    environ |= {k: v.format(**fill) for k, v in env.items()}
    proc = subprocess.run([sys.executable, "-m", "kvlink.server.main", *argv], capture_output=True, text=True,
                          env=environ, timeout=120, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert needle.format(**fill) in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr


def test_kvlink_serve_flags_make_the_store(url: str) -> None:
    from kvlink.server.fleet import open_shared
    from kvlink.server.main import build_parser

    args = build_parser().parse_args(["--store", url, "--store-max-bytes", "1MiB", "--session-ttl", "5"])
    tenants = open_shared(args, "tenants")  # several identities: one holds at most half
    assert (tenants.max_bytes, tenants.owner_max_bytes, tenants.ttl_ms) == (1 << 20, 1 << 19, 5000)
    assert open_shared(args, "token").owner_max_bytes == 1 << 20
    assert build_parser().parse_args([]).store is None  # the default: this process's memory only


def test_fleet_stats_need_a_store_and_say_so(url: str) -> None:
    """REST in process (a stand-in model): ?scope=fleet is 400 without --store, the fleet section with one."""
    from fastapi.testclient import TestClient

    from kvlink.metrics import MetricsRegistry
    from kvlink.models import Geometry
    from kvlink.server.fleet import FleetService
    from kvlink.server.rest import create_app
    from kvlink.server.service import KVLinkService
    from kvlink.server.store import SessionStore

    lm = LoadedModel(torch.nn.Linear(2, 2), None, "fake", "f" * 64, Geometry(2, 1, 4, 2))
    alone = KVLinkService(lm, SessionStore(), MetricsRegistry())
    with TestClient(create_app(alone)) as http:
        reply = http.get("/v1/stats", params={"scope": "fleet"})
        assert reply.status_code == 400 and "--store redis://" in reply.json()["detail"]
        assert http.get("/v1/stats", params={"scope": "everything"}).status_code == 422
        assert "fleet" not in http.get("/v1/stats").json()
        assert http.get("/v1/limits").json()["shared_store"] is False  # what the dashboard asks first
    shared = SharedStore.from_url(url)
    shared.put("alice", "s", "m1", _frames(2, 100), {}, "q2c/k4v4", {"total": 150, "fp16_bytes": 600})
    fleet = FleetService(lm, SessionStore(), MetricsRegistry(), shared=shared)
    with TestClient(create_app(fleet)) as http:
        section = http.get("/v1/stats", params={"scope": "fleet"}).json()["fleet"]
        limits = http.get("/v1/limits").json()
    assert limits["shared_store"] is True and limits["store_max_bytes"] == shared.max_bytes
    assert limits["store_max_bytes_per_identity"] == shared.owner_max_bytes
    assert section["messages"] == 1 and section["compression_ratio"] == 4.0
    assert section["families"]["q2c/k4v4"]["stored_bytes"] == 200 and section["store"] == url


# --- a fleet of two kvlink-serve replicas ---------------------------------------------------------------------
TOKENS = {"alice": "tok-alice-" + uuid.uuid4().hex, "bob": "tok-bob-" + uuid.uuid4().hex}
OPS = "tok-ops-" + uuid.uuid4().hex
ANSWER_TOKENS = 4


def _md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@dataclass
class Fleet:
    redis: RedisServer
    a: Receiver
    b: Receiver
    url: str

    def key(self, owner: str, message_id: str) -> str:
        return f"{PREFIX}msg:{owner_key(owner)}:{message_id}"


def _up(*receivers: Receiver) -> None:
    for rx in receivers:
        if not rx.alive():
            rx.start()
    for rx in receivers:
        rx.wait_ready()


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    tenants = d / "tenants"
    tenants.write_text("".join(f"{n} {t}\n" for n, t in TOKENS.items()) + f"ops {OPS} operator\n")
    url = redis_server.url(FLEET_DB)
    redis_server.client(FLEET_DB).flushdb()
    args = ["--store", url, "--tenants-file", str(tenants), "--max-new-tokens", "8", "--log-level", "info"]
    a, b = (Receiver(args=args, log=d / f"{name}.log", port=free_port(), rest_port=free_port(),
                     headers={"Authorization": f"Bearer {OPS}"}) for name in ("a", "b"))  # fmt: skip
    a.start()
    b.start()
    try:
        request.getfixturevalue("embedded")  # the sender's model loads while the replicas load theirs
        _up(a, b)
        yield Fleet(redis_server, a, b, url)
    finally:
        for rx in (a, b):
            if rx.proc is not None:
                rc = rx.stop()
                assert rc == 0, f"kvlink-serve exited with {rc}:\n{rx.log_tail()}"


@dataclass
class Message:
    """A message encoded once, and the answer its own bytes give locally (what any replica must answer)."""

    encoded: EncodedKV
    question: str
    tokens: list[int]


def _message(lm: LoadedModel, example: int) -> Message:
    ex = load_squad()[example]
    ctx, q = context_ids(lm.tokenizer, ex.context), question_ids(lm.tokenizer, ex.question)
    codec = Codec(build(selector="q2c", retention=0.5, k_bits=4, v_bits=4), lm.geometry)
    encoded = codec.encode(prefill(lm.model, ctx, q, observe=Observe.QUESTION))
    local = greedy_answer(lm.model, lm.tokenizer, codec.decode(encoded), q, max_new_tokens=ANSWER_TOKENS)
    return Message(encoded, ex.question, list(local.token_ids))


@pytest.fixture(scope="module")
def msg(embedded: LoadedModel) -> Message:
    return _message(embedded, 0)


@pytest.fixture(scope="module")
def other(embedded: LoadedModel) -> Message:
    """Another context, whose answer differs from msg's."""
    return _message(embedded, 1)


async def _send(rx: Receiver, lm: LoadedModel, m: Message, tenant: str = "alice", mid: str = "") -> str:
    mid = mid or uuid.uuid4().hex
    async with grpc.aio.insecure_channel(rx.target) as ch:
        frames = wire.to_frames(m.encoded, "s1", mid, lm.fingerprint, 1 << 20)
        result = await transfer(ch, frames, timeout=60, metadata=_md(tenant))
    assert result.receipt.message_id == mid
    return mid


async def _ask(rx: Receiver, m: Message, mid: str, tenant: str = "alice", session: str = "s1") -> list[int]:
    async with grpc.aio.insecure_channel(rx.target) as ch:
        answer = await ask(
            ch, wire.Ask(session, mid, m.question, ANSWER_TOKENS), timeout=120, metadata=_md(tenant)
        )
    return list(answer.token_ids)


async def _refused_ask(rx: Receiver, mid: str, tenant: str = "alice") -> SendError:
    async with grpc.aio.insecure_channel(rx.target) as ch:
        with pytest.raises(SendError) as info:
            await ask(ch, wire.Ask("", mid, "Where?", 2), timeout=120, metadata=_md(tenant))
    assert rx.alive(), rx.log_tail()
    return info.value


def _fleet_stats(rx: Receiver, token: str) -> httpx.Response:
    return httpx.get(f"{rx.rest}/v1/stats", params={"scope": "fleet"}, headers={"Authorization": f"Bearer {token}"},
                     timeout=30)  # fmt: skip


async def test_a_transfer_to_one_replica_is_answered_by_the_other(
    fleet: Fleet, embedded: LoadedModel, msg: Message
) -> None:
    mid = await _send(fleet.a, embedded, msg)
    # Stored in its wire form: a serialized TransferFrame per field, the header first, never a pickle.
    stored = fleet.redis.client(FLEET_DB).hgetall(fleet.key("alice", mid))
    n = int(stored[b"n"])
    header = wire.parse_frame(stored[b"0"])
    assert header.WhichOneof("frame") == "header" and header.header.message_id == mid
    assert wire.parse_frame(stored[str(n - 1).encode()]).WhichOneof("frame") == "trailer"
    record = json.loads(stored[b"record"])
    assert record["owner"] == "alice" and record["fingerprint"] == embedded.fingerprint
    assert record["stored_bytes"] == sum(len(stored[str(i).encode()]) for i in range(n))
    assert record["wire_bytes"] > 0 and record["fp16_bytes"] == msg.encoded.geometry.fp16_bytes(
        msg.encoded.length
    )

    assert await _ask(fleet.b, msg, mid) == msg.tokens  # B answers from exactly those bytes
    assert "fetched from the shared store, verified and decoded" in fleet.b.log_text()
    assert await _ask(fleet.b, msg, mid) == msg.tokens  # then from its own LRU
    assert fleet.b.log_text().count(f"message {mid!r} of alice fetched") == 1
    rest = httpx.post(f"{fleet.b.rest}/v1/messages/{mid}/ask", json={"question": msg.question, "max_new_tokens": ANSWER_TOKENS},
                      headers={"Authorization": f"Bearer {TOKENS['alice']}"}, timeout=120)  # fmt: skip
    assert rest.status_code == 200 and rest.json()["token_ids"] == msg.tokens, rest.text

    # Fleet-wide stats from either replica: everyone's for the operator, her own for alice, none for bob.
    ops = _fleet_stats(fleet.b, OPS)
    assert ops.status_code == 200, ops.text
    whole = ops.json()["fleet"]
    assert whole["messages"] >= 1 and whole["bytes"]["total"] >= record["wire_bytes"]
    assert "q2c/k4v4" in whole["families"] and whole["held"]["messages"] >= 1
    assert ops.json()["messages"] == 0  # B's own: it received none
    alice = _fleet_stats(fleet.a, TOKENS["alice"]).json()["fleet"]
    assert alice["messages"] >= 1 and alice["families"]["q2c/k4v4"]["stored_bytes"] >= record["stored_bytes"]
    bob = _fleet_stats(fleet.b, TOKENS["bob"]).json()["fleet"]
    assert bob["messages"] == 0 and bob["families"] == {}


async def test_tenants_are_isolated_across_replicas(
    fleet: Fleet, embedded: LoadedModel, msg: Message, other: Message
) -> None:
    assert msg.tokens != other.tokens
    mid = await _send(fleet.a, embedded, msg, "alice")
    err = await _refused_ask(fleet.b, mid, "bob")
    assert err.status == grpc.StatusCode.NOT_FOUND, err
    async with grpc.aio.insecure_channel(fleet.b.target) as ch:
        with pytest.raises(SendError) as info:
            await release(ch, mid, metadata=_md("bob"))
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    # Ids are the owner's own: bob's message with the same id is his, and alice's stays hers.
    await _send(fleet.b, embedded, other, "bob", mid)
    assert await _ask(fleet.a, other, mid, "bob") == other.tokens
    assert await _ask(fleet.b, msg, mid, "alice") == msg.tokens
    with pytest.raises(SendError) as again:
        await _send(fleet.b, embedded, other, "alice", mid)  # alice's id was used on A
    assert (again.value.status, again.value.code) == (grpc.StatusCode.ALREADY_EXISTS, "EXISTS")


async def test_a_message_tampered_with_in_the_store_is_refused(
    fleet: Fleet, embedded: LoadedModel, msg: Message
) -> None:
    client = fleet.redis.client(FLEET_DB)
    # A byte of a chunk's data (the largest chunk: its middle is data), then the header's model fingerprint.
    for part, status, code in [("chunk", grpc.StatusCode.DATA_LOSS, "CORRUPT"),
                               ("fingerprint", grpc.StatusCode.FAILED_PRECONDITION, "FINGERPRINT")]:  # fmt: skip
        mid = await _send(fleet.a, embedded, msg)
        stored = client.hgetall(fleet.key("alice", mid))
        n = int(stored[b"n"])
        if part == "chunk":
            field = max((str(i).encode() for i in range(1, n - 1)), key=lambda f: len(stored[f]))
            frame = bytearray(stored[field])
            at = len(frame) // 2
        else:
            field = b"0"
            frame = bytearray(stored[field])
            at = frame.index(embedded.fingerprint.encode())
        frame[at] = ord("0") if frame[at] != ord("0") else ord("1")
        client.hset(fleet.key("alice", mid), field, bytes(frame))
        err = await _refused_ask(fleet.b, mid)
        assert (err.status, err.code) == (status, code), err
        assert "shared store's copy" in err.message and "failed verification" in err.message
    assert await _ask(fleet.b, msg, await _send(fleet.a, embedded, msg)) == msg.tokens  # the next is fine


async def test_release_drops_it_from_every_replica(fleet: Fleet, embedded: LoadedModel, msg: Message) -> None:
    mid = await _send(fleet.a, embedded, msg)
    assert await _ask(fleet.b, msg, mid) == msg.tokens  # B holds a decoded copy now
    async with grpc.aio.insecure_channel(fleet.a.target) as ch:
        freed = await release(ch, mid, "s1", metadata=_md("alice"))
    assert freed.freed_bytes > 0
    assert not fleet.redis.client(FLEET_DB).exists(fleet.key("alice", mid))
    err = await _refused_ask(fleet.b, mid)  # B's copy goes too: the store says the message is gone
    assert err.status == grpc.StatusCode.NOT_FOUND, err
    with pytest.raises(SendError) as again:
        await _send(fleet.b, embedded, msg, "alice", mid)
    assert again.value.code == "EXISTS"


async def test_the_store_stopped_costs_a_transfer_unavailable_and_nothing_else(
    fleet: Fleet, embedded: LoadedModel, msg: Message
) -> None:
    held = await _send(fleet.b, embedded, msg)  # decoded on B
    only_stored = await _send(fleet.a, embedded, msg)  # B has no copy of this one
    where = f"--store {fleet.url} is unreachable"

    fleet.redis.stop()  # before a transfer
    try:
        with pytest.raises(SendError) as info:
            await _send(fleet.b, embedded, msg)
        assert (info.value.status, info.value.code) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
        assert where in info.value.message and "send it again later" in info.value.message
        assert await _ask(fleet.b, msg, held) == msg.tokens  # a context held here is still answered
        err = await _refused_ask(fleet.b, only_stored)
        assert err.status == grpc.StatusCode.UNAVAILABLE and "holds no copy" in err.message, err
        assert _fleet_stats(fleet.b, OPS).status_code == 503
        assert httpx.get(f"{fleet.b.rest}/healthz", timeout=10).status_code == 200
    finally:
        fleet.redis.start()  # an empty store: it kept nothing
    mid = await _send(fleet.b, embedded, msg)
    assert await _ask(fleet.a, msg, mid) == msg.tokens

    # During a transfer: the header's id check passed (an Ack proves it), the store goes before the trailer.
    mid = uuid.uuid4().hex
    frames = [
        wire.frame_bytes(f) for f in wire.to_frames(msg.encoded, "s1", mid, embedded.fingerprint, 1 << 20)
    ]
    async with grpc.aio.insecure_channel(fleet.b.target) as ch:
        call = ch.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(
            timeout=60, metadata=_md("alice")
        )
        for raw in frames[:-1]:
            await call.write(raw)
        assert (await call.read()).WhichOneof("signal") == "ack"
        await asyncio.to_thread(fleet.redis.stop)
        try:
            await call.write(frames[-1])
            await call.done_writing()
            signals = []
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (signal_ := await call.read()) is not grpc.aio.EOF:
                    signals.append(signal_)
            status, details = await call.code(), await call.details()
        finally:
            fleet.redis.start()
    assert status == grpc.StatusCode.UNAVAILABLE and where in details, details
    assert [s.error.code for s in signals if s.WhichOneof("signal") == "error"] == ["UNAVAILABLE"]
    assert "receipt" not in [s.WhichOneof("signal") for s in signals]
    err = await _refused_ask(fleet.b, mid)
    assert err.status == grpc.StatusCode.NOT_FOUND  # nothing of it was kept, here or in the store
    mid = await _send(fleet.b, embedded, msg, mid=mid)  # and the id is free: it was never taken
    assert await _ask(fleet.a, msg, mid) == msg.tokens


async def test_a_killed_replica_and_a_restarted_one_lose_nothing(
    fleet: Fleet, embedded: LoadedModel, msg: Message
) -> None:
    mid = await _send(fleet.a, embedded, msg)
    assert fleet.a.proc is not None
    fleet.a.proc.kill()  # no graceful anything
    fleet.a.proc.wait()
    assert await _ask(fleet.b, msg, mid) == msg.tokens
    # The only receiver left restarts: its memory is empty, the store still has the message.
    assert fleet.b.stop() == 0
    _up(fleet.b)
    assert await _ask(fleet.b, msg, mid) == msg.tokens
    _up(fleet.a)  # back for the fixture's graceful stop


async def test_a_replica_reads_its_store_url_from_a_file_and_never_shows_the_password(
    tmp_path_factory: pytest.TempPathFactory,
    embedded: LoadedModel,
    msg: Message,
    request: pytest.FixtureRequest,
) -> None:
    """A Redis that requires a password; the replica's URL comes from --store-url-file (a mounted secret).
    It stores and answers; the password is in neither its command line, its environment nor its log (at
    debug); once Redis changes its password, a transfer is UNAVAILABLE and still says nothing of either."""
    password, changed = "pw-" + uuid.uuid4().hex, "pw-" + uuid.uuid4().hex
    locked = RedisServer(tmp_path_factory.mktemp("locked"), password)
    locked.start()
    d = tmp_path_factory.mktemp("url-file")
    (d / "store-url").write_text(locked.url(0) + "\n")
    rx = Receiver(args=["--store-url-file", str(d / "store-url"), "--max-new-tokens", "8", "--log-level", "debug"],
                  log=d / "replica.log", port=free_port(), rest_port=free_port())  # fmt: skip
    try:
        with serving(rx, request):
            assert rx.proc is not None
            for part in ("cmdline", "environ"):
                assert password.encode() not in Path(f"/proc/{rx.proc.pid}/{part}").read_bytes(), part
            mid = await _send(rx, embedded, msg)
            assert locked.client(0).exists(f"{PREFIX}msg:anonymous:{mid}")  # stored with the file's password
            assert await _ask(rx, msg, mid) == msg.tokens
            # Redis takes another password and drops its connections: the replica's credentials are refused.
            admin = locked.client(0)
            admin.config_set("requirepass", changed)
            admin.client_kill_filter(_type="normal", skipme=True)
            with pytest.raises(SendError) as info:
                await _send(rx, embedded, msg)
            assert (info.value.status, info.value.code) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
            where = f"--store redis://127.0.0.1:{locked.port}/0 is unreachable (AuthenticationError"
            assert where in info.value.message, info.value.message
            for secret in (password, changed):
                assert secret not in info.value.message
        log = rx.log_text()
        assert f"shared store --store redis://127.0.0.1:{locked.port}/0: redis" in log, rx.log_tail()
        assert password not in log and changed not in log
    finally:
        locked.stop()
