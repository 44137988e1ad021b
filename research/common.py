"""Shared harness of the issue-24 screens (research beside the product: imports kvlink, never imported by it).

What every screen does, so their numbers compare:

- Data: the CALIBRATION split only (kvlink.eval.splits). Its paragraphs are cut in two by their index
  inside their article: even paragraphs give the screened questions (`screen_examples`, spread evenly over
  the four articles), odd paragraphs the text that profiles (PCA bases, predictors, codebooks) are fitted
  on (`fit_texts`). Nothing is fitted on a screened paragraph; nothing of the evaluation split is read.
- Reference: the full context KV rounded to FP16 (what the codec's `fp16` config decodes), 16-token greedy
  answer; quality = answer fidelity (token F1 vs that answer) and mean KL along it, as kvlink.eval.fidelity.
- Baselines: kvlink's own configs through the real codec (kvlink.eval.grid.Evaluator): exact wire bytes.
- A candidate returns (decoded ContextKV, Bytes): its per-message bytes counted by the screen (payload,
  side information, positions) plus the framing the real codec's FP16 message of the same context pays on
  top of its payload (headers, protobuf, gRPC, HTTP/2 allowance), plus 32 bytes per extra part per tensor.
  Profile data (bases, predictors, codebooks) travel once by hash: their size is reported, not counted.
- Paired bootstrap over questions (kvlink.eval.report.bootstrap_ci) of candidate minus baseline.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvlink.cache import ContextKV, Observation, Observe, prefill, prefill_observations
from kvlink.eval import fidelity
from kvlink.eval.grid import Evaluator, GridConfig, RunSettings, resolve
from kvlink.eval.report import bootstrap_ci
from kvlink.eval.splits import CALIBRATION_TITLES, calibration_examples, require_calibration
from kvlink.eval.tasks import Example, long_examples, squad_examples
from kvlink.layerbits import Sensitivity
from kvlink.models import LoadedModel, load_model
from kvlink.prompt import context_ids, question_rows

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KVLINK_RESEARCH_CACHE", "/tmp/kvlink-research"))
# RESEARCH_DEVICE=cuda runs the model and the coding on the GPU (the rANS coder stays on the CPU).
DEVICE = os.environ.get("RESEARCH_DEVICE", "cpu")
PART_BYTES = 32  # framing allowance per extra part of a tensor (a protobuf part header + checksum)

# Baselines are kvlink recipe names (kvlink.recipe grammar, as `kvlink-bench quality --configs` takes them).
PICK = "kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question"
"""The planner's quantizer at 12.5-25% of FP16; with Q2C per layer (q2c90%/layer+PICK, q2c40%/layer+PICK) its picks."""
LEGACY_NAMES: dict[str, str] = {
    "int2-g64-sink1": "kint2c/vint2t-g64+sink1",
    "int3-g64-sink1": "kint3c/vint3t-g64+sink1",
    "k4v3-g64-sink1": "kint4c/vint3t-g64+sink1",
    "k3v2-g64-sink1": "kint3c/vint2t-g64+sink1",
    "k4v3-g64-sink1-qround-kw-vw": PICK,
    **{f"q2c{r}-layer-k4v3-g64-sink1-qround-kw-vw": f"q2c{r}%/layer+{PICK}" for r in (90, 65, 40, 35, 20)},
    **{f"q2c{r}-layer": f"q2c{r}%/layer+fp16" for r in (50, 75, 90)},
}
"""Baseline names of the grid grammar before 2026-12 (kvlink 12bfafe) -> the same recipes' names today: the
results stored under research/results/ before the recipe grammar use the old ones (`current_names`)."""

torch.set_grad_enabled(False)
# The machine's 2 cores are shared: one intra-op thread avoids oversubscription (RESEARCH_THREADS to change).
torch.set_num_threads(int(os.environ.get("RESEARCH_THREADS", "1")))


# --- data ---------------------------------------------------------------------------------------
def _paragraph_index() -> dict[str, tuple[str, int]]:
    """Paragraph text -> (article, index inside the article) over the calibration split."""
    out: dict[str, tuple[str, int]] = {}
    counters: dict[str, int] = {}
    for qa in calibration_examples(answerable_only=False):
        if qa.context not in out:
            out[qa.context] = (qa.title, counters.get(qa.title, 0))
            counters[qa.title] = counters.get(qa.title, 0) + 1
    return out


def screen_examples(n: int, offset: int = 0, split: str = "calibration", task: str = "squad") -> list[Example]:
    """`n` answerable calibration questions on EVEN paragraphs, spread evenly over the split (file order);
    `offset` shifts the stride (a second, disjoint draw: offset=1).

    split="evaluation" is for MEASURING a method already chosen (the lead's GPU runs): the first `n`
    answerable evaluation questions in file order, as `kvlink-bench quality --split evaluation` takes them.
    """
    if task == "long":  # 2k-8k-token contexts of the split (kvlink.eval.tasks.long_examples), evenly spread
        pool = long_examples(lm().tokenizer, split=split)
        return pool[offset :: max(1, len(pool) // n)][:n]
    if split == "evaluation":
        return squad_examples(split="evaluation")[:n]
    index = _paragraph_index()
    pool = [e for e in squad_examples(split="calibration") if index[e.context][1] % 2 == 0]
    stride = max(1, len(pool) // n)
    chosen = pool[offset::stride][:n]
    require_calibration(chosen, "a research screen")
    return chosen


def fit_texts(limit: int | None = None) -> list[str]:
    """Calibration-split paragraphs with ODD index inside their article: what profiles are fitted on."""
    texts = [p for p, (_, i) in _paragraph_index().items() if i % 2 == 1]
    return texts[:limit] if limit is not None else texts


# --- model ----------------------------------------------------------------------------------------
_LM: LoadedModel | None = None


def lm() -> LoadedModel:
    global _LM
    if _LM is None:
        torch.manual_seed(0)
        _LM = load_model(None, DEVICE, "fp32")
    return _LM


def fp16_kv(kv: ContextKV) -> ContextKV:
    """The cache as the sender quantizes it: float16 values, held in float32."""
    return kv.to(dtype=torch.float16).to(dtype=torch.float32)


def rope_cos_sin(positions: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) of the model's rotary embedding at `positions` (n,), each (n, head_dim)."""
    model = lm().model
    d = lm().geometry.head_dim
    x = torch.zeros(1, positions.numel(), d, device=positions.device)
    cos, sin = model.model.rotary_emb(x, positions.reshape(1, -1))
    return cos[0], sin[0]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrope(k: Tensor, positions: Tensor) -> Tensor:
    """Keys (H, n, D) after RoPE at `positions` -> before it (the receiver re-applies it: it knows positions)."""
    cos, sin = rope_cos_sin(positions)
    return k * cos - _rotate_half(k) * sin


def rope(k: Tensor, positions: Tensor) -> Tensor:
    cos, sin = rope_cos_sin(positions)
    return k * cos + _rotate_half(k) * sin


@dataclass
class FitKV:
    """KV of the fit paragraphs, per layer: keys (pre- and post-RoPE) and values, (H, N, D) float32, the
    sink (position 0 of each paragraph) left out; N tokens in all."""

    keys: list[Tensor]
    keys_pre: list[Tensor]
    values: list[Tensor]
    tokens: int
    texts: int


def fit_kv(limit: int | None = None) -> FitKV:
    """Prefill the fit paragraphs once (cached on disk as float16 under CACHE)."""
    texts = fit_texts(limit)
    path = CACHE / f"fitkv-{len(texts)}.pt"
    if path.is_file():
        data = torch.load(path, map_location=DEVICE)
        return FitKV(
            [k.float() for k in data["k"]], [k.float() for k in data["kp"]], [v.float() for v in data["v"]],
            data["n"], data["texts"],
        )  # fmt: skip
    model, tok = lm().model, lm().tokenizer
    ks: list[list[Tensor]] = []
    kps: list[list[Tensor]] = []
    vs: list[list[Tensor]] = []
    for text in texts:
        kv = fp16_kv(prefill(model, context_ids(tok, text)).kv)
        pos = torch.arange(1, kv.length, device=DEVICE)
        for layer in range(kv.num_layers):
            if len(ks) <= layer:
                ks.append([])
                kps.append([])
                vs.append([])
            k = kv.keys[layer][:, 1:]
            ks[layer].append(k)
            kps[layer].append(unrope(k, pos))
            vs[layer].append(kv.values[layer][:, 1:])
    out = FitKV(
        [torch.cat(x, 1) for x in ks], [torch.cat(x, 1) for x in kps], [torch.cat(x, 1) for x in vs],
        sum(x.shape[1] for x in ks[0]), len(texts),
    )  # fmt: skip
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"k": [k.half() for k in out.keys], "kp": [k.half() for k in out.keys_pre],
         "v": [v.half() for v in out.values], "n": out.tokens, "texts": out.texts},
        path,
    )  # fmt: skip
    return out


def sensitivity() -> Sensitivity:
    """The shipped sensitivity profile (KL of each tensor alone at INT2, measured on the calibration split)."""
    return Sensitivity.for_model(lm().fingerprint, lm().name)


# --- one context ---------------------------------------------------------------------------------------
@dataclass
class Context:
    """One screened question: its cache (FP16-rounded), the question's observation, the reference."""

    example: Example
    kv: ContextKV
    question: Observation
    q_ids: Tensor
    ref_tokens: list[int]
    ref_text: str
    ref_forced: Tensor
    fp16_bytes: int
    framing: int = 0  # wire bytes of the codec's FP16 message beyond its encoded bytes
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Bytes:
    """Per-message bytes of a candidate as the screen counts them (framing is added by the harness)."""

    payload: float  # entropy-coded or packed codes
    side: float = 0.0  # scales, steps, widths, sink entries
    positions: float = 0.0
    parts: int = 0  # extra parts per message beyond the FP16 message's (one per tensor)

    def total(self, framing: int) -> float:
        return self.payload + self.side + self.positions + framing + PART_BYTES * self.parts


Candidate = Callable[[Context], dict[str, tuple[ContextKV, Bytes]]]


def prepare(example: Example, evaluator: Evaluator | None) -> Context:
    model, tok = lm().model, lm().tokenizer
    ctx, q = example.encode(tok)
    kv, obs = prefill_observations(model, ctx, q, {Observe.QUESTION}, 32, question_rows(tok, example.question))
    kv = fp16_kv(kv)
    ref = fidelity.batched_answers(model, tok, [kv], q, (), 16)
    tokens = ref.tokens[0]
    forced = fidelity.batched_answers(model, tok, [kv], q, [tokens], 0).forced[0][0]
    c = Context(
        example, kv, obs[Observe.QUESTION], q, tokens, fidelity.answer_text(tok, model, tokens), forced,
        kv.fp16_bytes(),
    )  # fmt: skip
    if evaluator is not None:
        for rec in evaluator.evaluate(example):
            c.baseline[rec["config"]] = rec
        fp = c.baseline["fp16"]
        c.framing = int(fp["wire_bytes"] - fp["encoded_bytes"])
        if fp["ref_answer"] != c.ref_text:
            print(f"warning: {example.eid}: the codec's reference answer differs from the screen's", flush=True)
    return c


def score(c: Context, decoded: Sequence[ContextKV], batch: int = 8) -> list[tuple[float, float, str]]:
    """(fidelity, KL, answer) of each decoded cache against the context's reference."""
    model, tok = lm().model, lm().tokenizer
    out: list[tuple[float, float, str]] = []
    for start in range(0, len(decoded), batch):
        chunk = list(decoded[start : start + batch])
        res = fidelity.batched_answers(model, tok, chunk, c.q_ids, [c.ref_tokens], 16)
        for row in range(len(chunk)):
            text = fidelity.answer_text(tok, model, res.tokens[row])
            out.append(
                (fidelity.answer_fidelity(text, c.ref_text), fidelity.mean_kl(c.ref_forced, res.forced[0][row]), text)
            )
    return out


# --- a screen ------------------------------------------------------------------------------------------
def run_screen(
    name: str,
    candidates: Candidate,
    n: int,
    baselines: Sequence[str] = (),
    offset: int = 0,
    meta: dict[str, Any] | None = None,
    split: str = "calibration",
    shard: tuple[int, int] = (0, 1),
    task: str = "squad",
    resume: bool = False,
) -> dict[str, Any]:
    """Evaluate `candidates` (and kvlink `baselines`) on `n` screened questions; write
    research/results/<name>/results.json (results-<k>of<n>.json for shard k of n: questions k, k+n, ...;
    research/merge_shards.py joins them; RESEARCH_RESULTS moves research/results); return it. `resume`
    keeps the questions an earlier, cut run of the same file answered and goes on after them."""
    examples = screen_examples(n, offset, split, task)[shard[0] :: shard[1]]
    configs: list[GridConfig] = resolve(["fp16", *baselines], lm().geometry, sensitivity())
    evaluator = Evaluator(lm(), configs, RunSettings(max_new_tokens=16, batch=8, ppl=False))
    rows: dict[str, dict[str, list[float]]] = {}
    done = 0
    if resume and _result_path(name, shard).is_file():
        earlier = json.loads(_result_path(name, shard).read_text())
        done = len(earlier["eids"])
        if earlier["eids"] != [e.eid for e in examples[:done]]:
            raise ValueError(f"{_result_path(name, shard)} holds other questions: not a cut run of this one")
        rows = earlier["per_question"]
        print(f"resuming after {done} questions", flush=True)
    started = time.time()
    for i, example in enumerate(examples[done:], start=done):
        c = prepare(example, evaluator)
        for base in baselines:
            rec = c.baseline[base]
            r = rows.setdefault(base, {"fidelity": [], "kl": [], "wire_frac": []})
            r["fidelity"].append(rec["fidelity"])
            r["kl"].append(rec["kl"])
            r["wire_frac"].append(rec["wire_frac"])
        made = candidates(c)
        scored = score(c, [kv for kv, _ in made.values()])
        for (cand, (_, nbytes)), (fid, kl, _) in zip(made.items(), scored, strict=True):
            r = rows.setdefault(cand, {"fidelity": [], "kl": [], "wire_frac": []})
            r["fidelity"].append(fid)
            r["kl"].append(kl)
            r["wire_frac"].append(nbytes.total(c.framing) / c.fp16_bytes)
        print(f"{i + 1}/{len(examples)} {example.eid} T={c.kv.length} {time.time() - started:.0f}s", flush=True)
        _write(name, shard, split, task, examples[: i + 1], rows, started, meta)  # a cut run keeps its questions
    return _write(name, shard, split, task, examples, rows, started, meta, final=True)


def _result_path(name: str, shard: tuple[int, int]) -> Path:
    root = Path(os.environ.get("RESEARCH_RESULTS", ROOT / "results"))
    return root / name / ("results.json" if shard[1] == 1 else f"results-{shard[0]}of{shard[1]}.json")


def _write(
    name: str,
    shard: tuple[int, int],
    split: str,
    task: str,
    examples: Sequence[Example],
    rows: dict[str, dict[str, list[float]]],
    started: float,
    meta: dict[str, Any] | None,
    final: bool = False,
) -> dict[str, Any]:
    summary = {k: summarize(v) for k, v in rows.items()}
    result = {
        "meta": {
            "screen": name,
            "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "questions": len(examples),
            "articles": sorted({e.title for e in examples}),
            "split": split,
            "task": task,
            "shard": list(shard),
            "device": DEVICE,
            "calibration_articles": list(CALIBRATION_TITLES),
            "seconds": round(time.time() - started, 1),
            "host": platform.node(),
            "commit": _commit(),
            "torch": torch.__version__,
            **(meta or {}),
        },
        "eids": [e.eid for e in examples],
        "summary": summary,
        "per_question": {k: {m: [round(x, 6) for x in v[m]] for m in v} for k, v in rows.items()},
    }
    path = _result_path(name, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    if final:
        print_summary(result)
    return result


def summarize(r: dict[str, list[float]]) -> dict[str, Any]:
    fid = bootstrap_ci(r["fidelity"])
    return {
        "n": len(r["fidelity"]),
        "fidelity": [round(x, 4) for x in fid],
        "kl": round(float(sum(r["kl"]) / len(r["kl"])), 5),
        "wire_pct": round(100 * float(sum(r["wire_frac"]) / len(r["wire_frac"])), 2),
    }


def paired(result: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """b minus a, question by question: fidelity difference [95% CI] and the KL ratio."""
    pa, pb = result["per_question"][a], result["per_question"][b]
    diff = bootstrap_ci([y - x for x, y in zip(pa["fidelity"], pb["fidelity"], strict=True)])
    kl_a, kl_b = sum(pa["kl"]) / len(pa["kl"]), sum(pb["kl"]) / len(pb["kl"])
    return {
        "a": a, "b": b, "delta": [round(x, 4) for x in diff], "kl_ratio": round(kl_b / kl_a, 3) if kl_a else math.nan,
        "wire_pct": [result["summary"][a]["wire_pct"], result["summary"][b]["wire_pct"]],
    }  # fmt: skip


def print_summary(result: dict[str, Any]) -> None:
    width = max([58, *map(len, result["summary"])])  # recipe names run to ~100 characters
    print(f"{'config':{width}s} {'wire %':>7s} {'fidelity [95% CI]':>24s} {'KL':>8s}")
    for k, s in sorted(result["summary"].items(), key=lambda kv: kv[1]["wire_pct"]):
        f = s["fidelity"]
        print(f"{k:{width}s} {s['wire_pct']:7.2f} {f[0]:8.3f} [{f[1]:.3f}, {f[2]:.3f}] {s['kl']:8.4f}")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def current_names(result: dict[str, Any]) -> dict[str, Any]:
    """A stored results.json with its baselines under today's recipe names (LEGACY_NAMES)."""

    def rename(rows: dict[str, Any]) -> dict[str, Any]:
        return {LEGACY_NAMES.get(k, k): v for k, v in rows.items()}

    paired = [{**p, "a": LEGACY_NAMES.get(p["a"], p["a"]), "b": LEGACY_NAMES.get(p["b"], p["b"])}
              for p in result.get("paired", [])]  # fmt: skip
    return {**result, "summary": rename(result["summary"]), "per_question": rename(result["per_question"]),
            **({"paired": paired} if "paired" in result else {})}  # fmt: skip


def write_paired(name: str, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Paired comparisons of a written screen; appended to its results.json and printed."""
    path = ROOT / "results" / name / "results.json"
    result = json.loads(path.read_text())
    pairs = list(dict.fromkeys(pairs))
    out = [paired(result, a, b) for a, b in pairs if a in result["per_question"] and b in result["per_question"]]
    result["paired"] = out
    path.write_text(json.dumps(result, indent=1) + "\n")
    for p in out:
        d = p["delta"]
        print(
            f"{p['b']:50s} vs {p['a']:45s} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]  KL x{p['kl_ratio']:.2f}  "
            f"wire {p['wire_pct'][1]:.2f}% vs {p['wire_pct'][0]:.2f}%"
        )
    return out
