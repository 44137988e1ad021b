"""The sender's logic, reusable by kvlink-send, the demo and tests: hello -> prefill -> plan -> stream -> ask.

    result = await send_context("127.0.0.1:50051", context, question, budget=0.1875, lm=lm)
    result.answer.text, result.receipt.total, result.timings

Everything that compresses is the library's (kvlink.cache.prefill,
kvlink.budget.plan); this module moves frames (kvlink.wire.to_frames, Outbox)
over a grpc.aio bidi call while it reads the receiver's signals: a Nack gets
exactly that chunk again, the Receipt ends the message. A failed call raises
SendError with the gRPC status and, when the receiver sent one, its
kvlink.wire error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvlink import wire
from kvlink.budget import Constraints, Plan, observe_for, parse_budget, plan
from kvlink.cache import prefill
from kvlink.models import LoadedModel, load_model
from kvlink.prompt import context_ids, question_ids, question_rows

logger = logging.getLogger(__name__)

CLIENT_NAME = "kvlink-send 0.1.0"

FaultHook = Callable[["wire.pb.TransferFrame", int], "wire.pb.TransferFrame | bytes | None"]
"""Fault injection for tests and demos: called with (frame, attempt) before each frame is sent
(attempt counts earlier sends of the same chunk); returns the frame to send, raw bytes to send
instead, or None to stop sending and half-close the stream."""


class SendError(Exception):
    """A call the receiver (or the network) failed: gRPC `status`, kvlink.wire `code` when known."""

    def __init__(self, status: grpc.StatusCode, message: str, code: str | None = None, rpc: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        self.rpc = rpc
        what = f"{status.name}" + (f" ({code})" if code else "")
        super().__init__(f"{rpc + ': ' if rpc else ''}{what}: {message}")

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError, rpc: str) -> SendError:
        wire_error = wire.error_from_rpc(error)
        return cls(error.code(), error.details() or "", wire_error.code if wire_error else None, rpc)


@dataclass
class TransferResult:
    """What one Transfer call cost and returned."""

    receipt: wire.Receipt
    frames_sent: int
    bytes_sent: int  # frames as sent (gRPC prefixes included), resends included
    resends: int
    signaling_bytes: int  # signals received, gRPC prefixes included
    nacks: list[wire.Nack]
    seconds: float


@dataclass
class SendResult:
    """One context sent and one question answered.

    fp16_bytes: FP16 size of the full context KV. receipt: the receiver's byte split of the
    message. timings: seconds per stage (prefill_s, select_s, quantize_s, pack_s, plan_s,
    transfer_s on the sender; decode_s, answer_s on the receiver).
    """

    session_id: str
    message_id: str
    budget: float
    plan: Plan
    transfer: TransferResult
    answer: wire.Answer
    welcome: wire.Welcome
    context_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def receipt(self) -> wire.Receipt:
        return self.transfer.receipt

    @property
    def fp16_bytes(self) -> int:
        return self.plan.fp16_bytes

    @property
    def fraction(self) -> float:
        """Bytes of the message on the wire (the receipt's total) over the FP16 size."""
        return self.receipt.total / self.fp16_bytes

    def as_dict(self) -> dict[str, Any]:
        p = self.plan
        return {
            "session_id": self.session_id, "message_id": self.message_id,
            "answer": self.answer.text, "token_ids": list(self.answer.token_ids),
            "f1": self.answer.f1, "exact_match": self.answer.exact_match,
            "config": p.config.to_dict(), "config_label": p.config.label,
            "context_tokens": self.context_tokens, "kept_tokens": _kept(p),
            "budget": self.budget, "budget_bytes": p.budget_bytes, "fp16_bytes": p.fp16_bytes,
            "planned_bytes": p.total_bytes, "planned_http2_allowance": p.allowance,
            "receipt": self.receipt.as_dict(), "percent_of_fp16": 100 * self.fraction,
            "sent_bytes": self.transfer.bytes_sent, "resends": self.transfer.resends,
            "timings": dict(self.timings), "receiver": {"model": self.welcome.model},
        }  # fmt: skip


def _kept(p: Plan) -> int:
    return p.encoded.tensors[0].shape[1] if p.encoded.tensors else 0


def _chunk_id(frame: wire.pb.TransferFrame) -> int:
    return int(frame.chunk.chunk_id) if frame.WhichOneof("frame") == "chunk" else -1


async def transfer(
    channel: grpc.aio.Channel,
    frames: Sequence[wire.pb.TransferFrame],
    *,
    timeout: float | None = 60.0,
    fault: FaultHook | None = None,
) -> TransferResult:
    """Stream one message's frames over a Transfer call and follow the receiver's signals.

    A Nack puts exactly that chunk back in the queue (kvlink.wire.Outbox); the Receipt ends the
    message and half-closes the stream. Raises SendError when the call fails.
    """
    outbox = wire.Outbox(frames)
    call = channel.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(
        timeout=timeout
    )
    queue: asyncio.Queue[wire.pb.TransferFrame | None] = asyncio.Queue()
    for frame in outbox.frames:
        queue.put_nowait(frame)
    attempts: dict[int, int] = {}
    sent = {"frames": 0, "bytes": 0}

    async def write() -> None:
        while (frame := await queue.get()) is not None:
            cid = _chunk_id(frame)
            attempt = attempts.get(cid, 0)
            attempts[cid] = attempt + 1
            out: Any = fault(frame, attempt) if fault is not None else frame
            if out is None:
                break
            raw = out if isinstance(out, bytes) else out.SerializeToString()
            await call.write(raw)
            sent["frames"] += 1
            sent["bytes"] += len(raw) + wire.GRPC_PREFIX_BYTES
        await call.done_writing()

    started = time.perf_counter()
    writer = asyncio.create_task(write())
    try:
        while (signal := await call.read()) is not grpc.aio.EOF:
            try:
                resend = outbox.handle(signal)
            except wire.WireError as err:
                # An Error signal: the receiver's verdict. The call's own status says the same unless
                # one of our writes lost the race with the receiver's abort: grpc.aio then reports
                # INTERNAL ("Internal error from Core") for the call, so the signal is authoritative.
                status = await call.code()
                details = await call.details() if status == err.status_code else ""
                raise SendError(err.status_code, details or err.message, err.code, "Transfer") from None
            for frame in resend:
                queue.put_nowait(frame)
            if outbox.complete:
                queue.put_nowait(None)
    except grpc.aio.AioRpcError as exc:
        raise SendError.from_rpc(exc, "Transfer") from None
    finally:
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await writer
    if outbox.receipt is None:
        raise SendError(grpc.StatusCode.DATA_LOSS, "the call ended without a receipt", None, "Transfer")
    return TransferResult(
        receipt=outbox.receipt, frames_sent=sent["frames"], bytes_sent=sent["bytes"],
        resends=len(outbox.nacks), signaling_bytes=outbox.signaling_bytes, nacks=list(outbox.nacks),
        seconds=time.perf_counter() - started,
    )  # fmt: skip


async def hello(channel: grpc.aio.Channel, fingerprint: str, *, timeout: float | None = 30.0) -> wire.Welcome:
    """The handshake: the receiver refuses another model (FAILED_PRECONDITION); so do we."""
    stub = wire.KVLinkStub(channel)
    try:
        msg = await stub.Hello(
            wire.hello_to_proto(wire.Hello(fingerprint, client=CLIENT_NAME)), timeout=timeout
        )
    except grpc.aio.AioRpcError as exc:
        raise SendError.from_rpc(exc, "Hello") from None
    try:
        return wire.welcome_from_proto(msg, fingerprint)
    except wire.WireError as err:
        raise SendError(err.status_code, err.message, err.code, "Hello") from None


async def ask(channel: grpc.aio.Channel, request: wire.Ask, *, timeout: float | None = 120.0) -> wire.Answer:
    """Ask about a transferred context; NOT_FOUND when the receiver holds no complete copy of it."""
    try:
        msg = await wire.KVLinkStub(channel).Ask(wire.ask_to_proto(request), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise SendError.from_rpc(exc, "Ask") from None
    return wire.answer_from_proto(msg)


def channel_options(max_message_bytes: int = 64 << 20) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


async def send_context(
    target: str,
    context: str,
    question: str,
    budget: float | str,
    *,
    lm: LoadedModel | None = None,
    model: str | None = None,
    constraints: Constraints | None = None,
    reference_answers: Sequence[str] = (),
    max_new_tokens: int = 32,
    timeout: float = 120.0,
    session_id: str | None = None,
    transfer_target: str | None = None,
    fault: FaultHook | None = None,
) -> SendResult:
    """Send `context`'s KV cache to the receiver at `target` within `budget` and ask `question`.

    budget: a fraction in (0, 1] or text like "18.75%" (ValueError outside). lm: a loaded model
    (else `model` is loaded). transfer_target: connect the Transfer call there instead (a proxy
    that counts bytes, say); Hello and Ask use `target`. Raises kvlink.budget.BudgetError when no
    config fits, SendError when a call fails.
    """
    fraction = parse_budget(budget)
    if lm is None:
        lm = await asyncio.to_thread(load_model, model)
    session_id = session_id or uuid.uuid4().hex
    message_id = uuid.uuid4().hex
    timings: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(target, options=channel_options())
        )
        welcome = await hello(channel, lm.fingerprint, timeout=timeout)
        chunk_bytes = min(1 << 20, welcome.max_chunk_bytes)

        t0 = time.perf_counter()
        ctx_ids = context_ids(lm.tokenizer, context)
        q_ids = question_ids(lm.tokenizer, question)
        rows = question_rows(lm.tokenizer, question)
        pre = await asyncio.to_thread(prefill, lm.model, ctx_ids, q_ids, observe_for(constraints), 32, rows)
        timings["prefill_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        chosen = await asyncio.to_thread(
            plan, pre, lm.geometry, lm.fingerprint, fraction, constraints=constraints,
            session_id=session_id, message_id=message_id, chunk_bytes=chunk_bytes,
        )  # fmt: skip
        timings["plan_s"] = time.perf_counter() - t0
        enc_t = chosen.encoded.timings
        if "select_s" in enc_t:
            timings["select_s"] = enc_t["select_s"]
        timings["quantize_s"] = enc_t.get("quantize_s", enc_t.get("encode_s", 0.0))

        t0 = time.perf_counter()
        frames = wire.to_frames(chosen.encoded, session_id, message_id, lm.fingerprint, chunk_bytes)
        timings["pack_s"] = time.perf_counter() - t0 + enc_t.get("zstd_s", 0.0)

        if transfer_target is not None and transfer_target != target:
            tchannel = await stack.enter_async_context(
                grpc.aio.insecure_channel(transfer_target, options=channel_options())
            )
        else:
            tchannel = channel
        result = await transfer(tchannel, frames, timeout=timeout, fault=fault)
        timings["transfer_s"] = result.seconds

        request = wire.Ask(
            session_id, message_id, question, max_new_tokens, tuple(reference_answers), dict(timings)
        )
        answer = await ask(channel, request, timeout=timeout)
    for key in ("decode_s", "receive_s"):
        if key in result.receipt.timings:
            timings[key] = result.receipt.timings[key]
    for key in ("answer_s", "first_token_s"):
        if key in answer.timings:
            timings[key] = answer.timings[key]
    return SendResult(
        session_id=session_id, message_id=message_id, budget=fraction, plan=chosen, transfer=result,
        answer=answer, welcome=welcome, context_tokens=int(ctx_ids.numel()), timings=timings,
    )  # fmt: skip
