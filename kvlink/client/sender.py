"""The sender's logic, reusable by kvlink-send, the demo and tests: hello -> prefill -> plan -> stream -> ask.

    result = await send_context("127.0.0.1:50051", context, question, budget=0.1875, lm=lm)
    result.answer.text, result.receipt.total, result.timings

Everything that compresses is the library's (kvlink.cache.prefill,
kvlink.budget.plan); this module moves frames (kvlink.wire.to_frames, Outbox)
over a grpc.aio bidi call while it reads the receiver's signals: a Nack gets
exactly that chunk again, the Receipt ends the message. A failed call raises
SendError with the gRPC status and, when the receiver sent one, its
kvlink.wire error code. A transfer that fails in a way a fresh connection can
cure (the connection broke, or a frame was damaged beyond what Nacks repair)
is sent again, whole, on a new channel (transfer_with_retries).

ClientSecurity opens the channels: TLS verified with a CA (or the system's
roots), a client certificate for mutual TLS, and the bearer token sent as call
metadata (`authorization: Bearer ...`), never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from kvlink import wire
from kvlink.answer import GenerationOptions
from kvlink.budget import Constraints, Plan, fixed_plan, observe_for, parse_budget, plan, window_for
from kvlink.cache import Prefill, prefill
from kvlink.capabilities import CapabilityError
from kvlink.models import Geometry, LoadedModel, load_model, max_positions
from kvlink.prompt import context_ids, question_ids, question_rows
from kvlink.recipe import Recipe

logger = logging.getLogger(__name__)

CLIENT_NAME = "kvlink-send 0.1.0"
MIN_RATE_BPS = 100e6
"""The slowest link a Transfer's deadline allows for: it gets the call timeout plus its bytes at this rate."""
TOKEN_ENV = "KVLINK_AUTH_TOKEN"

Metadata = tuple[tuple[str, str], ...]

RETRYABLE: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # the connection broke or could not be made
        grpc.StatusCode.INTERNAL,  # HTTP/2 or gRPC framing damaged in transit
        grpc.StatusCode.DATA_LOSS,  # CORRUPT: a chunk or the header stayed damaged
        grpc.StatusCode.ABORTED,  # TRUNCATED: the stream ended early
    }
)
"""Transfer failures that a fresh connection can cure: the whole message is sent again on a new channel.
Refusals of the message itself (shape, codec, fingerprint, size, auth, BUSY) are final."""

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
    server: str = ""  # the receiver's address (Hello and Ask)
    truncated_tokens: int = 0  # context tokens dropped from the end to fit the model (truncate=True)
    released_bytes: int | None = None  # the receiver freed the context after the answer (keep=False)

    @property
    def kept_on_receiver(self) -> bool:
        """Whether the receiver still holds the context for follow-up questions (until its TTL)."""
        return self.released_bytes is None

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
            "kept_on_receiver": self.kept_on_receiver, "released_bytes": self.released_bytes,
            "answer": self.answer.text, "token_ids": list(self.answer.token_ids),
            "finish_reason": self.answer.finish_reason, "truncated_tokens": self.truncated_tokens,
            "f1": self.answer.f1, "exact_match": self.answer.exact_match,
            "config": p.recipe.to_dict(), "config_label": p.recipe.name,
            "context_tokens": self.context_tokens, "kept_tokens": _kept(p),
            "budget": self.budget, "budget_bytes": p.budget_bytes, "fp16_bytes": p.fp16_bytes,
            "planned_bytes": p.total_bytes, "planned_http2_allowance": p.allowance,
            "receipt": self.receipt.as_dict(), "percent_of_fp16": 100 * self.fraction,
            "sent_bytes": self.transfer.bytes_sent, "resends": self.transfer.resends,
            "timings": dict(self.timings), "receiver": {"model": self.welcome.model},
        }  # fmt: skip


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """How the sender reaches a receiver. tls: verify the receiver's certificate (with root_ca, or the
    system's roots when None). cert/key: a client certificate for mutual TLS. token: the bearer token.
    server_name: the name to verify when it differs from the dialed host (dialing an IP, say)."""

    tls: bool = False
    root_ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        if (self.root_ca or self.cert or self.server_name) and not self.tls:
            raise ValueError("a CA, client certificate or server name needs tls=True")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("the bearer token must be non-empty and contain no whitespace")

    def __repr__(self) -> str:  # never shows the token or the key
        mode = "mutual TLS" if self.cert else "TLS" if self.tls else "plaintext"
        return f"ClientSecurity({mode}, token={'set' if self.token else 'none'})"

    @classmethod
    def from_files(
        cls,
        *,
        tls: bool = False,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token_file: str | None = None,
        server_name: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientSecurity:
        """Read PEM files and the token (token_file, else $KVLINK_AUTH_TOKEN); any of ca/cert/key implies
        TLS. ValueError names the file, never its contents."""
        environ = os.environ if environ is None else environ

        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None

        token: str | None = None
        if token_file is not None:
            raw = read(token_file, "the token file") or b""
            token = raw.decode("utf-8", "replace").strip()
            if not token:
                raise ValueError(f"the token file {token_file!r} is empty")
        elif environ.get(TOKEN_ENV, "").strip():
            token = environ[TOKEN_ENV].strip()
        return cls(
            tls=tls or bool(ca or cert or key or server_name), root_ca=read(ca, "the CA file"),
            cert=read(cert, "the client certificate"), key=read(key, "the client key"), token=token,
            server_name=server_name,
        )  # fmt: skip

    @property
    def metadata(self) -> Metadata:
        """Call metadata: the bearer token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A new grpc.aio channel to `target` (use it as an async context manager)."""
        opts = list(options)
        if not self.tls:
            return grpc.aio.insecure_channel(target, options=opts)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_ca, private_key=self.key, certificate_chain=self.cert
        )
        return grpc.aio.secure_channel(target, credentials, options=opts)


PLAINTEXT = ClientSecurity()


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
    metadata: Metadata = (),
    on_written: Callable[[], None] | None = None,
) -> TransferResult:
    """Stream one message's frames over a Transfer call and follow the receiver's signals.

    A Nack puts exactly that chunk back in the queue (kvlink.wire.Outbox); the Receipt ends the
    message and half-closes the stream. Raises SendError when the call fails. metadata: call
    metadata (ClientSecurity.metadata carries the bearer token). on_written: called once every frame
    has been written the first time (the link is free for the next message; its receipt may follow).
    """
    outbox = wire.Outbox(frames)
    call = channel.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(
        timeout=timeout, metadata=metadata or None
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
            raw = out if isinstance(out, bytes) else wire.frame_bytes(out)
            await call.write(raw)
            sent["frames"] += 1
            sent["bytes"] += len(raw) + wire.GRPC_PREFIX_BYTES
            if sent["frames"] == len(outbox.frames) and on_written is not None:
                on_written()
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


async def hello(
    channel: grpc.aio.Channel, fingerprint: str, *, timeout: float | None = 30.0, metadata: Metadata = ()
) -> wire.Welcome:
    """The handshake: the receiver refuses another model (FAILED_PRECONDITION); so do we."""
    stub = wire.KVLinkStub(channel)
    try:
        msg = await stub.Hello(
            wire.hello_to_proto(wire.Hello(fingerprint, client=CLIENT_NAME)), timeout=timeout,
            metadata=metadata or None,
        )  # fmt: skip
    except grpc.aio.AioRpcError as exc:
        raise SendError.from_rpc(exc, "Hello") from None
    try:
        return wire.welcome_from_proto(msg, fingerprint)
    except wire.WireError as err:
        raise SendError(err.status_code, err.message, err.code, "Hello") from None


async def ask(
    channel: grpc.aio.Channel, request: wire.Ask, *, timeout: float | None = 120.0, metadata: Metadata = ()
) -> wire.Answer:
    """Ask about a transferred context; NOT_FOUND when the receiver holds no complete copy of it."""
    try:
        msg = await wire.KVLinkStub(channel).Ask(
            wire.ask_to_proto(request), timeout=timeout, metadata=metadata or None
        )
    except grpc.aio.AioRpcError as exc:
        raise SendError.from_rpc(exc, "Ask") from None
    return wire.answer_from_proto(msg)


async def release(
    channel: grpc.aio.Channel,
    message_id: str,
    session_id: str = "",
    *,
    timeout: float | None = 30.0,
    metadata: Metadata = (),
) -> wire.Released:
    """Free a context this caller sent (NOT_FOUND when the receiver holds none by that id; UNIMPLEMENTED
    from a receiver older than the Release call)."""
    request = wire.release_to_proto(wire.Release(session_id, message_id))
    try:
        msg = await wire.KVLinkStub(channel).Release(request, timeout=timeout, metadata=metadata or None)
    except grpc.aio.AioRpcError as exc:
        raise SendError.from_rpc(exc, "Release") from None
    return wire.released_from_proto(msg)


def channel_options(max_message_bytes: int = 64 << 20) -> list[tuple[str, int]]:
    """Options of the sender's channels. Each channel gets its own connection (grpc otherwise shares one
    between channels to the same target), so that a retry on a new channel is one on a new connection."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
    ]


async def transfer_with_retries(
    open_channel: Callable[[], grpc.aio.Channel],
    frames: Sequence[wire.pb.TransferFrame],
    *,
    attempts: int = 3,
    backoff_s: float = 0.25,
    timeout: float | None = 60.0,
    fault: FaultHook | None = None,
    metadata: Metadata = (),
) -> tuple[TransferResult, grpc.aio.Channel]:
    """transfer() on a channel from open_channel() per attempt. A failure in RETRYABLE (the connection
    broke, framing or a frame was damaged in transit, the stream ended early) closes that channel and
    sends the whole message again on a new one, up to `attempts` tries in all; any other failure, or
    the last, raises SendError. Returns the result and the channel it succeeded on, still open (the
    caller closes it, and asks on it: a new connection may reach another receiver replica)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    for attempt in range(1, attempts + 1):
        channel = open_channel()
        try:
            return await transfer(channel, frames, timeout=timeout, fault=fault, metadata=metadata), channel
        except SendError as err:
            await channel.close()
            if err.status not in RETRYABLE or attempt == attempts:
                raise
            logger.warning(
                "transfer attempt %d of %d failed (%s); sending the message again on a new connection",
                attempt, attempts, err,
            )  # fmt: skip
            await asyncio.sleep(backoff_s * attempt)
        except BaseException:
            await channel.close()
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _for_receiver(constraints: Constraints | None, capabilities: frozenset[str]) -> Constraints:
    """The user's constraints narrowed to what the receiver decodes (its Welcome's capabilities); a pinned
    option it does not decode is refused here, before anything is encoded (UNKNOWN_CODEC)."""
    try:
        return replace(constraints or Constraints(), capabilities=frozenset(capabilities))
    except CapabilityError as exc:
        raise SendError(grpc.StatusCode.UNIMPLEMENTED, str(exc), code="UNKNOWN_CODEC", rpc="Hello") from None


class ContextTooLong(ValueError):
    """The context, the question and the answer do not fit the model's positions."""


def fit_context(
    context_tokens: int, question_tokens: int, max_new_tokens: int, limit: int | None, truncate: bool = False
) -> int:
    """How many context tokens to send: all of them when context + question + answer fit in `limit`
    positions (the model's max_position_embeddings; None: no limit), the first ones that fit with
    `truncate`, else ContextTooLong with the numbers."""
    if limit is None:
        return context_tokens
    need = context_tokens + question_tokens + max_new_tokens
    room = limit - question_tokens - max_new_tokens
    if need <= limit:
        return context_tokens
    if truncate and room >= 1:
        return room
    why = (
        f"the context has {context_tokens:,} tokens; with the question ({question_tokens}) and up to "
        f"{max_new_tokens} answer tokens that is {need:,} positions, and the model has {limit:,} "
        "(max_position_embeddings)"
    )
    if room < 1:
        raise ContextTooLong(f"{why}: even an empty context would not fit")
    raise ContextTooLong(f"{why}: shorten it, or pass --truncate to send its first {room:,} tokens")


def prompt_ids(
    lm: LoadedModel, context: str, question: str, max_new_tokens: int, truncate: bool
) -> tuple[Any, Any, int]:
    """The context's and the question's token ids, the context cut to fit the model with the question
    and the answer (fit_context: ContextTooLong unless `truncate`), and how many tokens were cut."""
    ctx_ids = context_ids(lm.tokenizer, context)
    q_ids = question_ids(lm.tokenizer, question)
    n_ctx = fit_context(
        int(ctx_ids.numel()), int(q_ids.numel()), max_new_tokens, max_positions(lm.model.config), truncate
    )
    return ctx_ids[:n_ctx], q_ids, int(ctx_ids.numel()) - n_ctx


Stage = Callable[[str, str], None]
"""Progress callback: (stage, detail), stage one of connect, prefill, plan, transfer, answer, release."""


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
    options: GenerationOptions | None = None,
    timeout: float = 120.0,
    session_id: str | None = None,
    transfer_target: str | None = None,
    fault: FaultHook | None = None,
    security: ClientSecurity = PLAINTEXT,
    attempts: int = 3,
    keep: bool = True,
    truncate: bool = False,
    on_stage: Stage | None = None,
    min_rate_bps: float = MIN_RATE_BPS,
    profile: Any | None = None,
) -> SendResult:
    """Send `context`'s KV cache to the receiver at `target` within `budget` and ask `question`.

    budget: a fraction in (0, 1] or text like "18.75%" (ValueError outside). lm: a loaded model
    (else `model` is loaded). options: how to answer (default: greedy, `max_new_tokens` tokens).
    transfer_target: connect the Transfer call there instead (a proxy that counts bytes, say); Hello
    and Ask use `target`. security: TLS and bearer token of every call. attempts: tries of the
    Transfer, each on a new connection (see transfer_with_retries). timeout: seconds of each call; the
    Transfer's deadline grows by the time its bytes take at `min_rate_bps` (a 4 GB message at 1 Gbit/s
    takes 34 s). keep: the receiver keeps the context for follow-up questions until its TTL (else it
    is released after the answer). truncate: a context too long for the model is cut to fit (else
    ContextTooLong, before anything is sent). on_stage: told when each stage begins. profile: the
    calibrated profile of a pinned recipe with a "profile-r<n>" stage (kvlink.lowrank.ModelProfile), an
    "xpred" one (kvlink.predict.PredictorProfile) or a "pca" one (kvlink.residual.TransformProfiles);
    the receiver must hold the same one (SendError UNKNOWN_CODEC at the Hello otherwise). Without a
    pinned recipe, a TransformProfiles the receiver holds lets the planner weigh transform coding
    (kvlink.budget.plan); one it does not hold is left out of the plan. Raises
    kvlink.budget.BudgetError when no config fits, SendError when a call fails.
    """
    parse_budget(budget)  # ValueError before anything loads
    options = options or GenerationOptions(max_new_tokens)
    if lm is None:
        lm = await asyncio.to_thread(load_model, model)
    loaded = lm
    ctx_ids, q_ids, truncated = prompt_ids(lm, context, question, options.max_new_tokens, truncate)
    if truncated:
        logger.warning(
            "the context is cut from %d to its first %d tokens to fit the model",
            ctx_ids.numel() + truncated, ctx_ids.numel(),
        )  # fmt: skip

    async def read_context(constraints: Constraints) -> Prefill:
        rows = question_rows(loaded.tokenizer, question)
        observe, window = observe_for(constraints), window_for(constraints)
        return await asyncio.to_thread(prefill, loaded.model, ctx_ids, q_ids, observe, window, rows)

    return await _send(
        target, read_context, question, budget, fingerprint=lm.fingerprint, geometry=lm.geometry,
        model_name=lm.name, constraints=constraints, reference_answers=reference_answers, options=options,
        timeout=timeout, session_id=session_id, transfer_target=transfer_target, fault=fault,
        security=security, attempts=attempts, min_rate_bps=min_rate_bps, keep=keep, on_stage=on_stage,
        truncated=truncated, profile=profile,
    )  # fmt: skip


async def send_prefilled(
    target: str,
    read: Prefill,
    question: str,
    budget: float | str,
    *,
    fingerprint: str,
    geometry: Geometry,
    model_name: str = "",
    constraints: Constraints | None = None,
    config: Recipe | None = None,
    reference_answers: Sequence[str] = (),
    max_new_tokens: int = 32,
    options: GenerationOptions | None = None,
    timeout: float = 120.0,
    session_id: str | None = None,
    transfer_target: str | None = None,
    security: ClientSecurity = PLAINTEXT,
    attempts: int = 3,
    min_rate_bps: float = MIN_RATE_BPS,
    keep: bool = True,
    profile: Any | None = None,
) -> SendResult:
    """send_context for a context the sender has already read: plan, stream and ask from `read`.

    `read` must carry what the constraints' selection observes (kvlink.budget.observe_for; the
    planner raises otherwise). The model itself is not needed, only its fingerprint and geometry,
    so a benchmark can read several contexts once and free the weights. No prefill_s in the timings.
    config: send exactly this recipe instead of planning (`budget` is then ignored: the FP16
    baseline, whose framing puts it just over 100% of FP16, can only be sent so); plan_s is then
    the time to select, encode and size it.
    """

    async def given(constraints: Constraints) -> Prefill:
        return read

    return await _send(
        target, given, question, budget, fingerprint=fingerprint, geometry=geometry, model_name=model_name,
        constraints=constraints, reference_answers=reference_answers,
        options=options or GenerationOptions(max_new_tokens), timeout=timeout, session_id=session_id,
        transfer_target=transfer_target, fault=None, security=security, attempts=attempts,
        min_rate_bps=min_rate_bps, timed_prefill=False, config=config, keep=keep, profile=profile,
    )  # fmt: skip


async def _send(
    target: str,
    read_context: Callable[[Constraints], Awaitable[Prefill]],
    question: str,
    budget: float | str,
    *,
    fingerprint: str,
    geometry: Geometry,
    model_name: str,
    constraints: Constraints | None,
    reference_answers: Sequence[str],
    options: GenerationOptions,
    timeout: float,
    session_id: str | None,
    transfer_target: str | None,
    fault: FaultHook | None,
    security: ClientSecurity,
    attempts: int,
    min_rate_bps: float,
    timed_prefill: bool = True,
    config: Recipe | None = None,
    keep: bool = True,
    on_stage: Stage | None = None,
    truncated: int = 0,
    profile: Any | None = None,
) -> SendResult:
    """hello -> read the context (read_context, given the constraints narrowed to the receiver) ->
    plan -> frames -> transfer -> ask (-> release unless `keep`)."""
    fraction = parse_budget(budget)
    if not min_rate_bps > 0:
        raise ValueError(f"min_rate_bps must be > 0, got {min_rate_bps!r}")
    pinned = config or (constraints.recipe if constraints is not None else None)
    profiled = (
        pinned
        if pinned is not None and {"lowrank:profile", "predict", "pca"} & pinned.capabilities()
        else None
    )
    if profiled is not None and profile is None:
        raise ValueError(
            f"recipe {profiled.name!r} {'predicts' if profiled.has('predict') else 'projects'} with a "
            "calibrated profile: pass it (profile=, a kvlink.lowrank.ModelProfile, "
            "kvlink.predict.PredictorProfile or kvlink.residual.TransformProfiles that the receiver "
            "holds too)"
        )
    # the hashes of the calibrated profiles the receiver must hold for the profile to be used
    needed: tuple[str, ...] = () if profile is None else tuple(getattr(profile, "hashes", (profile.hash,)))
    stage = on_stage or (lambda name, detail: None)
    session_id = session_id or uuid.uuid4().hex
    message_id = uuid.uuid4().hex
    timings: dict[str, float] = {}
    meta = security.metadata
    released: int | None = None
    async with contextlib.AsyncExitStack() as stack:
        stage("connect", target)
        channel = await stack.enter_async_context(security.channel(target, channel_options()))
        welcome = await hello(channel, fingerprint, timeout=timeout, metadata=meta)
        chunk_bytes = min(1 << 20, welcome.max_chunk_bytes)
        lacking = [h for h in needed if h not in welcome.profile_hashes]
        if profiled is not None and lacking:
            held = ", ".join(welcome.profile_hashes) or "none"
            raise SendError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"the receiver does not hold the calibrated profile {', '.join(lacking)} that recipe "
                f"{profiled.name!r} needs (it holds: {held}); start it with --profile FILE",
                code="UNKNOWN_CODEC", rpc="Hello",
            )  # fmt: skip
        if lacking:  # unpinned, the planner would have weighed transform coding with it
            stage("connect", f"the receiver does not hold profile {', '.join(lacking)}: planning without it")
            profile = None
        constraints = _for_receiver(constraints, welcome.capabilities)

        stage("prefill", "reading the context")
        t0 = time.perf_counter()
        pre = await read_context(constraints)
        if timed_prefill:
            timings["prefill_s"] = time.perf_counter() - t0

        stage("plan", f"within {100 * fraction:g}% of the FP16 size")
        t0 = time.perf_counter()
        if config is not None:
            chosen = await asyncio.to_thread(
                fixed_plan, pre, geometry, fingerprint, config, session_id, message_id, chunk_bytes, profile
            )
        else:
            chosen = await asyncio.to_thread(
                plan, pre, geometry, fingerprint, fraction, constraints=constraints, model_name=model_name,
                session_id=session_id, message_id=message_id, chunk_bytes=chunk_bytes, profile=profile,
            )  # fmt: skip
        timings["plan_s"] = time.perf_counter() - t0
        enc_t = chosen.encoded.timings
        if "select_s" in enc_t:
            timings["select_s"] = enc_t["select_s"]
        timings["quantize_s"] = enc_t.get("quantize_s", enc_t.get("encode_s", 0.0))

        t0 = time.perf_counter()
        frames = await asyncio.to_thread(
            wire.to_frames, chosen.encoded, session_id, message_id, fingerprint, chunk_bytes
        )
        timings["pack_s"] = time.perf_counter() - t0 + enc_t.get("zstd_s", 0.0) + enc_t.get("ans_s", 0.0)
        transfer_timeout = timeout + 8 * chosen.total_bytes / min_rate_bps

        # The first try shares the Hello connection; a retry gets a connection of its own, and the
        # question then follows the message there (one HTTP/2 connection reaches one replica).
        direct = transfer_target is None or transfer_target == target
        first = [channel] if direct else []

        def open_channel() -> grpc.aio.Channel:
            return first.pop() if first else security.channel(transfer_target or target, channel_options())

        stage("transfer", f"{chosen.total_bytes:,} bytes ({chosen.recipe.name})")
        result, tchannel = await transfer_with_retries(
            open_channel, frames, attempts=attempts, timeout=transfer_timeout, fault=fault, metadata=meta
        )
        del frames
        if tchannel is not channel:
            stack.push_async_callback(tchannel.close)
        timings["transfer_s"] = result.seconds

        stage("answer", "waiting for the receiver's answer")
        request = wire.Ask(
            session_id, message_id, question, options.max_new_tokens, tuple(reference_answers), dict(timings),
            options.temperature, options.top_p, options.stop,
        )  # fmt: skip
        asked = tchannel if direct else channel
        t0 = time.perf_counter()
        answer = await ask(asked, request, timeout=timeout, metadata=meta)
        timings["ask_s"] = time.perf_counter() - t0
        if not keep:
            stage("release", message_id)
            released = (
                await release(asked, message_id, session_id, timeout=timeout, metadata=meta)
            ).freed_bytes
    for key in ("decode_s", "receive_s"):
        if key in result.receipt.timings:
            timings[key] = result.receipt.timings[key]
    for key in ("answer_s", "first_token_s"):
        if key in answer.timings:
            timings[key] = answer.timings[key]
    return SendResult(
        session_id=session_id, message_id=message_id, budget=fraction, plan=chosen, transfer=result,
        answer=answer, welcome=welcome, context_tokens=int(pre.kv.length), timings=timings,
        server=target, truncated_tokens=truncated, released_bytes=released,
    )  # fmt: skip


async def probe(target: str, security: ClientSecurity = PLAINTEXT, timeout: float = 10.0) -> None:
    """Check that a receiver answers at `target` (its gRPC health service, which needs no token), before
    anything slow happens; SendError UNAVAILABLE (or the health call's status) otherwise."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with security.channel(target, channel_options()) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise SendError(exc.code(), exc.details() or "", None, "connect") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise SendError(grpc.StatusCode.UNAVAILABLE, f"the receiver reports {status}", None, "connect")
