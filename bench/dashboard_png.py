"""Make docs/dashboard.png: the receiver's dashboard after a few messages on the embedded model.

    PYTHONPATH=. python bench/dashboard_png.py                      # -> docs/dashboard.png (needs `make chromium`)
    PYTHONPATH=. python bench/dashboard_png.py --out /tmp/d.png --size 1280,1600

Starts kvlink-serve (the embedded SmolLM2-135M-Instruct, a bearer token) on free loopback ports, sends
SQuAD answerable questions at several budgets through the sender library (the planner picks each
config) with their gold answers as references, so that the receiver records F1, then loads the page
in headless chromium with the token in the URL fragment and takes a screenshot (tests/headless.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import tempfile
from pathlib import Path

from kvlink.client.sender import ClientSecurity, send_context
from kvlink.eval.squad import load_squad
from kvlink.models import load_model
from kvlink.server.local import LocalReceiver

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # chromium's flags and screenshot: tests/headless.py

import headless  # noqa: E402

BUDGETS = ("100%", "50%", "25%", "18.75%", "12.5%", "6.25%")


async def send_all(target: str, token: str, examples: int) -> None:
    lm = load_model()
    squad = load_squad()
    security = ClientSecurity(token=token)
    for i in range(examples):
        qa = squad[i]
        budget = BUDGETS[i % len(BUDGETS)]
        result = await send_context(
            target, qa.context, qa.question, budget, lm=lm, reference_answers=list(dict.fromkeys(qa.answers)),
            max_new_tokens=24, security=security,
        )  # fmt: skip
        print(f"{budget:>7}  {result.plan.recipe.name:<70} F1 {result.answer.f1}  {result.answer.text!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    p.add_argument("--size", default="1280,900", help="window width,height")
    p.add_argument("--examples", type=int, default=12, help="SQuAD questions to send (budgets in turn)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        token = secrets.token_urlsafe(24)
        (Path(tmp) / "token").write_text(token + "\n")
        with LocalReceiver(["--auth-token-file", str(Path(tmp) / "token"), "--max-new-tokens", "24"]) as rx:
            rx.wait_healthy()
            asyncio.run(send_all(rx.target, token, args.examples))
            profile = Path(tmp) / "chromium"
            profile.mkdir()
            headless.screenshot(f"{rx.rest}/#token={token}", args.out.resolve(), profile, args.size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
