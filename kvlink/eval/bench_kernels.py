"""Kernel benchmark (GPU only, not a test): Triton kernels vs the torch reference, in one run.

    python -m kvlink.eval.bench_kernels --out bench/results/kernels-h100.json
    kvlink-bench kernels --out ...          (the same, through kvlink.eval.cli -> main_kernels)

For every geometry (layers, kv_heads, head_dim) and context length T it times,
per layer tensor (H, T, D), with triton.testing.do_bench (median, L2 flushed):

- `dequant`: INT8/4/3/2 (token and channel groups) and NF4 (token) packed
  bytes -> (H, T, D) in the output dtype, Triton vs `kvlink.kernels.reference`;
- `dequant-msg`: the same cases on a whole message's K (or V) stack
  (layers*H, T, D) in one launch, which is how `Codec.decode` runs them, with
  its own copy baseline of the stack's size;
- `expand`: fused dequantize + low-rank expand of an INT4 latent (H, T, D/4)
  with an fp16 basis (per-message SVD) and with an fp32 projection + mean
  (calibrated profile), vs the unfused reference (dequantize to fp32, matmul,
  cast); `unfused_triton_ms` is Triton dequantize + torch matmul + cast;
- `quantize`: quantize + pack (INT8, INT4, INT2 channel, NF4), vs the reference.

Each row reports the median time, the effective bandwidth (bytes read + bytes
written, counting every input and output once), its fraction of a
device-to-device copy of the output size (torch `copy_`, timed in the same
run, counted as 2x its bytes), and the speedup over the reference. do_bench
times include Python and launch overhead (tens of microseconds per call for a
Triton kernel), which dominates at small T and makes those rows noisy; the
`graph_*` fields time the same Triton call and the copy inside CUDA graphs with
a cold L2 (see `_graph_ms`), the GPU-only view. Before
timing, each Triton result is checked against the reference on the same
input: codes/scale/zero byte-equal to the reference run on CPU (the specification; see
`_bench_shape`) for quantize, max |diff| against the reference for values.
The JSON also holds a Markdown table of the results ("markdown").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchShape:
    """One point of the grid: a model geometry at context length `length`."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    length: int

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.length, self.head_dim)  # one layer's K or V: (H, T, D)


GEOMETRIES: dict[str, tuple[int, int, int]] = {
    "smollm2-135m": (30, 3, 64),  # the embedded model: layers, kv_heads, head_dim
    "qwen2.5-7b": (28, 4, 128),
}
LENGTHS: tuple[int, ...] = (4096, 16384, 32768)
DEQUANT_CASES: tuple[tuple[str, str], ...] = (
    ("int8", "token"),
    ("int8", "channel"),
    ("int4", "token"),
    ("int4", "channel"),
    ("int3", "token"),
    ("int3", "channel"),
    ("int2", "token"),
    ("int2", "channel"),
    ("nf4", "token"),
    (
        "int3cw",
        "channel",
    ),  # a width per key channel (kvlink.quant.widths; uniform widths here: the same work)
    ("int3rw", "token"),  # a width per value row
)
QUANT_CASES: tuple[tuple[str, str], ...] = (
    ("int8", "token"),
    ("int4", "token"),
    ("int2", "channel"),
    ("nf4", "token"),
)
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def default_shapes(
    geometries: Sequence[str] = tuple(GEOMETRIES), lengths: Sequence[int] = LENGTHS
) -> list[BenchShape]:
    shapes: list[BenchShape] = []
    for name in geometries:
        if name not in GEOMETRIES:
            raise ValueError(f"unknown geometry {name!r}; known: {sorted(GEOMETRIES)}")
        layers, heads, dim = GEOMETRIES[name]
        shapes.extend(BenchShape(name, layers, heads, dim, t) for t in lengths)
    return shapes


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _bench(fn: Callable[[], Any], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


FLUSH_BYTES = 128 * 2**20  # more than an H100's 50 MB L2


def _graph_ms(fn: Callable[[], Any], flush: Tensor, calls: int = 10, replays: int = 5) -> float | None:
    """GPU-only time of fn with a cold L2: CUDA graphs of `calls` x (flush, fn) minus `calls` x flush.

    Free of Python and launch overhead, which do_bench includes and which
    dominates at small T; None when fn cannot be captured.
    """
    try:
        fn()
        torch.cuda.synchronize()
        both, alone = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(both):
            for _ in range(calls):
                flush.zero_()
                fn()
        with torch.cuda.graph(alone):
            for _ in range(calls):
                flush.zero_()
    except Exception:  # capture needs graph-safe code (no host syncs)
        logger.warning("could not capture %s in a CUDA graph", fn, exc_info=True)
        torch.cuda.synchronize()
        return None

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))

    for graph in (both, alone):  # warm-up replays
        replay_ms(graph)
    diffs = sorted(replay_ms(both) - replay_ms(alone) for _ in range(replays))
    return max(diffs[len(diffs) // 2], 1e-6) / calls


def _row(
    kind: str,
    shape: BenchShape,
    label: str,
    ms: float,
    ref_ms: float,
    moved: int,
    copy: dict[str, Any],
    check: dict[str, Any],
    graph_ms: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    gbps = moved / (ms * 1e-3) / 1e9
    graph_gbps = moved / (graph_ms * 1e-3) / 1e9 if graph_ms else None
    copy_gbps = copy["gbps"]
    return {
        "kind": kind,
        "geometry": shape.name,
        "length": shape.length,
        "shape": list(shape.tensor_shape),
        "case": label,
        "ms": ms,
        "ref_ms": ref_ms,
        "speedup": ref_ms / ms,
        "bytes": moved,
        "gbps": gbps,
        "copy_fraction": gbps / copy_gbps,
        "graph_ms": graph_ms,
        "graph_gbps": graph_gbps,
        "graph_copy_fraction": graph_gbps / copy["graph_gbps"] if graph_gbps and copy["graph_gbps"] else None,
        "cache_ms": ms * 2 * shape.layers,  # every layer's K and V, one launch each
        "check": check,
        **extra,
    }


def _value_check(out: Tensor, ref: Tensor) -> dict[str, Any]:
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp_min(1e-30)
    return {
        "exact": bool(torch.equal(out, ref)),
        "max_abs_diff": float(diff.max()),
        "max_rel_to_amax": float(diff.max() / scale),
    }


def _bytes_check(a: Any, b: Any) -> dict[str, Any]:
    same = {}
    for name in ("codes", "scale", "zero"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            same[name] = x is None and y is None
        else:
            same[name] = bool(torch.equal(x.cpu().view(torch.uint8), y.cpu().view(torch.uint8)))
    return {"exact": all(same.values()), **same}


def _bench_shape(
    shape: BenchShape,
    dev: torch.device,
    dtype: torch.dtype,
    group_size: int,
    rank_fraction: float,
    rep_ms: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The copy baseline and every kernel row for one shape."""
    from kvlink.kernels import dequant as tdq
    from kvlink.kernels import quant as tq
    from kvlink.kernels import reference as ref
    from kvlink.quant import QuantSpec

    rows: list[dict[str, Any]] = []
    h, t, d = shape.tensor_shape
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn((h, t, d), generator=gen, device=dev).to(dtype)  # (H, T, D) cache tensor
    src = torch.randn((h, t, d), generator=gen, device=dev).to(dtype)
    dst = torch.empty_like(src)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=dev)
    copy_ms = _bench(partial(dst.copy_, src), rep_ms)
    copy_graph_ms = _graph_ms(partial(dst.copy_, src), flush)
    moved = 2 * _nbytes(dst)
    copy = {
        "geometry": shape.name,
        "length": t,
        "bytes": moved,
        "ms": copy_ms,
        "gbps": moved / (copy_ms * 1e-3) / 1e9,
        "graph_ms": copy_graph_ms,
        "graph_gbps": moved / (copy_graph_ms * 1e-3) / 1e9 if copy_graph_ms else None,
    }
    logger.info("%s T=%d: copy %.1f GB/s", shape.name, t, copy["gbps"])

    for fmt, axis in DEQUANT_CASES:
        q = ref.quantize_pack(x, QuantSpec(fmt, group_size, axis))
        out = tdq.dequantize_into(q, dtype)
        check = _value_check(out, ref.dequantize_into(q, dtype))
        ms = _bench(partial(tdq.dequantize_into, q, dtype), rep_ms)
        graph_ms = _graph_ms(partial(tdq.dequantize_into, q, dtype), flush)
        ref_ms = _bench(partial(ref.dequantize_into, q, dtype), rep_ms)
        moved = _nbytes(q.codes, q.scale, q.zero, q.widths, out)
        rows.append(_row("dequant", shape, f"{fmt}-{axis}", ms, ref_ms, moved, copy, check, graph_ms))
        logger.info("dequant %s-%s: %.4f ms, %.0f%% of copy, %.1fx", fmt, axis, ms,
                    100 * rows[-1]["copy_fraction"], rows[-1]["speedup"])  # fmt: skip

    rows.extend(_bench_message(shape, dev, dtype, group_size, rep_ms, flush))

    rank = max(1, round(d * rank_fraction))
    latent = torch.randn((h, t, rank), generator=gen, device=dev)  # (H, T, r)
    q = ref.quantize_pack(latent, QuantSpec("int4", group_size, "token"))
    svd_basis = torch.randn((h, rank, d), generator=gen, device=dev).to(torch.float16)  # (H, r, D)
    projection = torch.randn((h, d, rank), generator=gen, device=dev)  # (H, D, r), used transposed
    mean = torch.randn((h, d), generator=gen, device=dev)
    for label, basis, mu in (("svd", svd_basis, None), ("profile", projection.transpose(-1, -2), mean)):
        out = tdq.dequantize_expand(q, basis, mu, dtype)
        check = _value_check(out, ref.dequantize_expand(q, basis, mu, dtype))
        ms = _bench(partial(tdq.dequantize_expand, q, basis, mu, dtype), rep_ms)
        graph_ms = _graph_ms(partial(tdq.dequantize_expand, q, basis, mu, dtype), flush)
        ref_ms = _bench(partial(ref.dequantize_expand, q, basis, mu, dtype), rep_ms)
        unfused_ms = _bench(partial(_unfused_triton, q, basis, mu, dtype), rep_ms)
        moved = _nbytes(q.codes, q.scale, q.zero, basis, mu, out)
        rows.append(_row("expand", shape, f"int4-r{rank}-{label}", ms, ref_ms, moved, copy, check, graph_ms,
                         rank=rank, unfused_triton_ms=unfused_ms))  # fmt: skip
        logger.info("expand %s: %.4f ms, %.1fx", label, ms, rows[-1]["speedup"])

    for fmt, axis in QUANT_CASES:
        spec = QuantSpec(fmt, group_size, axis)
        # The CPU reference is the specification: on CUDA, torch divides by a Python scalar
        # through its reciprocal, so the reference run there can differ in the last bit of a scale.
        mine, spec_bytes = tq.quantize_pack(x, spec), ref.quantize_pack(x.cpu(), spec)
        check = _bytes_check(mine, spec_bytes)
        check["ref_on_device_matches_cpu"] = _bytes_check(ref.quantize_pack(x, spec), spec_bytes)["exact"]
        ms = _bench(partial(tq.quantize_pack, x, spec), rep_ms)
        graph_ms = _graph_ms(partial(tq.quantize_pack, x, spec), flush)
        ref_ms = _bench(partial(ref.quantize_pack, x, spec), rep_ms)
        moved = _nbytes(x, mine.codes, mine.scale, mine.zero)
        rows.append(_row("quantize", shape, f"{fmt}-{axis}", ms, ref_ms, moved, copy, check, graph_ms))
        logger.info("quantize %s-%s: %.4f ms, %.1fx", fmt, axis, ms, rows[-1]["speedup"])
    return copy, rows


def _bench_message(
    shape: BenchShape, dev: torch.device, dtype: torch.dtype, group_size: int, rep_ms: int, flush: Tensor
) -> list[dict[str, Any]]:
    """`dequant-msg` rows: every layer's K (or V) of one message in ONE launch, as the receiver decodes.

    kvlink.codec.Codec.decode lays the packed streams of tensors quantized alike
    end to end and dequantizes them as one (layers*H, T, D) stack; a uniform
    config takes two launches per message (K per channel, V per token). The copy
    baseline here is a copy of the same (layers*H, T, D) bytes, timed in this run.
    """
    from kvlink.kernels import dequant as tdq
    from kvlink.kernels import reference as ref
    from kvlink.quant import QuantSpec

    h, t, d = shape.tensor_shape
    stack = (shape.layers * h, t, d)
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(stack, generator=gen, device=dev).to(dtype)
    dst = torch.empty_like(x)
    copy_ms = _bench(partial(dst.copy_, x), rep_ms)
    copy_graph_ms = _graph_ms(partial(dst.copy_, x), flush)
    moved = 2 * _nbytes(dst)
    copy = {
        "gbps": moved / (copy_ms * 1e-3) / 1e9,
        "graph_gbps": moved / (copy_graph_ms * 1e-3) / 1e9 if copy_graph_ms else None,
    }
    del dst
    logger.info("%s T=%d message stack %s: copy %.1f GB/s", shape.name, t, stack, copy["gbps"])
    rows: list[dict[str, Any]] = []
    for fmt, axis in DEQUANT_CASES:
        q = ref.quantize_pack(x, QuantSpec(fmt, group_size, axis))
        out = tdq.dequantize_into(q, dtype)
        check = _value_check(out, ref.dequantize_into(q, dtype))
        del out
        ms = _bench(partial(tdq.dequantize_into, q, dtype), rep_ms)
        graph_ms = _graph_ms(partial(tdq.dequantize_into, q, dtype), flush)
        ref_ms = _bench(partial(ref.dequantize_into, q, dtype), rep_ms)
        moved = _nbytes(q.codes, q.scale, q.zero) + x.numel() * x.element_size()
        row = _row("dequant-msg", shape, f"{fmt}-{axis}", ms, ref_ms, moved, copy, check, graph_ms,
                   copy_gbps=copy["gbps"], copy_graph_gbps=copy["graph_gbps"])  # fmt: skip
        row["shape"], row["cache_ms"] = list(stack), 2 * ms  # K stack + V stack
        rows.append(row)
        logger.info("dequant-msg %s-%s: %.4f ms, %.0f%% of copy, %.1fx", fmt, axis, ms,
                    100 * row["copy_fraction"], row["speedup"])  # fmt: skip
        del q
        torch.cuda.empty_cache()
    return rows


def _unfused_triton(q: Any, basis: Tensor, mean: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Triton dequantize to fp32, then torch matmul (+ mean) and cast: fused minus the fusion."""
    from kvlink.kernels import dequant as tdq

    full = torch.matmul(tdq.dequantize_into(q, torch.float32), basis.float())  # (H, T, D) fp32
    return (full + mean[:, None, :] if mean is not None else full).to(dtype)


def run_kernel_bench(
    out_path: str | Path | None,
    shapes: Sequence[BenchShape] | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.float16,
    group_size: int = 32,
    rank_fraction: float = 0.25,
    rep_ms: int = 100,
) -> dict[str, Any]:
    """Benchmark every kernel on every shape; write the results as JSON to `out_path` (if given).

    shapes: default GEOMETRIES x LENGTHS. dtype: the cache (output) dtype.
    Returns the dict that was written: environment, per-shape copy bandwidth,
    one row per (shape, kernel, case), and a Markdown table.
    """
    import triton

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the kernel benchmark needs a CUDA device, got {device!r}")
    shapes = list(shapes) if shapes is not None else default_shapes()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    copies: list[dict[str, Any]] = []
    for shape in shapes:
        copy, shape_rows = _bench_shape(shape, dev, dtype, group_size, rank_fraction, rep_ms)
        copies.append(copy)
        rows.extend(shape_rows)
        torch.cuda.empty_cache()

    result: dict[str, Any] = {
        "benchmark": "kernels",
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "group_size": group_size,
        "rank_fraction": rank_fraction,
        "timer": f"triton.testing.do_bench median, warmup 25 ms, rep {rep_ms} ms, L2 flushed",
        "shapes": [asdict(s) for s in shapes],
        "copy": copies,
        "rows": rows,
        "all_checks_pass": all(_check_ok(r) for r in rows),
        "elapsed_s": time.perf_counter() - started,
    }
    result["markdown"] = markdown_table(result)
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        logger.info("wrote %s", path)
    return result


def _check_ok(row: dict[str, Any]) -> bool:
    """Bytes must be equal; values within the tolerance tests/test_kernels.py states for GPUs."""
    check = row["check"]
    if row["kind"] == "quantize":
        return bool(check["exact"])
    tol = 1e-2 if row["kind"] == "expand" else 2e-3  # relative to the tensor's max |value|
    return bool(check["max_rel_to_amax"] <= tol)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown_table(result: dict[str, Any]) -> str:
    """One line per row: time per layer tensor, GB/s, % of the same-run copy, speedup over the reference."""
    lines = [
        f"Device: {result['device']}; output dtype {result['dtype']}; group size {result['group_size']}; "
        f"times per layer tensor (H, T, D), and for `dequant-msg` per message stack (layers*H, T, D): "
        f"every layer's K (or V) in one launch, as the receiver decodes, against a copy of that stack; "
        f"{result['timer']}. "
        "'GPU-only' columns: CUDA-graph replay with a cold L2 (no Python/launch overhead), "
        "kernel and copy alike.",
        "",
        "| geometry | T | kernel | case | ms | GB/s | % of copy | ref ms | speedup | GPU-only ms | GPU-only % of copy "
        "| check |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.4f}"
        lines.append(
            f"| {r['geometry']} | {r['length']} | {r['kind']} | {r['case']} | {r['ms']:.4f} | {r['gbps']:.0f} "
            f"| {_pct(r['copy_fraction'])} | {r['ref_ms']:.4f} | {r['speedup']:.1f}x | {graph} "
            f"| {_pct(r['graph_copy_fraction'])} | {'ok' if _check_ok(r) else 'FAIL'} |"
        )
    lines += ["", "| geometry | T | copy GB/s | GPU-only copy GB/s |", "|---|---:|---:|---:|"]
    for c in result["copy"]:
        graph = "-" if c["graph_gbps"] is None else f"{c['graph_gbps']:.0f}"
        lines.append(f"| {c['geometry']} | {c['length']} | {c['gbps']:.0f} | {graph} |")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `kvlink-bench kernels` (pass a subparser to extend it)."""
    p = parser or argparse.ArgumentParser(prog="kvlink-bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/kernels.json", help="JSON output path")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="cache (output) dtype")
    p.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=sorted(GEOMETRIES))
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--rank-fraction", type=float, default=0.25, help="latent rank / head_dim for expand")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    p.add_argument("--quick", action="store_true", help="only T=4096")
    return p


def main_kernels(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvlink-bench kernels` / `python -m kvlink.eval.bench_kernels`; 0 when every check passes."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.group_size < 1 or not math.isfinite(args.rank_fraction) or not 0 < args.rank_fraction <= 1:
        raise SystemExit(f"bad --group-size {args.group_size!r} or --rank-fraction {args.rank_fraction!r}")
    lengths = [4096] if args.quick else args.lengths
    try:
        result = run_kernel_bench(
            args.out,
            shapes=default_shapes(args.geometries, lengths),
            device=args.device,
            dtype=DTYPES[args.dtype],
            group_size=args.group_size,
            rank_fraction=args.rank_fraction,
            rep_ms=args.rep_ms,
        )
    except RuntimeError as exc:
        print(f"kvlink-bench kernels: {exc}")
        return 2
    print(result["markdown"])
    print(f"\nwrote {args.out}")
    return 0 if result["all_checks_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main_kernels())
