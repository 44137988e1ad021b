"""One hostile peer holding a valid token must not hurt anyone else (issue 18).

Each test attacks one kvlink-serve subprocess over real gRPC and REST on loopback, as an authenticated
tenant ("mallory") of a receiver that serves several ("alice", "bob", and an operator "ops"), and checks
that the attack costs one specific error and nothing else:

- a decompression bomb (a small zstd part whose frame claims far more than its declared raw size) is
  refused without the receiver's memory ever growing by the bomb's size;
- a header with too many payload rows, or position sets of millions of positions, is refused or
  validated while /healthz keeps answering within a fraction of a second (the header is parsed and
  validated off the event loop, row counts are checked before any walk, position sets are decoded
  vectorized), and leaves no memory held;
- reference answers are bounded in total (TOO_LARGE) and stored cut;
- concurrent decodes of small messages that decode to hundreds of MiB stay within the memory budget
  (--max-cached-bytes covers decodes in flight), and one tenant's flood evicts only its own contexts;
- questions over --max-question-tokens are refused;
- tenants cannot read, ask about, release or overwrite each other's messages, over gRPC (Ask, Release)
  or REST (POST .../ask, DELETE): another's id is 404/NOT_FOUND and frees nothing; a reused id is
  refused (EXISTS); REST shows a tenant only its own records and /metrics only to an operator;
- ids outside the documented character set (a newline that would forge a log line) are refused;
- a transfer that trickles one frame at a time ends at the per-message deadline; REST refuses two
  Authorization headers as gRPC does; /healthz says nothing but whether the receiver serves.

The sizes are chosen so that each attack, run against commit 12bfafe, fails its test (the memory and
latency bounds are a few times below what 12bfafe costs) while the whole module stays fast.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

from kvlink import wire
from kvlink.cache import Observe, prefill
from kvlink.client.sender import SendError, ask, channel_options, release, transfer
from kvlink.codec import Codec, EncodedKV, decode_cost
from kvlink.eval.bench_abuse import bearer, bomb_frames, decode_bomb, positions_frames, rows_frames
from kvlink.eval.squad import load_squad
from kvlink.generate import greedy_answer
from kvlink.models import LoadedModel
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import build
from netutil import Receiver, free_port, raw_transfer, refusal, serving

TOKENS = {
    "alice": "tok-alice-" + "a" * 20,
    "bob": "tok-bob-" + "b" * 20,
    "mallory": "tok-mallory-" + "m" * 20,
}
OPS_TOKEN = "tok-ops-" + "o" * 20
CACHE_CAP = 1 << 30  # each tenant may hold half: 512 MiB
STALL_S, DEADLINE_S = 2.0, 4.0
MAX_QUESTION_TOKENS = 256
MIB = 1 << 20


@pytest.fixture(scope="module")
def rx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    d = tmp_path_factory.mktemp("hostile")
    tenants = d / "tenants"
    lines = [f"{name} {token}" for name, token in TOKENS.items()] + [f"ops {OPS_TOKEN} operator"]
    tenants.write_text("# name token [operator]\n" + "\n".join(lines) + "\n")
    receiver = Receiver(
        args=["--tenants-file", str(tenants), "--max-cached-bytes", str(CACHE_CAP),
              "--stall-timeout", str(STALL_S), "--message-deadline", str(DEADLINE_S),
              "--max-question-tokens", str(MAX_QUESTION_TOKENS), "--max-new-tokens", "8",
              "--log-level", "info"],
        log=d / "kvlink-serve.log", port=free_port(), rest_port=free_port(),
        headers={"Authorization": f"Bearer {OPS_TOKEN}"},
    )  # fmt: skip
    with serving(receiver, request):
        yield receiver


# --- the receiver's memory, read from /proc --------------------------------------------------------------------
def _status(rx: Receiver, key: str) -> int:
    assert rx.proc is not None
    for line in Path(f"/proc/{rx.proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{rx.proc.pid}/status")


def reset_peak(rx: Receiver) -> int:
    """Reset the receiver's peak resident memory (VmHWM) to its current RSS; returns that."""
    assert rx.proc is not None
    Path(f"/proc/{rx.proc.pid}/clear_refs").write_text("5")
    return _status(rx, "VmRSS")


def peak_rss(rx: Receiver) -> int:
    return _status(rx, "VmHWM")


def rss(rx: Receiver) -> int:
    return _status(rx, "VmRSS")


# --- messages ----------------------------------------------------------------------------------------------
CONFIG = build(k_bits=4, v_bits=4)


def good_message(lm: LoadedModel, index: int = 0) -> tuple[EncodedKV, str, list[int]]:
    """A real context encoded at INT4, its question, and the answer its bytes give."""
    example = load_squad()[index]
    q = question_ids(lm.tokenizer, example.question)
    pre = prefill(lm.model, context_ids(lm.tokenizer, example.context), q, observe=Observe.NONE)
    codec = Codec(CONFIG, lm.geometry)
    encoded = codec.encode(pre)
    answer = greedy_answer(lm.model, lm.tokenizer, codec.decode(encoded), q, max_new_tokens=4)
    return encoded, example.question, list(answer.token_ids)


def frames_of(lm: LoadedModel, encoded: EncodedKV, message_id: str, session_id: str = "s") -> list[Any]:
    return wire.to_frames(encoded, session_id, message_id, lm.fingerprint, 1 << 20)


async def send(rx: Receiver, frames: list[Any], tenant: str) -> wire.Receipt:
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        result = await transfer(ch, frames, timeout=120, metadata=bearer(TOKENS[tenant]))
    return result.receipt


async def ask_as(rx: Receiver, tenant: str, request: wire.Ask) -> wire.Answer:
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        return await ask(ch, request, timeout=120, metadata=bearer(TOKENS[tenant]))


async def refused(rx: Receiver, frames: list[Any], tenant: str = "mallory") -> SendError:
    with pytest.raises(SendError) as info:
        await send(rx, frames, tenant)
    return info.value


async def refused_raw(rx: Receiver, frames: list[Any], tenant: str = "mallory") -> wire.WireError:
    """Send frames as they are (no Outbox checks: they may contradict themselves) and return the
    receiver's refusal (netutil.raw_transfer reads from the start: a write that loses the race with the
    receiver's abort must not lose its Error signal)."""
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        signals, error = await raw_transfer(
            ch, [wire.frame_bytes(f) for f in frames], timeout=120, metadata=bearer(TOKENS[tenant])
        )
    err = refusal(signals, error)
    assert err is not None, (error, signals)
    return err


class HealthProbe:
    """GET /healthz every 10 ms while an attack runs; the slowest answer is `worst` seconds."""

    def __init__(self, rx: Receiver) -> None:
        self.url = f"{rx.rest}/healthz"
        self.latencies: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while not stop.is_set():
                started = time.perf_counter()
                assert (await http.get(self.url)).status_code == 200
                self.latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)

    @property
    def worst(self) -> float:
        return max(self.latencies)


async def while_probing(rx: Receiver, attack: Any) -> tuple[Any, HealthProbe]:
    probe, stop = HealthProbe(rx), asyncio.Event()
    watcher = asyncio.create_task(probe.run(stop))
    await asyncio.sleep(0.05)
    try:
        result = await attack
    finally:
        await asyncio.sleep(0.05)
        stop.set()
        await watcher
    return result, probe


# --- 1. decompression bomb ----------------------------------------------------------------------------------
async def test_a_decompression_bomb_costs_no_memory(rx: Receiver, embedded: LoadedModel) -> None:
    frames = bomb_frames(embedded, uuid.uuid4().hex, claimed=512 * MIB)  # ~16 KiB claiming 512 MiB
    before = reset_peak(rx)
    err = await refused_raw(rx, frames)
    assert err.code == "MALFORMED" and "zstd" in err.message, err
    assert peak_rss(rx) - before < 64 * MIB, (peak_rss(rx) - before) / MIB


async def test_the_refusal_reaches_a_sender_that_keeps_writing(rx: Receiver, embedded: LoadedModel) -> None:
    # 300 more chunk frames after the bomb: writes go on after the receiver's refusal and lose the race with
    # its abort; the receiver's Error signal, sent before it, still says why (the call's status cannot).
    frames = bomb_frames(embedded, uuid.uuid4().hex, claimed=512 * MIB)
    for _ in range(3):
        err = await refused_raw(rx, [*frames[:-1], *[frames[1]] * 300, frames[-1]])
        assert err.code == "MALFORMED" and "zstd" in err.message, err


# --- 2. headers that would block the event loop --------------------------------------------------------------
async def test_a_header_of_too_many_rows_is_refused_without_blocking(
    rx: Receiver, embedded: LoadedModel
) -> None:
    encoded, _, _ = good_message(embedded)
    frames = rows_frames(frames_of(embedded, encoded, uuid.uuid4().hex), rows=300_000)  # ~5 MB, past 65536
    before = rss(rx)
    err, probe = await while_probing(rx, refused_raw(rx, frames))
    assert err.code == "TOO_LARGE" and "payload table" in err.message, err
    assert probe.worst < 0.5, probe.worst
    await asyncio.sleep(0.5)
    assert rss(rx) - before < 32 * MIB, (rss(rx) - before) / MIB  # nothing of the header is held


async def test_position_sets_of_millions_are_decoded_without_blocking(
    rx: Receiver, embedded: LoadedModel
) -> None:
    """A header claiming T = 900,000 with 30 sets of 450k varints. This receiver's model has 8,192
    positions, so the header is refused at once on its length (issue 20), the sets never decoded; a
    receiver whose limits allow such a length (WireLimits' default, 2M, as for a long-context model)
    decodes them, vectorized, in well under a second and finds the tensors do not match (SHAPE)."""
    frames = positions_frames(embedded, uuid.uuid4().hex, length=900_000)  # 30 sets of 450k varints
    assert frames[0].ByteSize() < wire.WireLimits().max_header_bytes
    before = rss(rx)
    for _ in range(3):  # nothing accumulates: a refused header leaves nothing behind
        err, probe = await while_probing(rx, refused_raw(rx, frames))
        assert err.code == "TOO_LARGE" and "context length 900000 exceeds the limit 8192" in err.message, err
        assert probe.worst < 0.5, probe.worst
    await asyncio.sleep(0.5)
    assert rss(rx) - before < 32 * MIB, (rss(rx) - before) / MIB
    asm = wire.Assembler(embedded.fingerprint, embedded.geometry, wire.WireLimits())
    started = time.perf_counter()
    with pytest.raises(wire.WireError) as info:
        asm.feed_raw(wire.frame_bytes(frames[0]))
    assert info.value.code == "SHAPE", info.value  # positions decoded and valid; the tensors do not match
    assert time.perf_counter() - started < 2.0


# --- 3. reference answers ----------------------------------------------------------------------------------
async def test_reference_answers_are_bounded_and_stored_cut(rx: Receiver, embedded: LoadedModel) -> None:
    encoded, question, _ = good_message(embedded)
    message_id = uuid.uuid4().hex
    await send(rx, frames_of(embedded, encoded, message_id), "alice")
    huge = wire.Ask("s", message_id, question, 4, reference_answers=("word " * 20_000,) * 8)
    with pytest.raises(SendError) as info:
        await ask_as(rx, "alice", huge)
    assert info.value.code == "TOO_LARGE" and "reference answers" in info.value.message
    fits = wire.Ask("s", message_id, question, 4, reference_answers=("word " * 800,) * 3)  # 12 KB in all
    answer = await ask_as(rx, "alice", fits)
    assert answer.f1 is not None
    record = httpx.get(
        f"{rx.rest}/v1/messages/{message_id}",
        headers={"Authorization": f"Bearer {TOKENS['alice']}"},
        timeout=10,
    ).json()
    stored = record["asks"][-1]["reference_answers"]
    assert len(stored) == 3 and all(len(r) <= 2048 for r in stored)


# --- 4. decode memory -----------------------------------------------------------------------------------------
async def test_concurrent_decodes_stay_within_the_memory_budget(rx: Receiver, embedded: LoadedModel) -> None:
    lm = embedded
    encoded, question, tokens = good_message(lm, 1)
    alice_id = uuid.uuid4().hex
    await send(rx, frames_of(lm, encoded, alice_id), "alice")
    bomb = decode_bomb(lm, 5000)
    cost = decode_cost(bomb, torch.float32)
    wire_bytes = sum(len(p.data) for t in bomb.tensors for p in t.parts.values())
    assert wire_bytes < 256 << 10 and 256 * MIB < cost < CACHE_CAP // 2, (wire_bytes, cost)
    before = reset_peak(rx)
    # Mallory sends six at once: together they decode to over 1.3 GiB, three times her share.
    outcomes = await asyncio.gather(
        *(send(rx, frames_of(lm, bomb, uuid.uuid4().hex), "mallory") for _ in range(6)),
        return_exceptions=True,
    )
    rise = peak_rss(rx) - before
    for outcome in outcomes:
        assert isinstance(outcome, wire.Receipt) or (
            isinstance(outcome, SendError) and outcome.code == "BUSY"
        )
    assert any(isinstance(o, wire.Receipt) for o in outcomes)
    assert rise < CACHE_CAP * 3 // 4, rise / MIB  # her share and one decode's temporaries at most
    # Her flood evicted only her own contexts: Alice's is still answered from its own bytes.
    answer = await ask_as(rx, "alice", wire.Ask("s", alice_id, question, 4))
    assert list(answer.token_ids) == tokens
    stats = rx.stats()
    assert stats["store"]["reserved_bytes"] == 0 and stats["store"]["bytes"] <= CACHE_CAP


# --- 5. long questions ------------------------------------------------------------------------------------------
async def test_a_question_over_the_token_limit_is_refused(rx: Receiver, embedded: LoadedModel) -> None:
    encoded, _, _ = good_message(embedded)
    message_id = uuid.uuid4().hex
    await send(rx, frames_of(embedded, encoded, message_id), "bob")
    long_question = "Which of these words comes first? " + " ".join(f"w{i}" for i in range(2000))
    started = time.perf_counter()
    with pytest.raises(SendError) as info:
        await ask_as(rx, "bob", wire.Ask("s", message_id, long_question, 4))
    assert info.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.code == "TOO_LARGE"
    assert "--max-question-tokens" in info.value.message and time.perf_counter() - started < 10


# --- 6. isolation between tenants ---------------------------------------------------------------------------------
async def test_tenants_cannot_read_or_overwrite_each_other(rx: Receiver, embedded: LoadedModel) -> None:
    lm = embedded
    alice_msg, alice_q, alice_tokens = good_message(lm, 0)
    bob_msg, _, _ = good_message(lm, 2)
    message_id = uuid.uuid4().hex
    await send(rx, frames_of(lm, alice_msg, message_id), "alice")
    # Bob asks about Alice's message by its ids: not found (nothing says it exists).
    with pytest.raises(SendError) as info:
        await ask_as(rx, "bob", wire.Ask("s", message_id, alice_q, 4))
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    # Bob sends his own context under the same ids: his own namespace, Alice's stays hers.
    await send(rx, frames_of(lm, bob_msg, message_id), "bob")
    answer = await ask_as(rx, "alice", wire.Ask("s", message_id, alice_q, 4))
    assert list(answer.token_ids) == alice_tokens
    # Alice cannot reuse an id she holds: EXISTS, and the held message is unchanged.
    err = await refused(rx, frames_of(lm, bob_msg, message_id), "alice")
    assert err.status == grpc.StatusCode.ALREADY_EXISTS and err.code == "EXISTS", err
    assert list((await ask_as(rx, "alice", wire.Ask("s", message_id, alice_q, 4))).token_ids) == alice_tokens

    # REST: each sees its own record only; the operator sees both; /metrics is the operator's.
    def get(path: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{rx.rest}{path}", headers=headers, timeout=10)

    for tenant in ("alice", "bob"):
        mine = get("/v1/messages?limit=1000", TOKENS[tenant]).json()
        assert {r["owner"] for r in mine} == {tenant}
        assert get(f"/v1/messages/{message_id}", TOKENS[tenant]).json()["owner"] == tenant
    assert {r["owner"] for r in get("/v1/messages?limit=1000", TOKENS["mallory"]).json()} <= {"mallory"}
    every = get("/v1/messages?limit=1000", OPS_TOKEN).json()
    assert {"alice", "bob"} <= {r["owner"] for r in every if r["message_id"] == message_id}
    assert get("/metrics", TOKENS["bob"]).status_code == 403 and get("/metrics", OPS_TOKEN).status_code == 200
    assert (
        "calls" not in get("/v1/stats", TOKENS["bob"]).json()
        and "calls" in get("/v1/stats", OPS_TOKEN).json()
    )
    assert get("/v1/stats", None).status_code == 401 and get("/v1/info", "nope").status_code == 401
    assert get("/v1/info", TOKENS["bob"]).json()["identity"] == "bob"


async def test_tenants_cannot_ask_about_or_free_each_others_contexts(
    rx: Receiver, embedded: LoadedModel
) -> None:
    """Mallory knows Alice's message id: REST ask and DELETE are 404, gRPC Release NOT_FOUND, the operator
    cannot free it either (it is not the operator's), and Alice still gets her answer; then she frees it."""
    lm = embedded
    alice_msg, alice_q, alice_tokens = good_message(lm, 0)
    message_id = uuid.uuid4().hex
    await send(rx, frames_of(lm, alice_msg, message_id), "alice")
    url = f"{rx.rest}/v1/messages/{message_id}"

    def as_(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    before = rx.stats()["store"]["bytes"]
    for token in (TOKENS["mallory"], OPS_TOKEN):
        assert httpx.delete(url, headers=as_(token), timeout=10).status_code == 404
        reply = httpx.post(f"{url}/ask", json={"question": alice_q}, headers=as_(token), timeout=60)
        assert reply.status_code == 404 and alice_q not in reply.text
    with pytest.raises(SendError) as info:
        async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
            await release(ch, message_id, metadata=bearer(TOKENS["mallory"]))
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert httpx.delete(url, timeout=10).status_code == 401  # no token: nobody
    assert rx.stats()["store"]["bytes"] == before  # nothing was freed

    mine = httpx.post(f"{url}/ask", json={"question": alice_q, "max_new_tokens": 4}, headers=as_(TOKENS["alice"]),
                      timeout=120)  # fmt: skip
    assert mine.status_code == 200 and mine.json()["token_ids"] == alice_tokens
    assert list((await ask_as(rx, "alice", wire.Ask("", message_id, alice_q, 4))).token_ids) == alice_tokens
    freed = httpx.delete(url, headers=as_(TOKENS["alice"]), timeout=10)
    assert freed.status_code == 200 and freed.json()["freed_bytes"] > 0
    assert rx.stats()["store"]["bytes"] == before - freed.json()["freed_bytes"]
    with pytest.raises(SendError) as info:
        await ask_as(rx, "alice", wire.Ask("s", message_id, alice_q, 4))
    assert info.value.status == grpc.StatusCode.NOT_FOUND


# --- 7. log forging -------------------------------------------------------------------------------------------
async def test_ids_that_would_forge_log_lines_are_refused(rx: Receiver, embedded: LoadedModel) -> None:
    encoded, question, _ = good_message(embedded)
    forged = "m\n2026-12-04 00:00:00 INFO kvlink.serve: FORGED operator login"
    err = await refused(rx, frames_of(embedded, encoded, forged))
    assert err.code == "MALFORMED" and "message_id" in err.message, err
    with pytest.raises(SendError) as info:
        await ask_as(rx, "mallory", wire.Ask("s", forged, question, 4))
    assert info.value.code == "MALFORMED"
    assert not any(line.startswith("2026-12-04 00:00:00") for line in rx.log_text().splitlines())


# --- 8. deadline, duplicate authorization, /healthz ---------------------------------------------------------------
async def test_a_trickling_transfer_ends_at_the_message_deadline(rx: Receiver, embedded: LoadedModel) -> None:
    encoded, _, _ = good_message(embedded)
    frames = frames_of(embedded, encoded, uuid.uuid4().hex)

    async def trickle() -> AsyncIterator[bytes]:
        for frame in frames:  # one frame every 1.5 s: never a stall, but never done either
            yield wire.frame_bytes(frame)
            await asyncio.sleep(STALL_S * 0.75)

    started = time.perf_counter()
    async with grpc.aio.insecure_channel(rx.target) as ch:
        call = ch.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(
            trickle(), timeout=60, metadata=bearer(TOKENS["mallory"])
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    elapsed = time.perf_counter() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wire.error_from_rpc(info.value).code == "DEADLINE"  # type: ignore[union-attr]
    assert (
        len(frames) * STALL_S * 0.75 > DEADLINE_S + STALL_S
        and DEADLINE_S - 0.5 < elapsed < DEADLINE_S + STALL_S
    )


def test_rest_refuses_two_authorization_headers_as_grpc_does(rx: Receiver) -> None:
    one = [("Authorization", f"Bearer {TOKENS['bob']}")]
    assert httpx.get(f"{rx.rest}/v1/info", headers=one, timeout=10).status_code == 200
    two = [*one, ("Authorization", f"Bearer {OPS_TOKEN}")]
    reply = httpx.get(f"{rx.rest}/v1/info", headers=two, timeout=10)
    assert reply.status_code == 401 and "2 authorization values" in reply.json()["detail"]


async def test_grpc_refuses_two_authorization_values(rx: Receiver, embedded: LoadedModel) -> None:
    async with grpc.aio.insecure_channel(rx.target) as ch:
        metadata = (*bearer(TOKENS["bob"]), *bearer(OPS_TOKEN))
        with pytest.raises(SendError) as info:
            await ask(ch, wire.Ask("s", "m", "Who?", 2), timeout=20, metadata=metadata)
    assert info.value.status == grpc.StatusCode.UNAUTHENTICATED


def test_healthz_says_only_whether_it_serves(rx: Receiver, embedded: LoadedModel) -> None:
    body = httpx.get(f"{rx.rest}/healthz", timeout=10).json()
    assert body == {"status": "serving"} and embedded.fingerprint not in str(body)
