"""The receiver's gRPC servicer (grpc.aio): Hello, Transfer, Ask, Release.

Requests arrive as bytes (kvlink.wire.raw_rpc_handler) so that malformed
protobuf is answered with INVALID_ARGUMENT and a readable message. Everything
else is the library's: kvlink.wire validates and assembles a message,
kvlink.codec decodes it, kvlink.answer answers from it (transformers' generate() over
a kvlink.hfcache.KVLinkCache, with the Ask's generation options). A message becomes a
session entry only once it is complete, verified and decoded; any failure
aborts the call with the WireError's gRPC status (its code in the trailing
metadata) and leaves nothing behind, so no partial cache can ever answer.

Before any of that, kvlink.server.guard.Guard names the caller (UNAUTHENTICATED without
a usable credential) and admits the call: Transfer and Ask calls in progress are
capped in all and per peer (RESOURCE_EXHAUSTED, code BUSY). The caller's
identity owns what it sends: message ids are its own (a reused one is refused,
EXISTS), and only it can ask about them or release them (Release frees a context
before its TTL; another identity's attempt is NOT_FOUND and frees nothing). The
REST app (kvlink.server.rest) asks and releases through the same methods, `answer` and
`release`, under the same rules.

What one hostile caller can cost the others is bounded:
- time on the event loop: a header is parsed and validated in a worker thread
  (its size and row counts are checked first), and so are decodes, answers and
  answer scoring; chunks cost a CRC32C each;
- memory: the chunk data of transfers in flight (declared by their headers,
  reserved before the first chunk is kept: max_buffered_bytes) and the decoded
  contexts plus the decodes in flight (SessionStore's budget, reserved with
  kvlink.codec.decode_cost before a decode starts) are capped; past a cap the
  call is refused BUSY before anything is allocated; a refused call keeps no
  buffer (errors are detached from the frames they were raised in);
- duration: a Transfer on which no frame arrives for `stall_timeout_s` ends
  STALLED, and one that has not completed `message_deadline_s` after it began
  ends DEADLINE, however it trickles;
- the model: questions longer than `max_question_tokens` are refused, longer
  ones than a chunk are prefilled in chunks, and answers take turns forward by
  forward (kvlink.server.guard.FairLock), so no answer waits for another to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import grpc
import torch

from kvlink import wire
from kvlink.answer import GenerationOptions, generate_answer
from kvlink.cache import ContextKV, prefill
from kvlink.capabilities import local_capabilities
from kvlink.codec import Codec, EncodedKV, decode_cost
from kvlink.metrics import AskRecord, MessageRecord, MetricsRegistry
from kvlink.models import LoadedModel, max_positions
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import Recipe, build
from kvlink.scoring import best_scores
from kvlink.server import memory
from kvlink.server.guard import Busy, ByteBudget, FairLock, Guard, Identity, Slot, Unauthorized
from kvlink.server.store import Reservation, SessionStore, StoreBusy
from kvlink.stream import join, recompute, shifted

logger = logging.getLogger(__name__)

NOT_FOUND = "NOT_FOUND"
INTERNAL = "INTERNAL"


def decoded_nbytes(encoded: EncodedKV, dtype: torch.dtype) -> int:
    """Bytes the decoded cache will take: K and V of every layer in `dtype` plus int64 positions."""
    element = torch.empty((), dtype=dtype).element_size()
    tensors = sum(t.shape[0] * t.shape[1] * t.shape[2] * element for t in encoded.tensors)
    positions = (
        sum(count for _, _, count in encoded.positions) * 8 if encoded.positions else encoded.length * 8
    )
    return tensors + positions


async def _abort(context: grpc.aio.ServicerContext, err: wire.WireError) -> NoReturn:
    await context.abort(
        err.status_code, err.message, trailing_metadata=((wire.ERROR_METADATA_KEY, err.code),)
    )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


BIG_DECODE_BYTES = 64 << 20
"""A decode whose cost reaches this runs on one CPU thread (on a CPU receiver), leaving the others' cores to
the rest of the receiver's work: one sender's large messages slow the others' answers less."""


def _decode_politely(
    encoded: EncodedKV, device: torch.device | str, dtype: torch.dtype, cost: int, profile: Any = None
) -> ContextKV:
    """Codec.decode (with `profile`, the calibrated projection or predictors the message names, if any),
    on one intra-op thread when the message is big and decodes on the CPU. (OpenMP's thread count is
    per calling thread: this worker's, restored after; other threads keep theirs.)"""
    decode = Codec(encoded.recipe, encoded.geometry, profile).decode
    if cost < BIG_DECODE_BYTES or torch.device(device).type != "cpu":
        return decode(encoded, device, dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return decode(encoded, device, dtype)
    finally:
        torch.set_num_threads(threads)


class Refused(Exception):
    """An Ask or Release refused: a gRPC status, a kvlink code (for the error counters) and why."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @classmethod
    def of(cls, err: wire.WireError) -> Refused:
        return cls(err.status_code, err.code, err.message)


def out_of_memory(exc: BaseException, store: SessionStore) -> str:
    """Why a message was refused for memory: what the receiver holds (the contexts kept for follow-up
    questions are the usual reason), and what the sender can do."""
    stats = store.stats()
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (
        f"the receiver ran out of memory ({first}; it holds {stats.messages} contexts, {stats.bytes:,} B); "
        "free contexts you no longer ask about (kvlink-ask --release, kvlink-send --no-keep) or retry later"
    )


@dataclass
class _Call:
    """What one Transfer call holds; released however the call ends."""

    who: Identity
    asm: wire.Assembler
    slot: Slot | None = None
    claimed: tuple[str, str] | None = None  # (owner, message id) taken by this call
    buffered: Any = None  # the chunk bytes taken from the transfer budget
    decoding: Reservation | None = None  # the decode's share of the store's budget
    stored: bool = False


@dataclass
class _Stream:
    """A segmented context being received (kvlink.stream): its segments' caches so far, in order, and
    the store budget they hold; answerable as `stream_id` only once the last segment is in."""

    owner: str
    session_id: str
    stream_id: str
    total_length: int
    parts: list[ContextKV] = field(default_factory=list)
    held: list[Reservation] = field(default_factory=list)
    receipts: list[wire.Receipt] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    # (segment, its message id, its encoded KV or None for text), kept only for a fleet's shared store
    messages: list[tuple[wire.Segment, str, EncodedKV | None]] = field(default_factory=list)
    next_index: int = 0
    next_start: int = 0
    touched: float = field(default_factory=time.monotonic)
    failed: str = ""

    def drop(self, why: str) -> None:
        self.failed = self.failed or why
        self.parts.clear()
        self.messages.clear()
        for held in self.held:
            held.release()
        self.held.clear()


class KVLinkService:
    """Receiver side of kvlink.v2.KVLink over a loaded model.

    lm: the model (decode and answers run on its device). store: decoded caches by (owner, message),
    whose byte cap also covers decodes in flight. metrics: per-message records for REST. limits: what
    a message may declare. max_new_tokens: answers are at most this long (a longer request is
    clamped). profiles: calibrated profiles held: low-rank projections (kvlink.lowrank.ModelProfile) and
    cross-layer predictors (kvlink.predict.PredictorProfile); a message naming one not held is refused
    as UNKNOWN_CODEC. guard: identities and call admission (default: no authentication, 64 calls, 4
    per peer). stall_timeout_s: longest wait for the next frame of a Transfer; message_deadline_s:
    longest a Transfer may take from its first frame to its last (None: only the sender's deadline
    bounds either). max_question_tokens: longest question. max_buffered_bytes: chunk data all
    transfers in flight may hold together. admission_wait_s: how long a complete message waits for
    room in the store's budget before it is refused BUSY.
    """

    shares_segments = False  # a fleet's replica keeps each segment's message to store the context whole

    def __init__(
        self,
        lm: LoadedModel,
        store: SessionStore,
        metrics: MetricsRegistry,
        limits: wire.WireLimits | None = None,
        max_new_tokens: int = 64,
        profiles: Collection[Any] = (),
        guard: Guard | None = None,
        stall_timeout_s: float | None = 30.0,
        message_deadline_s: float | None = 600.0,
        max_question_tokens: int = 2048,
        max_buffered_bytes: int = 1 << 30,
        admission_wait_s: float = 10.0,
        text_segments: bool = True,
        costs: wire.ReceiverCosts | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if max_question_tokens < 1:
            raise ValueError(f"max_question_tokens must be >= 1, got {max_question_tokens!r}")
        for name, value in (("stall_timeout_s", stall_timeout_s), ("message_deadline_s", message_deadline_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        self.lm = lm
        self.store = store
        self.metrics = metrics
        self.limits = limits or wire.WireLimits()
        # A context longer than the model's positions could only be answered wrongly: its header is refused
        # (TOO_LARGE), and an answer never runs past them (see _answer).
        config = getattr(lm.model, "config", None)
        self.max_positions = max_positions(config) if config is not None else None
        if self.max_positions is not None and self.max_positions < self.limits.max_length:
            self.limits = replace(self.limits, max_length=self.max_positions)
        if max_buffered_bytes < self.limits.max_message_bytes:
            raise ValueError(
                f"max_buffered_bytes {max_buffered_bytes} is below max_message_bytes "
                f"{self.limits.max_message_bytes}: the largest message allowed could never be received"
            )
        self.max_new_tokens = max_new_tokens
        self.max_question_tokens = max_question_tokens
        from kvlink.predict import PredictorProfile
        from kvlink.residual import ResidualProfile, TransformProfiles, pair_profiles

        held = [p.to(lm.device) for p in pair_profiles(list(profiles))]
        for p in held:
            p.check_fingerprint(lm.fingerprint)
        self.residuals = {p.hash: p for p in held if isinstance(p, TransformProfiles)}
        self.predictors = {p.hash: p for p in held if isinstance(p, PredictorProfile)}
        self.predictors.update({p.predictors.hash: p.predictors for p in self.residuals.values()})
        self.profiles = {
            p.hash: p
            for p in held
            if not isinstance(p, PredictorProfile | ResidualProfile | TransformProfiles)
        }
        self.profile_hashes = tuple(sorted({*self.profiles, *self.predictors, *self.residuals}))
        # What it decodes: everything registered here, low rank by a profile (cross-layer prediction by
        # predictors, transform coding by a residual profile) only when it holds one.
        self.capabilities = local_capabilities(
            profiles=bool(self.profiles), text_segments=text_segments, predictors=bool(self.predictors),
            residuals=bool(self.residuals),
        )  # fmt: skip
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            self.limits = replace(self.limits, max_token_id=vocab - 1)
        self.costs = costs  # advertised in the Welcome (kvlink.stream.measure_costs)
        self._streams: dict[tuple[str, str], _Stream] = {}
        self.serving = True
        self.started = time.time()
        self.forwards = FairLock()  # one model: forwards take turns, in arrival order
        self.guard = guard or Guard()
        self.stall_timeout_s = stall_timeout_s
        self.message_deadline_s = message_deadline_s
        self.admission_wait_s = admission_wait_s
        self.buffers = ByteBudget(max_buffered_bytes, "transfers", "--max-buffered-bytes")
        self.in_flight = 0  # Transfer calls in progress
        self.asks_in_flight = 0
        self._assemblers: set[wire.Assembler] = set()
        self._claimed: set[tuple[str, str]] = set()  # (owner, message id) of transfers in flight

    def call_stats(self) -> dict[str, int | float | None]:
        """Calls in progress and what they hold: returns to 0 when every call has ended, however it ended."""
        guard = self.guard.stats()
        return {
            "transfers_in_flight": self.in_flight, "asks_in_flight": self.asks_in_flight,
            "buffered_bytes": sum(a.buffered_bytes for a in self._assemblers),
            "reserved_buffer_bytes": self.buffers.held, "max_buffered_bytes": self.buffers.max_bytes,
            "calls": guard.calls, "peers": guard.peers, "busiest_peer_calls": guard.busiest_peer_calls,
            "refused_busy": guard.refused_busy + self.buffers.refused, "refused_unauthenticated": guard.refused_auth,
            "max_concurrent_sessions": guard.max_calls, "per_peer_concurrency": guard.per_peer,
            "stall_timeout_s": self.stall_timeout_s, "message_deadline_s": self.message_deadline_s,
            "max_question_tokens": self.max_question_tokens, "forwards_waiting": self.forwards.waiting,
        }  # fmt: skip

    def memory_stats(self) -> dict[str, Any]:
        """Host memory of this process, and on a CUDA receiver torch's allocator on its device: now and
        the peaks since start-up or the last reset_memory_peaks() (benchmarks take one message's peak)."""
        out: dict[str, Any] = {"host": memory.host_memory(), "device": None}
        device = self.lm.device
        if device.type == "cuda":
            out["device"] = {
                "name": str(device), "allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.memory_reserved(device),
                "total_bytes": torch.cuda.get_device_properties(device).total_memory,
            }  # fmt: skip
        return out

    def limit_settings(self, operator: bool) -> dict[str, Any]:
        """What this receiver accepts and holds (REST /v1/limits): the limits that bind every caller, and
        to an operator the receiver-wide caps as well (None to others, as /v1/stats shows them the store)."""
        limits, store = self.limits, self.store
        return {
            "max_message_bytes": limits.max_message_bytes, "max_chunk_bytes": limits.max_chunk_bytes,
            "max_context_tokens": limits.max_length, "max_new_tokens": self.max_new_tokens,
            "max_question_tokens": self.max_question_tokens, "max_references": limits.max_references,
            "per_peer_concurrency": self.guard.per_peer, "stall_timeout_s": self.stall_timeout_s,
            "message_deadline_s": self.message_deadline_s, "session_ttl_s": store.ttl_s,
            "max_cached_bytes_per_identity": store.owner_max_bytes,
            "max_cached_bytes": store.max_bytes if operator else None,
            "max_concurrent_sessions": self.guard.max_calls if operator else None,
            "max_buffered_bytes": self.buffers.max_bytes if operator else None,
            **self._shared_settings(operator),
        }  # fmt: skip

    def _shared_settings(self, operator: bool) -> dict[str, Any]:
        """The fleet's store, as limit_settings shows it: none here (kvlink.server.fleet has one)."""
        return {"shared_store": False, "store_max_bytes": None, "store_max_bytes_per_identity": None}

    def reset_memory_peaks(self) -> dict[str, Any]:
        """Start new peaks of host and device memory; returns memory_stats() right after."""
        memory.reset_peak_rss()
        if self.lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.lm.device)
        return self.memory_stats()

    def _refuse(self, err: wire.WireError, rpc: str, peer: str) -> wire.WireError:
        """Count and log a refusal; the error to answer with, a copy never raised (a raised error kept in a
        local would tie the frames it went through, and what they hold, into a cycle only the cyclic
        garbage collector frees, much later)."""
        self.metrics.record_error(err.code, rpc)
        logger.info("%s from %s refused: %s", rpc, peer, err.message)
        return err.detached()

    def _identify(self, context: grpc.aio.ServicerContext) -> Identity:
        """The caller (WireError UNAUTHENTICATED when it has no usable credential)."""
        try:
            return self.guard.identify(context.invocation_metadata(), context.auth_context())
        except Unauthorized as exc:
            reason = exc.message
        raise wire.WireError("UNAUTHENTICATED", reason)

    def _admit(self, context: grpc.aio.ServicerContext, rpc: str) -> tuple[Identity, Slot] | wire.WireError:
        """The caller and a call slot, or the error to refuse the call with (UNAUTHENTICATED, BUSY)."""
        try:
            who = self._identify(context)
            return who, self.guard.acquire(context.peer(), who)
        except wire.WireError as err:
            return self._refuse(err, rpc, context.peer())
        except Busy as busy:
            return self._refuse(wire.WireError("BUSY", busy.message), rpc, context.peer())

    def profile_of(self, encoded: EncodedKV) -> Any:
        """The calibrated profile held here that `encoded` decodes with (None: none it names is held):
        the predictors and residual profile its stages name (Predict and Pca: transform coding), the
        predictors (Predict), else the low-rank projection its header names."""
        named = [h for stage in encoded.recipe.stages() for h in stage.profiles()]
        pca = [s.profile for s in encoded.recipe.stages() if s.name == "pca"]  # type: ignore[attr-defined]
        if pca:
            return self.residuals.get(pca[0])
        if named:
            return self.predictors.get(named[0])
        return self.profiles.get(encoded.profile_hash or "")

    def warm_up(self) -> float:
        """Run a tiny prefill, INT4 round trip and answer once (blocking), so that the first real
        request does not pay the first-call costs of the model and the kernels. Returns seconds."""
        started = time.perf_counter()
        tok = self.lm.tokenizer
        pre = prefill(self.lm.model, context_ids(tok, "kvlink warm-up."), None)
        codec = Codec(build(k_bits=4, v_bits=4), self.lm.geometry)
        kv = codec.decode(codec.encode(pre), self.lm.device, self.lm.dtype)
        generate_answer(self.lm.model, tok, kv, question_ids(tok, "Ready?"), GenerationOptions(2))
        return time.perf_counter() - started

    @property
    def welcome(self) -> wire.Welcome:
        return wire.Welcome(
            fingerprint=self.lm.fingerprint, capabilities=self.capabilities,
            max_message_bytes=self.limits.max_message_bytes, max_chunk_bytes=self.limits.max_chunk_bytes,
            profile_hashes=self.profile_hashes, model=self.lm.name, geometry=self.lm.geometry,
            costs=self.costs,
        )  # fmt: skip

    # --- Hello --------------------------------------------------------------------
    async def Hello(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Welcome:
        failure: wire.WireError | None = None
        try:
            self._identify(context)
            hello = wire.hello_from_proto(wire.parse_hello(request), self.lm.fingerprint)
        except wire.WireError as err:
            failure = self._refuse(err, "Hello", context.peer())
        if failure is not None:
            await _abort(context, failure)
        logger.debug("Hello from %r", hello.client)
        return wire.welcome_to_proto(self.welcome)

    # --- Transfer -----------------------------------------------------------------
    async def Transfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.pb.Signal]:
        admitted = self._admit(context, "Transfer")
        if isinstance(admitted, wire.WireError):
            # A signal first: a sender whose writes race this abort sees INTERNAL from grpc, not the status.
            yield wire.error_signal(admitted)
            await _abort(context, admitted)
        who, slot = admitted
        asm = wire.Assembler(
            self.lm.fingerprint, self.lm.geometry, self.limits, self.capabilities, self.profile_hashes
        )
        call = _Call(who, asm, slot)
        self.in_flight += 1
        self._assemblers.add(asm)
        failure: wire.WireError | None = None
        frames = aiter(request_iterator)
        try:
            async for signal in self._transfer(call, frames):
                yield signal
        except wire.WireError as err:
            failure = self._refuse(err, "Transfer", context.peer())
        except asyncio.CancelledError:
            # The sender went away (or the server is stopping): nothing of the message is kept,
            # not even a complete one whose receipt could not be delivered.
            if call.stored:
                self.store.discard(who.name, asm.message_id or "")
                self._unshare(who.name, asm.message_id or "")
            self.metrics.record_error("CANCELLED", "Transfer")
            logger.info("Transfer of message %r cancelled; discarded", asm.message_id)
            raise
        except (torch.OutOfMemoryError, MemoryError) as exc:  # this receiver's state, not the message's
            failure = self._refuse(
                wire.WireError("BUSY", out_of_memory(exc, self.store)), "Transfer", context.peer()
            )
            if call.stored:
                self.store.discard(who.name, asm.message_id or "")
                self._unshare(who.name, asm.message_id or "")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as exc:  # a bug must cost one call, never the server
            self.metrics.record_error(INTERNAL, "Transfer")
            logger.exception("Transfer of message %r failed", asm.message_id)
            failure = wire.WireError("MALFORMED", f"receiver error: {type(exc).__name__}")
        finally:
            self._release(call)
            # grpc's request stream is an async generator that holds the last frame it yielded until it
            # is closed or collected: close it now, so that a large refused frame is freed at once.
            aclose = getattr(frames, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if failure is not None:  # answered outside the handlers: the status chains no frame or buffer
            await asyncio.to_thread(memory.trim)  # what the refused message held goes back to the system
            yield wire.error_signal(failure)
            await _abort(context, failure)

    def _release(self, call: _Call) -> None:
        self.in_flight -= 1
        self._assemblers.discard(call.asm)
        if call.claimed is not None:
            self._claimed.discard(call.claimed)
        for held in (call.buffered, call.decoding, call.slot):
            if held is not None:
                held.release()

    async def _transfer(self, call: _Call, frames: AsyncIterator[bytes]) -> AsyncIterator[wire.pb.Signal]:
        """Receive, verify, decode and store one message; yields the signals. Raises WireError."""
        asm = call.asm
        deadline = None if self.message_deadline_s is None else time.monotonic() + self.message_deadline_s
        while (raw := await self._next_frame(frames, asm, deadline)) is not None:
            if asm.message_id is None:  # the header: parsed and validated off the event loop
                signals = await asyncio.to_thread(asm.feed_raw, raw)
                self._claim(call)
                await self._claim_shared(call)
            else:
                signals = asm.feed_raw(raw)
            for signal in signals:
                yield signal
            if asm.complete:
                break
        del raw
        encoded, receipt = asm.finish()
        if call.buffered is not None:
            call.buffered.release()  # the chunks now live in `encoded`, which the decode reservation counts
        if asm.segment is not None:
            yield await self._segment(call, asm.segment, encoded, receipt)
            return
        kv, decode_s = await self._decode(call, encoded)
        timings = {**receipt.timings, "decode_s": decode_s}
        sealed, signal = wire.receipt_signal(replace(receipt, timings=timings))
        session_id = asm.session_id or ""
        record = MessageRecord.from_receipt(
            sealed, session_id, encoded.recipe, encoded.length, kv.kept(0), owner=call.who.name
        )
        await self._share(call, encoded, record)
        try:
            self.store.put(
                call.who.name, session_id, sealed.message_id, kv, encoded.recipe.name, call.decoding
            )
        except ValueError as exc:
            self._unshare(call.who.name, sealed.message_id)
            raise wire.WireError("TOO_LARGE", str(exc)) from None
        call.stored = True
        self.metrics.record_message(record)
        logger.info(
            "message %r (%s) of %s: %d wire bytes, %.1f%% of FP16, decoded in %.3f s",
            sealed.message_id, encoded.recipe.name, call.who.name, sealed.total,
            100 * sealed.total / max(sealed.fp16_bytes, 1), decode_s,
        )  # fmt: skip
        yield signal

    # Where a fleet's shared store (kvlink.server.fleet) joins a Transfer; this receiver alone has none.
    async def _claim_shared(self, call: _Call) -> None:
        """After _claim: the id must be new in the shared store too (EXISTS; UNAVAILABLE when unreachable)."""

    async def _share(self, call: _Call, encoded: EncodedKV, record: MessageRecord) -> None:
        """Once decoded, before it is kept here: the verified message into the shared store (WireError)."""

    def _unshare(self, owner: str, message_id: str) -> None:
        """Take back a message _share stored, when this receiver does not keep it after all."""

    async def _context(self, who: Identity, session_id: str, message_id: str) -> ContextKV | None:
        """The decoded context an Ask is answered from (None: NOT_FOUND; Refused for other failures)."""
        return self.store.get(who.name, session_id, message_id)

    def fleet_stats(self, owner: str | None) -> dict[str, Any]:
        """Aggregates of every replica (REST /v1/stats?scope=fleet): only with a shared store."""
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED",
            "this receiver keeps its contexts in its own memory: fleet-wide stats need a shared store "
            "(kvlink-serve --store redis://HOST:PORT/DB)",
        )  # fmt: skip

    def _claim(self, call: _Call) -> None:
        """Once the header is valid: the message id must be new for its owner (EXISTS), and its chunk
        data must fit the transfer budget (BUSY); both are held until the call ends."""
        key = (call.who.name, call.asm.message_id or "")
        if key in self._claimed or self.store.holds(*key) or self.metrics.has(*key):
            raise wire.WireError(
                "EXISTS",
                f"message id {key[1]!r} is already in use by this sender: ids are never reused or overwritten",
            )
        segment = call.asm.segment
        if segment is not None and segment.index == 0:
            stream = (call.who.name, segment.stream_id)
            if stream in self._streams or self.store.holds(*stream) or self.metrics.has(*stream):
                raise wire.WireError(
                    "EXISTS", f"context id {segment.stream_id!r} is already in use by this sender"
                )
            self._streams[stream] = _Stream(
                call.who.name, call.asm.session_id or "", segment.stream_id, segment.total_length
            )
            self._expire_later(stream)
        self._claimed.add(key)
        call.claimed = key
        try:
            call.buffered = self.buffers.take(call.asm.declared_bytes)
        except Busy as busy:
            reason = busy.message
        else:
            return
        raise wire.WireError("BUSY", reason)

    # --- segmented contexts (kvlink.stream) --------------------------------------------
    def _expire_later(self, key: tuple[str, str]) -> None:
        """Drop a segmented context that makes no progress for stall_timeout_s (its sender went away)."""
        wait = self.stall_timeout_s or 60.0
        stream = self._streams.get(key)

        def check() -> None:
            if self._streams.get(key) is not stream or stream is None:
                return
            idle = time.monotonic() - stream.touched
            if idle >= wait:
                self._drop_stream(key, f"no segment arrived for {idle:.0f} s")
            else:
                asyncio.get_running_loop().call_later(wait - idle + 0.01, check)

        asyncio.get_running_loop().call_later(wait, check)

    def _drop_stream(self, key: tuple[str, str], why: str) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            stream.drop(why)
            logger.info("segmented context %r of %s dropped: %s", key[1], key[0], why)

    async def _turn(self, call: _Call, segment: wire.Segment) -> _Stream:
        """The stream once the segments before this one are in (ORDER for a wrong start or a gap;
        STALLED when the one before never completes)."""
        key = (call.who.name, segment.stream_id)
        wait = self.stall_timeout_s or 60.0
        give_up = time.monotonic() + wait
        while True:
            stream = self._streams.get(key)
            if stream is not None and stream.failed:
                raise wire.WireError("ORDER", f"context {segment.stream_id!r} was dropped: {stream.failed}")
            if stream is not None and stream.next_index == segment.index:
                break
            if stream is not None and stream.next_index > segment.index:
                raise wire.WireError(
                    "ORDER", f"segment {segment.index} of context {segment.stream_id!r} arrived twice"
                )
            if stream is None and segment.index == 0:
                raise wire.WireError("ORDER", f"context {segment.stream_id!r} is gone")
            if time.monotonic() >= give_up:
                what = "never began" if stream is None else f"waits for segment {stream.next_index}"
                raise wire.WireError(
                    "STALLED",
                    f"segment {segment.index} of context {segment.stream_id!r}: the context {what} "
                    f"after {wait:g} s",
                )
            await asyncio.sleep(0.002)
        if segment.start != stream.next_start or segment.total_length != stream.total_length:
            raise wire.WireError(
                "ORDER",
                f"segment {segment.index} starts at token {segment.start} of {segment.total_length}; "
                f"the context is in up to token {stream.next_start} of {stream.total_length}",
            )
        if (call.asm.session_id or "") != stream.session_id:
            raise wire.WireError("ORDER", f"segment {segment.index} names another session than its context")
        return stream

    async def _recompute(
        self, call: _Call, stream: _Stream, segment: wire.Segment
    ) -> tuple[ContextKV, float]:
        """A text segment's KV, computed by the model after the context's cache so far (its prefix)."""
        n = len(segment.token_ids)
        g = self.lm.geometry
        element = torch.empty((), dtype=self.lm.dtype).element_size()
        prefix_bytes = sum(2 * p.keys[0].numel() * element * g.num_layers for p in stream.parts)
        cost = 2 * g.num_layers * g.kv_heads * g.head_dim * n * element + 8 * n * g.num_layers + prefix_bytes
        if not self.store.fits(cost):
            raise wire.WireError(
                "TOO_LARGE", f"recomputing this segment takes up to {cost} bytes; --max-cached-bytes is lower"
            )
        give_up = time.monotonic() + self.admission_wait_s
        while call.decoding is None:
            try:
                call.decoding = self.store.reserve(cost, call.who.name)
            except StoreBusy as busy:
                if time.monotonic() >= give_up:
                    raise wire.WireError("BUSY", f"{busy}; retry later") from None
                await asyncio.sleep(0.02)
        ids = torch.tensor(segment.token_ids, dtype=torch.long)

        def run() -> ContextKV:
            prefix = join(stream.parts, segment.start) if stream.parts else None
            with self.forwards:
                return recompute(self.lm.model, prefix, ids, segment.start)

        started = time.perf_counter()
        kv = await asyncio.to_thread(run)
        return kv, time.perf_counter() - started

    async def _segment(
        self, call: _Call, segment: wire.Segment, encoded: EncodedKV, receipt: wire.Receipt
    ) -> wire.pb.Signal:
        """Decode (or recompute) one segment into its context, in order; the last one commits the
        context under its stream id. Any failure drops the whole context."""
        key = (call.who.name, segment.stream_id)
        try:
            waited = time.perf_counter()
            stream = await self._turn(call, segment)
            # How long it waited for the segment before it: a sender tells its call cost from the receipt
            # by this (kvlink.stream.call_sample).
            turn_s = time.perf_counter() - waited
            stream.touched = time.monotonic()
            stop = segment.start + encoded.length
            if segment.text:
                kv, seconds = await self._recompute(call, stream, segment)
                timings = {**receipt.timings, "recompute_s": seconds, "turn_s": turn_s}
                label = "text"
            else:
                decoded, seconds = await self._decode(call, encoded)
                kv = shifted(decoded, segment.start, stop)
                timings = {**receipt.timings, "decode_s": seconds, "turn_s": turn_s}
                label = encoded.recipe.name
            if call.decoding is not None:  # the stream holds it now, until the context is stored
                stream.held.append(call.decoding)
                call.decoding = None
            stream.parts.append(kv)
            stream.labels.append(label)
            if self.shares_segments:
                stream.messages.append(
                    (segment, call.asm.message_id or "", None if segment.text else encoded)
                )
            sealed, signal = wire.receipt_signal(replace(receipt, timings=timings))
            stream.receipts.append(sealed)
            stream.next_index += 1
            stream.next_start = stop
            stream.touched = time.monotonic()
            if segment.last:
                await self._commit(stream)
            return signal
        except BaseException as exc:
            reason = exc.message if isinstance(exc, wire.WireError) else type(exc).__name__
            self._drop_stream(key, f"segment {segment.index} failed: {reason}")
            raise

    async def _share_stream(self, stream: _Stream, record: MessageRecord) -> None:
        """Before a segmented context is kept here: its segments' messages into the shared store."""

    async def _commit(self, stream: _Stream) -> None:
        """The last segment is in: the context is stored whole and becomes answerable."""
        key = (stream.owner, stream.stream_id)
        try:
            kv = join(stream.parts, stream.total_length)
        except (torch.OutOfMemoryError, MemoryError):
            self._drop_stream(key, "the receiver ran out of memory joining its segments")
            raise
        stream.parts.clear()
        for held in stream.held:
            held.release()
        stream.held.clear()
        self._streams.pop(key, None)
        rs = stream.receipts
        total = wire.Receipt(
            message_id=stream.stream_id, payload=sum(r.payload for r in rs),
            positions=sum(r.positions for r in rs), scales=sum(r.scales for r in rs),
            factors=sum(r.factors for r in rs), framing=sum(r.framing for r in rs),
            signaling=sum(r.signaling for r in rs), chunks=sum(r.chunks for r in rs),
            retransmits=sum(r.retransmits for r in rs),
            retransmitted_bytes=sum(r.retransmitted_bytes for r in rs),
            fp16_bytes=self.lm.geometry.fp16_bytes(stream.total_length),
            timings={name: sum(r.timings.get(name, 0.0) for r in rs)
                     for name in ("receive_s", "decode_s", "recompute_s", "verify_s")},
        )  # fmt: skip
        counts: dict[str, int] = {}
        for label in stream.labels:
            counts[label] = counts.get(label, 0) + 1
        label = "segments " + " + ".join(f"{n}x {name}" for name, n in counts.items())
        kv_labels = [name for name in stream.labels if name != "text"]
        recipe = Recipe.from_name(max(set(kv_labels), key=kv_labels.count)) if kv_labels else wire.TEXT_RECIPE
        record = replace(
            MessageRecord.from_receipt(total, stream.session_id, recipe, stream.total_length, kv.kept(0),
                                       owner=stream.owner),
            config_label=label,
        )  # fmt: skip
        await self._share_stream(stream, record)
        stream.messages.clear()
        try:
            self.store.put(stream.owner, stream.session_id, stream.stream_id, kv, label)
        except ValueError as exc:
            self._unshare(stream.owner, stream.stream_id)
            raise wire.WireError("TOO_LARGE", str(exc)) from None
        self.metrics.record_message(record)
        logger.info(
            "context %r of %s: %d segments (%s), %d wire bytes, %.1f%% of FP16",
            stream.stream_id, stream.owner, len(rs), label, total.total,
            100 * total.total / max(total.fp16_bytes, 1),
        )  # fmt: skip

    async def _next_frame(
        self, frames: AsyncIterator[bytes], asm: wire.Assembler, deadline: float | None
    ) -> bytes | None:
        """The next frame's bytes, None at the end of the stream; STALLED after stall_timeout_s of
        silence, DEADLINE once the message's deadline has passed."""
        left = None if deadline is None else deadline - time.monotonic()
        deadline_first = left is not None and (self.stall_timeout_s is None or left < self.stall_timeout_s)
        wait = max(left or 0.0, 0.0) if deadline_first else self.stall_timeout_s
        try:
            return await asyncio.wait_for(anext(frames), wait)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            pass
        if deadline_first:
            raise wire.WireError(
                "DEADLINE",
                f"message {asm.message_id!r} did not complete within {self.message_deadline_s:g} s (the "
                f"receiver's --message-deadline); dropped after {asm.buffered_bytes} bytes of chunk data",
            )
        raise wire.WireError(
            "STALLED",
            f"no frame arrived for {self.stall_timeout_s:g} s (the receiver's --stall-timeout); "
            f"message {asm.message_id!r} dropped after {asm.buffered_bytes} bytes of chunk data",
        )

    async def _decode(self, call: _Call, encoded: EncodedKV) -> tuple[ContextKV, float]:
        """Decode on the model's device, within the store's memory budget: reserved first (TOO_LARGE if
        the message could never fit; while decodes in flight leave too little, wait for them up to
        admission_wait_s, then BUSY)."""
        cost = decode_cost(encoded, self.lm.dtype)
        if not self.store.fits(cost):
            raise wire.WireError(
                "TOO_LARGE",
                f"decoding this message takes up to {cost} bytes; this receiver holds at most "
                f"{self.store.owner_max_bytes} for one sender's contexts (--max-cached-bytes)",
            )
        give_up = time.monotonic() + self.admission_wait_s
        while call.decoding is None:
            try:
                call.decoding = self.store.reserve(cost, call.who.name)
            except StoreBusy as busy:
                if time.monotonic() >= give_up:
                    reason = f"{busy}; waited {self.admission_wait_s:g} s: retry later"
                    raise wire.WireError("BUSY", reason) from None
                await asyncio.sleep(0.02)  # decodes take milliseconds to seconds: room comes soon
        started = time.perf_counter()
        problem = None
        try:
            profile = self.profile_of(encoded)
            kv = await asyncio.to_thread(
                _decode_politely, encoded, self.lm.device, self.lm.dtype, cost, profile
            )
        except ValueError as exc:
            problem = f"the message does not decode: {exc}"
        if problem is not None:  # raised outside the handler: the error chains no decoded buffer
            raise wire.WireError("MALFORMED", problem)
        if cost >= 64 << 20:  # the decode's temporaries, and the message's parts, go back to the system
            await asyncio.to_thread(memory.trim)
        return kv, time.perf_counter() - started

    # --- Ask ----------------------------------------------------------------------
    async def Ask(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Answer:
        admitted = self._admit(context, "Ask")
        if isinstance(admitted, wire.WireError):
            await _abort(context, admitted)
        who, slot = admitted
        self.asks_in_flight += 1
        try:
            try:
                ask = wire.ask_from_proto(wire.parse_ask(request), self.limits)
            except wire.WireError as err:
                self.metrics.record_error(err.code, "Ask")
                raise Refused.of(err) from None
            return wire.answer_to_proto(await self.answer(who, ask))
        except Refused as exc:  # plain values out of it: the exception is not kept past this block
            status, code, message = exc.status, exc.code, exc.message
        finally:
            self.asks_in_flight -= 1
            slot.release()
        logger.info("Ask from %s refused: %s", context.peer(), message)
        await context.abort(status, message, trailing_metadata=((wire.ERROR_METADATA_KEY, code),))
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def answer(self, who: Identity, ask: wire.Ask, rpc: str = "Ask") -> wire.Answer:
        """Answer one question of `who` about one of its contexts (raises Refused, counted as an error
        of `rpc`)."""
        try:
            return await self._answer(who, ask)
        except Refused as exc:
            self.metrics.record_error(exc.code, rpc)
            raise

    async def _answer(self, who: Identity, ask: wire.Ask) -> wire.Answer:
        kv = await self._context(who, ask.session_id, ask.message_id)
        if kv is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, NOT_FOUND, _not_found(ask.session_id, ask.message_id))
        try:
            options = ask.options.clamped(self.max_new_tokens)
        except ValueError as exc:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED", f"generation options: {exc}"
            ) from None
        q_ids = await asyncio.to_thread(question_ids, self.lm.tokenizer, ask.question)
        if q_ids.numel() > self.max_question_tokens:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_LARGE",
                f"the question has {q_ids.numel()} tokens, this receiver answers at most "
                f"{self.max_question_tokens} (--max-question-tokens)",
            )  # fmt: skip
        if self.max_positions is not None:
            room = self.max_positions - kv.length - int(q_ids.numel())
            if room < 1:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                    f"the context ({kv.length} tokens) and the question ({q_ids.numel()}) leave no room in the "
                    f"model's {self.max_positions} positions for an answer",
                )  # fmt: skip
            options = options.clamped(room)
        problem = None
        try:
            answer = await asyncio.to_thread(
                generate_answer, self.lm.model, self.lm.tokenizer, kv, q_ids, options,
                forward_lock=self.forwards,
            )  # fmt: skip
        except ValueError as exc:
            problem = f"cannot answer: {exc}"
        except (torch.OutOfMemoryError, MemoryError) as exc:  # the context stays: asking again may work
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "BUSY", out_of_memory(exc, self.store)
            ) from None
        if problem is not None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", problem)
        f1 = em = None
        if ask.reference_answers:
            f1, em = await asyncio.to_thread(best_scores, answer.text, list(ask.reference_answers))
        timings = {k: float(v) for k, v in answer.timings.items() if k.endswith("_s")}
        record = AskRecord(
            question=ask.question, answer=answer.text, token_ids=list(answer.token_ids),
            reference_answers=list(ask.reference_answers), f1=f1, exact_match=em, timings=timings,
        )  # fmt: skip
        self.metrics.record_answer(ask.message_id, record, ask.sender_timings, owner=who.name)
        logger.info(
            "answered message %r of %s in %.2f s (%d tokens, %s)",
            ask.message_id, who.name, timings.get("answer_s", 0.0), len(answer.token_ids), answer.finish_reason,
        )  # fmt: skip
        logger.debug("answer to message %r: %r", ask.message_id, answer.text)
        return wire.Answer(
            ask.message_id, answer.text, tuple(answer.token_ids), timings, f1, em, answer.finish_reason
        )

    # --- Release ------------------------------------------------------------------
    async def Release(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Released:
        refused: Refused | None = None
        try:
            who = self._identify(context)
            release = wire.release_from_proto(wire.parse_release(request), self.limits)
            freed = await self.release(who, release.session_id, release.message_id)
        except wire.WireError as err:
            refused = Refused.of(self._refuse(err, "Release", context.peer()))
        except Refused as exc:
            refused = exc
        if refused is None:
            return wire.released_to_proto(wire.Released(release.message_id, freed))
        await context.abort(
            refused.status, refused.message, trailing_metadata=((wire.ERROR_METADATA_KEY, refused.code),)
        )
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def release(self, who: Identity, session_id: str, message_id: str, rpc: str = "Release") -> int:
        """Free `who`'s context (of `session_id`, unless empty): the bytes given back. Refused
        NOT_FOUND when it holds none by that id; another identity's context is never touched."""
        freed = self.store.discard(who.name, message_id, session_id)
        if freed is None:
            self.metrics.record_error(NOT_FOUND, rpc)
            raise Refused(grpc.StatusCode.NOT_FOUND, NOT_FOUND, _not_found(session_id, message_id))
        logger.info("released message %r of %s (%d bytes)", message_id, who.name, freed)
        return freed


def _not_found(session_id: str, message_id: str) -> str:
    session = f"session {session_id!r} " if session_id else ""
    return (
        f"no context for {session}message {message_id!r}: it was never received completely from this "
        "sender, or it was released, expired or evicted"
    )
