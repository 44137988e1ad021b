"""The receiver's gRPC servicer (grpc.aio): Hello, Transfer, Ask.

Requests arrive as bytes (kvlink.wire.raw_rpc_handler) so that malformed
protobuf is answered with INVALID_ARGUMENT and a readable message. Everything
else is the library's: kvlink.wire validates and assembles a message,
kvlink.codec decodes it, kvlink.generate answers from it. A message becomes a
session entry only once it is complete, verified and decoded; any failure
aborts the call with the WireError's gRPC status (its code in the trailing
metadata) and leaves nothing behind, so no partial cache can ever answer.

Before any of that, server.guard.Guard checks the bearer token (UNAUTHENTICATED)
and admits the call: Transfer and Ask calls in progress are capped in all and
per peer (RESOURCE_EXHAUSTED, code BUSY). A Transfer on which no frame arrives
for `stall_timeout_s` ends with DEADLINE_EXCEEDED (code STALLED) and is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import replace
from typing import NoReturn

import grpc
import torch

from kvlink import wire
from kvlink.cache import ContextKV, prefill
from kvlink.codec import Codec, CodecConfig, EncodedKV
from kvlink.eval.squad import best_scores
from kvlink.generate import greedy_answer
from kvlink.metrics import AskRecord, MessageRecord, MetricsRegistry
from kvlink.models import LoadedModel
from kvlink.prompt import context_ids, question_ids
from server.guard import Busy, Guard, Slot
from server.store import SessionStore

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


async def _abort_status(context: grpc.aio.ServicerContext, status: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(status, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class KVLinkService:
    """Receiver side of kvlink.v1.KVLink over a loaded model.

    lm: the model (decode and answers run on its device). store: decoded caches by (session, message).
    metrics: per-message records for REST. limits: what a message may declare. max_new_tokens:
    answers are at most this long (a longer request is clamped). profile_hashes: calibrated low-rank
    profiles held (none: "profile" messages are refused as UNKNOWN_CODEC). guard: bearer token and
    call admission (default: no token, 64 calls, 4 per peer). stall_timeout_s: longest wait for the
    next frame of a Transfer (None: only the sender's deadline bounds it).
    """

    def __init__(
        self,
        lm: LoadedModel,
        store: SessionStore,
        metrics: MetricsRegistry,
        limits: wire.WireLimits | None = None,
        max_new_tokens: int = 64,
        profile_hashes: Collection[str] = (),
        guard: Guard | None = None,
        stall_timeout_s: float | None = 30.0,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0 or None, got {stall_timeout_s!r}")
        self.lm = lm
        self.store = store
        self.metrics = metrics
        self.limits = limits or wire.WireLimits()
        self.max_new_tokens = max_new_tokens
        self.profile_hashes = tuple(profile_hashes)
        local = wire.local_codecs()
        modes = (
            local.lowrank_modes
            if self.profile_hashes
            else tuple(m for m in local.lowrank_modes if m != "profile")
        )
        self.codecs = replace(local, lowrank_modes=modes)
        self.serving = True
        self.started = time.time()
        self._model_lock = asyncio.Lock()  # one model, one forward at a time
        self.guard = guard or Guard()
        self.stall_timeout_s = stall_timeout_s
        self.in_flight = 0  # Transfer calls in progress
        self.asks_in_flight = 0
        self._assemblers: set[wire.Assembler] = set()

    def call_stats(self) -> dict[str, int | float | None]:
        """Calls in progress and what they hold: returns to 0 when every call has ended, however it ended."""
        guard = self.guard.stats()
        return {
            "transfers_in_flight": self.in_flight, "asks_in_flight": self.asks_in_flight,
            "buffered_bytes": sum(a.buffered_bytes for a in self._assemblers),
            "calls": guard.calls, "peers": guard.peers, "busiest_peer_calls": guard.busiest_peer_calls,
            "refused_busy": guard.refused_busy, "refused_unauthenticated": guard.refused_auth,
            "max_concurrent_sessions": guard.max_calls, "per_peer_concurrency": guard.per_peer,
            "stall_timeout_s": self.stall_timeout_s,
        }  # fmt: skip

    def _admit(self, context: grpc.aio.ServicerContext, rpc: str, slot: bool = True) -> Slot | None:
        """Check the bearer token (UNAUTHENTICATED) and take a call slot (BUSY when none is free);
        raises WireError, which the caller turns into the call's status."""
        reason = self.guard.authorized(context.invocation_metadata())
        err: wire.WireError | None = None
        if reason is not None:
            err = wire.WireError("UNAUTHENTICATED", reason)
        elif slot:
            try:
                return self.guard.acquire(context.peer())
            except Busy as busy:
                err = wire.WireError("BUSY", busy.message)
        if err is None:
            return None
        self.metrics.record_error(err.code, rpc)
        logger.info("%s from %s refused: %s", rpc, context.peer(), err.message)
        raise err

    def warm_up(self) -> float:
        """Run a tiny prefill, INT4 round trip and answer once (blocking), so that the first real
        request does not pay the first-call costs of the model and the kernels. Returns seconds."""
        started = time.perf_counter()
        tok = self.lm.tokenizer
        pre = prefill(self.lm.model, context_ids(tok, "kvlink warm-up."), None)
        codec = Codec(CodecConfig(k_bits=4, v_bits=4), self.lm.geometry)
        kv = codec.decode(codec.encode(pre), self.lm.device, self.lm.dtype)
        greedy_answer(self.lm.model, tok, kv, question_ids(tok, "Ready?"), max_new_tokens=2)
        return time.perf_counter() - started

    @property
    def welcome(self) -> wire.Welcome:
        return wire.Welcome(
            fingerprint=self.lm.fingerprint, codecs=self.codecs,
            max_message_bytes=self.limits.max_message_bytes, max_chunk_bytes=self.limits.max_chunk_bytes,
            profile_hashes=self.profile_hashes, model=self.lm.name, geometry=self.lm.geometry,
        )  # fmt: skip

    # --- Hello --------------------------------------------------------------------
    async def Hello(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Welcome:
        try:
            self._admit(context, "Hello", slot=False)
        except wire.WireError as err:
            await _abort(context, err)
        try:
            hello = wire.hello_from_proto(wire.parse_hello(request), self.lm.fingerprint)
        except wire.WireError as err:
            self.metrics.record_error(err.code, "Hello")
            logger.info("Hello refused: %s", err)
            await _abort(context, err)
        logger.debug("Hello from %r", hello.client)
        return wire.welcome_to_proto(self.welcome)

    # --- Transfer -----------------------------------------------------------------
    async def Transfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.pb.Signal]:
        try:
            slot = self._admit(context, "Transfer")
        except wire.WireError as err:
            # A signal first: a sender whose writes race this abort sees INTERNAL from grpc, not the status.
            yield wire.error_signal(err)
            await _abort(context, err)
        asm = wire.Assembler(
            self.lm.fingerprint, self.lm.geometry, self.limits, self.codecs, self.profile_hashes
        )
        self.in_flight += 1
        self._assemblers.add(asm)
        stored: tuple[str, str] | None = None
        try:
            frames = aiter(request_iterator)
            while (raw := await self._next_frame(frames, asm)) is not None:
                for signal in asm.feed_raw(raw):
                    yield signal
                if asm.complete:
                    break
            encoded, receipt = asm.finish()
            kv, decode_s = await self._decode(encoded)
            timings = {**receipt.timings, "decode_s": decode_s}
            sealed, signal = wire.receipt_signal(replace(receipt, timings=timings))
            session_id = asm.session_id or ""
            self.store.put(session_id, sealed.message_id, kv, encoded.config.label)
            stored = (session_id, sealed.message_id)
            self.metrics.record_message(
                MessageRecord.from_receipt(sealed, session_id, encoded.config, encoded.length, kv.kept(0))
            )
            logger.info(
                "message %s (%s): %d wire bytes, %.1f%% of FP16, decoded in %.3f s",
                sealed.message_id, encoded.config.label, sealed.total,
                100 * sealed.total / max(sealed.fp16_bytes, 1), decode_s,
            )  # fmt: skip
            yield signal
        except wire.WireError as err:
            self.metrics.record_error(err.code, "Transfer")
            logger.info("Transfer of message %s refused: %s", asm.message_id, err)
            yield wire.error_signal(err)
            await _abort(context, err)
        except asyncio.CancelledError:
            # The sender went away (or the server is stopping): nothing of the message is kept,
            # not even a complete one whose receipt could not be delivered.
            if stored is not None:
                self.store.discard(*stored)
            self.metrics.record_error("CANCELLED", "Transfer")
            logger.info("Transfer of message %s cancelled; discarded", asm.message_id)
            raise
        except Exception as exc:  # a bug must cost one call, never the server
            self.metrics.record_error(INTERNAL, "Transfer")
            logger.exception("Transfer of message %s failed", asm.message_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"receiver error: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= 1
            self._assemblers.discard(asm)
            if slot is not None:
                slot.release()

    async def _next_frame(self, frames: AsyncIterator[bytes], asm: wire.Assembler) -> bytes | None:
        """The next frame's bytes, None at the end of the stream; STALLED after stall_timeout_s of silence."""
        try:
            return await asyncio.wait_for(anext(frames), self.stall_timeout_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise wire.WireError(
                "STALLED",
                f"no frame arrived for {self.stall_timeout_s:g} s (the receiver's --stall-timeout); "
                f"message {asm.message_id} dropped after {asm.buffered_bytes} bytes of chunk data",
            ) from None

    async def _decode(self, encoded: EncodedKV) -> tuple[ContextKV, float]:
        """Decode on the model's device; refuses a cache the store could never hold."""
        need = decoded_nbytes(encoded, self.lm.dtype)
        if not self.store.fits(need):
            raise wire.WireError(
                "TOO_LARGE",
                f"the decoded cache needs {need} bytes; this receiver caches at most {self.store.max_bytes}",
            )
        started = time.perf_counter()
        try:
            kv = await asyncio.to_thread(
                Codec(encoded.config, encoded.geometry).decode, encoded, self.lm.device, self.lm.dtype
            )
        except ValueError as exc:
            raise wire.WireError("MALFORMED", f"the message does not decode: {exc}") from None
        return kv, time.perf_counter() - started

    # --- Ask ----------------------------------------------------------------------
    async def Ask(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Answer:
        try:
            slot = self._admit(context, "Ask")
        except wire.WireError as err:
            await _abort(context, err)
        self.asks_in_flight += 1
        try:
            return await self._ask(request, context)
        finally:
            self.asks_in_flight -= 1
            if slot is not None:
                slot.release()

    async def _ask(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Answer:
        try:
            ask = wire.ask_from_proto(wire.parse_ask(request), self.limits)
        except wire.WireError as err:
            self.metrics.record_error(err.code, "Ask")
            await _abort(context, err)
        kv = self.store.get(ask.session_id, ask.message_id)
        if kv is None:
            self.metrics.record_error(NOT_FOUND, "Ask")
            await _abort_status(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no context for session {ask.session_id!r} message {ask.message_id!r}: it was never "
                "received completely, or it expired or was evicted",
            )
        q_ids = question_ids(self.lm.tokenizer, ask.question)
        max_new = min(ask.max_new_tokens, self.max_new_tokens)
        queued = time.perf_counter()
        async with self._model_lock:
            queue_s = time.perf_counter() - queued
            try:
                answer = await asyncio.to_thread(
                    greedy_answer, self.lm.model, self.lm.tokenizer, kv, q_ids, max_new_tokens=max_new
                )
            except ValueError as exc:
                self.metrics.record_error("INVALID_ARGUMENT", "Ask")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot answer: {exc}")
        f1 = em = None
        if ask.reference_answers:
            f1, em = best_scores(answer.text, list(ask.reference_answers))
        timings = {k: float(v) for k, v in answer.timings.items() if k.endswith("_s")}
        timings["queue_s"] = queue_s
        record = AskRecord(
            question=ask.question, answer=answer.text, token_ids=list(answer.token_ids),
            reference_answers=list(ask.reference_answers), f1=f1, exact_match=em, timings=timings,
        )  # fmt: skip
        self.metrics.record_answer(ask.message_id, record, ask.sender_timings)
        logger.info(
            "answered message %s in %.2f s: %r", ask.message_id, timings.get("answer_s", 0.0), answer.text
        )
        return wire.answer_to_proto(
            wire.Answer(ask.message_id, answer.text, tuple(answer.token_ids), timings, f1, em)
        )
