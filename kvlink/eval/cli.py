"""kvlink-bench: quality per wire byte, the planner's quality table, end-to-end latency, kernels.

    kvlink-bench quality --task squad --task long:100 --task needle:100 --limit 300 --grid default \\
        --device cuda --out bench/results/quality         # the evaluation split: figures to report
    kvlink-bench quality --split calibration --task squad --configs ... --out bench/results/quality-cal
    kvlink-bench calibrate bench/results/quality-cal [more runs]   # quality table + planner-on-frontier check
    kvlink-bench sensitivity --limit 16                   # KL per layer and K/V at INT2: bits per layer (mix3.5)
    kvlink-bench e2e --task long --limit 3 --configs q2c50-int4,int4 --out bench/results/e2e.json
    kvlink-bench report bench/results/quality             # rebuild JSON/Markdown/plots from samples.jsonl
    kvlink-bench kernels --out bench/results/kernels.json # Triton kernels vs the torch reference
    kvlink-bench scale --model random:llama-3.1-8b --tokens 8k,32k   # TTFT through kvlink-serve, paced links

Data are split by article (kvlink.eval.splits): `--split calibration` for anything that is tuned
(`calibrate` refuses results holding any other example), `--split evaluation` (the default of
`quality`, `e2e` and `report`) for figures to report, `--split all` for every article (the
layout before the split, and any other SQuAD-format --data file).

`quality` writes, under --out: samples.jsonl (one line per (example, config), appended as
it goes, so --resume continues an interrupted run), run.json (settings), results.json
(samples + per-config summaries with bootstrap 95% CIs), results.md and pareto-<task>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlink.eval.splits import SPLITS

logger = logging.getLogger(__name__)

DEFAULT_OUT = "bench/results/quality"
BANDWIDTHS = "100M,1G,10G"


# --- helpers ------------------------------------------------------------------------------
def _task_spec(text: str) -> tuple[str, int | None]:
    """'long' or 'long:50' -> ('long', None) / ('long', 50)."""
    from kvlink.eval.tasks import TASKS

    name, _, limit = text.partition(":")
    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"--task must be one of {TASKS} (optionally task:N), got {text!r}")
    if limit:
        try:
            n = int(limit)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--task {name}:N needs an integer N, got {text!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"--task limit must be >= 0, got {text!r}")
        return name, n
    return name, None


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N like 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX tokens like 1024-4096, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def parse_bandwidth(text: str) -> float:
    """'100M', '1G', '10Gbit', '2.5e9' -> bits per second."""
    raw = text.strip().lower().removesuffix("bps").removesuffix("bit/s").removesuffix("bit")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(raw[-1:], 1.0)
    number = raw[:-1] if raw[-1:] in "kmg" else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bandwidth like 100M, 1G or 10G, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"bandwidth must be positive, got {text!r}")
    return value


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(model: str | None, device: str, dtype: str) -> Any:
    from kvlink.models import load_model

    return load_model(model, device=device, dtype=dtype)


def _console() -> Any:
    from rich.console import Console

    return Console(width=160)


# --- quality ------------------------------------------------------------------------------
def _run_meta(args: argparse.Namespace, lm: Any, settings: Any) -> dict[str, Any]:
    import torch

    return {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "geometry": vars(lm.geometry),
        "device": str(lm.device),
        "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "max_new_tokens": settings.max_new_tokens,
        "ppl": settings.ppl,
        "ppl_every": settings.ppl_every,
        "ppl_prefix": settings.ppl_prefix,
        "ppl_tokens": settings.ppl_tokens,
        "window": settings.window,
        "seed": args.seed,
        "data": args.data,
        "split": args.split,
        "command": "kvlink-bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
    }


_RESUME_KEYS = (
    "fingerprint", "dtype", "max_new_tokens", "ppl", "ppl_every", "ppl_prefix", "ppl_tokens", "window", "seed",
    "split",
)  # fmt: skip


def _split_tasks(args: argparse.Namespace, lm: Any, specs: Sequence[tuple[str, int | None]]) -> list[Any]:
    """The examples of `specs` on args.split: one split's articles, or every article (`all`: the reserved
    article, whose paragraphs fit the benchmark's projection profile, left out as before the split)."""
    from kvlink.eval import tasks

    split = None if args.split == "all" else args.split
    long_range = args.long_tokens or tasks.LONG_TOKENS
    try:
        return tasks.build_tasks(
            lm.tokenizer, specs, data=args.data, seed=args.seed, long_range=long_range,
            needle_range=getattr(args, "needle_tokens", None) or long_range,
            exclude=tasks.reserved_contexts() if split is None else (), split=split,
        )  # fmt: skip
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def cmd_quality(args: argparse.Namespace) -> int:
    from kvlink.eval import grid, report
    from kvlink.layerbits import Sensitivity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(args.device)
    lm = _load(args.model, device, args.dtype)
    # No --grid and no --configs: the default grid. --configs alone: only those (and the full KV).
    chosen_grid = args.grid or (None if args.configs else "default")
    sensitivity = Sensitivity.for_model(lm.fingerprint, lm.name)
    configs = grid.select_configs(chosen_grid, args.configs or (), lm.geometry, sensitivity)
    if args.list_configs:
        for c in configs:
            alias = f" (= {', '.join(c.aliases)})" if c.aliases else ""
            print(f"{c.name:24s} {c.family:18s} {c.config.name}{alias}")
        return 0
    batch = args.batch or (64 if lm.device.type == "cuda" else 8)
    settings = grid.RunSettings(
        max_new_tokens=args.max_new_tokens,
        batch=batch,
        ppl=not args.no_ppl,
        ppl_every=args.ppl_every,
        ppl_prefix=args.ppl_prefix,
        ppl_tokens=args.ppl_tokens,
    )
    k, n = args.shard
    if n > 1:
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or n) // n))
    meta = _run_meta(args, lm, settings)
    run_file = out / "run.json"
    # Every config measured into this directory, with its codec (a mix<bits> name alone does not
    # say which bits: the report and calibrate read them from here).
    by_name = {}
    if args.resume and run_file.is_file():
        old = json.loads(run_file.read_text())
        by_name = {c["name"]: c for c in old.get("configs", [])}
        changed = [k for k in _RESUME_KEYS if old.get(k) != meta.get(k)]
        if changed:
            raise SystemExit(
                f"--resume: {run_file} was written with other settings ({', '.join(changed)}: "
                f"{[old.get(k) for k in changed]} vs {[meta.get(k) for k in changed]}); use another --out"
            )
    for c in configs:
        by_name[c.name] = {**c.config.to_dict(), "name": c.name, "aliases": list(c.aliases)}
    meta["configs"] = list(by_name.values())
    run_file.write_text(json.dumps(meta, indent=1))

    specs = [
        (name, limit if limit is not None else args.limit) for name, limit in (args.task or [("squad", None)])
    ]
    examples = _split_tasks(args, lm, specs)
    counts = {t: sum(1 for e in examples if e.task == t) for t, _ in specs}
    profile = None
    if grid.needs_profile(configs):
        started = time.perf_counter()
        profile = grid.bench_profile(lm, args.profile)
        logger.info("profile %s ready in %.1f s", profile.hash[:12], time.perf_counter() - started)
    console = _console()
    console.print(
        f"[bold]kvlink-bench quality[/bold]: {lm.name} on {meta['device_name']} ({meta['dtype']}), "
        f"{len(configs)} configs x {len(examples)} examples {counts} ({args.split} split), batch {batch}, "
        f"out {out}"
    )
    records, stats = grid.run_quality(
        lm,
        examples,
        configs,
        grid.samples_file(out, args.shard),
        settings,
        profile,
        args.resume,
        not args.no_progress,
        args.shard,
    )
    aliases = {c.name: list(c.aliases) for c in configs if c.aliases}
    if n > 1:
        console.print(
            f"shard {k}/{n}: {stats['examples_run']} examples in {stats['seconds_total']:.1f} s "
            f"({stats['seconds_per_example']:.2f} s each); when every shard is done: kvlink-bench report {out}"
        )
        return 0
    meta["stats"] = stats
    run_file.write_text(json.dumps(meta, indent=1))
    result = report.write_report(records, out, meta, aliases)
    print(report.markdown(result["summary"], aliases))
    per_task = stats.get("seconds_per_example_by_task", {})
    console.print(
        f"time per example: {stats['seconds_per_example']:.2f} s over {stats['examples_run']} examples run now "
        f"({', '.join(f'{t}: {s:.2f} s' for t, s in per_task.items())}); {stats['pairs_skipped']} pairs resumed; "
        f"{len(configs)} configs per example"
    )
    _print_stage_times(console, records)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(result['plots'])}")
    return 0


def _print_stage_times(console: Any, records: Sequence[dict[str, Any]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        seen.setdefault(rec["eid"], rec)
    if not seen:
        return
    stages = ("prefill_s", "reference_s", "configs_s", "ppl_s", "example_s")
    means = {s: statistics.mean(float(r.get(s, 0.0)) for r in seen.values()) for s in stages}
    console.print(
        "mean per example: " + ", ".join(f"{s.removesuffix('_s')} {v:.2f} s" for s, v in means.items())
    )


def cmd_entropy(args: argparse.Namespace) -> int:
    """Entropy of the quantized codes vs zstd over real contexts (kvlink.eval.entropy)."""
    import torch
    from rich.table import Table

    from kvlink.cache import prefill
    from kvlink.eval import entropy, grid
    from kvlink.eval.tasks import build_tasks
    from kvlink.layerbits import Sensitivity

    lm = _load(args.model, _device(args.device), args.dtype)
    examples = build_tasks(lm.tokenizer, args.task or [("squad", 20)], args.data)
    sensitivity = Sensitivity.for_model(lm.fingerprint, lm.name)
    configs = grid.resolve(grid.expand_names(args.configs.split(",")), lm.geometry, sensitivity)
    seen: set[str] = set()
    rows: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for example in examples:
        if example.context in seen:  # SQuAD asks several questions about one paragraph
            continue
        seen.add(example.context)
        kv = prefill(lm.model, example.encode(lm.tokenizer)[0]).kv.to("cpu", torch.float32)
        for c in configs:
            rows[c.name].append(entropy.code_statistics(kv, c.config, lm.geometry, args.level))
    summary = {name: entropy.summarize(r) for name, r in rows.items()}
    view = Table(
        title=f"entropy coding vs zstd{args.level}, {len(seen)} contexts (savings in % of the message)"
    )
    for col in (
        "config",
        "codes % of msg",
        "order-0 coder",
        "order-1 bound",
        f"zstd{args.level}",
        "zstd ms/msg",
    ):
        view.add_column(col)
    for name, s in summary.items():
        view.add_row(
            name, f"{100 * s['codes_share']:.1f}", f"{100 * s['order0_saving']:.1f}",
            f"{100 * s['order1_saving']:.1f}", f"{100 * s['zstd_saving']:.1f}", f"{s['zstd_ms_per_message']:.1f}",
        )  # fmt: skip
    _console().print(view)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": lm.name, "fingerprint": lm.fingerprint, "contexts": len(seen), "zstd_level": args.level,
                "command": "kvlink-bench " + " ".join(sys.argv[1:])}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "messages": rows}, indent=1))
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """KL per layer and K/V at low bits on held-out questions: the profile `mix<bits>` configs allocate from."""
    from rich.table import Table
    from tqdm import tqdm

    from kvlink.eval import sensitivity
    from kvlink.layerbits import default_path

    lm = _load(args.model, _device(args.device), args.dtype)
    examples = sensitivity.held_out_examples(args.limit, args.data)
    bar = tqdm(total=len(examples), desc="sensitivity", unit="ex", disable=args.no_progress)

    def advance(_: int) -> None:
        bar.update()

    profile = sensitivity.measure(
        lm, examples, args.bits, args.group_size, args.sink, batch=args.batch, on_example=advance
    )
    bar.close()
    out = Path(args.out) if args.out else default_path(lm.fingerprint)
    profile.save(out)
    view = Table(title=f"KL of each tensor alone at INT{args.bits} (rest INT8), {profile.examples} questions")
    for col in ("layer", "K", "V"):
        view.add_column(col, justify="right")
    for layer, (k, v) in enumerate(zip(profile.k, profile.v, strict=True)):
        view.add_row(str(layer), f"{k:.4f}", f"{v:.4f}")
    _console().print(view)
    from kvlink.recipe import build

    for average in (3.0, 3.5):
        kb, vb = profile.allocate(average)
        recipe = build(k_layer_bits=kb, v_layer_bits=vb, group_size=args.group_size, sink=args.sink)
        print(f"mix{average:g}: K {list(kb)}  V {list(vb)}  name {recipe.name}")
    print(f"wrote {out}")
    return 0


def split_records(records: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The records of `split`'s examples (kvlink.eval.splits.split_of_eid); `all`: every record."""
    from kvlink.eval.splits import split_of_eid

    if split == "all":
        return list(records)
    return [r for r in records if split_of_eid(r["eid"]) == split]


def cmd_report(args: argparse.Namespace) -> int:
    from collections import Counter

    from kvlink.eval import grid, report
    from kvlink.eval.splits import split_of_eid

    out = Path(args.out)
    records, _ = grid.read_done(out)
    if not records:
        raise SystemExit(f"no samples in {out}/{grid.SAMPLES_GLOB}")
    chosen = split_records(records, args.split)
    if not chosen:
        held = Counter(str(split_of_eid(eid) or "no split") for eid in {r["eid"] for r in records})
        raise SystemExit(
            f"no samples of the {args.split} split in {out} (its examples: "
            f"{', '.join(f'{n} {s}' for s, n in sorted(held.items()))}); pick one with --split"
        )
    records = chosen
    meta = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    meta["report_split"] = args.split
    aliases = {c["name"]: c["aliases"] for c in meta.get("configs", []) if c.get("aliases")}
    result = report.write_report(records, out, meta, aliases)
    print(report.markdown(result["summary"], aliases))
    return 0


# --- calibrate -------------------------------------------------------------------------------
def quality_table(results: dict[str, Any], task: str = "squad", quality: str = "fidelity") -> Any:
    """A kvlink.budget.QualityTable: mean `quality` of each measured config of `task`, by quality_key."""
    from kvlink.budget import QualityTable

    rows = [r for r in results["summary"] if r["task"] == task]
    if not rows:
        raise ValueError(
            f"no results for task {task!r}; tasks: {sorted({r['task'] for r in results['summary']})}"
        )
    entries: dict[str, float] = {}
    for r in rows:
        value = r[quality]["mean"]
        if "key" in r and math.isfinite(value):
            entries[r["key"]] = float(value)
    meta = results.get("meta", {})
    return QualityTable(
        model=str(meta.get("fingerprint", "unknown")),
        entries=entries,
        source=f"kvlink-bench quality ({task}, {quality}, n={max(r['n'] for r in rows)})",
    )


def check_calibration_results(paths: Sequence[str | Path]) -> None:
    """Refuse (ValueError naming the example and its article) any quality run that measured an example outside
    the calibration split: the table is fitted on calibration data only. A run without samples counts as
    calibration only when its meta says it ran on that split."""
    from kvlink.eval import report
    from kvlink.eval.splits import CALIBRATION, require_calibration

    for path in paths:
        run = report.load_results(path)
        samples = run.get("samples") or []
        if samples:
            require_calibration(samples, f"kvlink-bench calibrate ({path})")
        elif run.get("meta", {}).get("split") != CALIBRATION:
            raise ValueError(
                f"kvlink-bench calibrate ({path}): no samples, and its meta does not say it ran on the calibration "
                f"split (split: {run.get('meta', {}).get('split')!r}); calibrate takes calibration-split runs only "
                "(kvlink-bench quality --split calibration)"
            )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvlink.budget import parse_budget
    from kvlink.eval import report

    try:
        check_calibration_results(args.results)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    results = report.merge_results(args.results)
    tasks = sorted({r["task"] for r in results["summary"]})
    task = args.task or ("squad" if "squad" in tasks else tasks[0])
    table = quality_table(results, task, args.quality)
    fingerprint = results.get("meta", {}).get("fingerprint")
    from kvlink.budget import default_quality_path

    path = Path(args.out) if args.out else default_quality_path(fingerprint or "unknown")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    checks = report.planner_check(results["summary"], table, budgets, task, args.quality)

    from rich.table import Table

    view = Table(title=f"planner pick vs the measured frontier ({task}, {args.quality})")
    for col in ("budget", "pick", "wire % FP16", args.quality, "on frontier", "best measured that fits"):
        view.add_column(col)
    for c in checks:
        view.add_row(
            f"{100 * c['budget']:.2f}%",
            str(c.get("pick")),
            f"{100 * c['pick_fraction']:.2f}%" if c.get("pick") else "–",
            f"{c['pick_quality']:.3f}" if c.get("pick") else "–",
            "yes" if c["on_frontier"] else "NO",
            f"{c.get('best')} ({c['best_quality']:.3f})" if c.get("best") else c.get("note", "–"),
        )
    console = _console()
    console.print(view)
    console.print(f"wrote quality table ({len(table.entries)} configs) to {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": str(path), "task": task, "checks": checks}, indent=1))
    return 0 if all(c["on_frontier"] for c in checks) else 1


# --- e2e ----------------------------------------------------------------------------------------
GRPC_PREFIX = struct.Struct(">BI")  # gRPC message framing: compressed flag, big-endian length
PACE_CHUNK = 64 * 1024


class PacedLink:
    """A loopback TCP connection whose sender is paced by a token bucket at `bits_per_s`.

    `send(blobs)` (sender thread) writes the blobs back to back, never getting ahead of
    start + bytes_sent / rate; the receiver reads from `self.receiver`. The bucket holds
    one PACE_CHUNK (the burst): a 64 KiB chunk leaves when its last byte's time is due.
    """

    def __init__(self, bits_per_s: float) -> None:
        self.rate = bits_per_s / 8.0  # bytes per second
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.sender = socket.create_connection(server.getsockname())
        self.receiver, _ = server.accept()
        server.close()
        for s in (self.sender, self.receiver):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.started = 0.0
        self.sent = 0

    def send(self, blobs: Sequence[bytes]) -> None:
        self.started = time.perf_counter()
        sent = 0
        for blob in blobs:
            view = memoryview(blob)
            for start in range(0, len(view), PACE_CHUNK):
                piece = view[start : start + PACE_CHUNK]
                due = self.started + (sent + len(piece)) / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self.sender.sendall(piece)
                sent += len(piece)
        self.sent = sent

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.receiver.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError(f"link closed after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def _transfer(link: PacedLink, blobs: Sequence[bytes], on_message: Any) -> float:
    """Send gRPC-framed `blobs` over `link` in a thread; the caller's thread reads each message and
    hands it to `on_message`. Returns the seconds from the first byte sent to the last one read."""
    framed = [GRPC_PREFIX.pack(0, len(b)) + b for b in blobs]
    thread = threading.Thread(target=link.send, args=(framed,), daemon=True)
    thread.start()
    for _ in framed:
        _flag, size = GRPC_PREFIX.unpack(link.recv_exact(GRPC_PREFIX.size))
        on_message(link.recv_exact(size))
    done = time.perf_counter()
    thread.join()
    return done - link.started


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def e2e_example(
    lm: Any,
    example: Any,
    configs: Sequence[Any],
    bandwidths: Sequence[float],
    repeats: int = 3,
    profile: Any = None,
) -> list[dict[str, Any]]:
    """Time to first answer token at the receiver, per (bandwidth, method), for one example.

    Methods: each config in `configs` (the context's KV, compressed, as kvlink.wire frames),
    "fp16-kv" (the full KV at FP16, same path) and "text" (the context and question as UTF-8;
    the receiver tokenizes and prefills). KV methods: ttft = sender select+encode+frame
    (the question is needed to select, so it is on the path) + transfer + receiver assemble
    and decode + first token (cache build + question forward). Text: transfer + prefill
    + first token. Each timing is the median of `repeats` runs after one warm-up.
    """
    from kvlink import wire
    from kvlink.cache import Prefill, prefill, prefill_observations
    from kvlink.codec import Codec
    from kvlink.eval.grid import GridConfig, _observes, _queries_for
    from kvlink.generate import greedy_answer
    from kvlink.prompt import context_ids, question_ids, question_rows
    from kvlink.recipe import build

    model, tok, device = lm.model, lm.tokenizer, lm.device
    ctx, q = example.encode(tok)
    methods = [*configs, GridConfig("fp16-kv", build())]
    kinds = {_observes(c.config) for c in methods}
    kinds |= {k for k in (_queries_for(c.config) for c in methods) if k is not None}
    kv, observations = prefill_observations(model, ctx, q, kinds, 32, question_rows(tok, example.question))

    def send_kv(c: Any) -> tuple[list[bytes], float, int]:
        codec = Codec(c.config, lm.geometry, profile)
        _sync(device)
        t0 = time.perf_counter()
        kept = codec.select(Prefill(kv, observations[_observes(c.config)], ctx, q))
        queries = _queries_for(c.config)
        encoded = codec.encode_kv(kv, kept, None if queries is None else observations[queries])
        frames = wire.to_frames(encoded, "0" * 32, "1" * 32, lm.fingerprint, 1 << 20)
        blobs = [f.SerializeToString() for f in frames]
        return blobs, time.perf_counter() - t0, int(encoded.fp16_bytes())

    def receive_kv(c: Any, link: PacedLink | None, blobs: list[bytes]) -> dict[str, float]:
        asm = wire.Assembler(lm.fingerprint, lm.geometry, profile_hashes=None)
        if link is None:
            t0 = time.perf_counter()
            for b in blobs:
                asm.feed_raw(b)
            transfer = time.perf_counter() - t0
        else:
            transfer = _transfer(link, blobs, asm.feed_raw)
        t1 = time.perf_counter()
        encoded, _ = asm.finish()
        decoded = Codec(encoded.recipe, lm.geometry, profile).decode(encoded, device, lm.dtype)
        _sync(device)
        t2 = time.perf_counter()
        answer = greedy_answer(model, tok, decoded, q, max_new_tokens=1)
        _sync(device)
        t3 = time.perf_counter()
        return {
            "transfer_s": transfer,
            "decode_s": t2 - t1,
            "first_token_s": t3 - t2,
            "token": answer.token_ids[0],
        }

    def receive_text(link: PacedLink | None, blob: bytes) -> dict[str, float]:
        got: list[bytes] = []
        if link is None:
            t0 = time.perf_counter()
            got.append(blob)
            transfer = time.perf_counter() - t0
        else:
            transfer = _transfer(link, [blob], got.append)
        t1 = time.perf_counter()
        context, question = json.loads(got[0].decode())
        c_ids, q_ids = context_ids(tok, context), question_ids(tok, question)
        pre = prefill(model, c_ids)
        _sync(device)
        t2 = time.perf_counter()
        answer = greedy_answer(model, tok, pre.kv, q_ids, max_new_tokens=1)
        _sync(device)
        t3 = time.perf_counter()
        return {
            "transfer_s": transfer,
            "prefill_s": t2 - t1,
            "first_token_s": t3 - t2,
            "token": answer.token_ids[0],
        }

    text_blob = json.dumps([example.context, example.question]).encode()
    prepared = {c.name: send_kv(c) for c in methods}  # warm-up of the sender path
    for c in methods:
        receive_kv(c, None, prepared[c.name][0])  # warm-up of the receiver path
    receive_text(None, text_blob)

    rows: list[dict[str, Any]] = []
    for bw in bandwidths:
        base = {"eid": example.eid, "task": example.task, "T": int(ctx.numel()), "bandwidth_bps": bw}
        for c in methods:
            runs = []
            for _ in range(repeats):
                blobs, encode_s, fp16 = send_kv(c)
                link = PacedLink(bw)
                try:
                    r = receive_kv(c, link, blobs)
                finally:
                    link.close()
                r["encode_s"] = encode_s
                r["ttft_s"] = encode_s + r["transfer_s"] + r["decode_s"] + r["first_token_s"]
                r["bytes"] = sum(len(b) + GRPC_PREFIX.size for b in blobs)
                runs.append(r)
            rows.append({**base, "method": c.name, "fp16_bytes": fp16, **_median(runs)})
        runs = []
        for _ in range(repeats):
            link = PacedLink(bw)
            try:
                r = receive_text(link, text_blob)
            finally:
                link.close()
            r["ttft_s"] = r["transfer_s"] + r["prefill_s"] + r["first_token_s"]
            r["bytes"] = len(text_blob) + GRPC_PREFIX.size
            runs.append(r)
        rows.append({**base, "method": "text", **_median(runs)})
    for row in rows:
        row["achieved_bps"] = 8 * row["bytes"] / row["transfer_s"] if row["transfer_s"] > 0 else math.nan
    return rows


def _median(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = values[0] if key == "token" else statistics.median(values)
    return out


def e2e_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (bandwidth, method): median over examples of each time, and ttft ratios (fp16-kv / method,
    text / method) computed per example first (same run, same example), then the median."""
    by_key: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["bandwidth_bps"], r["method"]), []).append(r)
    out = []
    for (bw, method), group in by_key.items():
        entry: dict[str, Any] = {"bandwidth_bps": bw, "method": method, "n": len(group)}
        for key in (
            "bytes",
            "encode_s",
            "transfer_s",
            "decode_s",
            "prefill_s",
            "first_token_s",
            "ttft_s",
            "achieved_bps",
        ):
            values = [g[key] for g in group if key in g]
            if values:
                entry[key] = statistics.median(values)
        for other, name in (("fp16-kv", "fp16_over_this"), ("text", "text_over_this")):
            ratios = []
            for g in group:
                match = [x for x in by_key.get((bw, other), []) if x["eid"] == g["eid"]]
                if match:
                    ratios.append(match[0]["ttft_s"] / g["ttft_s"])
            if ratios:
                entry[name] = statistics.median(ratios)
        out.append(entry)
    return out


def cmd_e2e(args: argparse.Namespace) -> int:
    import torch

    from kvlink.eval import grid

    device = _device(args.device)
    lm = _load(args.model, device, args.dtype)
    configs = [c for c in grid.resolve(args.configs or ["q2c50-int4"], lm.geometry) if c.name != "fp16"]
    bandwidths = [parse_bandwidth(b) for b in args.bandwidth.split(",")]
    specs = [
        (name, limit if limit is not None else args.limit) for name, limit in (args.task or [("long", None)])
    ]
    examples = _split_tasks(args, lm, specs)
    profile = grid.bench_profile(lm, args.profile) if grid.needs_profile(configs) else None
    rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    for example in tqdm(examples, desc="e2e", unit="ex", disable=args.no_progress):
        rows += e2e_example(lm, example, configs, bandwidths, args.repeats, profile)
    summary = e2e_summary(rows)
    result: dict[str, Any] = {
        "meta": {
            "model": lm.name,
            "fingerprint": lm.fingerprint,
            "device": str(lm.device),
            "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu",
            "dtype": str(lm.dtype).removeprefix("torch."),
            "repeats": args.repeats,
            "configs": [c.name for c in configs],
            "bandwidths_bps": bandwidths,
        },
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    from rich.table import Table

    view = Table(
        title=f"time to first answer token at the receiver ({lm.name}, {result['meta']['device_name']})"
    )
    for col in (
        "link",
        "method",
        "bytes",
        "encode",
        "transfer",
        "decode/prefill",
        "first token",
        "TTFT",
        "FP16-KV / this",
        "text / this",
    ):
        view.add_column(col, justify="right")
    for e in summary:
        view.add_row(
            f"{e['bandwidth_bps'] / 1e9:g} Gbit/s",
            e["method"],
            f"{e['bytes']:,.0f}",
            f"{1e3 * e.get('encode_s', 0.0):.1f} ms",
            f"{1e3 * e['transfer_s']:.1f} ms",
            f"{1e3 * e.get('decode_s', e.get('prefill_s', 0.0)):.1f} ms",
            f"{1e3 * e['first_token_s']:.1f} ms",
            f"{1e3 * e['ttft_s']:.1f} ms",
            f"{e.get('fp16_over_this', math.nan):.2f}x",
            f"{e.get('text_over_this', math.nan):.2f}x",
        )
    console = _console()
    console.print(view)
    console.print(f"wrote {out}")
    return 0


# --- argument parsing -------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF id or path (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--task", action="append", type=_task_spec, metavar="TASK[:N]",
        help="squad, long or needle; repeatable; TASK:N overrides --limit for that task",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None, help="a SQuAD-format JSON file (default: the shipped SQuAD v2 dev split)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="examples per task (quality: all, needle 50; e2e: 3)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model dtype (default fp32)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the long-context and needle tasks")
    p.add_argument(
        "--long-tokens", type=_token_range, default=None, metavar="MIN-MAX",
        help="context tokens of the long task (default 2048-7936: kvlink.eval.tasks.LONG_TOKENS)",
    )  # fmt: skip
    p.add_argument(
        "--split", choices=(*SPLITS, "all"), default="evaluation",
        help="articles to draw examples from (kvlink.eval.splits): evaluation (default; reporting), calibration "
        "(what calibrate takes), all (every article; any other --data file)",
    )  # fmt: skip
    p.add_argument(
        "--profile", default=None, help="calibrated projection profile (default: calibrated and cached)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlink-bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("quality", help="quality vs wire bytes over the grid (JSON, Markdown, Pareto PNG)")
    _common(q)
    q.add_argument(
        "--grid", choices=("default", "seeds", "full"), default=None, help="config grid (default: default)"
    )
    q.add_argument(
        "--configs", action="append", metavar="NAMES",
        help="comma-separated config names or presets (reference, seeds, kivi2, streamingllm, default); "
        "e.g. q2c50-int4,h2o25-k8v4,proj32-int4,seed-kv-asym. With --grid: added to it; alone: only these",
    )  # fmt: skip
    q.add_argument("--list-configs", action="store_true", help="print the resolved configs and exit")
    q.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    q.add_argument(
        "--resume", action="store_true", help="continue: skip (example, config) pairs in samples.jsonl"
    )
    q.add_argument("--max-new-tokens", type=int, default=16)
    q.add_argument(
        "--batch", type=int, default=None, help="configs decoded per batch (default 64 on CUDA, 8 on CPU)"
    )
    q.add_argument(
        "--no-ppl", action="store_true", help="skip the held-out perplexity (one prefill less per example)"
    )
    q.add_argument(
        "--ppl-every", type=int, default=1, metavar="N", help="perplexity on every N-th example only"
    )
    q.add_argument(
        "--shard", type=_shard, default=(0, 1), metavar="K/N",
        help="run examples K, K+N, ... only, into samples-KofN.jsonl; start N of these, one per GPU "
        "(--device cuda:K; several on ONE GPU measured no faster), then `kvlink-bench report OUT`",
    )  # fmt: skip
    q.add_argument("--ppl-prefix", type=int, default=512, help="max tokens of the prefilled first half")
    q.add_argument("--ppl-tokens", type=int, default=64, help="max continuation tokens scored")
    q.add_argument(
        "--needle-tokens", type=_token_range, default=None, metavar="MIN-MAX",
        help="context tokens of the needle task (default: --long-tokens)",
    )  # fmt: skip
    q.set_defaults(func=cmd_quality)

    c = sub.add_parser(
        "calibrate", help="write the model's quality table; check the planner's picks are on the frontier"
    )
    c.add_argument(
        "results", nargs="+",
        help="results.json of a quality run (or its directory); several runs of one model merge",
    )  # fmt: skip
    c.add_argument(
        "--task", default=None, help="task whose results define quality (default: squad if present)"
    )
    c.add_argument("--quality", default="fidelity", help="summary metric used as quality (default fidelity)")
    c.add_argument("--out", default=None, help="table path (default <cache_dir>/quality/<fingerprint>.json)")
    c.add_argument("--budgets", default="18.75%,12.5%,6.25%", help="comma-separated budgets to check")
    c.add_argument("--json", default=None, help="also write the check as JSON here")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser(
        "e2e", help="time to first token over a paced loopback link: compressed KV vs FP16 KV vs text"
    )
    _common(e)
    e.add_argument(
        "--configs", action="append", metavar="NAMES", help="compressed configs (default q2c50-int4)"
    )
    e.add_argument(
        "--bandwidth", default=BANDWIDTHS, help=f"comma-separated link rates (default {BANDWIDTHS})"
    )
    e.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    e.add_argument("--out", default="bench/results/e2e.json", help="JSON output path")
    e.set_defaults(func=cmd_e2e)

    n = sub.add_parser("entropy", help="how much an entropy coder could save on the codes, vs zstd")
    n.add_argument("--task", type=_task_spec, action="append", help="task[:N] (default squad:20)")
    n.add_argument("--configs", default="int8,int4,int3,int2,int4-sink1", help="comma-separated config names")
    n.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    n.add_argument("--model", default=None, help="model alias, HF id or local path (default: embedded)")
    n.add_argument("--device", default=None)
    n.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    n.add_argument("--data", default=None, help="SQuAD-format JSON (default: the packaged dev set)")
    n.add_argument("--out", default=None, help="write the per-message rows and the summary as JSON")
    n.set_defaults(func=cmd_entropy)

    s = sub.add_parser(
        "sensitivity", help="KL per layer and K/V at low bits on held-out questions (for mix<bits> configs)"
    )
    s.add_argument("--model", default=None, help="model alias, HF id or local path (default: embedded)")
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    s.add_argument("--data", default=None, help="SQuAD-format JSON (default: the packaged dev set)")
    s.add_argument("--limit", type=int, default=16, help="held-out questions (default 16)")
    s.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="width of the tensor under test")
    s.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    s.add_argument("--sink", type=int, default=1, help="fp16 sink entries per tensor (default 1)")
    s.add_argument("--batch", type=int, default=16, help="variant caches per forward (default 16)")
    s.add_argument(
        "--out", default=None, help="profile path (default <cache_dir>/sensitivity/<fingerprint>.json)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sensitivity)

    r = sub.add_parser("report", help="rebuild results.json, results.md and plots from a run's samples.jsonl")
    r.add_argument("out", help="the quality run's output directory")
    r.add_argument(
        "--split", choices=(*SPLITS, "all"), default="evaluation",
        help="report the samples of this split only (default evaluation; all: every sample)",
    )  # fmt: skip
    r.set_defaults(func=cmd_report)

    from kvlink.eval import bench_kernels

    sub.add_parser(
        "abuse", help="good senders beside one hostile authenticated peer: what it costs them", add_help=False
    )
    sub.add_parser(
        "scale", add_help=False,
        help="TTFT through kvlink-serve over paced links at real geometries: text vs FP16 vs compressed KV",
    )  # fmt: skip
    k = sub.add_parser("kernels", help="Triton kernels vs the torch reference (GPU)")
    bench_kernels.build_parser(k)
    k.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `kvlink-bench`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kernels"] and not {"-h", "--help"} & set(argv[1:]):
        from kvlink.eval.bench_kernels import main_kernels

        return main_kernels(argv[1:])
    if argv[:1] == ["abuse"]:  # its own parser: good senders beside one hostile peer, on a receiver it starts
        from kvlink.eval.bench_abuse import main as main_abuse

        return main_abuse(argv[1:])
    if argv[:1] == ["scale"]:  # its own parser: the real service over paced links (kvlink.eval.bench_scale)
        from kvlink.eval.bench_scale import main as main_scale

        return main_scale(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    if args.command == "e2e" and args.limit is None:
        args.limit = 3
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
