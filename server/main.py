"""kvlink-serve: the receiver. gRPC (kvlink.v1.KVLink + grpc.health.v1) and the REST stats app, one process.

    kvlink-serve --model smollm2-135m-instruct --port 50051 --rest-port 8080 --device cuda

Loads the model (it must be the sender's: the fingerprint is compared in Hello
and in every message header), then serves until SIGTERM/SIGINT: it stops
accepting calls, lets the calls in flight finish within --grace seconds, and
exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:  # torch, grpc and the library are imported when the server starts, not for --help
    from server.store import SessionStore

logger = logging.getLogger("kvlink.serve")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvlink-serve",
        description="Receive compressed KV caches over gRPC and answer questions from them; "
        "REST statistics on --rest-port.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="model alias, HF id or local path (the sender's); default: the embedded model",
    )
    p.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--rest-host", default="127.0.0.1", help="REST listen address")
    p.add_argument("--rest-port", type=int, default=8080, help="REST port")
    p.add_argument(
        "--device", default="cpu", help="where the model runs and caches are decoded: cpu, cuda, cuda:1"
    )
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="model dtype")
    p.add_argument(
        "--session-ttl",
        type=_positive_float,
        default=600.0,
        help="seconds a context is kept after its last use",
    )
    p.add_argument(
        "--max-cached-bytes",
        type=_positive_int,
        default=2 << 30,
        help="memory cap of decoded contexts (LRU eviction)",
    )
    p.add_argument(
        "--max-message-bytes", type=_positive_int, default=512 << 20,
        help="largest message (declared chunk data + positions) accepted",
    )  # fmt: skip
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=64,
        help="longest answer (longer requests are clamped)",
    )
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds calls in flight get to finish at shutdown"
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return p


class _RestServer(uvicorn.Server):
    """uvicorn without its own signal handling: kvlink-serve stops gRPC and REST together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from kvlink import wire
    from kvlink.metrics import MetricsRegistry
    from kvlink.models import load_model
    from server.rest import create_app
    from server.service import KVLinkService
    from server.store import SessionStore

    limits = wire.WireLimits(
        max_message_bytes=args.max_message_bytes,
        max_chunk_bytes=min(wire.WireLimits().max_chunk_bytes, args.max_message_bytes),
    )
    # Bind REST first so that a port in use fails before the model loads.
    rest_sock = _listen(args.rest_host, args.rest_port)
    logger.info("loading model %s on %s", args.model or "(embedded)", args.device)
    lm = await asyncio.to_thread(
        load_model, args.model, args.device, None if args.dtype == "auto" else args.dtype
    )
    store = SessionStore(ttl_s=args.session_ttl, max_bytes=args.max_cached_bytes)
    service = KVLinkService(lm, store, MetricsRegistry(), limits, max_new_tokens=args.max_new_tokens)
    logger.info("warmed up in %.1f s", await asyncio.to_thread(service.warm_up))

    server = grpc.aio.server(options=limits.grpc_options())
    server.add_generic_rpc_handlers((wire.raw_rpc_handler(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    for name in ("", wire.SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    rest = _RestServer(
        uvicorn.Config(
            create_app(service), log_config=None, log_level=args.log_level, access_log=False, lifespan="off"
        )
    )
    rest_task = asyncio.create_task(rest.serve(sockets=[rest_sock]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    purge = asyncio.create_task(_purge_loop(store, min(args.session_ttl / 4, 30.0)))
    logger.info(
        "kvlink-serve ready: model %s (fingerprint %s) on %s; gRPC %s:%d; REST http://%s:%d (docs at /docs)",
        lm.name, lm.fingerprint[:12], lm.device, args.host, port, args.rest_host, rest_sock.getsockname()[1],
    )  # fmt: skip

    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, rest_task}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if rest_task.done() and not stop.is_set():
        logger.error("the REST server stopped unexpectedly: %r", rest_task.exception())
        status = 1
    logger.info(
        "shutting down: no new calls; %d transfer(s) in flight get %.0f s", service.in_flight, args.grace
    )
    service.serving = False
    await health_servicer.enter_graceful_shutdown()
    await server.stop(args.grace)
    rest.should_exit = True
    with contextlib.suppress(Exception):
        await rest_task
    purge.cancel()
    stop_task.cancel()
    logger.info("kvlink-serve stopped")
    return status


async def _purge_loop(store: SessionStore, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        n = store.purge_expired()
        if n:
            logger.info("expired %d context(s)", n)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(args))
    except (OSError, RuntimeError, ValueError) as exc:  # a port in use, an unknown model or device, ...
        print(f"kvlink-serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
