"""Faults and load over loopback, against one kvlink-serve subprocess with small limits.

Each fault ends in a defined error (a specific gRPC status, and kvlink code where the receiver sent one),
nothing partial is ever used (an Ask about the message gets NOT_FOUND, or, where the message did arrive
whole, exactly the answer its bytes give), no call leaks (REST /v1/stats: no call in progress, no chunk
data held, the store as before), and the next good message succeeds:

- a sender that disconnects mid-stream (the TCP connection cut, or the stream reset);
- a stream that stalls past the receiver's --stall-timeout (DEADLINE_EXCEEDED, STALLED), or past the
  sender's own deadline;
- duplicated chunks (refused: ORDER) and out-of-order chunks (accepted: each chunk is placed by its id
  and verified by its CRC32C, so order carries no information);
- corrupted bytes in transit (a proxy flips one bit of the TCP stream: chunk data is Nacked and resent,
  a damaged header is caught by the trailer's CRC32C, damaged HTTP/2 framing kills the connection and
  the sender sends the message again on a fresh one);
- concurrency limits (RESOURCE_EXHAUSTED, BUSY) and the answer-length clamp;
- 16 concurrent senders with distinct SQuAD contexts under a cache cap that forces eviction: every
  answer is the one its own context gives (computed here, sequentially, from the same bytes), every
  message arrives, the store never exceeds its cap, and an evicted message is NOT_FOUND;
- a receiver restarted between transfer and ask (NOT_FOUND) - last, since it restarts the receiver.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from kvlink import wire
from kvlink.cache import Observe, prefill
from kvlink.client.sender import (
    SendError,
    TransferResult,
    ask,
    channel_options,
    transfer,
    transfer_with_retries,
)
from kvlink.codec import Codec, EncodedKV
from kvlink.eval.squad import QAExample, load_squad
from kvlink.generate import greedy_answer
from kvlink.models import LoadedModel
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import build
from kvlink.server.store import kv_nbytes
from netutil import Fault, FaultProxy, Receiver, can_bind, free_port, raw_transfer, refusal, serving, settle

STALL_S = 3.0
MAX_CALLS, PER_PEER = 24, 20
CACHE_CAP = (
    32 << 20
)  # holds 8-13 of the load test's contexts, and fits one decode's working memory: 16 force eviction
MAX_NEW_TOKENS = 8
ANSWER_TOKENS = 4
SENDERS = 16
CONFIG = build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
DEFINED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED, grpc.StatusCode.OUT_OF_RANGE,
    }
)  # fmt: skip
"""What a failed call may end with: any specific status, never OK-with-garbage or UNKNOWN."""


@pytest.fixture(scope="module")
def rx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    d = tmp_path_factory.mktemp("faults")
    receiver = Receiver(
        args=["--stall-timeout", str(STALL_S), "--max-concurrent-sessions", str(MAX_CALLS),
              "--per-peer-concurrency", str(PER_PEER), "--max-cached-bytes", str(CACHE_CAP),
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--log-level", "info"],
        log=d / "kvlink-serve.log", port=free_port(), rest_port=free_port(),
    )  # fmt: skip
    with serving(receiver, request):
        yield receiver


# --- messages with known answers -----------------------------------------------------------------------------
@dataclass
class Message:
    """One context encoded once, and the answer the receiver must give from exactly these bytes."""

    encoded: EncodedKV
    question: str
    tokens: list[int]
    nbytes: int  # decoded size in the receiver's store
    session_id: str = "faults"

    def frames(self, lm: LoadedModel, message_id: str) -> list[Any]:
        return wire.to_frames(self.encoded, self.session_id, message_id, lm.fingerprint, 1 << 20)

    def ask(self, message_id: str, max_new_tokens: int = ANSWER_TOKENS) -> wire.Ask:
        return wire.Ask(self.session_id, message_id, self.question, max_new_tokens)


def make_message(lm: LoadedModel, example: QAExample, session_id: str = "faults") -> Message:
    ctx, q = context_ids(lm.tokenizer, example.context), question_ids(lm.tokenizer, example.question)
    pre = prefill(lm.model, ctx, q, observe=Observe.QUESTION)
    codec = Codec(CONFIG, lm.geometry)
    encoded = codec.encode(pre)
    kv = codec.decode(encoded)  # what the receiver will rebuild from the bytes
    local = greedy_answer(lm.model, lm.tokenizer, kv, q, max_new_tokens=ANSWER_TOKENS)
    return Message(encoded, example.question, list(local.token_ids), kv_nbytes(kv), session_id)


@pytest.fixture(scope="module")
def good(embedded: LoadedModel) -> Message:
    return make_message(embedded, load_squad()[0])


async def send_good(rx: Receiver, lm: LoadedModel, good: Message) -> None:
    """The next good message after a fault: transferred and answered from exactly its bytes."""
    message_id = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        result = await transfer(ch, good.frames(lm, message_id), timeout=60)
        answer = await ask(ch, good.ask(message_id), timeout=60)
    assert result.receipt.message_id == message_id and list(answer.token_ids) == good.tokens
    assert rx.alive()


async def assert_not_kept(rx: Receiver, good: Message, message_id: str, before: dict[str, Any]) -> None:
    """Nothing of the message is used or held: NOT_FOUND, no call or chunk data left, the store unchanged."""
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        with pytest.raises(SendError) as info:
            await ask(ch, good.ask(message_id), timeout=30)
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    after = await settle(rx)
    for key in ("messages", "bytes"):
        assert after["store"][key] == before["store"][key], (key, before["store"], after["store"])
    assert rx.alive()


def verdict(signals: list[Any], error: grpc.aio.AioRpcError | None) -> str | None:
    """The receiver's kvlink error code: from its Error signal, else from the call's trailing metadata."""
    found = refusal(signals, error)
    return found.code if found else None


# --- a sender that goes away ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["tcp-cut", "stream-reset"])
async def test_sender_disconnects_mid_stream(
    rx: Receiver, embedded: LoadedModel, good: Message, how: str
) -> None:
    before = await settle(rx)
    message_id = uuid.uuid4().hex
    frames = good.frames(embedded, message_id)
    if how == "tcp-cut":  # the connection dies under the stream, 40% into the message
        size = sum(wire.frame_size(f) for f in frames)
        async with FaultProxy(rx.target) as proxy:
            proxy.arm(Fault(cut_after=int(0.4 * size)))
            async with grpc.aio.insecure_channel(proxy.address, channel_options()) as ch:
                with pytest.raises(SendError) as info:
                    await transfer(ch, frames, timeout=30)
        assert info.value.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), info.value
    else:  # the sender cancels the call (RST_STREAM) after a few frames, without a word
        async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
            call = ch.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(timeout=30)
            for frame in frames[:40]:
                await call.write(wire.frame_bytes(frame))
            await asyncio.sleep(0.2)
            call.cancel()
    await assert_not_kept(rx, good, message_id, before)
    await send_good(rx, embedded, good)


# --- stalls -------------------------------------------------------------------------------------------------------
async def test_stall_past_the_receivers_stall_timeout(
    rx: Receiver, embedded: LoadedModel, good: Message
) -> None:
    before = await settle(rx)
    message_id = uuid.uuid4().hex
    raws = [wire.frame_bytes(f) for f in good.frames(embedded, message_id)[:4]]  # header + 3 chunks
    started = time.monotonic()
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        signals, error = await raw_transfer(ch, raws, timeout=60, close=False)  # then silence
    waited = time.monotonic() - started
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert verdict(signals, error) == "STALLED"
    assert STALL_S - 0.5 <= waited < STALL_S + 10, waited
    assert (await asyncio.to_thread(rx.stats))["errors"]["STALLED"] >= 1
    await assert_not_kept(rx, good, message_id, before)
    await send_good(rx, embedded, good)


async def test_stall_past_the_senders_deadline(rx: Receiver, embedded: LoadedModel, good: Message) -> None:
    before = await settle(rx)
    message_id = uuid.uuid4().hex
    raws = [wire.frame_bytes(f) for f in good.frames(embedded, message_id)[:4]]
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        _, error = await raw_transfer(ch, raws, timeout=1.0, close=False)
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_not_kept(rx, good, message_id, before)  # the receiver dropped it when the deadline passed
    await send_good(rx, embedded, good)


# --- duplicated and out-of-order chunks -----------------------------------------------------------------------------
async def test_duplicated_chunk_is_refused(rx: Receiver, embedded: LoadedModel, good: Message) -> None:
    before = await settle(rx)
    message_id = uuid.uuid4().hex
    raws = [wire.frame_bytes(f) for f in good.frames(embedded, message_id)]
    duplicated = [*raws[:4], raws[3], *raws[4:]]  # chunk 2 twice in a row
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        signals, error = await raw_transfer(ch, duplicated, timeout=30)
    assert error is not None and error.code() in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
    )
    assert verdict(signals, error) == "ORDER"
    assert not any(isinstance(wire.read_signal(s), wire.Receipt) for s in signals)
    await assert_not_kept(rx, good, message_id, before)
    await send_good(rx, embedded, good)


async def test_out_of_order_chunks_are_accepted(rx: Receiver, embedded: LoadedModel, good: Message) -> None:
    message_id = uuid.uuid4().hex
    frames = good.frames(embedded, message_id)
    chunks = frames[1:-1]
    shuffled = [frames[0], *chunks[1::2][::-1], *chunks[0::2], frames[-1]]  # odd ids backwards, then even ids
    assert sorted(f.chunk.chunk_id for f in shuffled[1:-1]) == list(range(len(chunks)))
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        signals, error = await raw_transfer(ch, [wire.frame_bytes(f) for f in shuffled], timeout=60)
        assert error is None, error
        events = [wire.read_signal(s) for s in signals]
        receipts = [e for e in events if isinstance(e, wire.Receipt)]
        assert len(receipts) == 1 and receipts[0].message_id == message_id and receipts[0].retransmits == 0
        acks = [e for e in events if isinstance(e, wire.Ack)]
        assert sorted(a.layer for a in acks) == list(range(embedded.geometry.num_layers))
        answer = await ask(ch, good.ask(message_id), timeout=60)
    assert list(answer.token_ids) == good.tokens, "out of order, the same bytes: the same answer"


# --- corrupted bytes in transit ---------------------------------------------------------------------------------------
@dataclass
class Trial:
    fault: Fault
    status: grpc.StatusCode | None = None  # None: the transfer succeeded (perhaps after Nacks and retries)
    result: TransferResult | None = None
    connections: int = 0
    answered: bool = False


async def test_corrupted_bytes_in_transit(rx: Receiver, embedded: LoadedModel, good: Message) -> None:
    """One bit flipped per trial, at offsets chosen to hit the HTTP/2 preface, SETTINGS and HEADERS,
    the kvlink header frame, chunk data and (server to client) the receiver's frames. Every trial ends
    in the right answer or a defined error after which the message is NOT_FOUND; never another answer."""
    lm = embedded
    size = sum(wire.frame_size(f) for f in good.frames(lm, "x" * 32))
    c2s = [5, 70, 150, 400, 900, 3000, size // 3, size // 2, (9 * size) // 10]
    faults = [Fault(c2s=[(at, 0x10)]) for at in c2s] + [Fault(s2c=[(at, 0x04)]) for at in (3, 40)]
    trials: list[Trial] = []
    async with FaultProxy(rx.target) as proxy:
        for fault in faults:
            trial = Trial(fault)
            trials.append(trial)
            message_id = uuid.uuid4().hex
            proxy.arm(fault)  # the first connection of the trial only: a retry gets a clean one
            seen = proxy.connections
            try:
                trial.result, channel = await transfer_with_retries(
                    lambda: grpc.aio.insecure_channel(proxy.address, channel_options()), good.frames(lm, message_id),
                    attempts=3, backoff_s=0.05, timeout=30,
                )  # fmt: skip
                await channel.close()
            except SendError as err:
                trial.status = err.status
            trial.connections = proxy.connections - seen
            proxy.faults.clear()
            async with grpc.aio.insecure_channel(
                rx.target, channel_options()
            ) as ch:  # asked directly, not through the proxy
                try:
                    answer = await ask(ch, good.ask(message_id), timeout=60)
                except SendError as err:
                    assert err.status == grpc.StatusCode.NOT_FOUND, f"{trial}: {err}"
                else:
                    trial.answered = True
                    assert list(answer.token_ids) == good.tokens, f"a wrong answer after {trial}"
            if trial.status is None:
                assert trial.answered, f"transfer succeeded but the message is missing: {trial}"
            else:
                assert trial.status in DEFINED, f"{trial}"
            await settle(rx)
            assert rx.alive(), rx.log_tail()
    summary = [(t.fault, t.status.name if t.status else "ok", t.connections,
                t.result.resends if t.result else None) for t in trials]  # fmt: skip
    print("\n".join(map(str, summary)))
    assert proxy.flipped == len(faults), "every fault was applied"
    ok = [t for t in trials if t.status is None]
    assert any(t.result and t.result.resends for t in ok), f"no chunk was Nacked and resent: {summary}"
    assert any(t.connections > 1 for t in ok), f"no message was sent again on a new connection: {summary}"
    assert len(ok) >= len(trials) // 2, summary
    await send_good(rx, lm, good)


# --- limits ---------------------------------------------------------------------------------------------------------
async def _idle_calls(ch: grpc.aio.Channel, n: int) -> list[Any]:
    """Transfer calls that hold a slot and send nothing (yet)."""
    return [ch.stream_stream(wire.TRANSFER_METHOD)(timeout=30) for _ in range(n)]


async def _wait_calls(rx: Receiver, n: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (calls := (await asyncio.to_thread(rx.stats))["calls"])["calls"] != n:
        assert time.monotonic() < deadline, f"expected {n} calls in progress: {calls}"
        await asyncio.sleep(0.02)


async def test_concurrency_limits_and_answer_clamp(
    rx: Receiver, embedded: LoadedModel, good: Message
) -> None:
    before = await settle(rx)
    frames = good.frames(embedded, uuid.uuid4().hex)
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        held = await _idle_calls(ch, PER_PEER)
        await _wait_calls(rx, PER_PEER)
        with pytest.raises(SendError) as info:  # one more from the same peer (127.0.0.1)
            await transfer(ch, frames, timeout=30)
        assert (info.value.status, info.value.code) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUSY")
        assert "--per-peer-concurrency" in info.value.message
        with pytest.raises(SendError) as info:
            await ask(ch, good.ask("whatever"), timeout=30)
        assert (info.value.status, info.value.code) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUSY")
        if can_bind("127.0.0.2"):  # another peer takes the remaining slots, then the total is reached
            async with (
                FaultProxy(rx.target, source="127.0.0.2") as proxy,
                grpc.aio.insecure_channel(proxy.address, channel_options()) as other,
            ):
                more = await _idle_calls(other, MAX_CALLS - PER_PEER)
                await _wait_calls(rx, MAX_CALLS)
                with pytest.raises(SendError) as info:
                    await transfer(other, frames, timeout=30)
                assert info.value.code == "BUSY" and "--max-concurrent-sessions" in info.value.message
                for call in more:
                    call.cancel()
        for call in held:
            call.cancel()
    stats = await settle(rx)
    assert stats["calls"]["refused_busy"] >= before["calls"]["refused_busy"] + 2
    assert stats["errors"]["BUSY"] >= 2
    # Slots are back: the next message goes through, and a long answer is clamped to --max-new-tokens.
    message_id = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        await transfer(ch, good.frames(embedded, message_id), timeout=60)
        answer = await ask(ch, good.ask(message_id, max_new_tokens=1000), timeout=60)
    assert 1 <= len(answer.token_ids) <= MAX_NEW_TOKENS
    assert answer.token_ids[:ANSWER_TOKENS] == tuple(good.tokens)


# --- load: 16 concurrent senders -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def load_messages(embedded: LoadedModel) -> list[Message]:
    """SENDERS distinct SQuAD contexts (the shortest ones), each in its own session, answers computed here."""
    by_context: dict[str, QAExample] = {}
    for example in load_squad():
        by_context.setdefault(example.context, example)
    examples = sorted(by_context.values(), key=lambda e: len(e.context))[:SENDERS]
    return [make_message(embedded, e, session_id=f"sender-{i:02d}") for i, e in enumerate(examples)]


@pytest.mark.slow
async def test_load_concurrent_senders(
    rx: Receiver, embedded: LoadedModel, load_messages: list[Message], good: Message
) -> None:
    lm, messages = embedded, load_messages
    sizes = [m.nbytes for m in messages]
    assert max(sizes) <= CACHE_CAP < sum(sizes), (sizes, CACHE_CAP)  # each fits, all of them do not
    distinct = {tuple(m.tokens) for m in messages}
    assert len(distinct) >= SENDERS * 3 // 4, "the answers differ, so cross-talk would show"
    before = await settle(rx)
    ids = [uuid.uuid4().hex for _ in messages]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                peak = max(peak, (await http.get(f"{rx.rest}/v1/stats")).json()["store"]["bytes"])
                await asyncio.sleep(0.05)

    async def sender(m: Message, message_id: str) -> tuple[wire.Receipt, list[int] | None]:
        async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:  # one connection per sender
            result = await transfer(ch, m.frames(lm, message_id), timeout=120)
            try:
                answer = await ask(ch, m.ask(message_id), timeout=120)
            except SendError as err:
                assert err.status == grpc.StatusCode.NOT_FOUND, err  # evicted before its question came
                return result.receipt, None
        return result.receipt, list(answer.token_ids)

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    try:
        outcomes = await asyncio.gather(*(sender(m, i) for m, i in zip(messages, ids)))
    finally:
        watcher.cancel()
    seconds = time.perf_counter() - started
    # No message lost: every one has its receipt and the receiver's record.
    assert [r.message_id for r, _ in outcomes] == ids
    records = (await asyncio.to_thread(httpx.get, f"{rx.rest}/v1/messages", params={"limit": 1000})).json()
    assert set(ids) <= {r["message_id"] for r in records}
    # Every answer is its own context's.
    answered = [i for i, (_, tokens) in enumerate(outcomes) if tokens is not None]
    for i in answered:
        assert outcomes[i][1] == messages[i].tokens, f"sender {i} got another context's answer"
    assert answered, "every message was evicted before its question: the cap is too small to test"
    # Memory stayed under the cap, and eviction happened.
    stats = await settle(rx)
    assert peak <= CACHE_CAP and stats["store"]["peak_bytes"] <= CACHE_CAP
    assert stats["store"]["bytes"] <= CACHE_CAP
    assert stats["store"]["evicted"] - before["store"]["evicted"] >= SENDERS - CACHE_CAP // min(sizes)
    # Asked again: a held message answers with its own context, an evicted one is NOT_FOUND, and a
    # message is never found under another session.
    held = 0
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        for m, message_id in zip(messages, ids):
            try:
                answer = await ask(ch, m.ask(message_id), timeout=60)
            except SendError as err:
                assert err.status == grpc.StatusCode.NOT_FOUND
            else:
                held += 1
                assert list(answer.token_ids) == m.tokens
                other = messages[(messages.index(m) + 1) % len(messages)]
                with pytest.raises(SendError) as info:
                    await ask(ch, wire.Ask(other.session_id, message_id, m.question, 2), timeout=30)
                assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert 1 <= held < SENDERS
    print(
        f"\n{SENDERS} senders: {seconds:.1f} s, {SENDERS / seconds:.2f} messages/s; answered at once "
        f"{len(answered)}, held after {held}; peak store {peak:,} B of {CACHE_CAP:,}; sizes {min(sizes):,}-{max(sizes):,}"
    )
    await send_good(rx, lm, good)


# --- last: the receiver restarts between transfer and ask --------------------------------------------------------------
async def test_receiver_restarted_between_transfer_and_ask(
    rx: Receiver, embedded: LoadedModel, good: Message
) -> None:
    message_id = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(rx.target, channel_options()) as ch:
        await transfer(ch, good.frames(embedded, message_id), timeout=60)
        answer = await ask(ch, good.ask(message_id), timeout=60)  # held before the restart
        assert list(answer.token_ids) == good.tokens
    assert rx.stop() == 0, rx.log_tail()
    rx.start()
    rx.wait_ready()
    before = await settle(rx)
    assert before["store"]["messages"] == 0 and before["messages"] == 0, "a new process starts empty"
    await assert_not_kept(rx, good, message_id, before)
    await send_good(rx, embedded, good)
