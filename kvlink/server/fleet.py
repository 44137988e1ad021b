"""A receiver of a fleet: kvlink-serve --store redis://HOST:PORT/DB.

FleetService is the KVLinkService whose verified messages also go to the fleet's
shared store (kvlink.server.shared), so that any replica answers about any of them:

    Transfer   header valid -> the id must be new in the store too (EXISTS)
               decoded      -> the message, re-framed by kvlink.wire.to_frames, stored whole
                               with its record, TTL and counters; then kept decoded here
    Ask        the store is asked first (it refreshes the TTL and LRU rank fleet-wide):
               gone there (released, evicted, expired on any replica) -> NOT_FOUND, and a
               copy held here is dropped; held here -> answered; held only there -> fetched,
               VERIFIED like a peer's message (a fresh kvlink.wire.Assembler: fingerprint,
               limits, every chunk's CRC32C and the header's, no retries), decoded within
               this receiver's memory budget, kept in its LRU (kvlink.server.store) and answered
    Release    dropped from the store and here

The store down: a Transfer fails UNAVAILABLE (nothing is kept: a message the fleet cannot
see is not accepted), an Ask of a context held here is still answered, others are
UNAVAILABLE, a Release is UNAVAILABLE (the fleet's copy could not be dropped). Every
call tries the store again: it is used again as soon as it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import grpc
import torch

from kvlink import wire
from kvlink.cache import ContextKV
from kvlink.codec import Codec, EncodedKV
from kvlink.metrics import MessageRecord
from kvlink.server.guard import Identity
from kvlink.server.service import KVLinkService, Refused, _Call, _Stream
from kvlink.server.shared import SharedStore, StoreUnavailable, check_url
from kvlink.server.store import StoreBusy
from kvlink.stream import join, recompute, shifted

logger = logging.getLogger(__name__)

UNAVAILABLE = "UNAVAILABLE"


def _tampered(err: wire.WireError, what: str) -> Refused:
    """The refusal of a stored copy that failed verification (logged: a store is not trusted more than a
    peer, and a copy it damaged or was given damaged is worth an operator's look)."""
    refused = Refused(
        err.status_code,
        err.code,
        f"the shared store's copy of {what} failed verification and is refused: {err.message}",
    )
    logger.warning("%s", refused.message)
    return refused


def _unavailable(exc: StoreUnavailable, consequence: str) -> Refused:
    return Refused(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE, f"{exc.message}: {consequence}")


class FleetService(KVLinkService):
    """KVLinkService over a SharedStore (`shared`); the other arguments are KVLinkService's."""

    shares_segments = True

    def __init__(self, *args: Any, shared: SharedStore, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared = shared
        # Verification reads a stored message once: a damaged chunk is not asked for again, it is refused.
        self.stored_limits = replace(self.limits, max_chunk_retries=0)
        self._fetching: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    # --- Transfer -------------------------------------------------------------------------------
    async def _claim_shared(self, call: _Call) -> None:
        owner, message_id = call.claimed or (call.who.name, call.asm.message_id or "")
        try:
            used = await asyncio.to_thread(self.shared.holds, owner, message_id)
        except StoreUnavailable as exc:
            reason = f"{exc.message}: the message cannot be kept for the fleet now; send it again later"
        else:
            if used:
                raise wire.WireError(
                    "EXISTS",
                    f"message id {message_id!r} is already in use by this sender in the fleet: ids are "
                    "never reused or overwritten",
                )
            return
        raise wire.WireError(UNAVAILABLE, reason)

    async def _share(self, call: _Call, encoded: EncodedKV, record: MessageRecord) -> None:
        frames = await asyncio.to_thread(self._frames, encoded, record.session_id, record.message_id)
        await self._put_shared(call.who.name, frames, record)

    async def _share_stream(self, stream: _Stream, record: MessageRecord) -> None:
        """A segmented context: its segments' messages, one after the other, stored as one (a replica
        that fetches it verifies each and decodes or recomputes them in order, as the receiver did)."""

        def framed() -> list[bytes]:
            out: list[bytes] = []
            for segment, segment_id, encoded in stream.messages:
                if encoded is None:
                    frames = wire.text_frames(
                        stream.session_id, segment_id, self.lm.fingerprint, self.lm.geometry, segment
                    )
                else:
                    frames = wire.to_frames(
                        encoded, stream.session_id, segment_id, self.lm.fingerprint,
                        self.limits.max_chunk_bytes, segment,
                    )  # fmt: skip
                out += [wire.frame_bytes(f) for f in frames]
            return out

        await self._put_shared(stream.owner, await asyncio.to_thread(framed), record)

    async def _put_shared(self, owner: str, frames: list[bytes], record: MessageRecord) -> None:
        session_id, message_id = record.session_id, record.message_id
        facts = {
            "owner": owner, "session_id": session_id, "message_id": message_id,
            "fingerprint": self.lm.fingerprint, "config": record.config_label, "family": record.family,
            "length": record.length, "kept": record.kept, "fp16_bytes": record.fp16_bytes,
            "wire_bytes": record.total, "stored_bytes": sum(len(f) for f in frames),
            "frames": len(frames), "received_at": record.received_at,
        }  # fmt: skip
        counts = {
            "payload": record.payload, "metadata": record.metadata, "framing": record.framing,
            "signaling": record.signaling, "total": record.total, "fp16_bytes": record.fp16_bytes,
            "tokens": record.length,
        }  # fmt: skip
        try:
            await asyncio.to_thread(
                self.shared.put, owner, session_id, message_id, frames, facts, record.family, counts
            )
        except StoreUnavailable as exc:
            reason = f"{exc.message}: the message was not kept; send it again later"
            code = UNAVAILABLE
        except KeyError:
            code, reason = "EXISTS", f"message id {message_id!r} was stored by another replica meanwhile"
        except ValueError as exc:
            code, reason = "TOO_LARGE", str(exc)
        else:
            return
        raise wire.WireError(code, reason)

    def _frames(self, encoded: EncodedKV, session_id: str, message_id: str) -> list[bytes]:
        """The message as the wire carries it: header, chunks, trailer (serialized protobuf)."""
        frames = wire.to_frames(
            encoded, session_id, message_id, self.lm.fingerprint, self.limits.max_chunk_bytes
        )
        return [wire.frame_bytes(f) for f in frames]

    def _unshare(self, owner: str, message_id: str) -> None:
        def forget() -> None:
            try:
                self.shared.discard(owner, message_id)
            except StoreUnavailable as exc:  # it expires with its TTL
                logger.warning("could not drop message %r from the shared store: %s", message_id, exc)

        asyncio.get_running_loop().run_in_executor(None, forget)

    # --- Ask ------------------------------------------------------------------------------------
    async def _context(self, who: Identity, session_id: str, message_id: str) -> ContextKV | None:
        local = self.store.get(who.name, session_id, message_id)
        try:
            entry = await asyncio.to_thread(self.shared.touch, who.name, message_id)
        except StoreUnavailable as exc:
            if local is not None:
                logger.warning("answering message %r from this replica's copy: %s", message_id, exc.message)
                return local
            raise _unavailable(exc, f"this replica holds no copy of message {message_id!r}") from None
        if entry is None:  # released, evicted or expired in the fleet: no replica answers any more
            if local is not None:
                self.store.discard(who.name, message_id)
            return None
        if session_id and entry.session_id != session_id:
            return None
        if local is not None:
            return local
        key = (who.name, message_id)
        lock, users = self._fetching.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:  # concurrent Asks about one message fetch and decode it once
                kv = self.store.get(who.name, session_id, message_id)
                if kv is None:
                    kv = await self._fetch(who, entry.session_id, entry.frames, message_id)
                return kv
        finally:
            users[0] -= 1
            if not users[0]:
                self._fetching.pop(key, None)

    async def _fetch(self, who: Identity, session_id: str, count: int, message_id: str) -> ContextKV | None:
        """Read, verify and decode the stored message, and keep it in this replica's LRU."""
        limit = self.stored_limits.max_chunks + 2  # header, chunks, trailer
        if not 3 <= count <= limit:
            raise Refused(
                grpc.StatusCode.DATA_LOSS, "CORRUPT",
                f"the shared store's copy of message {message_id!r} claims {count} frames (3 to {limit} are "
                "possible): refused",
            )  # fmt: skip
        try:
            frames = await asyncio.to_thread(self.shared.frames, who.name, message_id, count)
        except StoreUnavailable as exc:
            raise _unavailable(exc, f"message {message_id!r} could not be read") from None
        if frames is None:  # dropped meanwhile
            return None
        if (
            frames
            and wire.frame_kind(frames[0]) == "header"
            and wire.parse_frame(frames[0]).header.HasField("segment")
        ):
            return await self._fetch_segments(who, session_id, frames, message_id)
        asm = wire.Assembler(
            self.lm.fingerprint, self.lm.geometry, self.stored_limits, self.capabilities, self.profile_hashes
        )
        try:
            encoded = await asyncio.to_thread(self._verify, asm, frames, session_id, message_id)
        except wire.WireError as err:
            refused = _tampered(err, f"message {message_id!r}")
        else:
            return await self._keep(who, asm, encoded, session_id, message_id)
        raise refused

    @staticmethod
    def _verify(asm: wire.Assembler, frames: list[bytes], session_id: str, message_id: str) -> EncodedKV:
        """The frames through `asm` (WireError for anything a peer's message would be refused for), and
        the header's ids against where the message was stored."""
        frames.reverse()
        while frames:  # each frame is let go once fed
            asm.feed_raw(frames.pop())
        if (asm.session_id, asm.message_id) != (session_id, message_id):
            raise wire.WireError(
                "CORRUPT",
                f"its header names session {asm.session_id!r} and message {asm.message_id!r}, stored as "
                f"session {session_id!r} and message {message_id!r}",
            )
        encoded, _ = asm.finish()
        return encoded

    async def _fetch_segments(
        self, who: Identity, session_id: str, frames: list[bytes], message_id: str
    ) -> ContextKV:
        """A stored segmented context: every segment verified like a peer's message, then decoded (KV)
        or recomputed after the ones before it (text), in order, within this replica's memory budget."""
        try:
            segments = await asyncio.to_thread(self._verify_segments, frames, session_id, message_id)
        except wire.WireError as err:
            raise _tampered(err, f"context {message_id!r}") from None
        g, dtype = self.lm.geometry, self.lm.dtype
        total = segments[-1][0].total_length
        cost = 2 * (
            g.fp16_bytes(total) // 2 * torch.empty((), dtype=dtype).element_size() + 8 * total * g.num_layers
        )
        try:
            held = self.store.reserve(cost, who.name)
        except (StoreBusy, ValueError) as exc:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "BUSY", f"context {message_id!r}: {exc}"
            ) from None

        def rebuild() -> ContextKV:
            parts: list[ContextKV] = []
            for segment, encoded in segments:
                if segment.text:
                    prefix = join(parts, segment.start) if parts else None
                    ids = torch.tensor(segment.token_ids, dtype=torch.long)
                    with self.forwards:
                        parts.append(recompute(self.lm.model, prefix, ids, segment.start))
                else:
                    codec = Codec(encoded.recipe, g, self.profile_of(encoded))
                    decoded = codec.decode(encoded, self.lm.device, dtype)
                    parts.append(shifted(decoded, segment.start, segment.start + encoded.length))
            return join(parts, total)

        try:
            started = time.perf_counter()
            kv = await asyncio.to_thread(rebuild)
            self.store.put(who.name, session_id, message_id, kv, f"segments x{len(segments)}", held)
        except ValueError as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_LARGE", str(exc)) from None
        finally:
            held.release()  # a no-op once the store took it
        logger.info(
            "context %r of %s (%d segments) fetched from the shared store, verified and rebuilt in %.3f s",
            message_id, who.name, len(segments), time.perf_counter() - started,
        )  # fmt: skip
        return kv

    def _verify_segments(
        self, frames: list[bytes], session_id: str, message_id: str
    ) -> list[tuple[wire.Segment, EncodedKV]]:
        """Each segment's frames through a fresh Assembler (WireError as for a peer's message), and the
        segments against each other: this context's, numbered 0, 1, ..., contiguous, the last one last."""
        out: list[tuple[wire.Segment, EncodedKV]] = []
        asm: wire.Assembler | None = None
        frames.reverse()
        while frames:
            raw = frames.pop()
            if wire.frame_kind(raw) == "header":
                if asm is not None:
                    raise wire.WireError("CORRUPT", f"segment {len(out)} ends before its trailer")
                asm = wire.Assembler(
                    self.lm.fingerprint, self.lm.geometry, self.stored_limits, self.capabilities,
                    self.profile_hashes,
                )  # fmt: skip
            if asm is None:
                raise wire.WireError("CORRUPT", "a stored segment's frames come before its header")
            asm.feed_raw(raw)
            if asm.complete:
                encoded, _ = asm.finish()
                segment = asm.segment
                start = out[-1][0].start + out[-1][1].length if out else 0
                if (
                    segment is None or segment.stream_id != message_id or segment.index != len(out)
                    or segment.start != start or asm.session_id != session_id
                    or (out and segment.total_length != out[0][0].total_length) or (out and out[-1][0].last)
                ):  # fmt: skip
                    raise wire.WireError(
                        "CORRUPT", f"stored segment {len(out)} does not continue its context"
                    )
                out.append((segment, encoded))
                asm = None
        if asm is not None or not out or not out[-1][0].last:
            raise wire.WireError("TRUNCATED", "the stored context ends before its last segment")
        return out

    async def _keep(
        self, who: Identity, asm: wire.Assembler, encoded: EncodedKV, session_id: str, message_id: str
    ) -> ContextKV:
        call = _Call(who, asm)
        try:
            kv, decode_s = await self._decode(call, encoded)
            self.store.put(who.name, session_id, message_id, kv, encoded.recipe.name, call.decoding)
        except wire.WireError as err:
            raise Refused.of(err) from None
        except ValueError as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_LARGE", str(exc)) from None
        finally:
            if call.decoding is not None:
                call.decoding.release()  # a no-op once the store took it
        logger.info(
            "message %r of %s fetched from the shared store, verified and decoded in %.3f s",
            message_id, who.name, decode_s,
        )  # fmt: skip
        return kv

    # --- Release and stats ------------------------------------------------------------------------
    async def release(self, who: Identity, session_id: str, message_id: str, rpc: str = "Release") -> int:
        try:
            stored = await asyncio.to_thread(self.shared.discard, who.name, message_id, session_id)
        except StoreUnavailable as exc:
            self.metrics.record_error(UNAVAILABLE, rpc)
            raise _unavailable(exc, f"message {message_id!r} was not released; try again later") from None
        local = self.store.discard(who.name, message_id, session_id if stored is None else "")
        if stored is None and local is None:
            return await super().release(who, session_id, message_id, rpc)  # NOT_FOUND, counted
        logger.info("released message %r of %s in the fleet", message_id, who.name)
        return (stored or 0) + (local or 0)

    def _shared_settings(self, operator: bool) -> dict[str, Any]:
        return {
            "shared_store": True, "store_max_bytes": self.shared.max_bytes if operator else None,
            "store_max_bytes_per_identity": self.shared.owner_max_bytes,
        }  # fmt: skip

    def fleet_stats(self, owner: str | None) -> dict[str, Any]:
        try:
            return self.shared.stats(owner)
        except StoreUnavailable as exc:
            raise _unavailable(exc, "no fleet-wide figures now") from None


def open_shared(args: Any, guard_mode: str) -> SharedStore:
    """The SharedStore of kvlink-serve's flags (--store, --store-max-bytes, --session-ttl): one identity
    holds at most half of it when there are several (tenants, client certificates). Greets it once; a
    store that does not answer yet is only a warning (every call tries it again)."""
    share = args.store_max_bytes // 2 if guard_mode in ("tenants", "certificates") else None
    shared = SharedStore.from_url(check_url(args.store), args.session_ttl, args.store_max_bytes, share)
    try:
        logger.info("shared store %s: %s", shared.where, shared.ping())
    except StoreUnavailable as exc:
        logger.warning("%s; transfers are refused UNAVAILABLE until it answers", exc.message)
    return shared
