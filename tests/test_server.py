"""kvlink-serve and kvlink-send end to end over loopback with the embedded model, plus the in-process parts.

One receiver runs in a subprocess for the whole module (`kvlink-serve` via `python -m kvlink.server.main`,
free ports, a 16 MiB --max-message-bytes so that "over the limit" is cheap to provoke). The sender
runs in this process through kvlink.client.sender. Bytes are measured at the socket by a byte-counting TCP
proxy that carries ONLY the Transfer call of a message (its own connection, so the count covers the
whole connection: HTTP/2 preface, SETTINGS, HEADERS, DATA, WINDOW_UPDATE, PING, GOAWAY); Hello and
Ask go directly to the receiver and are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

import kvlink.client.main as client_main
from kvlink import wire
from kvlink.answer import GenerationOptions
from kvlink.budget import parse_budget
from kvlink.cache import ContextKV, Observe, Prefill, prefill
from kvlink.client.sender import SendError, ask, fit_context, hello, release, send_context, transfer
from kvlink.codec import Codec, EncodedKV, Part
from kvlink.eval.squad import QAExample, load_squad
from kvlink.generate import greedy_answer
from kvlink.metrics import (
    MAX_STORED_ASKS,
    MAX_STORED_TEXT,
    AskRecord,
    MessageRecord,
    MetricsRegistry,
    aggregate,
    percentile,
)
from kvlink.models import Geometry, LoadedModel
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import Recipe, build
from kvlink.server.rest import create_app
from kvlink.server.service import KVLinkService
from kvlink.server.store import SessionStore, StoreBusy, kv_nbytes
from netutil import Receiver, free_port, serving

REPO = Path(__file__).resolve().parent.parent
MAX_MESSAGE_BYTES = 16 << 20
ANSWER_TOKENS = 12
EXAMPLE = 0  # SQuAD answerable question 0: 199 context tokens ("In what country is Normandy located?")


# --- helpers: ports, the receiver process, the byte-counting proxy ---------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    """kvlink-serve in a subprocess; stopped with SIGTERM at the end, which must exit 0."""
    rx = Receiver(
        args=["--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-new-tokens", "32", "--log-level", "info"],
        log=tmp_path_factory.mktemp("serve") / "kvlink-serve.log", port=free_port(), rest_port=free_port(),
    )  # fmt: skip
    with serving(rx, request):
        yield rx


class ByteCountingProxy:
    """A TCP proxy that counts the bytes each way (client->server, server->client)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.c2s = 0
        self.s2c = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def total(self) -> int:
        return self.c2s + self.s2c

    async def __aenter__(self) -> ByteCountingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Let the last bytes (GOAWAY, FIN) through before the counts are read.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in self._tasks:
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_writer, "c2s"), self._pipe(up_reader, writer, "s2c"))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while data := await reader.read(1 << 16):
                setattr(self, direction, getattr(self, direction) + len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()


# --- shared inputs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example() -> QAExample:
    return load_squad()[EXAMPLE]


@dataclass
class Good:
    """A known-good message (encoded once) and the answer the receiver must give from it."""

    encoded: EncodedKV
    question: str
    tokens: list[int]
    n_tokens: int = 4
    seen: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def sender_prefill(embedded: LoadedModel, example: QAExample) -> tuple[Prefill, torch.Tensor]:
    """The sender's own prefill of the example (with Q2C's observation) and the question ids."""
    lm = embedded
    ctx, q = context_ids(lm.tokenizer, example.context), question_ids(lm.tokenizer, example.question)
    return prefill(lm.model, ctx, q, observe=Observe.QUESTION), q


@pytest.fixture(scope="module")
def good(embedded: LoadedModel, example: QAExample, sender_prefill: tuple[Prefill, torch.Tensor]) -> Good:
    """Q2C 50% + INT4, encoded once; the answer is decoded locally from the same bytes (invariant 1)."""
    pre, q = sender_prefill
    codec = Codec(build(selector="q2c", retention=0.5, k_bits=4, v_bits=4), embedded.geometry)
    encoded = codec.encode(pre)
    local = greedy_answer(embedded.model, embedded.tokenizer, codec.decode(encoded), q, max_new_tokens=4)
    return Good(encoded, example.question, local.token_ids)


def _frames(lm: LoadedModel, encoded: EncodedKV, message_id: str, session_id: str = "tests") -> list[Any]:
    return wire.to_frames(encoded, session_id, message_id, lm.fingerprint, 1 << 20)


@contextlib.asynccontextmanager
async def _channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


async def _send_good(rx: Receiver, lm: LoadedModel, good: Good) -> None:
    """A good message right after a bad one: it must still go through and be answered correctly."""
    message_id = uuid.uuid4().hex
    async with _channel(rx.target) as ch:
        result = await transfer(ch, _frames(lm, good.encoded, message_id), timeout=60)
        answer = await ask(ch, wire.Ask("tests", message_id, good.question, good.n_tokens), timeout=60)
    assert result.receipt.message_id == message_id
    assert list(answer.token_ids) == good.tokens, "the receiver must answer from exactly the bytes sent"
    good.seen.append(message_id)


async def _refused(
    rx: Receiver, lm: LoadedModel, frames: list[Any], status: grpc.StatusCode, code: str, needle: str,
    fault: Callable[[Any, int], Any] | None = None,
) -> SendError:  # fmt: skip
    """Send `frames` (through `fault`), expect a specific refusal, then check nothing was kept."""
    async with _channel(rx.target) as ch:
        with pytest.raises(SendError) as info:
            await transfer(ch, frames, timeout=60, fault=fault)
        err = info.value
        assert (err.status, err.code) == (status, code), f"{err}"
        assert needle in err.message, f"{needle!r} not in {err.message!r}"
        header = frames[0].header if not isinstance(frames[0], bytes) else None
        if header is not None and header.message_id:
            with pytest.raises(SendError) as missing:
                await ask(ch, wire.Ask(header.session_id, header.message_id, "Where?", 2), timeout=30)
            assert missing.value.status == grpc.StatusCode.NOT_FOUND, "no partial cache may ever answer"
    assert rx.alive(), f"kvlink-serve died:\n{rx.log_tail()}"
    return err


def _edited_header(frames: list[Any], edit: Callable[[Any], None]) -> list[Any]:
    header = wire.parse_frame(wire.frame_bytes(frames[0]))
    edit(header.header)
    return [header, *frames[1:]]


def _flip(chunk_id: int, times: int) -> Callable[[Any, int], Any]:
    """Fault hook: flip one byte of chunk `chunk_id` on its first `times` sends."""

    def hook(frame: Any, attempt: int) -> Any:
        if frame.WhichOneof("frame") != "chunk" or frame.chunk.chunk_id != chunk_id or attempt >= times:
            return frame
        bad = wire.parse_frame(wire.frame_bytes(frame))
        data = bytearray(bad.chunk.data)
        data[len(data) // 2] ^= 0x40
        bad.chunk.data = bytes(data)
        return bad

    return hook


# --- the receiver is up ----------------------------------------------------------------------------------
def test_health_endpoints(server: Receiver, embedded: LoadedModel) -> None:
    assert httpx.get(f"{server.rest}/healthz", timeout=10).json() == {"status": "serving"}  # liveness only
    info = httpx.get(f"{server.rest}/v1/info", timeout=10).json()
    assert (
        info["fingerprint"] == embedded.fingerprint and info["identity"] == "anonymous" and info["operator"]
    )
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", wire.SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"{server.rest}/docs", timeout=10).status_code == 200
    assert "/v1/stats" in httpx.get(f"{server.rest}/openapi.json", timeout=10).json()["paths"]


def test_docs_are_served_from_the_receiver_itself(server: Receiver) -> None:
    """Swagger UI and ReDoc load nothing from another host (they work offline): every script, style and
    icon the pages reference is a path of this server, and it serves them."""
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{server.rest}{page}", timeout=10).text
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        assert refs, html
        assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
        for ref in refs:
            reply = httpx.get(f"{server.rest}{ref}", timeout=10)
            assert reply.status_code == 200 and len(reply.content) > 100, ref
        external = re.findall(r"https?://[^\s\"'<>)]+", html)
        assert not external, external
    spec = httpx.get(f"{server.rest}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    assert {"Info", "Stats", "Group", "Message", "AskRequest", "AnswerView", "Released"} <= set(schemas)
    ok = spec["paths"]["/v1/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Stats"}
    assert "lengths" in schemas["Stats"]["properties"] and "family" in schemas["Message"]["properties"]
    assert set(spec["paths"]["/v1/messages/{message_id}"]) == {"get", "delete"}


# --- budgets, measured at the socket -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("budget", ["100%", "50%", "25%", "18.75%", "12.5%", "6.25%"])
async def test_budget_holds_at_the_socket(
    server: Receiver, embedded: LoadedModel, example: QAExample, sender_prefill: tuple[Prefill, torch.Tensor],
    budget: str,
) -> None:  # fmt: skip
    lm = embedded
    async with ByteCountingProxy(server.target) as proxy:
        result = await send_context(
            server.target, example.context, example.question, budget, lm=lm,
            reference_answers=example.answers, max_new_tokens=ANSWER_TOKENS, transfer_target=proxy.address,
        )  # fmt: skip
    p, r = result.plan, result.receipt
    fraction = parse_budget(budget)
    budget_bytes = int(fraction * result.fp16_bytes)
    assert result.fp16_bytes == lm.geometry.fp16_bytes(result.context_tokens)
    assert proxy.connections == 1 and proxy.c2s > 0 and proxy.s2c > 0
    # The receipt's categories add up, and it is what the sender put in frames (no resends here).
    assert r.metadata == r.positions + r.scales + r.factors
    assert r.payload + r.metadata + r.framing + r.signaling == r.total
    assert r.payload + r.metadata + r.framing == result.transfer.bytes_sent
    assert r.signaling == result.transfer.signaling_bytes
    assert r.total <= p.total_bytes <= p.budget_bytes <= budget_bytes
    # Bytes at the socket: the whole Transfer connection, both directions, within budget.
    assert proxy.c2s >= r.payload + r.metadata + r.framing and proxy.s2c >= r.signaling
    # The planner's HTTP/2 allowance must bound what the socket really carried.
    assert proxy.total <= p.total_bytes, f"socket {proxy.total} > planned {p.total_bytes}"
    assert proxy.total <= budget_bytes, (
        f"{proxy.total} socket bytes (c2s {proxy.c2s}, s2c {proxy.s2c}) exceed {budget} of "
        f"{result.fp16_bytes} = {budget_bytes}; the plan counted {p.total_bytes}"
    )
    print(
        f"\n[{budget}] {p.recipe.name}: fp16 {result.fp16_bytes:,} B; budget {budget_bytes:,}; "
        f"planned {p.total_bytes:,}; receipt {r.total:,} (payload {r.payload:,}, metadata {r.metadata:,}, "
        f"framing {r.framing:,}, signaling {r.signaling:,}); socket c2s {proxy.c2s:,} + s2c {proxy.s2c:,} "
        f"= {proxy.total:,} ({100 * proxy.total / result.fp16_bytes:.2f}% of FP16); answer {result.answer.text!r}; "
        f"timings {', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())}"
    )
    assert result.answer.f1 is not None and result.answer.exact_match is not None

    if fraction == 1.0:  # lossless: the receiver's answer is the sender's own, token for token
        assert (p.recipe.method, p.recipe.format("k"), p.recipe.format("v"), p.recipe.has("lowrank")) == (
            "none", "fp16", "fp16", False,
        )  # fmt: skip
        pre, q = sender_prefill  # the full context KV as the sender computed it, never compressed
        local = greedy_answer(lm.model, lm.tokenizer, pre.kv, q, max_new_tokens=ANSWER_TOKENS)
        assert list(result.answer.token_ids) == local.token_ids
        assert result.answer.text == local.text

    # REST reports the numbers of the message just sent.
    record = httpx.get(f"{server.rest}/v1/messages/{result.message_id}", timeout=10).json()
    assert record["bytes"] == {
        "payload": r.payload, "metadata": r.metadata, "positions": r.positions, "scales": r.scales,
        "factors": r.factors, "framing": r.framing, "signaling": r.signaling, "total": r.total,
    }  # fmt: skip
    assert record["fp16_bytes"] == result.fp16_bytes and record["config_label"] == p.recipe.name
    assert record["asks"][-1]["answer"] == result.answer.text
    assert record["asks"][-1]["f1"] == pytest.approx(result.answer.f1)
    assert record["timings"]["prefill_s"] == pytest.approx(result.timings["prefill_s"])
    stats = httpx.get(f"{server.rest}/v1/stats", timeout=10).json()
    group = stats["configs"][p.recipe.name]
    assert group["messages"] >= 1 and group["bytes"]["total"] >= r.total
    assert group["f1_mean"] is not None and "decode_s" in group["timings"]


# --- bad input: each refused specifically, each followed by a good message ---------------------------------
async def test_truncated_stream(server: Receiver, embedded: LoadedModel, good: Good) -> None:
    frames = _frames(embedded, good.encoded, uuid.uuid4().hex)
    half = (len(frames) - 2) // 2

    def close_halfway(frame: Any, attempt: int) -> Any:
        is_chunk = frame.WhichOneof("frame") == "chunk"
        return None if (is_chunk and frame.chunk.chunk_id >= half) else frame

    err = await _refused(
        server, embedded, frames, grpc.StatusCode.ABORTED, "TRUNCATED", "before the trailer", close_halfway
    )
    assert f"after {half} of {len(frames) - 2} chunks" in err.message
    await _send_good(server, embedded, good)


async def test_cancel_frame_and_disconnect_discard_the_message(
    server: Receiver, embedded: LoadedModel, good: Good
) -> None:
    frames = _frames(embedded, good.encoded, uuid.uuid4().hex)

    def cancel_at_chunk_5(frame: Any, attempt: int) -> Any:
        is_chunk = frame.WhichOneof("frame") == "chunk"
        return wire.cancel_frame("user pressed ^C") if (is_chunk and frame.chunk.chunk_id == 5) else frame

    await _refused(server, embedded, frames, grpc.StatusCode.CANCELLED, "CANCELLED", "^C", cancel_at_chunk_5)
    # The sender goes away mid-stream without a word: the receiver drops what it had.
    message_id = uuid.uuid4().hex
    async with _channel(server.target) as ch:
        call = ch.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(timeout=30)
        for frame in _frames(embedded, good.encoded, message_id)[:6]:
            await call.write(wire.frame_bytes(frame))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(SendError) as info:
            await ask(ch, wire.Ask("tests", message_id, good.question, 2), timeout=30)
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert server.alive()
    await _send_good(server, embedded, good)


async def test_flipped_byte_is_resent_and_succeeds(
    server: Receiver, embedded: LoadedModel, good: Good
) -> None:
    message_id = uuid.uuid4().hex
    async with _channel(server.target) as ch:
        result = await transfer(
            ch, _frames(embedded, good.encoded, message_id), timeout=60, fault=_flip(3, 1)
        )
        answer = await ask(ch, wire.Ask("tests", message_id, good.question, good.n_tokens), timeout=60)
    assert result.resends == 1 and result.nacks[0].chunk_id == 3 and "CRC32C" in result.nacks[0].reason
    assert result.receipt.retransmits == 1 and result.receipt.retransmitted_bytes > 0
    assert list(answer.token_ids) == good.tokens  # the resent chunk, not the damaged one, was used
    await _send_good(server, embedded, good)


async def test_chunk_corrupted_on_every_resend_is_data_loss(
    server: Receiver, embedded: LoadedModel, good: Good
) -> None:
    frames = _frames(embedded, good.encoded, uuid.uuid4().hex)
    await _refused(
        server, embedded, frames, grpc.StatusCode.DATA_LOSS, "CORRUPT", "failed verification", _flip(2, 1000)
    )
    await _send_good(server, embedded, good)


async def test_wrong_model_fingerprint(server: Receiver, embedded: LoadedModel, good: Good) -> None:
    async with _channel(server.target) as ch:
        with pytest.raises(SendError) as info:
            await hello(ch, "0" * 64, timeout=30)
    assert (info.value.status, info.value.code) == (grpc.StatusCode.FAILED_PRECONDITION, "FINGERPRINT")
    assert "same weights and tokenizer" in info.value.message
    frames = wire.to_frames(good.encoded, "tests", uuid.uuid4().hex, "0" * 64, 1 << 20)
    await _refused(
        server,
        embedded,
        frames,
        grpc.StatusCode.FAILED_PRECONDITION,
        "FINGERPRINT",
        "model fingerprint '0000",
    )
    await _send_good(server, embedded, good)


async def test_unknown_codec(server: Receiver, embedded: LoadedModel, good: Good) -> None:
    frames = _frames(embedded, good.encoded, uuid.uuid4().hex)
    bad = _edited_header(frames, lambda h: setattr(h.tensors[0].spec, "format", "int5"))
    await _refused(server, embedded, bad, grpc.StatusCode.UNIMPLEMENTED, "UNKNOWN_CODEC", "'int5'")
    unknown_stage = _edited_header(
        frames, lambda h: setattr(h.recipe.pipelines[0].stages[-1], "name", "tucker")
    )
    await _refused(
        server, embedded, unknown_stage, grpc.StatusCode.UNIMPLEMENTED, "UNKNOWN_CODEC", "'tucker'"
    )
    await _send_good(server, embedded, good)


def test_a_version_1_sender_is_refused_by_name_at_its_hello(server: Receiver) -> None:
    """Protocol 2 carries recipes as stages; a version-1 sender's Hello (service kvlink.v1.KVLink) gets a
    PROTOCOL error that says what to upgrade, not a bare UNIMPLEMENTED."""
    with grpc.insecure_channel(server.target) as ch:
        hello = ch.unary_unary("/kvlink.v1.KVLink/Hello")
        with pytest.raises(grpc.RpcError) as info:
            hello(b"\x08\x01\x12\x01x", timeout=10)  # protocol_version 1, fingerprint "x"
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = wire.error_from_rpc(info.value)
    assert err is not None and err.code == "PROTOCOL" and "upgrade the sender" in err.message


async def test_key_widths_are_answered_and_bad_widths_cost_one_error(
    server: Receiver, embedded: LoadedModel, good: Good, sender_prefill: tuple[Prefill, torch.Tensor]
) -> None:
    """A message with per-channel key widths is answered from exactly its bytes; one whose widths do
    not add up (well framed, CRCs right) is refused as MALFORMED and the receiver keeps serving."""
    pre, q = sender_prefill
    config = build(selector="q2c", retention=0.5, scope="layer", k_bits=3, v_bits=4, group_size=64,
                         sink=1, k_widths="query")  # fmt: skip
    codec = Codec(config, embedded.geometry)
    encoded = codec.encode(pre)
    assert encoded.tensors[0].spec.format == "int3cw"
    local = greedy_answer(embedded.model, embedded.tokenizer, codec.decode(encoded), q, max_new_tokens=4)
    await _send_good(server, embedded, Good(encoded, good.question, local.token_ids))
    t = encoded.tensors[0]
    raw = bytearray(t.parts["widths"].data)
    raw[0] = (raw[0] & 0xF0) | (((raw[0] & 0x0F) + 1) % 9)  # one more (or fewer) bit in head 0
    bad = replace(encoded, tensors=[replace(t, parts={**t.parts, "widths": Part(bytes(raw), len(raw))}),
                                    *encoded.tensors[1:]])  # fmt: skip
    frames = _frames(embedded, bad, uuid.uuid4().hex)
    await _refused(
        server, embedded, frames, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED", "widths of head 0"
    )
    await _send_good(server, embedded, good)


async def test_value_widths_are_answered_and_bad_widths_cost_one_error(
    server: Receiver, embedded: LoadedModel, good: Good, sender_prefill: tuple[Prefill, torch.Tensor]
) -> None:
    """Likewise for a width per value row: answered from exactly its bytes; row widths that do not
    add up are refused as MALFORMED and the receiver keeps serving."""
    pre, q = sender_prefill
    config = build(selector="q2c", retention=0.65, scope="layer", k_bits=4, v_bits=3, group_size=64,
                         sink=1, k_widths="query", v_widths="attention")  # fmt: skip
    codec = Codec(config, embedded.geometry)
    encoded = codec.encode(pre)
    assert (encoded.tensors[0].spec.format, encoded.tensors[1].spec.format) == ("int4cw", "int3rw")
    local = greedy_answer(embedded.model, embedded.tokenizer, codec.decode(encoded), q, max_new_tokens=4)
    await _send_good(server, embedded, Good(encoded, good.question, local.token_ids))
    t = encoded.tensors[1]
    raw = bytearray(t.parts["widths"].data)
    raw[0] = (raw[0] & 0xF0) | (((raw[0] & 0x0F) + 1) % 9)  # one more (or fewer) bit in head 0
    bad = replace(encoded, tensors=[encoded.tensors[0], replace(t, parts={**t.parts, "widths": Part(bytes(raw), len(raw))}),
                                    *encoded.tensors[2:]])  # fmt: skip
    frames = _frames(embedded, bad, uuid.uuid4().hex)
    await _refused(
        server, embedded, frames, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED", "widths of head 0"
    )
    await _send_good(server, embedded, good)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: h.tensors[2].shape.__setitem__(1, 7), "layer 1 k: shape"),
        (lambda h: setattr(h.payload[0], "size", h.payload[0].size + 1), "chunks hold"),
    ],
    ids=["tensor-shape", "table-size"],
)
async def test_shape_or_size_mismatch_with_the_header(
    server: Receiver, embedded: LoadedModel, good: Good, edit: Callable[[Any], None], needle: str
) -> None:
    bad = _edited_header(_frames(embedded, good.encoded, uuid.uuid4().hex), edit)
    await _refused(server, embedded, bad, grpc.StatusCode.INVALID_ARGUMENT, "SHAPE", needle)
    await _send_good(server, embedded, good)


async def test_a_context_longer_than_the_models_positions_is_refused_from_its_header(
    server: Receiver, embedded: LoadedModel, good: Good
) -> None:
    """The embedded model has 8,192 positions: a header declaring more is refused before any chunk."""
    frames = _edited_header(
        _frames(embedded, good.encoded, uuid.uuid4().hex), lambda h: setattr(h, "length", 9000)
    )
    await _refused(
        server, embedded, frames, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_LARGE",
        "context length 9000 exceeds the limit 8192",
    )  # fmt: skip


async def test_message_over_the_limit(server: Receiver, embedded: LoadedModel, good: Good) -> None:
    async with _channel(server.target) as ch:
        welcome = await hello(ch, embedded.fingerprint, timeout=30)
    assert welcome.max_message_bytes == MAX_MESSAGE_BYTES
    g = embedded.geometry
    length = welcome.max_message_bytes // g.fp16_bytes(1) + 1  # FP16 of this many tokens is over the limit
    shape = (g.kv_heads, length, g.head_dim)
    kv = ContextKV(
        [torch.zeros(shape) for _ in range(g.num_layers)], [torch.zeros(shape) for _ in range(g.num_layers)],
        [torch.arange(length)] * g.num_layers, length,
    )  # fmt: skip
    encoded = Codec(build(), g).encode_kv(kv)
    frames = _frames(embedded, encoded, uuid.uuid4().hex)
    stop_after_header = lambda frame, attempt: frame if frame.WhichOneof("frame") == "header" else None  # noqa: E731
    await _refused(
        server, embedded, frames, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_LARGE",
        f"the limit is {MAX_MESSAGE_BYTES}", stop_after_header,
    )  # fmt: skip
    await _send_good(server, embedded, good)


async def test_malformed_protobuf(server: Receiver, embedded: LoadedModel, good: Good) -> None:
    frames = _frames(embedded, good.encoded, uuid.uuid4().hex)
    junk_first = lambda frame, attempt: b"\xff\xff\xff" if frame.WhichOneof("frame") == "header" else frame  # noqa: E731
    await _refused(
        server, embedded, frames, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED", "not a kvlink TransferFrame",
        junk_first,
    )  # fmt: skip
    async with _channel(server.target) as ch:
        for method in (wire.HELLO_METHOD, wire.ASK_METHOD):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(method)(b"\x0a\x05ab", timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            err = wire.error_from_rpc(info.value)
            assert err is not None and err.code == "MALFORMED" and "are not a kvlink" in err.message
    await _send_good(server, embedded, good)


async def test_ask_about_an_unknown_message_is_not_found(server: Receiver) -> None:
    async with _channel(server.target) as ch:
        with pytest.raises(SendError) as info:
            await ask(ch, wire.Ask("nobody", "nothing", "Who?", 4), timeout=30)
    assert info.value.status == grpc.StatusCode.NOT_FOUND and "'nothing'" in info.value.message


async def test_budget_outside_the_range_is_a_value_error(server: Receiver, embedded: LoadedModel) -> None:
    for bad in ("0%", "150%", "-5%", "1.5", "abc", "nan"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="budget"):
        await send_context(server.target, "some context", "why?", 1.5, lm=embedded)


def test_the_cli_refuses_a_bad_budget_with_exit_2(
    server: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    context = tmp_path / "context.txt"
    context.write_text("Normandy is a region in France.")
    argv = ["--server", server.target, "--context", str(context), "--question", "Where?"]
    proc = subprocess.run(
        [sys.executable, "-m", "kvlink.client.main", *argv, "--budget", "150%"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "budget must be in (0, 100%]" in proc.stderr and "Traceback" not in proc.stderr
    for budget in ("0%", "-1", "lots"):
        assert client_main.main([*argv, "--budget", budget]) == 2
        err = capsys.readouterr().err
        assert "kvlink-send: error: budget" in err and "Traceback" not in err
    for budget in ("1.01", "18.75"):  # a bare number above 1 was surely meant as a percentage
        assert client_main.main([*argv, "--budget", budget]) == 2
        assert f"did you mean {budget}%?" in capsys.readouterr().err


def test_the_cli_in_process(
    server: Receiver, embedded: LoadedModel, example: QAExample, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """kvlink-send's main(): --json prints one object; an unsatisfiable budget exits 2 without a traceback."""
    monkeypatch.setattr("kvlink.models.load_model", lambda *a, **k: embedded)
    context = tmp_path / "context.txt"
    context.write_text(example.context)
    argv = ["--server", server.target, "--context", str(context), "--question", example.question,
            "--max-new-tokens", "4", "--bits", "8"]  # fmt: skip
    assert client_main.main([*argv, "--budget", "60%", "--json", "--explain"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {
        q["format"]
        for kind in ("k", "v")
        for p in data["config"][kind]
        for q in p
        if q["stage"] == "quantize"
    } == {"int8"}
    assert data["config_label"] == data["config"]["name"] and "kint8c/vint8t" in data["config_label"]
    assert data["receipt"]["total"] <= data["budget_bytes"] and data["candidates"]
    assert data["session_id"] and data["message_id"] and data["kept_on_receiver"] is True
    # --explain --json is bounded: the 20 best and the ones encoded, not every candidate weighed.
    encoded = sum(1 for c in data["candidates"] if c["note"])
    assert len(data["candidates"]) <= 20 + encoded < data["candidates_total"]
    assert client_main.main([*argv, "--budget", "60%", "--json", "--explain", "--explain-top", "0"]) == 0
    assert len(json.loads(capsys.readouterr().out)["candidates"]) == data["candidates_total"]
    assert set(data["timings"]) >= {"prefill_s", "quantize_s", "pack_s", "transfer_s", "decode_s", "answer_s"}
    assert client_main.main([*argv, "--budget", "0.5%"]) == 2  # unsatisfiable: no config is that small
    err = capsys.readouterr().err
    assert "cannot be met: the smallest achievable message is" in err and "Traceback" not in err


def _cli(module: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A kvlink command in a subprocess, its output piped (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


# --- follow-up questions: kvlink-ask, REST ask, releasing ---------------------------------------------------------
async def test_follow_up_questions_over_grpc_and_rest_and_releasing(
    server: Receiver, embedded: LoadedModel, example: QAExample
) -> None:
    """One send, then questions again without re-sending: kvlink-ask (real gRPC, any session or the right
    one), REST POST /v1/messages/{id}/ask, the same greedy answer both ways; then DELETE frees it."""
    sent = await send_context(
        server.target, example.context, example.question, "50%", lm=embedded, max_new_tokens=8, timeout=120
    )
    assert sent.kept_on_receiver and sent.answer.finish_reason in ("eos", "length")
    follow_up = "What is the capital of Normandy?"
    proc = _cli("kvlink.client.ask", "--server", server.target, "--message", sent.message_id, "--json",
                "--max-new-tokens", "8", follow_up)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    by_grpc = json.loads(proc.stdout)
    assert by_grpc["message_id"] == sent.message_id and by_grpc["answer"] and by_grpc["finish_reason"]
    plain = _cli("kvlink.client.ask", "--server", server.target, "--message", sent.message_id,
                 "--session", sent.session_id, "--max-new-tokens", "8", follow_up)  # fmt: skip
    assert plain.returncode == 0 and plain.stdout.startswith(f"answer: {by_grpc['answer']}"), plain
    wrong_session = _cli("kvlink.client.ask", "--server", server.target, "--message", sent.message_id,
                         "--session", "another-session", follow_up)  # fmt: skip
    assert wrong_session.returncode == 1 and "NOT_FOUND" in wrong_session.stderr

    url = f"{server.rest}/v1/messages/{sent.message_id}"
    by_rest = httpx.post(f"{url}/ask", json={"question": follow_up, "max_new_tokens": 8}, timeout=120)
    assert by_rest.status_code == 200, by_rest.text
    assert by_rest.json()["token_ids"] == by_grpc["token_ids"]  # greedy: the same answer both ways
    assert httpx.post(f"{url}/ask", json={"question": "x", "top_p": 0.5}, timeout=30).status_code == 400
    record = httpx.get(url, timeout=10).json()
    assert record["questions"] == 4 and {a["question"] for a in record["asks"]} == {
        example.question,
        follow_up,
    }

    freed = httpx.delete(url, timeout=10)
    assert freed.status_code == 200 and freed.json()["freed_bytes"] > 0
    assert httpx.delete(url, timeout=10).status_code == 404
    assert httpx.post(f"{url}/ask", json={"question": follow_up}, timeout=30).status_code == 404
    gone = _cli(
        "kvlink.client.ask", "--server", server.target, "--message", sent.message_id, "--json", follow_up
    )
    assert gone.returncode == 1 and json.loads(gone.stdout)["error"]["code"] == "NOT_FOUND"
    assert httpx.get(url, timeout=10).json()["message_id"] == sent.message_id  # the record stays


async def test_no_keep_releases_and_answers_take_generation_options(
    server: Receiver, embedded: LoadedModel, example: QAExample
) -> None:
    """--no-keep (keep=False) frees the context after the answer; a stop string ends an answer ("stop"),
    sampling answers, and a Release by the Release RPC is NOT_FOUND once freed."""
    greedy = await send_context(
        server.target, example.context, example.question, "50%", lm=embedded, max_new_tokens=16, keep=False
    )
    assert greedy.released_bytes and not greedy.kept_on_receiver
    async with _channel(server.target) as ch:
        with pytest.raises(SendError) as info:
            await ask(ch, wire.Ask("", greedy.message_id, example.question, 4), timeout=30)
        assert info.value.status == grpc.StatusCode.NOT_FOUND
        with pytest.raises(SendError) as info:
            await release(ch, greedy.message_id, timeout=30)
        assert info.value.status == grpc.StatusCode.NOT_FOUND
    word = greedy.answer.text.split()[0]
    stopped = await send_context(
        server.target, example.context, example.question, "50%", lm=embedded,
        options=GenerationOptions(16, stop=(word,)), keep=False,
    )  # fmt: skip
    assert stopped.answer.finish_reason == "stop" and stopped.answer.text.endswith(word)
    assert list(stopped.answer.token_ids) == list(greedy.answer.token_ids)[: len(stopped.answer.token_ids)]
    sampled = await send_context(
        server.target, example.context, example.question, "50%", lm=embedded,
        options=GenerationOptions(8, temperature=1.5, top_p=0.95), keep=False,
    )  # fmt: skip
    assert sampled.answer.token_ids and sampled.released_bytes


async def test_a_context_too_long_is_cut_only_when_asked(
    server: Receiver, embedded: LoadedModel, example: QAExample, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The numbers in the refusal; with truncate=True, the first tokens that fit are sent."""
    assert fit_context(100, 10, 5, 200) == 100 and fit_context(100, 10, 5, None) == 100
    assert fit_context(300, 10, 5, 200, truncate=True) == 185
    with pytest.raises(ValueError, match="the model has 200"):
        fit_context(10, 190, 20, 200, truncate=True)  # even an empty context would not fit
    monkeypatch.setattr("kvlink.client.sender.max_positions", lambda config: 160)
    with pytest.raises(ValueError, match=r"the context has 199 tokens; .* 160 \(max_position_embeddings\)"):
        await send_context(server.target, example.context, example.question, "50%", lm=embedded)
    cut = await send_context(
        server.target, example.context, example.question, "50%", lm=embedded, truncate=True, max_new_tokens=8
    )
    n_q = int(question_ids(embedded.tokenizer, example.question).numel())
    assert cut.context_tokens == 160 - n_q - 8 and cut.truncated_tokens == 199 - cut.context_tokens
    assert (
        httpx.get(f"{server.rest}/v1/messages/{cut.message_id}", timeout=10).json()["length"]
        == cut.context_tokens
    )


def test_piped_output_is_complete_lines(
    server: Receiver, embedded: LoadedModel, example: QAExample, tmp_path: Path
) -> None:
    """kvlink-send piped: no line cut to 80 columns, the --explain table's columns all there, the ids printed."""
    context = tmp_path / "context.txt"
    context.write_text(example.context)
    proc = _cli("kvlink.client.main", "--server", server.target, "--context", str(context), "--question",
                example.question, "--budget", "18.75%", "--max-new-tokens", "4", "--explain")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) > 100 and "\x1b[" not in proc.stdout  # wide, no colors
    header = next(line for line in lines if "config" in line and "estimate" in line)
    assert "quality" in header and "encoded: exact bytes" in header
    assert any(line.startswith("session ") and " message " in line for line in lines)
    assert any(line.startswith("ask again: kvlink-ask --server") for line in lines)
    assert proc.stderr == ""  # no spinner, no log noise when not on a terminal


# --- REST reports what it was sent ---------------------------------------------------------------------------
async def test_rest_reports_the_messages_and_errors(
    server: Receiver, embedded: LoadedModel, good: Good
) -> None:
    before = httpx.get(f"{server.rest}/v1/stats", timeout=10).json()
    frames = _frames(embedded, good.encoded, uuid.uuid4().hex)
    await _refused(
        server, embedded, frames, grpc.StatusCode.DATA_LOSS, "CORRUPT", "failed verification", _flip(0, 99)
    )
    message_id = uuid.uuid4().hex
    async with _channel(server.target) as ch:
        sent = await transfer(ch, _frames(embedded, good.encoded, message_id), timeout=60)
    r = sent.receipt
    record = httpx.get(f"{server.rest}/v1/messages/{message_id}", timeout=10).json()
    assert record["bytes"]["total"] == r.total and record["bytes"]["payload"] == r.payload
    assert record["chunks"] == r.chunks and record["config_label"] == good.encoded.recipe.name
    assert record["asks"] == []  # nobody asked yet
    stats = httpx.get(f"{server.rest}/v1/stats", timeout=10).json()
    assert stats["messages"] == before["messages"] + 1
    assert stats["bytes"]["total"] == before["bytes"]["total"] + r.total
    assert stats["errors"]["CORRUPT"] == before["errors"].get("CORRUPT", 0) + 1
    group = stats["configs"][good.encoded.recipe.name]
    assert group["messages"] >= 1 and group["percent_of_fp16"] == pytest.approx(
        100 * group["bytes"]["total"] / group["fp16_bytes"]
    )
    listed = httpx.get(f"{server.rest}/v1/messages", params={"limit": 1}, timeout=10).json()
    assert [m["message_id"] for m in listed] == [message_id]
    assert httpx.get(f"{server.rest}/v1/messages/no-such-message", timeout=10).status_code == 404
    metrics = httpx.get(f"{server.rest}/metrics", timeout=10).text
    assert 'kvlink_errors_total{code="CORRUPT",rpc="Transfer"}' in metrics
    assert "kvlink_decode_seconds_count" in metrics and "kvlink_wire_bytes_total" in metrics
    assert server.alive()


# --- in process: store, metrics, REST app ------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _small_kv(length: int = 10) -> ContextKV:
    shape = (2, length, 4)
    return ContextKV([torch.zeros(shape)], [torch.zeros(shape)], [torch.arange(length)], length)


def test_store_ttl_and_lru_eviction() -> None:
    one = kv_nbytes(_small_kv())
    assert one == 2 * (2 * 10 * 4 * 4) + 10 * 8
    clock = FakeClock()
    store = SessionStore(ttl_s=60, max_bytes=2 * one, clock=clock)
    store.put("alice", "s", "a", _small_kv())
    clock.now += 10
    store.put("alice", "s", "b", _small_kv())
    clock.now += 10
    assert store.get("alice", "s", "a") is not None  # a is now more recently used than b
    assert store.put("alice", "t", "c", _small_kv()) == [("alice", "b")]  # over the cap: the LRU entry goes
    assert store.get("alice", "s", "b") is None and store.get("alice", "t", "c") is not None
    clock.now += 30
    assert store.get("alice", "t", "c") is not None
    clock.now += 31
    assert store.get("alice", "s", "a") is None  # not used for 61 s
    assert store.get("alice", "t", "c") is not None  # used 31 s ago
    stats = store.stats()
    assert (stats.messages, stats.sessions, stats.bytes, stats.evicted, stats.expired) == (1, 1, one, 1, 1)
    clock.now += 61
    assert store.purge_expired() == 1 and len(store) == 0 and store.stats().bytes == 0
    with pytest.raises(ValueError, match="exceeds the store's cap"):
        SessionStore(max_bytes=one - 1).put("alice", "s", "big", _small_kv())
    with pytest.raises(ValueError, match="ttl_s"):
        SessionStore(ttl_s=0)


def test_store_owners_ids_and_the_decode_budget() -> None:
    one = kv_nbytes(_small_kv())
    store = SessionStore(ttl_s=60, max_bytes=3 * one)
    store.put("alice", "s", "m", _small_kv())
    # Another owner's message, or the same owner's in another session, is not found; nothing is overwritten.
    assert store.get("bob", "s", "m") is None and store.get("alice", "other", "m") is None
    with pytest.raises(KeyError, match="already holds"):
        store.put("alice", "s2", "m", _small_kv())
    store.put("bob", "s", "m", _small_kv())  # ids are per owner
    assert store.holds("alice", "m") and store.holds("bob", "m") and not store.holds("carol", "m")
    assert store.stats("bob").messages == 1 and store.stats().messages == 2
    # A decode's reservation counts against the cap: it evicts the LRU entry, and a second one that
    # the decodes in flight alone would push over the cap is refused without evicting anything.
    first = store.reserve(2 * one)
    assert (
        store.stats().reserved_bytes == 2 * one and not store.holds("alice", "m") and store.holds("bob", "m")
    )
    with pytest.raises(StoreBusy, match="decodes in flight"):
        store.reserve(2 * one)
    assert store.holds("bob", "m") and store.stats().refused_busy == 1
    with pytest.raises(ValueError, match="exceed"):
        store.reserve(4 * one)
    # The decoded cache takes the reservation's place.
    store.put("carol", "s", "x", _small_kv(), reservation=first)
    stats = store.stats()
    assert stats.reserved_bytes == 0 and stats.bytes == 2 * one and stats.peak_bytes == 3 * one
    first.release()  # idempotent: the put released it already
    assert store.stats().reserved_bytes == 0


def _record(message_id: str, label_config: Recipe, payload: int, decode_s: float) -> MessageRecord:
    return MessageRecord(
        message_id=message_id, session_id="s", config_label=label_config.name, config=label_config.to_dict(),
        length=100, kept=50, fp16_bytes=10_000, payload=payload, positions=10, scales=100, factors=0,
        framing=50, signaling=40, timings={"decode_s": decode_s},
    )  # fmt: skip


def test_metrics_aggregate_per_config() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5.0], 95) == 5.0
    int4 = build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
    registry = MetricsRegistry(max_records=2)
    registry.record_message(_record("m1", int4, 1000, 0.1))
    registry.record_message(_record("m2", int4, 2000, 0.3))
    assert registry.record_answer(
        "m1", AskRecord("q", "Paris", f1=1.0, exact_match=1.0, timings={"answer_s": 2.0})
    )
    assert registry.record_answer("m2", AskRecord("q", "Lyon", timings={"answer_s": 4.0}), {"prefill_s": 0.5})
    assert not registry.record_answer("missing", AskRecord("q", "x"))
    group = aggregate(registry.messages())[int4.name]
    assert group["messages"] == 2 and group["questions"] == 2 and group["scored_questions"] == 1
    assert group["bytes"]["payload"] == 3000 and group["bytes"]["metadata"] == 220
    assert group["bytes"]["total"] == 3000 + 220 + 100 + 80
    assert group["compression_ratio"] == pytest.approx(20_000 / 3400)
    assert group["timings"]["decode_s"]["mean"] == pytest.approx(0.2)
    assert group["timings"]["decode_s"]["p50"] == pytest.approx(0.2)
    assert group["timings"]["answer_s"]["p95"] == pytest.approx(3.9)
    assert group["timings"]["prefill_s"]["n"] == 1
    assert group["f1_mean"] == 1.0 and group["exact_match_mean"] == 1.0
    registry.record_message(_record("m3", build(), 9000, 0.2))  # m1 drops out of the history
    registry.record_error("CORRUPT")
    assert registry.get("m1") is None and registry.get("m3") is not None
    stats = registry.stats()
    assert stats["messages"] == 3 and stats["records_held"] == 2 and stats["errors"] == {"CORRUPT": 1}
    assert stats["bytes"]["payload"] == 12_000  # totals keep what the history dropped


def test_metrics_owners_and_a_bounded_history() -> None:
    registry = MetricsRegistry(max_bytes=64 << 10)
    int4 = build(k_bits=4, v_bits=4)
    registry.record_message(replace(_record("m", int4, 1000, 0.1), owner="alice"))
    registry.record_message(replace(_record("m", int4, 3000, 0.1), owner="bob"))
    assert registry.get("m", owner="alice").payload == 1000 and registry.get("m", owner="bob").payload == 3000
    assert registry.get("m", owner="carol") is None and registry.get("m", owner=None).owner == "bob"
    assert [r.owner for r in registry.messages(owner="alice")] == ["alice"]
    assert (
        registry.stats("alice")["bytes"]["payload"] == 1000 and registry.stats()["bytes"]["payload"] == 4000
    )
    # A huge question and references are scored whole but stored cut; the history stays under max_bytes.
    big = AskRecord("q" * 100_000, "a", reference_answers=["r" * 50_000] * 3, f1=0.0)
    for _ in range(MAX_STORED_ASKS + 6):
        assert registry.record_answer("m", big, owner="bob")
    kept = registry.get("m", owner="bob")
    assert kept is not None and registry.get("m", owner="alice") is None  # the older record made room
    assert len(kept.asks) == MAX_STORED_ASKS and kept.questions == MAX_STORED_ASKS + 6
    assert all(
        len(a.question) <= MAX_STORED_TEXT and len(a.reference_answers[0]) <= MAX_STORED_TEXT
        for a in kept.asks
    )
    assert registry.stats()["questions"] == MAX_STORED_ASKS + 6


def test_rest_app_in_process() -> None:
    model = torch.nn.Linear(2, 2)
    lm = LoadedModel(model, None, "fake", "f" * 64, Geometry(2, 1, 4, 2))
    service = KVLinkService(lm, SessionStore(), MetricsRegistry())
    app = create_app(service)
    int8 = build(k_bits=8, v_bits=8)
    with TestClient(app) as http:
        assert http.get("/healthz").json() == {"status": "serving"}
        assert http.get("/v1/info").json()["model"] == "fake"
        assert http.get("/v1/stats").json()["messages"] == 0
        service.metrics.record_message(_record("m1", int8, 5000, 0.05))
        service.metrics.record_answer(
            "m1", AskRecord("q", "a", f1=0.5, exact_match=0.0, timings={"answer_s": 1.0})
        )
        service.metrics.record_error("SHAPE")
        one = http.get("/v1/messages/m1").json()
        assert one["bytes"]["payload"] == 5000 and one["bytes"]["total"] == 5000 + 110 + 50 + 40
        assert one["percent_of_fp16"] == pytest.approx(100 * 5200 / 10_000)
        assert [m["message_id"] for m in http.get("/v1/messages").json()] == ["m1"]
        assert http.get("/v1/messages/nope").status_code == 404
        stats = http.get("/v1/stats").json()
        assert stats["configs"][int8.name]["f1_mean"] == 0.5 and stats["errors"] == {"SHAPE": 1}
        text = http.get("/metrics").text
        assert 'kvlink_wire_bytes_total{category="payload",family="all/k8v8"} 5000.0' in text
        assert 'kvlink_messages_total{family="all/k8v8",length="1-256"} 1.0' in text
        assert int8.name not in text  # labels of bounded cardinality: the family, not the full label
        service.metrics.record_message(
            replace(
                _record("m2", int8.with_quantize("k", group=64).with_quantize("v", group=64), 100, 0.1),
                length=3000,
            )
        )
        stats = http.get("/v1/stats").json()
        assert set(stats["lengths"]) == {"1-256", "2049-4096"} and len(stats["configs"]) == 2
        assert stats["lengths"]["2049-4096"]["messages"] == 1
        text = http.get("/metrics").text
        assert 'kvlink_wire_bytes_total{category="payload",family="all/k8v8"} 5100.0' in text
        assert 'kvlink_errors_total{code="SHAPE",rpc="Transfer"} 1.0' in text
        assert "kvlink_answer_seconds_count 1.0" in text
        assert http.get("/docs").status_code == 200
        service.serving = False
        assert http.get("/healthz").status_code == 503


# --- the commands ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "needle"), [("kvlink.server.main", "--max-message-bytes"), ("kvlink.client.main", "--budget")]
)
def test_help(module: str, needle: str) -> None:
    script = Path(sys.executable).parent / (
        "kvlink-serve" if module == "kvlink.server.main" else "kvlink-send"
    )
    cmd = [str(script), "--help"] if script.is_file() else [sys.executable, "-m", module, "--help"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert needle in proc.stdout


def test_auto_limits_are_sized_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-cached-bytes/--max-message-bytes 'auto': half of the host's available memory on the CPU, a
    message the smaller of that and a quarter of the host's (at least 512 MiB); given values stay."""
    from kvlink.server import main as server_main

    monkeypatch.setattr("kvlink.server.memory.available_host_bytes", lambda: 64 << 30)
    assert server_main.auto_limits(torch.device("cpu"), None, None) == (32 << 30, 16 << 30)
    assert server_main.auto_limits(torch.device("cpu"), 1 << 30, None) == (1 << 30, 1 << 30)
    monkeypatch.setattr("kvlink.server.memory.available_host_bytes", lambda: 1 << 30)
    assert server_main.auto_limits(torch.device("cpu"), None, None) == (512 << 20, 512 << 20)
    assert server_main.auto_limits(torch.device("cpu"), 7, 5) == (7, 5)
    args = server_main.build_parser().parse_args(
        ["--max-message-bytes", "auto", "--max-cached-bytes", "4096"]
    )
    assert (args.max_message_bytes, args.max_cached_bytes) == (None, 4096)
    # The FP16 KV of 32k tokens of an 8B GQA model fits a host with 16 GiB available.
    monkeypatch.setattr("kvlink.server.memory.available_host_bytes", lambda: 16 << 30)
    cached, message = server_main.auto_limits(torch.device("cpu"), None, None)
    assert message >= Geometry(32, 8, 128, 32).fp16_bytes(32768) and cached >= message
