"""The receiver's REST app (FastAPI, served by uvicorn in the kvlink-serve process).

    GET /healthz                 liveness/readiness only: {"status": "serving"} (always open)
    GET /v1/info                 the model, its fingerprint, the device, uptime, and who is asking
    GET /v1/stats                aggregates per codec config (kvlink.metrics.aggregate) + totals and
                                 the caller's cached contexts; an operator sees every identity's,
                                 the whole session store and the calls in progress
    POST /v1/stats/memory/reset  operators: start new peaks of the receiver's host and device memory
                                 (whose figures /v1/stats shows an operator under "memory")
    GET /v1/messages?limit=N     per-message records, newest first (the caller's own; an operator's: all)
    GET /v1/messages/{id}        one record (404 if unknown, or another identity's)
    GET /metrics                 Prometheus text format (operators only: it covers every identity)
    GET /docs, /openapi.json     OpenAPI (FastAPI's defaults)

The numbers come from the servicer's kvlink.metrics.MetricsRegistry; this
module only serves them (and mirrors them into Prometheus collectors).

Every path but /healthz is answered for an identity (server.guard): with tokens,
it is the one whose `Authorization: Bearer <token>` the request carries (401
without one, with a wrong one, or with two Authorization headers, as on gRPC);
without tokens, REST serves one anonymous operator (it binds loopback by default).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvlink.metrics import BYTE_CATEGORIES, AskRecord, MessageRecord
from server.guard import Identity, Unauthorized
from server.service import KVLinkService

OPEN_PATHS = frozenset({"/healthz"})
"""Paths served without the bearer token: the probes' endpoint."""

_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PrometheusExporter:
    """kvlink.metrics listener that keeps Prometheus counters and histograms (own registry per app)."""

    def __init__(self, service: KVLinkService) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("kvlink_messages", "Messages received completely", ["config"], registry=r)
        self.bytes = Counter(
            "kvlink_wire_bytes",
            "Wire bytes of received messages by category",
            ["category", "config"],
            registry=r,
        )
        self.fp16_bytes = Counter(
            "kvlink_fp16_bytes",
            "FP16 size of the full context KV of received messages",
            ["config"],
            registry=r,
        )
        self.retransmits = Counter("kvlink_retransmits", "Chunks received more than once", registry=r)
        self.questions = Counter("kvlink_questions", "Questions answered", ["config"], registry=r)
        self.errors = Counter("kvlink_errors", "Refused requests by error code", ["code", "rpc"], registry=r)
        self.decode_seconds = Histogram(
            "kvlink_decode_seconds", "Receiver decode time per message", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.receive_seconds = Histogram(
            "kvlink_receive_seconds", "First to last frame of a message", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.answer_seconds = Histogram(
            "kvlink_answer_seconds", "Answer time per question", buckets=_SECONDS_BUCKETS, registry=r
        )
        cached = Gauge("kvlink_cached_messages", "Decoded contexts held", registry=r)
        cached.set_function(lambda: service.store.stats().messages)
        cached_bytes = Gauge("kvlink_cached_bytes", "Bytes of decoded contexts held", registry=r)
        cached_bytes.set_function(lambda: service.store.stats().bytes)
        in_flight = Gauge("kvlink_transfers_in_flight", "Transfer calls in progress", registry=r)
        in_flight.set_function(lambda: service.in_flight)
        asks = Gauge("kvlink_asks_in_flight", "Ask calls in progress", registry=r)
        asks.set_function(lambda: service.asks_in_flight)
        buffered = Gauge(
            "kvlink_buffered_bytes", "Chunk data held by transfers in progress (not yet decoded)", registry=r
        )
        buffered.set_function(lambda: service.call_stats()["buffered_bytes"] or 0)

    def on_message(self, record: MessageRecord) -> None:
        label = record.config_label
        self.messages.labels(label).inc()
        for category in BYTE_CATEGORIES:
            self.bytes.labels(category, label).inc(getattr(record, category))
        self.fp16_bytes.labels(label).inc(record.fp16_bytes)
        self.retransmits.inc(record.retransmits)
        if "decode_s" in record.timings:
            self.decode_seconds.observe(record.timings["decode_s"])
        if "receive_s" in record.timings:
            self.receive_seconds.observe(record.timings["receive_s"])

    def on_answer(self, record: MessageRecord, ask: AskRecord) -> None:
        self.questions.labels(record.config_label).inc()
        if "answer_s" in ask.timings:
            self.answer_seconds.observe(ask.timings["answer_s"])

    def on_error(self, code: str, rpc: str) -> None:
        self.errors.labels(code, rpc).inc()


def _who(request: Request) -> Identity:
    return request.state.who  # type: ignore[no-any-return]


def _scope(who: Identity) -> str | None:
    """The owner whose records a caller sees: its own, or everyone's (None) for an operator."""
    return None if who.operator else who.name


def create_app(service: KVLinkService) -> FastAPI:
    """The REST app over a servicer's metrics and session store."""
    app = FastAPI(
        title="kvlink receiver",
        version="1.0",
        description="Bandwidth and accuracy statistics of the KV caches this receiver was sent.",
    )
    exporter = PrometheusExporter(service)
    service.metrics.add_listener(exporter)
    app.state.exporter = exporter
    guard = service.guard

    @app.middleware("http")
    async def identify(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        try:
            request.state.who = guard.identify_bearer(request.headers.getlist("authorization"))
        except Unauthorized as exc:
            service.metrics.record_error("UNAUTHENTICATED", "REST")
            return JSONResponse(
                {"detail": f"{exc.message}: send one 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="kvlink"'},
            )
        return await call_next(request)

    @app.get("/healthz", summary="Liveness and readiness")
    def healthz() -> JSONResponse:
        """Open to probes, so it says nothing but whether the receiver serves."""
        status = "serving" if service.serving else "stopping"
        return JSONResponse({"status": status}, status_code=200 if service.serving else 503)

    @app.get("/v1/info", summary="The receiver's model and the caller's identity")
    def info(request: Request) -> dict[str, Any]:
        who = _who(request)
        store = service.store.stats(_scope(who))
        return {
            "status": "serving" if service.serving else "stopping",
            "model": service.lm.name, "fingerprint": service.lm.fingerprint,
            "device": str(service.lm.device), "uptime_s": time.time() - service.started,
            "identity": who.name, "operator": who.operator, "auth": guard.mode,
            "sessions": store.sessions, "cached_messages": store.messages, "cached_bytes": store.bytes,
        }  # fmt: skip

    @app.get("/v1/stats", summary="Aggregates per codec config")
    def stats(request: Request) -> dict[str, Any]:
        """Messages, bytes by category (payload / metadata / framing / signaling), compression ratio vs
        FP16, timings (mean/p50/p95 per stage) and F1/EM means per codec config label, plus totals: of
        the caller's messages, or of everyone's for an operator (with the store and the calls)."""
        who = _who(request)
        out = service.metrics.stats(_scope(who))
        store = service.store.stats(_scope(who))
        out["store"] = {"sessions": store.sessions, "messages": store.messages, "bytes": store.bytes}
        if who.operator:
            out["store"].update(
                peak_bytes=store.peak_bytes, max_bytes=store.max_bytes, ttl_s=store.ttl_s, evicted=store.evicted,
                expired=store.expired, reserved_bytes=store.reserved_bytes, refused_busy=store.refused_busy,
            )  # fmt: skip
            out["calls"] = service.call_stats()
            out["memory"] = service.memory_stats()
        return out

    @app.post("/v1/stats/memory/reset", summary="Start new memory peaks (operators)")
    def reset_memory(request: Request) -> dict[str, Any]:
        """Reset the peaks of the receiver's resident memory and of its device allocator, so that a
        benchmark reads one message's peak in /v1/stats afterwards; returns the figures right after."""
        if not _who(request).operator:
            raise HTTPException(
                status_code=403, detail="memory figures cover every identity: an operator's token"
            )
        return service.reset_memory_peaks()

    @app.get("/v1/messages", summary="Per-message records, newest first")
    def messages(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        return [r.as_dict() for r in service.metrics.messages(limit, owner=_scope(_who(request)))]

    @app.get("/v1/messages/{message_id}", summary="One message's record")
    def message(request: Request, message_id: str) -> dict[str, Any]:
        record = service.metrics.get(message_id, owner=_scope(_who(request)))
        if record is None:
            raise HTTPException(status_code=404, detail=f"no record of message {message_id[:128]!r}")
        return record.as_dict()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        if not _who(request).operator:
            raise HTTPException(status_code=403, detail="/metrics covers every identity: an operator's token")
        return Response(generate_latest(exporter.registry), media_type=CONTENT_TYPE_LATEST)

    return app
