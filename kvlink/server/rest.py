"""The receiver's REST app (FastAPI, served by uvicorn in the kvlink-serve process).

    GET /healthz                 liveness/readiness only: {"status": "serving"} (always open)
    GET /v1/info                 the model, its fingerprint, the device, uptime, and who is asking
    GET /v1/stats                aggregates per codec config and per context-length bucket
                                 (kvlink.metrics.aggregate) + totals and the caller's cached contexts;
                                 an operator sees every identity's, the whole store and the calls
                                 (and the host and device memory, under "memory");
                                 ?scope=fleet adds "fleet": every replica's, from the shared store
    POST /v1/stats/memory/reset  operators: start new peaks of the receiver's host and device memory
    GET /v1/messages?limit=N     per-message records, newest first (the caller's own; an operator's: all)
    GET /v1/messages/{id}        one record (404 if unknown, or another identity's)
    POST /v1/messages/{id}/ask   a follow-up question about the caller's own context (as gRPC Ask)
    DELETE /v1/messages/{id}     free the caller's own context now (as gRPC Release); the record stays
    GET /v1/limits               what the receiver accepts and holds (to an operator, its global caps too)
    GET /metrics                 Prometheus text format (operators only: it covers every identity)
    GET /                        the operator's dashboard: a page (kvlink/server/static/) that reads the
                                 paths above with the token it is given; open, as are its files under
                                 /static/dashboard, which hold no data (CSP: its own files only)
    GET /docs, /redoc            Swagger UI and ReDoc, served from the installed package (no CDN)
    GET /openapi.json            OpenAPI 3.1, with a typed model of every response (kvlink.server.schemas)

The numbers come from the servicer's kvlink.metrics.MetricsRegistry; this
module only serves them (and mirrors them into Prometheus collectors, labelled
by config family, never by full config label: a label's values stay few).
Questions and releases go through the servicer's own `answer` and `release`,
under the same rules as gRPC: only the identity that sent a context asks about
it or frees it (another identity's attempt is 404, and frees nothing), the
question counts against the same call limits and takes its turn on the model
forward by forward.

Every path but /healthz and the dashboard's files is answered for an identity
(kvlink.server.guard): with tokens, it is the one whose `Authorization: Bearer <token>`
the request carries (401 without one, with a wrong one, or with two Authorization
headers, as on gRPC); without tokens, REST serves one anonymous operator (it binds
loopback by default).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvlink import wire
from kvlink.metrics import BYTE_CATEGORIES, AskRecord, MessageRecord
from kvlink.server import schemas
from kvlink.server.guard import Busy, Identity, Unauthorized
from kvlink.server.service import KVLinkService, Refused

OPEN_PATHS = frozenset({"/healthz"})
"""Paths served without the bearer token: the probes' endpoint (and the dashboard's, DASHBOARD_PATH)."""
STATIC_PATH = "/static/docs"
"""Where the Swagger UI and ReDoc assets are served from (the fastapi-offline package's copies)."""
DASHBOARD_PATH = "/static/dashboard"
"""Where the dashboard's script, style and icon are served from (kvlink/server/static/, package data)."""
DASHBOARD_ASSETS = Path(__file__).parent / "static"
DASHBOARD_HEADERS = {
    # Its own files only: no inline script or style, no other host; fetch() to this origin alone.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""Headers of the dashboard's page and files."""

_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def _http_status(status: grpc.StatusCode, code: str) -> int:
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 413 if code == "TOO_LARGE" else 429
    return _HTTP_STATUS.get(status, 500)


def docs_assets() -> Path | None:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PrometheusExporter:
    """kvlink.metrics listener that keeps Prometheus counters and histograms (own registry per app)."""

    def __init__(self, service: KVLinkService) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Labels of bounded cardinality: the config family (kvlink.metrics.config_family) and the
        # context-length bucket, never the full config label (retention, groups, ... are unbounded).
        self.messages = Counter(
            "kvlink_messages", "Messages received completely", ["family", "length"], registry=r
        )
        self.bytes = Counter(
            "kvlink_wire_bytes",
            "Wire bytes of received messages by category",
            ["category", "family"],
            registry=r,
        )
        self.fp16_bytes = Counter(
            "kvlink_fp16_bytes",
            "FP16 size of the full context KV of received messages",
            ["family"],
            registry=r,
        )
        self.retransmits = Counter("kvlink_retransmits", "Chunks received more than once", registry=r)
        self.questions = Counter("kvlink_questions", "Questions answered", ["family"], registry=r)
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
        family = record.family
        self.messages.labels(family, record.length_bucket).inc()
        for category in BYTE_CATEGORIES:
            self.bytes.labels(category, family).inc(getattr(record, category))
        self.fp16_bytes.labels(family).inc(record.fp16_bytes)
        self.retransmits.inc(record.retransmits)
        if "decode_s" in record.timings:
            self.decode_seconds.observe(record.timings["decode_s"])
        if "receive_s" in record.timings:
            self.receive_seconds.observe(record.timings["receive_s"])

    def on_answer(self, record: MessageRecord, ask: AskRecord) -> None:
        self.questions.labels(record.family).inc()
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
        description="Bandwidth and accuracy statistics of the KV caches this receiver was sent, and "
        "follow-up questions about them.",
        docs_url=None,
        redoc_url=None,
    )
    exporter = PrometheusExporter(service)
    service.metrics.add_listener(exporter)
    app.state.exporter = exporter
    guard = service.guard
    _mount_docs(app)
    _mount_dashboard(app)

    @app.middleware("http")
    async def identify(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        # The dashboard's page and files hold no data: its script asks the REST paths with the token.
        if path == "/" or path.startswith(DASHBOARD_PATH + "/"):
            response = await call_next(request)
            response.headers.update(DASHBOARD_HEADERS)
            return response
        # The docs' scripts and styles are public files of a package (a browser sends no token for them).
        if path in OPEN_PATHS or path.startswith(STATIC_PATH + "/"):
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

    @app.get("/healthz", summary="Liveness and readiness", response_model=schemas.Health)
    def healthz() -> JSONResponse:
        """Open to probes, so it says nothing but whether the receiver serves."""
        status = "serving" if service.serving else "stopping"
        return JSONResponse({"status": status}, status_code=200 if service.serving else 503)

    @app.get(
        "/v1/info", summary="The receiver's model and the caller's identity", response_model=schemas.Info
    )
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

    @app.get(
        "/v1/stats", summary="Aggregates per codec config and per context length",
        response_model=schemas.Stats, response_model_exclude_unset=True,
    )  # fmt: skip
    def stats(
        request: Request,
        scope: str = Query(
            "local", pattern="^(local|fleet)$", description="fleet: add the fleet's aggregates"
        ),
    ) -> dict[str, Any]:
        """Messages, bytes by category (payload / metadata / framing / signaling), compression ratio vs
        FP16, timings (mean/p50/p95 per stage) and F1/EM means per codec config label and per
        context-length bucket, plus totals: of the caller's messages, or of everyone's for an
        operator (with the store and the calls). scope=fleet adds "fleet": the aggregates of every
        replica sharing this receiver's store (--store), from the store itself."""
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
        if scope == "fleet":
            try:
                out["fleet"] = service.fleet_stats(_scope(who))
            except Refused as refused:
                raise HTTPException(_http_status(refused.status, refused.code), refused.message) from None
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

    @app.get(
        "/v1/messages", summary="Per-message records, newest first", response_model=list[schemas.Message]
    )
    def messages(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        return [r.as_dict() for r in service.metrics.messages(limit, owner=_scope(_who(request)))]

    @app.get(
        "/v1/messages/{message_id}", summary="One message's record", response_model=schemas.Message,
        responses={404: {"model": schemas.Problem}},
    )  # fmt: skip
    def message(request: Request, message_id: str) -> dict[str, Any]:
        record = service.metrics.get(message_id, owner=_scope(_who(request)))
        if record is None:
            raise HTTPException(status_code=404, detail=f"no record of message {message_id[:128]!r}")
        return record.as_dict()

    @app.post(
        "/v1/messages/{message_id}/ask", summary="Ask again about a context the caller sent",
        response_model=schemas.AnswerView,
        responses={code: {"model": schemas.Problem} for code in (400, 404, 413, 429)},
    )  # fmt: skip
    async def ask(request: Request, message_id: str, body: schemas.AskRequest) -> dict[str, Any]:
        """The receiver answers from the transferred cache alone, as for gRPC Ask: only the identity that
        sent the context may ask (another's message is 404), with the same limits and generation options."""
        who = _who(request)
        question = wire.Ask(
            body.session_id, message_id, body.question, body.max_new_tokens, tuple(body.reference_answers),
            {}, body.temperature, body.top_p, tuple(body.stop),
        )  # fmt: skip
        try:  # the gRPC request's checks, to the letter
            question = wire.ask_from_proto(wire.ask_to_proto(question), service.limits)
        except wire.WireError as err:
            service.metrics.record_error(err.code, "REST")
            raise HTTPException(_http_status(err.status_code, err.code), err.message) from None
        try:
            slot = guard.acquire(f"rest:{request.client.host if request.client else '?'}", who)
        except Busy as busy:
            service.metrics.record_error("BUSY", "REST")
            raise HTTPException(429, busy.message) from None
        service.asks_in_flight += 1
        try:
            answer = await service.answer(who, question, rpc="REST")
        except Refused as refused:
            raise HTTPException(_http_status(refused.status, refused.code), refused.message) from None
        finally:
            service.asks_in_flight -= 1
            slot.release()
        return {
            "message_id": answer.message_id, "answer": answer.text, "token_ids": list(answer.token_ids),
            "finish_reason": answer.finish_reason, "timings": answer.timings, "f1": answer.f1,
            "exact_match": answer.exact_match,
        }  # fmt: skip

    @app.delete(
        "/v1/messages/{message_id}", summary="Free a context the caller sent", response_model=schemas.Released,
        responses={404: {"model": schemas.Problem}},
    )  # fmt: skip
    async def release(
        request: Request,
        message_id: str,
        session_id: str = Query("", description="optional: the message id alone names the context"),
    ) -> dict[str, Any]:
        """The decoded context is dropped now instead of at its TTL (later questions get 404); its record
        stays in /v1/messages. Only the identity that sent it may free it: another's is 404."""
        try:
            wire.release_from_proto(
                wire.release_to_proto(wire.Release(session_id, message_id)), service.limits
            )
            freed = await service.release(_who(request), session_id, message_id, rpc="REST")
        except wire.WireError as err:
            raise HTTPException(_http_status(err.status_code, err.code), err.message) from None
        except Refused as refused:
            raise HTTPException(_http_status(refused.status, refused.code), refused.message) from None
        return {"message_id": message_id, "freed_bytes": freed}

    @app.get("/v1/limits", summary="What the receiver accepts and holds", response_model=schemas.Limits)
    def limits(request: Request) -> dict[str, Any]:
        """Its limit flags: those that bind every caller (message size, context and answer lengths,
        timeouts, one identity's share of the decoded contexts); to an operator, the receiver-wide caps
        too. shared_store says whether /v1/stats?scope=fleet answers."""
        return service.limit_settings(_who(request).operator)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        if not _who(request).operator:
            raise HTTPException(status_code=403, detail="/metrics covers every identity: an operator's token")
        return Response(generate_latest(exporter.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _mount_dashboard(app: FastAPI) -> None:
    """The operator's page at / and its files: a plain script that reads the REST paths with the
    bearer token the operator gives it (in the URL fragment, or typed), so serving them needs none."""
    app.mount(DASHBOARD_PATH, StaticFiles(directory=DASHBOARD_ASSETS), name="dashboard-assets")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_ASSETS / "index.html", media_type="text/html")


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, whose scripts, styles and icon come from this server
    (the installed fastapi-offline package), so the pages work without the internet; without that
    package, /docs says how to get it and /openapi.json still serves the document."""
    assets = docs_assets()
    openapi = app.openapi_url or "/openapi.json"
    if assets is None:

        @app.get("/docs", include_in_schema=False)
        def no_docs() -> HTMLResponse:
            return HTMLResponse(
                "<p>The API documentation pages need the fastapi-offline package (pip install "
                f"fastapi-offline); the OpenAPI document is at <a href='{openapi}'>{openapi}</a>.</p>"
            )

        return
    app.mount(STATIC_PATH, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi, title=f"{app.title}: API", oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{STATIC_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_PATH}/favicon.png",
            # No validator badge: it would fetch from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )  # fmt: skip

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi, title=f"{app.title}: API", redoc_js_url=f"{STATIC_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC_PATH}/favicon.png", with_google_fonts=False,
        )  # fmt: skip
