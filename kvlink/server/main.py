"""kvlink-serve: the receiver. gRPC (kvlink.v2.KVLink + grpc.health.v1) and the REST stats app, one process.

    kvlink-serve --model smollm2-135m-instruct --port 50051 --rest-port 8080 --device cuda
    kvlink-serve --tls-cert tls.crt --tls-key tls.key [--tls-client-ca ca.crt] \
                 --auth-token-file token --health-port 50052

Checks its flags, the device, the model's files and that its ports are free
(exit 2 for a bad flag, device or model, 1 for a port in use, each in one line,
before anything loads), binds its ports exclusively, loads the model (it must
be the sender's: the fingerprint is compared in Hello and in every message
header), then serves until SIGTERM/SIGINT: it stops accepting calls, lets the
calls in flight finish within --grace seconds, and exits 0.

Settings: every flag can also come from an environment variable KVLINK_<FLAG>
(`--max-cached-bytes` is KVLINK_MAX_CACHED_BYTES) or from a TOML file given by
--config (or $KVLINK_CONFIG), e.g. `max-cached-bytes = "4GiB"`; a flag wins over
the environment, which wins over the file (kvlink.cli). Byte sizes take units:
4GiB, 512MiB, 1_000_000. An HF model id must be in the local Hugging Face cache
unless --download is given.

Security: gRPC is TLS when --tls-cert/--tls-key are given, mutual TLS when
--tls-client-ca is too; a bearer token (--auth-token-file, or the environment
variable KVLINK_AUTH_TOKEN), or one token per tenant (--tenants-file), is then
required on every KVLink call and REST path but /healthz. Each tenant (or, under
mutual TLS without tokens, each client certificate's common name) owns the
messages it sends and sees only its own (kvlink.server.guard has the isolation model).
Both listeners bind 127.0.0.1 unless --host/--rest-host say otherwise.
--health-port adds a plaintext listener that serves grpc.health.v1 and nothing
else (the kubelet's gRPC probe cannot speak TLS). A fleet's store URL (--store,
kvlink.server.fleet) that holds a password is read from --store-url-file (or
$KVLINK_STORE), not the command line. No secret is ever logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from kvlink.cli import HelpFormatter, configure_logging, format_size, parse_size, parse_with_settings

if TYPE_CHECKING:  # torch, grpc and the library are imported when the server starts, not for --help
    import grpc
    import torch

    from kvlink import wire
    from kvlink.server.guard import Guard, Identity
    from kvlink.server.store import SessionStore

logger = logging.getLogger("kvlink.serve")

LOG_LEVELS = ("debug", "info", "warning", "error")
TOKEN_ENV = "KVLINK_AUTH_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (underscores allowed, as in 4_096)."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _bytes_or_auto(text: str) -> int | None:
    """A size (kvlink.cli.parse_size: 4GiB, 512MiB, bytes), or 'auto' (None: sized from the machine at
    start-up, see auto_limits)."""
    if str(text).strip().lower() == "auto":
        return None
    return parse_size(text)


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
        formatter_class=HelpFormatter,
        epilog="Every flag can also be set by an environment variable KVLINK_<FLAG> (e.g. "
        'KVLINK_MAX_CACHED_BYTES=4GiB) or in the --config file (max-cached-bytes = "4GiB"); '
        "precedence: flag, environment, file, default.",
    )
    p.add_argument(
        "--config", metavar="FILE", default=None,
        help="TOML file of settings: keys are the flags without dashes, e.g. port = 50051 (default: "
        "$KVLINK_CONFIG if set)",
    )  # fmt: skip
    p.add_argument(
        "--model",
        default=None,
        help="model alias, HF id or local path (the sender's; default: the embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--download", action="store_true",
        help="fetch an HF model id from the Hub when it is not in the local cache (off: fail at once)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument(
        "--rest-host", default="127.0.0.1",
        help="REST listen address; anything but loopback exposes the stats (use --auth-token-file)",
    )  # fmt: skip
    p.add_argument("--rest-port", type=int, default=8080, help="REST port")
    p.add_argument(
        "--health-port", type=int, default=None,
        help="also serve grpc.health.v1 (and nothing else) in plaintext on this port, on --host: "
        "for probes that cannot speak TLS, such as the kubelet's",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu", help="where the model runs and caches are decoded: cpu, cuda, cuda:1"
    )
    p.add_argument(
        "--profile", metavar="FILE", action="append", default=[],
        help="a calibrated profile of the model (.safetensors; repeatable): a low-rank projection "
        "(kvlink.lowrank), cross-layer predictors (kvlink.predict, the xpred stage) or a residual profile "
        "(kvlink.residual, the pca stage; give its predictors too): messages that use it are decoded, and "
        "its hash is advertised",
    )  # fmt: skip
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="model dtype")

    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", metavar="PEM", default=None, help="gRPC server certificate chain: TLS on")
    sec.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")
    sec.add_argument(
        "--tls-client-ca", metavar="PEM", default=None,
        help="mutual TLS: senders must present a certificate signed by this CA",
    )  # fmt: skip
    sec.add_argument(
        "--auth-token-file", metavar="FILE", default=None,
        help=f"bearer token senders must present (gRPC metadata 'authorization: Bearer ...', REST "
        f"Authorization header; /healthz stays open); default: ${TOKEN_ENV} if set, else no token",
    )  # fmt: skip
    sec.add_argument(
        "--tenants-file", metavar="FILE", default=None,
        help="one bearer token per tenant: lines 'NAME TOKEN' or 'NAME TOKEN operator'; each tenant "
        "owns and sees only its own messages, an operator sees all (instead of --auth-token-file)",
    )  # fmt: skip
    sec.add_argument(
        "--operator", metavar="NAME", action="append", default=[],
        help="under mutual TLS without tokens, a client certificate common name that may see every "
        "identity's messages (repeatable)",
    )  # fmt: skip

    lim = p.add_argument_group(
        "limits (a request past one gets a specific gRPC error; nothing else is affected)"
    )
    lim.add_argument(
        "--max-message-bytes", type=_bytes_or_auto, default=None, metavar="SIZE|auto",
        help="largest message (declared chunk data + positions), refused from its header before "
        "anything is allocated (RESOURCE_EXHAUSTED, TOO_LARGE); auto (the default): the smaller of "
        "--max-cached-bytes and a quarter of the host's available memory, at least 512 MiB",
    )  # fmt: skip
    lim.add_argument(
        "--max-concurrent-sessions", type=_positive_int, default=64,
        help="Transfer and Ask calls in progress over all senders; one more is refused "
        "(RESOURCE_EXHAUSTED, BUSY)",
    )  # fmt: skip
    lim.add_argument(
        "--per-peer-concurrency", type=_positive_int, default=4,
        help="Transfer and Ask calls in progress from one sender (one identity with --tenants-file or "
        "client certificates, else one client address); one more is refused (RESOURCE_EXHAUSTED, BUSY)",
    )  # fmt: skip
    lim.add_argument(
        "--max-cached-bytes", type=_bytes_or_auto, default=None, metavar="SIZE|auto",
        help="memory cap of decoded contexts kept for questions and of the decodes in flight: least "
        "recently used contexts are evicted (a later Ask gets NOT_FOUND); a context larger than the cap "
        "is refused; auto (the default): 70%% of the device memory left free once the model is loaded "
        "(--device cuda), half of the host's available memory on the CPU",
    )  # fmt: skip
    lim.add_argument(
        "--max-cached-bytes-per-identity", type=parse_size, metavar="SIZE", default=None,
        help="what one identity's contexts (and its decodes in flight) may hold of --max-cached-bytes: "
        "past it, its own least recently used contexts go first; default: half of it with several "
        "identities (--tenants-file, client certificates), all of it otherwise",
    )  # fmt: skip
    lim.add_argument(
        "--session-ttl", type=_positive_float, default=600.0,
        help="seconds a decoded context is kept after its last use",
    )  # fmt: skip
    lim.add_argument(
        "--max-new-tokens", type=_positive_int, default=64,
        help="longest answer in tokens (longer requests are clamped)",
    )  # fmt: skip
    lim.add_argument(
        "--stall-timeout", type=_positive_float, default=30.0,
        help="seconds a Transfer may go without a frame before it is dropped "
        "(DEADLINE_EXCEEDED, STALLED)",
    )  # fmt: skip
    lim.add_argument(
        "--message-deadline", type=_positive_float, default=600.0,
        help="seconds a Transfer may take from its first frame to its last, however it trickles "
        "(DEADLINE_EXCEEDED, DEADLINE)",
    )  # fmt: skip
    lim.add_argument(
        "--max-question-tokens", type=_positive_int, default=2048,
        help="longest question in tokens (RESOURCE_EXHAUSTED, TOO_LARGE)",
    )  # fmt: skip
    lim.add_argument(
        "--max-buffered-bytes", type=parse_size, metavar="SIZE", default=None,
        help="chunk data all transfers in flight may hold together, reserved from each header; one more "
        "is refused (RESOURCE_EXHAUSTED, BUSY); default: 2 x --max-message-bytes",
    )  # fmt: skip
    seg = p.add_argument_group("segmented contexts (kvlink.stream, kvlink-send --goal ttft)")
    seg.add_argument(
        "--no-text-segments", action="store_true",
        help="refuse text segments (UNKNOWN_CODEC): senders then send every segment as KV, and this "
        "receiver's model never spends time recomputing a context",
    )  # fmt: skip
    seg.add_argument(
        "--cost-probe-tokens", type=_nonnegative_int, default=4096, metavar="N",
        help="at start-up, measure this receiver's prefill rate at contexts of up to N tokens (capped by "
        "the model's positions), its decode rate of each KV format senders would choose (FP16, INT4, "
        "the quality table's) and its fixed cost of one segment, and advertise them in its Welcome for "
        "senders that plan time to first token; 0: measure nothing (such senders then assume defaults)",
    )  # fmt: skip
    fleet = p.add_argument_group("a fleet of receivers sharing one store (kvlink.server.fleet)")
    fleet.add_argument(
        "--store", metavar="URL", default=None,
        help="redis://[[USER]:PASSWORD@]HOST:PORT/DB (rediss:// for TLS) of a Redis or Valkey server the "
        "replicas share: every verified message is kept there too (its wire form, for --session-ttl "
        "after its last use) and any replica answers about it; default: this process's memory only. "
        "A password belongs in --store-url-file or $KVLINK_STORE, not on the command line",
    )  # fmt: skip
    fleet.add_argument(
        "--store-url-file", metavar="FILE", default=None,
        help="read --store's URL from this file (one line), so that its password stays off the command "
        "line and out of the environment: a mounted Kubernetes or Compose secret (instead of --store)",
    )  # fmt: skip
    fleet.add_argument(
        "--store-max-bytes", type=parse_size, metavar="SIZE", default=4 << 30,
        help="stored bytes the whole fleet keeps in --store: least recently used messages are evicted "
        "past it, and one identity holds at most half of it with several identities; give every "
        "replica the same value",
    )  # fmt: skip
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds calls in flight get to finish at shutdown"
    )
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info",
        help="of the log on stderr; progress bars (model loading) show at info or debug, on a terminal",
    )  # fmt: skip
    return p


@dataclass(frozen=True, repr=False)
class Security:
    """The security flags, read and checked before the model loads. repr() shows no secret."""

    cert: bytes | None = None
    key: bytes | None = None
    client_ca: bytes | None = None
    token: str | None = None
    token_source: str = ""
    tenants: dict[str, Identity] | None = None  # token -> tenant, from --tenants-file
    operators: tuple[str, ...] = ()

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def tokens(self) -> bool:
        """Whether callers present bearer tokens (one, or one per tenant)."""
        return bool(self.token or self.tenants)

    def describe(self) -> str:
        if self.tenants:
            return f"{len(self.tenants)} tenant tokens from --tenants-file"
        if self.token:
            return f"bearer token from {self.token_source}"
        return "client certificate names" if self.client_ca else "no token"

    def guard(self, max_calls: int, per_peer: int) -> Guard:
        from kvlink.server.guard import Guard

        return Guard(
            self.token, max_calls, per_peer, tenants=self.tenants, client_certs=self.client_ca is not None,
            operators=self.operators,
        )  # fmt: skip

    def __repr__(self) -> str:
        mode = "mutual TLS" if self.client_ca else "TLS" if self.tls else "plaintext"
        return f"Security({mode}, {self.describe()})"

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """gRPC server credentials (None: plaintext)."""
        if self.cert is None or self.key is None:
            return None
        import grpc

        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )  # fmt: skip


def _read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path!r} is not a PEM file")
    return data


def check_token(token: str, source: str) -> str:
    """A usable bearer token (surrounding whitespace dropped) or ValueError, which never quotes it."""
    token = token.strip()
    if not token:
        raise ValueError(f"the bearer token from {source} is empty")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ValueError(f"the bearer token from {source} must be printable ASCII without spaces")
    return token


def load_security(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Security:
    """Read the TLS files and the token named by the flags (or $KVLINK_AUTH_TOKEN); ValueError says what is
    wrong without quoting any secret."""
    environ = dict(os.environ) if environ is None else environ
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    cert = _read_pem(args.tls_cert, "--tls-cert") if args.tls_cert else None
    key = _read_pem(args.tls_key, "--tls-key") if args.tls_key else None
    client_ca = _read_pem(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None
    token, source = None, ""
    if args.tenants_file and (args.auth_token_file or TOKEN_ENV in environ):
        raise ValueError(
            f"--tenants-file gives every tenant its own token: drop --auth-token-file and ${TOKEN_ENV}"
        )
    tenants = None
    if args.tenants_file:
        from kvlink.server.guard import read_tenants

        tenants = read_tenants(args.tenants_file)
    if args.operator and not args.tls_client_ca:
        raise ValueError("--operator names client certificates: it needs --tls-client-ca (mutual TLS)")
    if args.auth_token_file:
        source = "--auth-token-file"
        try:
            text = Path(args.auth_token_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not text"
            raise ValueError(f"cannot read --auth-token-file {args.auth_token_file!r}: {why}") from None
        token = check_token(text, source)
    elif TOKEN_ENV in environ:
        source = f"${TOKEN_ENV}"
        token = check_token(environ[TOKEN_ENV], source)
    if args.health_port is not None and args.health_port in (args.port, args.rest_port):
        raise ValueError(f"--health-port {args.health_port} must differ from --port and --rest-port")
    return Security(cert, key, client_ca, token, source, tenants, tuple(args.operator))


def store_url(args: argparse.Namespace) -> str | None:
    """The fleet's store URL, from --store (or $KVLINK_STORE) or read from --store-url-file, checked
    (kvlink.server.shared.check_url); None without a store. ValueError never quotes a password."""
    if not (args.store or args.store_url_file):
        return None
    from kvlink.server.shared import check_url, read_url_file

    if args.store and args.store_url_file:
        raise ValueError(
            "give the store's URL once: --store (or $KVLINK_STORE) or --store-url-file, not both"
        )
    return read_url_file(args.store_url_file) if args.store_url_file else check_url(args.store)


class _RestServer(uvicorn.Server):
    """uvicorn without its own signal handling: kvlink-serve stops gRPC and REST together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int, flag: str) -> socket.socket:
    """A listening socket on host:port; OSError naming the address and the flag when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise PortInUse(f"{flag} {port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class PortInUse(OSError):
    """A port this receiver needs is taken (by another kvlink-serve, say): one line naming it."""


def check_port_free(host: str, port: int, flag: str) -> None:
    """PortInUse unless `port` can be bound on `host` right now. The probe does not set SO_REUSEPORT
    (which would let it share a port another process listens on, as grpc's own bind does by default),
    so any listener on the port refuses it; it sets SO_REUSEADDR, as the real bind does, so that the
    closed connections of a receiver that just stopped (TIME_WAIT) do not."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise PortInUse(f"{flag} {port}: {host}:{port} is {why}" if why == "in use" else
                            f"{flag} {port}: cannot bind {host}:{port}: {why}") from None  # fmt: skip


GRPC_SERVER_OPTIONS: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]
"""A receiver's port is its own: without this, grpc binds with SO_REUSEPORT and a second kvlink-serve on
the same port starts silently and takes part of the traffic."""


def _bind_grpc(
    server: grpc.aio.Server, address: str, flag: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Add a listening port (exclusively, see GRPC_SERVER_OPTIONS); PortInUse naming it if grpc cannot."""
    try:
        port = (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if not port:
        raise PortInUse(f"{flag}: cannot listen on {address} (in use, or not an address of this host)")
    return int(port)


MIN_AUTO_MESSAGE_BYTES = 512 << 20
"""The smallest --max-message-bytes auto gives (the fixed default before it was sized from the machine)."""


def auto_limits(device: torch.device, cached: int | None, message: int | None) -> tuple[int, int]:
    """(--max-cached-bytes, --max-message-bytes), each as given or, for None ('auto'), sized from the
    machine now: contexts and decodes take 70% of the device memory still free (CUDA) or half of the
    host's available memory (CPU); a message, whose chunks are buffered in host memory (twice over
    with --max-buffered-bytes' default), the smaller of that and a quarter of the host's available
    memory, at least MIN_AUTO_MESSAGE_BYTES. The FP16 KV of 32k tokens of an 8B GQA model (4 GiB)
    fits any machine with 16 GiB of memory available."""
    import torch

    from kvlink.server.memory import available_host_bytes

    host = available_host_bytes() or (8 << 30)
    if cached is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cached = int(0.7 * free)
        else:
            cached = host // 2
        cached = max(cached, 64 << 20)
        logger.info("--max-cached-bytes auto: %.2f GiB (%s)", cached / 2**30, device)
    if message is None:
        message = max(MIN_AUTO_MESSAGE_BYTES, min(cached, host // 4))
        logger.info("--max-message-bytes auto: %.2f GiB", message / 2**30)
    return cached, message


def measure_receiver(
    lm: Any, max_tokens: int, capabilities: frozenset[str] | None = None
) -> wire.ReceiverCosts:
    """kvlink.stream.measure_costs on the loaded model, up to min(max_tokens, its positions) tokens,
    timing the decode of the KV formats a sender would choose among (kvlink.stream.kv_options: FP16 and
    the quality table's segmentable configs this receiver decodes)."""
    from kvlink.capabilities import local_capabilities
    from kvlink.models import max_positions
    from kvlink.stream import kv_options, measure_costs

    limit = max_positions(lm.model.config) or max_tokens
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or len(lm.tokenizer))
    caps = capabilities if capabilities is not None else local_capabilities(profiles=False, residuals=False)
    options = kv_options(lm.fingerprint, lm.name, caps, lm.geometry, 0.0)
    formats = [o.recipe for o in options if o.recipe is not None]
    return measure_costs(lm.model, lm.geometry, min(max_tokens, limit - 64), vocab, formats=formats)


async def serve(args: argparse.Namespace, security: Security | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status. security: load_security(args) by default."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from kvlink import wire
    from kvlink.metrics import MetricsRegistry
    from kvlink.models import load_model
    from kvlink.server.rest import create_app
    from kvlink.server.service import KVLinkService
    from kvlink.server.store import SessionStore

    security = security or load_security(args)
    if security.tokens and not security.tls:
        logger.warning("bearer tokens travel in plaintext gRPC: add --tls-cert and --tls-key")
    if args.rest_host not in LOOPBACK and not security.tokens:
        logger.warning("REST is exposed on %s without a bearer token (--auth-token-file)", args.rest_host)
    if args.host not in LOOPBACK and not security.tls:
        logger.warning("gRPC is exposed on %s without TLS (--tls-cert, --tls-key)", args.host)

    # Every port first, exclusively, so that one in use fails before the model loads (and a second
    # receiver on the same port cannot start): probes give a clean one-line error; the gRPC binds follow
    # once the limits (sized from the device, see auto_limits) are known.
    check_port_free(args.host, args.port, "--port")
    if args.health_port is not None:
        check_port_free(args.host, args.health_port, "--health-port")
    rest_sock = _listen(args.rest_host, args.rest_port, "--rest-port")
    logger.info("loading model %s on %s", args.model or "(embedded)", args.device)
    lm = await asyncio.to_thread(
        load_model, args.model, args.device, None if args.dtype == "auto" else args.dtype, args.download
    )
    args.max_cached_bytes, args.max_message_bytes = auto_limits(
        lm.device, args.max_cached_bytes, args.max_message_bytes
    )
    limits = wire.WireLimits(
        max_message_bytes=args.max_message_bytes,
        max_chunk_bytes=min(wire.WireLimits().max_chunk_bytes, args.max_message_bytes),
        # What the parts of a message decode to can be admitted only within the cache's budget.
        max_decoded_bytes=max(wire.WireLimits().max_decoded_bytes, args.max_cached_bytes),
    )
    server = grpc.aio.server(options=[*limits.grpc_options(), *GRPC_SERVER_OPTIONS])
    port = _bind_grpc(server, f"{args.host}:{args.port}", "--port", security.server_credentials())
    health_server: grpc.aio.Server | None = None
    if args.health_port is not None:
        health_server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        _bind_grpc(health_server, f"{args.host}:{args.health_port}", "--health-port", None)
    guard = security.guard(args.max_concurrent_sessions, args.per_peer_concurrency)
    share = args.max_cached_bytes_per_identity or (
        args.max_cached_bytes // 2 if guard.mode in ("tenants", "certificates") else args.max_cached_bytes
    )
    store = SessionStore(ttl_s=args.session_ttl, max_bytes=args.max_cached_bytes, owner_max_bytes=share)
    from kvlink.predict import load_profile

    profiles: list[Any] = [load_profile(path) for path in args.profile]
    make_service: Callable[..., KVLinkService] = KVLinkService
    if args.store:  # a replica of a fleet: its messages go to the shared store too
        from kvlink.server.fleet import FleetService, open_shared

        make_service = functools.partial(FleetService, shared=open_shared(args, guard.mode))
    service = make_service(
        lm, store, MetricsRegistry(), limits, max_new_tokens=args.max_new_tokens, guard=guard,
        stall_timeout_s=args.stall_timeout, message_deadline_s=args.message_deadline,
        max_question_tokens=args.max_question_tokens,
        max_buffered_bytes=args.max_buffered_bytes or 2 * args.max_message_bytes, profiles=profiles,
        text_segments=not args.no_text_segments,
    )  # fmt: skip
    logger.info("warmed up in %.1f s", await asyncio.to_thread(service.warm_up))
    if args.cost_probe_tokens:
        c = service.costs = await asyncio.to_thread(
            measure_receiver, lm, args.cost_probe_tokens, service.capabilities
        )
        logger.info(
            "measured: prefill %s tokens/s; decode %.2f GB/s of FP16 KV (%s); %.1f ms a segment; "
            "first token %.3f s",
            ", ".join(f"{r:,.0f} at {n:,}" for n, r in c.prefill), c.decode_bytes_per_s / 1e9,
            ", ".join(f"{name} {r / 1e9:.2f}" for name, r in c.decode), 1e3 * c.segment_s, c.first_token_s,
        )  # fmt: skip

    server.add_generic_rpc_handlers((wire.raw_rpc_handler(service), wire.legacy_rpc_handler()))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if health_server is not None:  # the same servicer: one status on both listeners
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        await health_server.start()
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
        "kvlink-serve ready: model %s (fingerprint %s) on %s; gRPC %s:%d (%s, %s)%s; REST http://%s:%d "
        "(dashboard at /, docs at /docs); limits: %d calls, %d per peer, %s cached, %s per message, "
        "%d answer tokens, %g s stall timeout",
        lm.name, lm.fingerprint[:12], lm.device, args.host, port,
        "mutual TLS" if security.client_ca else "TLS" if security.tls else "plaintext",
        security.describe(),
        f"; health-only {args.host}:{args.health_port}" if health_server else "",
        args.rest_host, rest_sock.getsockname()[1], args.max_concurrent_sessions, args.per_peer_concurrency,
        format_size(args.max_cached_bytes), format_size(args.max_message_bytes), args.max_new_tokens,
        args.stall_timeout,
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
    if health_server is not None:
        await health_server.stop(None)
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
            from kvlink.server.memory import trim

            await asyncio.to_thread(
                trim
            )  # their memory goes back to the system now, not at the next big free


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_settings(parser, argv)
    try:
        security = load_security(args)
        args.store = store_url(args)
    except ValueError as exc:
        parser.error(str(exc))  # exit 2
    configure_logging(args.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvlink import models

    try:  # before anything loads or binds: a device this machine lacks, a model that is not there
        models.check_device(args.device)
        models.check_model(args.model, args.download)
    except ValueError as exc:
        print(f"kvlink-serve: error: {exc}", file=sys.stderr)
        return 2
    from kvlink.server.memory import return_freed_memory_promptly

    return_freed_memory_promptly()
    try:
        return asyncio.run(serve(args, security))
    except PortInUse as exc:
        print(f"kvlink-serve: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:  # an unusable model, ...: one line, no traceback
        print(f"kvlink-serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
