"""Each issue-18 attack once against a receiver of a given tree: 12bfafe (before) or the working tree (after).

    python bench/attacks_before_after.py --tree /path/to/12bfafe-checkout --out before.json
    python bench/attacks_before_after.py --tree . --out after.json

The receiver runs single-token (the mode both trees have) with a 2 s stall timeout; the attacker is this
process (the current kvlink's payload builders, kvlink.eval.bench_abuse). Per attack: the receiver's answer
code and what it cost (peak resident memory rise, /healthz worst latency, seconds until refused), and for
the isolation attacks whether they succeeded. Research script: prints and writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx

from kvlink import wire
from kvlink.cache import prefill
from kvlink.client.sender import SendError, ask, channel_options, transfer
from kvlink.codec import Codec
from kvlink.eval.bench_abuse import bearer, bomb_frames, decode_bomb, positions_frames, rows_frames, send_raw
from kvlink.eval.squad import load_squad
from kvlink.generate import greedy_answer
from kvlink.models import load_model
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import build
from kvlink.server.local import free_port

MIB = 1 << 20
TOKEN = "bench-token-" + "x" * 16


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


async def main_async(args: argparse.Namespace) -> dict:
    tree = Path(args.tree).resolve()
    d = Path(args.workdir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "token").write_text(TOKEN)
    port, rest_port = free_port(), free_port()
    log = open(d / "serve.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        "-m",
        "kvlink.server.main",
        "--port",
        str(port),
        "--rest-port",
        str(rest_port),
        "--auth-token-file",
        str(d / "token"),
        "--stall-timeout",
        "2",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    target, rest = f"127.0.0.1:{port}", f"http://127.0.0.1:{rest_port}"
    lm = load_model(None)
    for _ in range(600):
        try:
            if httpx.get(f"{rest}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    me = bearer(TOKEN)
    codec = Codec(build(k_bits=4, v_bits=4), lm.geometry)
    examples = []
    for e in load_squad():
        if e.context not in {x.context for x in examples}:
            examples.append(e)
        if len(examples) == 2:
            break
    goods = []
    for e in examples:
        q = question_ids(lm.tokenizer, e.question)
        enc = codec.encode(prefill(lm.model, context_ids(lm.tokenizer, e.context), None))
        goods.append(
            (
                e.question,
                enc,
                greedy_answer(lm.model, lm.tokenizer, codec.decode(enc), q, max_new_tokens=4).token_ids,
            )
        )
    out: dict = {"tree": str(tree)}

    async def probe_during(coro):
        worst, done = 0.0, asyncio.Event()

        async def probe():
            nonlocal worst
            async with httpx.AsyncClient(timeout=120) as http:
                while not done.is_set():
                    t = time.perf_counter()
                    await http.get(f"{rest}/healthz")
                    worst = max(worst, time.perf_counter() - t)
                    await asyncio.sleep(0.01)

        task = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        code = await coro
        elapsed = time.perf_counter() - t
        await asyncio.sleep(0.05)
        done.set()
        await task
        return code, worst, elapsed

    async def measured(name, coro):
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before = status(proc.pid, "VmRSS")
        code, worst, elapsed = await probe_during(coro)
        rise = status(proc.pid, "VmHWM") - before
        await asyncio.sleep(1.0)
        out[name] = {
            "code": code,
            "peak_rss_rise_mib": rise / MIB,
            "healthz_worst_s": worst,
            "seconds": elapsed,
            "rss_after_minus_before_mib": (status(proc.pid, "VmRSS") - before) / MIB,
        }
        print(name, out[name], flush=True)

    async def asking(request, metadata=me):
        async with grpc.aio.insecure_channel(target, channel_options()) as ch:
            try:
                a = await ask(ch, request, timeout=300, metadata=metadata)
                return "OK", list(a.token_ids)
            except SendError as err:
                return err.code or err.status.name, None

    async def sending(frames, metadata=me):
        async with grpc.aio.insecure_channel(target, channel_options()) as ch:
            try:
                await transfer(ch, frames, timeout=300, metadata=metadata)
                return "OK"
            except SendError as err:
                return err.code or err.status.name

    question, enc, _ = goods[0]
    await measured("decompression_bomb", send_raw(target, bomb_frames(lm, uuid.uuid4().hex), me))
    await measured(
        "header_rows",
        send_raw(
            target, rows_frames(wire.to_frames(enc, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20)), me
        ),
    )
    await measured("position_sets", send_raw(target, positions_frames(lm, uuid.uuid4().hex), me))
    mid = uuid.uuid4().hex
    await sending(wire.to_frames(enc, "s", mid, lm.fingerprint, 1 << 20))

    async def refs():
        code, _ = await asking(wire.Ask("s", mid, question, 4, reference_answers=("word " * 20_000,) * 8))
        return code

    await measured("reference_answers", refs())
    record = httpx.get(
        f"{rest}/v1/messages/{mid}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ).json()
    out["reference_answers"]["stored_record_bytes"] = len(json.dumps(record))
    flood = decode_bomb(lm, 5000)

    async def decode_flood():
        codes = await asyncio.gather(
            *(
                sending(wire.to_frames(flood, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20))
                for _ in range(4)
            )
        )
        return "+".join(sorted(set(codes)))

    await measured("decode_flood", decode_flood())

    async def long_question():
        code, _ = await asking(
            wire.Ask("s", mid, "Which comes first? " + " ".join(f"w{i}" for i in range(3000)), 4)
        )
        return code

    await measured("long_question", long_question())
    # Overwrite: the same ids sent again with another context; then the first sender asks.
    oid = uuid.uuid4().hex
    await sending(wire.to_frames(goods[0][1], "s", oid, lm.fingerprint, 1 << 20))
    again = await sending(wire.to_frames(goods[1][1], "s", oid, lm.fingerprint, 1 << 20))
    _, tokens = await asking(wire.Ask("s", oid, goods[0][0], 4))
    out["overwrite_same_ids"] = {
        "second_send": again,
        "first_senders_answer_is_its_own": tokens == list(goods[0][2]),
    }
    print("overwrite_same_ids", out["overwrite_same_ids"], flush=True)
    forged = "m\n2026-12-04 00:00:00 INFO kvlink.serve: FORGED operator login"
    code = await sending(wire.to_frames(enc, "s", forged, lm.fingerprint, 1 << 20))
    log_text = (d / "serve.log").read_text(errors="replace")
    out["forged_ids"] = {
        "code": code,
        "forged_line_in_log": any(
            line.startswith("2026-12-04 00:00:00 INFO") for line in log_text.splitlines()
        ),
    }
    print("forged_ids", out["forged_ids"], flush=True)
    await measured(
        "trickle_1_frame_per_1.5s",
        send_raw(target, wire.to_frames(enc, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20), me, pace_s=1.5),
    )
    two = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other")]
    out["rest_two_authorization_headers"] = httpx.get(f"{rest}/v1/stats", headers=two, timeout=30).status_code
    out["healthz_body"] = httpx.get(f"{rest}/healthz", timeout=30).json()
    out["healthz_reveals_fingerprint"] = (
        lm.fingerprint[:12] in json.dumps(out["healthz_body"]) or "fingerprint" in out["healthz_body"]
    )
    print({k: out[k] for k in ("rest_two_authorization_headers", "healthz_reveals_fingerprint")}, flush=True)
    proc.terminate()
    proc.wait(60)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default="/tmp/kvlink-before-after")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
