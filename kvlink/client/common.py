"""What kvlink-send and kvlink-ask share: the connection and security flags, the generation flags, how
errors are reported (one line on stderr, or one JSON object on stdout with --json) and exit statuses.

Exit statuses: 0 success; 1 a call failed or the receiver cannot be reached; 2 a bad argument, an
unusable file or model, or an unsatisfiable budget.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlink.cli import host_port, json_error

if TYPE_CHECKING:
    from kvlink.answer import GenerationOptions
    from kvlink.client.sender import ClientSecurity

LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class Failed(Exception):
    """A failure reported in one line with an exit status and, for --json, a code."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """--server, --timeout and the security group (TLS, client certificate, bearer token)."""
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the receiver's gRPC address")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls", action="store_true", help="TLS, verifying the receiver with the system's CAs")
    sec.add_argument("--tls-ca", metavar="PEM", default=None, help="TLS, verifying the receiver with this CA")
    sec.add_argument("--tls-cert", metavar="PEM", default=None, help="client certificate for mutual TLS")
    sec.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")
    sec.add_argument(
        "--tls-server-name", metavar="NAME", default=None,
        help="the name the receiver's certificate must carry, when it differs from --server's host",
    )  # fmt: skip
    sec.add_argument(
        "--auth-token-file", metavar="FILE", default=None,
        help="bearer token for the receiver (default: $KVLINK_AUTH_TOKEN if set)",
    )  # fmt: skip


def add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int = 32) -> None:
    """--max-new-tokens, --temperature, --top-p, --stop: how the receiver answers."""
    g = p.add_argument_group("answer (how the receiver generates it)")
    g.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens,
        help="longest answer in tokens (the receiver may clamp it to its own --max-new-tokens)",
    )  # fmt: skip
    g.add_argument(
        "--temperature", type=float, default=0.0,
        help="0 answers greedily (the same answer every time); above 0, sample at this temperature",
    )  # fmt: skip
    g.add_argument(
        "--top-p", type=float, default=1.0,
        help="with --temperature: sample from the smallest set of tokens whose probability reaches this",
    )  # fmt: skip
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="end the answer after this text (repeatable; the text stays in the answer)",
    )  # fmt: skip


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    from kvlink.answer import GenerationOptions

    try:
        return GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, tuple(args.stop))
    except ValueError as exc:
        text = str(exc)
        for name in ("max_new_tokens", "temperature", "top_p"):
            text = text.replace(name, "--" + name.replace("_", "-"))
        raise UsageError(text) from None


def security_from_args(args: argparse.Namespace) -> ClientSecurity:
    from kvlink.client.sender import ClientSecurity

    try:
        return ClientSecurity.from_files(
            tls=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
            token_file=args.auth_token_file, server_name=args.tls_server_name,
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def server_from_args(args: argparse.Namespace) -> str:
    try:
        return host_port(args.server, "--server")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def read_text_file(source: str, what: str = "context") -> str:
    """The UTF-8 text of a file (or of standard input for '-'); UsageError naming the file when it cannot be
    read, is binary, or is not UTF-8."""
    name = "standard input" if source == "-" else f"the {what} file {source!r}"
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UsageError(f"{name} is binary (a NUL byte at offset {nul}), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise UsageError(f"{name} is empty")
    return text.removeprefix("\ufeff")


def report(prog: str, exc: BaseException, as_json: bool) -> int:
    """Print a failure in one line (stderr, or JSON on stdout) and return its exit status; the traceback
    goes to the log at debug level (--log-level debug)."""
    from kvlink.budget import BudgetError
    from kvlink.client.sender import SendError

    if isinstance(exc, Failed):
        message, status, code = exc.message, exc.status, exc.code
    elif isinstance(exc, UsageError):
        message, status, code = str(exc), 2, "usage"
    elif isinstance(exc, BudgetError):
        message, status, code = str(exc), 2, "budget"
    elif isinstance(exc, SendError):
        message, status, code = str(exc), 1, exc.code or exc.status.name
    elif isinstance(exc, ValueError):
        message, status, code = str(exc), 2, "usage"
    else:
        message, status, code = f"{type(exc).__name__}: {exc}", 1, "error"
    logging.getLogger(f"kvlink.{prog.removeprefix('kvlink-')}").debug("%s failed", prog, exc_info=exc)
    if as_json:
        print(json_error(message, status, code))
    else:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def explain_rows(candidates: Sequence[Any], top: int) -> list[Any]:
    """The planner's candidates worth showing: the `top` best (all with 0) and every one it encoded."""
    return [c for i, c in enumerate(candidates) if c.note or top == 0 or i < top]
