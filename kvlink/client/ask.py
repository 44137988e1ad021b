"""kvlink-ask: ask again about a context already sent with kvlink-send, without sending it again.

    kvlink-ask --server 127.0.0.1:50051 --message MESSAGE_ID "And when was it founded?"
    kvlink-ask --server rx:50051 --tls-ca ca.crt --auth-token-file token --message ID --temperature 0.7 "..."
    kvlink-ask --server 127.0.0.1:50051 --message MESSAGE_ID --release          # free the context now

kvlink-send prints the session and message ids of what it sent; the receiver
answers from that cache until it is released, expires (--session-ttl) or is
evicted, and only for the identity that sent it (another caller's attempt is
NOT_FOUND). No model is loaded here: the receiver tokenizes the question. Same
connection and security flags as kvlink-send; exit statuses as kvlink.client.common says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from kvlink.cli import HelpFormatter, JsonErrorParser, configure_logging, consoles
from kvlink.client.common import (
    LOG_LEVELS,
    UsageError,
    add_connection_flags,
    add_generation_flags,
    options_from_args,
    report,
    security_from_args,
    server_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = JsonErrorParser(
        prog="kvlink-ask",
        description="Ask a kvlink-serve receiver another question about a context sent earlier with "
        "kvlink-send (by its message id), or release that context.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("question", nargs="?", default=None, help="the question (may be left out with --release)")
    add_connection_flags(p)
    p.add_argument("--message", required=True, metavar="ID", help="the message id kvlink-send printed")
    p.add_argument(
        "--session", metavar="SID", default="",
        help="the session id kvlink-send printed (optional: the message id alone names the context)",
    )  # fmt: skip
    p.add_argument(
        "--release", action="store_true",
        help="free the context on the receiver (after answering, when a question is given)",
    )  # fmt: skip
    add_generation_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (errors too)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="of the messages on stderr")
    return p


async def ask_again(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """The Ask (when there is a question) and the Release (with --release) on one channel."""
    from kvlink import wire
    from kvlink.client.sender import ask, channel_options, release

    security = security_from_args(args)
    options = options_from_args(args) if args.question is not None else None
    out: dict[str, Any] = {"message_id": args.message, "session_id": args.session}
    async with security.channel(target, channel_options()) as channel:
        if options is not None:
            request = wire.Ask(
                args.session, args.message, args.question, options.max_new_tokens,
                temperature=options.temperature, top_p=options.top_p, stop=options.stop,
            )  # fmt: skip
            answer = await ask(channel, request, timeout=args.timeout, metadata=security.metadata)
            out.update(
                answer=answer.text, token_ids=list(answer.token_ids), finish_reason=answer.finish_reason,
                timings=dict(answer.timings), answer_object=answer,
            )  # fmt: skip
        if args.release:
            released = await release(
                channel, args.message, args.session, timeout=args.timeout, metadata=security.metadata
            )
            out["released_bytes"] = released.freed_bytes
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        target = server_from_args(args)
        if args.question is not None and not args.question.strip():
            raise UsageError("the question is empty")
        if args.question is None and not args.release:
            raise UsageError("give a question, or --release to free the context")
        if args.question is not None:
            options_from_args(args)  # checked before connecting
        result = asyncio.run(ask_again(args, target))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line (or one JSON object), never a traceback
        return report("kvlink-ask", exc, args.json)
    answer = result.pop("answer_object", None)
    if args.json:
        print(json.dumps(result))
        return 0
    out, _ = consoles()
    if answer is not None:
        from kvlink.client.main import print_answer

        print_answer(out, answer)
    if "released_bytes" in result:
        out.print(f"released message {args.message} ({result['released_bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
