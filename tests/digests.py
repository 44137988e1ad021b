"""Digests of the codec's output for a fixed set of contexts: the baseline issue 19 is proven against.

Issue 19 ("Architecture v2") rebuilds the codec config as a pipeline of stages and must keep
behaviour exactly: every config of the shipped quality table encodes and decodes to the same
tensors as commit 12bfafe on a fixed set of contexts, and the planner's picks at 25, 18.75, 12.5
and 6.25% are unchanged. This module computes that evidence with public APIs that exist at
12bfafe; `bench/make_digests.py` runs it against any tree (PYTHONPATH) and writes
tests/data/digests-12bfafe.json; tests/test_digests.py recomputes it with the current code and
compares.

What is recorded, per (context, config): sha256 of every kind of part (codes, scale, zero, sink,
widths, basis: each over all 2 x layers tensors in order, with its zstd flag and raw size), of the
tensors' layout (shapes, specs, part order), of the kept-position sets and of everything together;
the exact wire size and its split (kvlink.wire.message_wire_size, ids SESSION_ID/MESSAGE_ID,
CHUNK_BYTES); and sha256 of the decoded K, V (float32, CPU) and positions. Per (context, budget): the planner's pick
(label, to_dict()), its exact and estimated bytes and the digest of its encoded message.

Everything runs on one CPU thread (torch.set_num_threads(1)): a reduction split differently
across threads may round differently, and the machines this runs on are shared.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BASELINE = Path(__file__).parent / "data" / "digests-12bfafe.json"
"""The first baseline (an Intel Xeon's); other machines' lie beside it as digests-12bfafe-<machine>.json."""
BUDGETS: tuple[str, ...] = ("25%", "18.75%", "12.5%", "6.25%")
SESSION_ID = "0" * 32  # fixed ids of uuid4-hex length (they are part of the framed size)
MESSAGE_ID = "1" * 32
CHUNK_BYTES = 1 << 20
SQUAD_CONTEXTS = 3  # the first distinct contexts of the shipped SQuAD file, each with its first question
LONG_TOKENS = 800  # the synthetic context: the next paragraphs joined until this many context tokens
PROFILE_TEXTS = 4  # calibration paragraphs of the projection profile that profile-r* configs need
THREADS = 1


# --- hashing -----------------------------------------------------------------------------
def _sha() -> Any:
    return hashlib.sha256()


def _field(h: Any, value: object) -> None:
    """Feed one length-prefixed field (bytes, or anything by its repr) to `h`, so fields never run together."""
    data = value if isinstance(value, (bytes, bytearray, memoryview)) else repr(value).encode()
    data = bytes(data)
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def tensor_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def digest_tensors(tensors: Iterable[Tensor]) -> str:
    """sha256 over each tensor's dtype, shape and raw bytes, in order."""
    h = _sha()
    for t in tensors:
        _field(h, (str(t.dtype), tuple(t.shape)))
        _field(h, tensor_bytes(t))
    return str(h.hexdigest())


def encoded_digests(encoded: Any) -> dict[str, Any]:
    """Digests of an EncodedKV: per part name, the layout, the positions, and all of it in order.

    `parts[name]` hashes that part of every tensor (layer 0 K, layer 0 V, layer 1 K, ...): layer,
    kind, zstd flag, raw size and the bytes as they travel. `layout` hashes what frames them (each
    tensor's shape, stored shape, spec, low-rank mode and part order). `all` hashes the positions,
    then every tensor's layout and parts in order: one digest for the whole encoded message.
    """
    by_part: dict[str, Any] = {}
    part_bytes: dict[str, int] = {}
    layout = _sha()
    every = _sha()
    positions = _sha()
    for enc, data, count in encoded.positions:
        _field(positions, (enc, int(count)))
        _field(positions, data)
    positions_hex = str(positions.hexdigest())
    _field(every, positions_hex)
    for t in encoded.tensors:
        fmt = _FORMAT_BEFORE_2026_12.get(t.spec.format, t.spec.format)  # the baseline's names of the formats
        frame = (
            int(t.layer), t.kind, tuple(t.shape), tuple(t.stored),
            (fmt, int(t.spec.group_size), t.spec.axis), t.lowrank, tuple(t.parts),
        )  # fmt: skip
        _field(layout, frame)
        _field(every, frame)
        for name, part in t.parts.items():
            head = (int(t.layer), t.kind, bool(part.zstd), int(part.raw_size))
            h = by_part.setdefault(name, _sha())
            _field(h, head)
            _field(h, part.data)
            _field(every, head)
            _field(every, part.data)
            part_bytes[name] = part_bytes.get(name, 0) + len(part.data)
    return {
        "all": str(every.hexdigest()),
        "parts": {name: str(h.hexdigest()) for name, h in sorted(by_part.items())},
        "part_bytes": dict(sorted(part_bytes.items())),
        "layout": str(layout.hexdigest()),
        "positions": positions_hex,
        "profile_hash": encoded.profile_hash,
    }


_FORMAT_BEFORE_2026_12 = {
    "int4cw": "int4w", "int3cw": "int3w", "int2cw": "int2w", "int4rw": "int4t", "int3rw": "int3t", "int2rw": "int2t",
}  # fmt: skip
"""Formats renamed by issue 19 (the bytes are the same): the layout digest hashes the names it had."""


def decoded_digests(kv: Any) -> dict[str, str]:
    """Digests of a decoded ContextKV: its keys, values and kept positions, each over all layers in order."""
    return {
        "k": digest_tensors(kv.keys),
        "v": digest_tensors(kv.values),
        "positions": digest_tensors(kv.positions),
    }


# --- the fixed contexts --------------------------------------------------------------------
def pick_contexts(tokenizer: Any) -> list[dict[str, str]]:
    """The fixed contexts: the first SQUAD_CONTEXTS distinct contexts of the shipped SQuAD file with
    their first questions, then a synthetic long one (the next paragraphs of the file, joined by a
    blank line until the context part reaches LONG_TOKENS tokens) with the first question of its
    middle paragraph. Each: name, title, context, question."""
    from kvlink.eval.squad import load_squad
    from kvlink.prompt import context_ids

    firsts: dict[str, Any] = {}  # context -> its first answerable question, in file order
    for qa in load_squad():
        firsts.setdefault(qa.context, qa)
    examples = list(firsts.values())
    out = [
        {"name": f"squad{i}", "title": qa.title, "context": qa.context, "question": qa.question}
        for i, qa in enumerate(examples[:SQUAD_CONTEXTS])
    ]
    paragraphs = []
    for qa in examples[SQUAD_CONTEXTS:]:
        paragraphs.append(qa)
        if context_ids(tokenizer, "\n\n".join(p.context for p in paragraphs)).numel() >= LONG_TOKENS:
            break
    middle = paragraphs[len(paragraphs) // 2]
    out.append(
        {
            "name": f"long{len(paragraphs)}",
            "title": middle.title,
            "context": "\n\n".join(p.context for p in paragraphs),
            "question": middle.question,
        }
    )
    return out


# --- the configs of the shipped quality table ----------------------------------------------
_FORMAT_BITS: dict[str, int | str] = {"fp16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2, "nf4": "nf4"}
_FMT = r"fp16|int8|int4|int3|int2|nf4|mix[0-9.]+"
_SELECT = re.compile(r"(?P<sel>[a-z0-9]+?)(?P<pct>[0-9.]+)%(?P<layer>/layer)?")
_LOWRANK = re.compile(r"(?P<mode>svd|profile)-r(?P<k>\d+|full)/(?P<v>\d+|full)")
_BITS = re.compile(rf"k(?P<kf>{_FMT})(?P<ka>[ct])/v(?P<vf>{_FMT})(?P<va>[ct])-g(?P<g>\d+)")
_SIMPLE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"bits-(?P<v>[0-9a-f]{8})"), "bits_id"),
    (re.compile(r"hi(?P<n>\d+)@(?P<v>" + _FMT + ")"), "hi"),
    (re.compile(r"sink(?P<v>\d+)"), "sink"),
    (re.compile(r"rot-(?P<v>k|v|kv)"), "rotate"),
    (re.compile(r"round-(?P<v>[a-z]+)"), "round_k"),
    (re.compile(r"kwidths-(?P<v>[a-z]+)"), "k_widths"),
    (re.compile(r"vwidths-(?P<v>[a-z]+)"), "v_widths"),
    (re.compile(r"zstd(?P<v>\d+)"), "zstd_level"),
)
_AXES = {"c": "channel", "t": "token"}


def config_from_label(label: str, allocations: Sequence[tuple[tuple[int, ...], tuple[int, ...]]] = ()) -> Any:
    """The Recipe whose `label` (kvlink.codec.Recipe.name at 12bfafe) is `label`.

    The label names every field but `window` and `seed` (left at their defaults, as every measured
    config had them) and a per-layer allocation, which it names by `layer_bits_id`: `allocations`
    are the (k_layer_bits, v_layer_bits) it may be. Raises ValueError when the label does not parse
    or the config built does not label back to `label` exactly.
    """
    from kvlink.codec import layer_bits_id
    from kvlink.recipe import build

    parts = label.split("+")
    fields: dict[str, Any] = {}
    if parts and (m := _SELECT.fullmatch(parts[0])):
        fields.update(selector=m["sel"], retention=float(m["pct"]) / 100.0)
        if m["layer"]:
            fields["scope"] = "layer"
        parts = parts[1:]
    if parts and (m := _LOWRANK.fullmatch(parts[0])):
        fields["lowrank"] = m["mode"]
        fields["k_rank"] = None if m["k"] == "full" else int(m["k"])
        fields["v_rank"] = None if m["v"] == "full" else int(m["v"])
        parts = parts[1:]
    mix: dict[str, str] = {}
    if parts and parts[0] == "fp16":
        parts = parts[1:]
    elif parts and (m := _BITS.fullmatch(parts[0])):
        for kind in ("k", "v"):
            fmt = m[f"{kind}f"]
            if fmt.startswith("mix"):
                mix[kind] = fmt
            else:
                fields[f"{kind}_bits"] = _FORMAT_BITS[fmt]
            fields[f"{kind}_axis"] = _AXES[m[f"{kind}a"]]
        fields["group_size"] = int(m["g"])
        parts = parts[1:]
    else:
        raise ValueError(f"label {label!r}: no bits part (fp16 or k<fmt><axis>/v<fmt><axis>-g<n>)")
    for part in parts:
        for pattern, name in _SIMPLE:
            m = pattern.fullmatch(part)
            if m is None:
                continue
            if name == "bits_id":
                matches = [a for a in allocations if layer_bits_id(*a) == m["v"]]
                if len(matches) != 1:
                    raise ValueError(f"label {label!r}: {len(matches)} allocations have id {m['v']!r}")
                fields["k_layer_bits"], fields["v_layer_bits"] = matches[0]
            elif name == "hi":
                fields["hi_layers"], fields["hi_bits"] = int(m["n"]), _FORMAT_BITS[m["v"]]
            elif name in ("sink", "zstd_level"):
                fields[name] = int(m["v"])
            else:
                fields[name] = m["v"]
            break
        else:
            raise ValueError(f"label {label!r}: unknown part {part!r}")
    if mix and "k_layer_bits" not in fields:
        raise ValueError(f"label {label!r}: {sorted(mix.values())} without a bits-<id> part")
    from kvlink.recipe import migrate_name

    config = build(**fields)
    if config.name != migrate_name(label):
        raise ValueError(f"label {label!r} parses to a recipe named {config.name!r}")
    return config


FLAT_TABLE = Path(__file__).parent / "data" / "quality-smollm2-flat.json"
"""The embedded model's quality table as shipped from 12bfafe until 2026-12-05 (flat: one quality per
config, from SQuAD runs that predate the calibration/evaluation split): the baseline's picks and expected
qualities were made with it, and so were the lookups and picks of b05f17b in tests/test_budget.py. The
table shipped since is per context length, from calibration-split questions only, through the
evaluation-split gate, so its qualities differ slightly."""


def baseline_table_and_profile(model_name: str) -> tuple[Any, Any]:
    """The baseline's quality table (FLAT_TABLE) and the sensitivity profile shipped for `model_name`, read
    from files (never a table calibrated on this machine, which QualityTable.for_model would prefer)."""
    from kvlink.budget import QualityTable
    from kvlink.layerbits import Sensitivity, shipped_path

    table = QualityTable.load(FLAT_TABLE)
    profile = shipped_path(model_name)
    return table, (Sensitivity.load(profile) if profile.is_file() else None)


def table_configs(table: Any, sensitivity: Any) -> dict[str, Any]:
    """Label -> Recipe of every entry of a quality table (its keys are Recipe labels).

    Per-layer allocations are those the planner and the grid make: the sensitivity profile's at
    kvlink.budget.MIX_AVERAGES mean bits.
    """
    from kvlink.budget import MIX_AVERAGES

    allocations = [sensitivity.allocate(a) for a in MIX_AVERAGES] if sensitivity is not None else []
    return {label: config_from_label(label, allocations) for label in sorted(table.entries)}


# --- computing -----------------------------------------------------------------------------
def observe_for_config(config: Any) -> Any:
    """The prefill observation `config` (a kvlink.recipe.Recipe) encodes from: its selector's; else the
    question's when its keys or values use the question's queries; else none (Recipe.needs)."""
    return config.needs()


class Context:
    """One fixed context, prefilled once per observation kind it is asked for (as the sender does:
    kvlink.cache.prefill with the question's own rows as the Q2C observers)."""

    def __init__(self, lm: Any, spec: dict[str, str]) -> None:
        from kvlink.prompt import context_ids, question_ids, question_rows

        self.lm = lm
        self.spec = spec
        self.ctx = context_ids(lm.tokenizer, spec["context"])
        self.q = question_ids(lm.tokenizer, spec["question"])
        self.rows = question_rows(lm.tokenizer, spec["question"])
        self._prefills: dict[Any, Any] = {}

    def prefill(self, observe: Any, window: int = 32) -> Any:
        from kvlink.cache import prefill

        key = (observe, window)
        if key not in self._prefills:
            self._prefills[key] = prefill(self.lm.model, self.ctx, self.q, observe, window, self.rows)
        return self._prefills[key]

    def facts(self) -> dict[str, Any]:
        """What identifies the context: its text, question, token counts and ids' digests."""
        return {
            **self.spec,
            "context_tokens": int(self.ctx.numel()),
            "question_tokens": int(self.q.numel()),
            "question_rows": list(self.rows),
            "ids": digest_tensors([self.ctx, self.q]),
        }

    def prefill_digests(self) -> dict[str, Any]:
        """Digests of each prefill made so far: its KV and its observed queries (for diagnosis: a
        changed prefill changes every digest after it)."""
        out: dict[str, Any] = {}
        for (observe, window), pre in sorted(self._prefills.items(), key=lambda kv: kv[0][0].value):
            obs = pre.observation
            out[f"{observe.value}/{window}"] = {
                "kv": digest_tensors([*pre.kv.keys, *pre.kv.values]),
                "queries": digest_tensors([layer.queries for layer in obs.layers]),
            }
        return out


def encode_decode(config: Any, context: Context, profile: Any = None) -> dict[str, Any]:
    """Encode `context` under `config` (from the prefill its observation needs), size it on the
    wire, decode it on CPU in float32; the digests of each step."""
    from kvlink import wire
    from kvlink.codec import Codec

    lm = context.lm
    codec = Codec(config, lm.geometry, profile if uses_profile(config) else None)
    window = config.select.window if config.select is not None else 32
    encoded = codec.encode(context.prefill(observe_for_config(config), window))
    size = wire.message_wire_size(encoded, SESSION_ID, MESSAGE_ID, lm.fingerprint, CHUNK_BYTES)
    decoded = codec.decode(encoded, "cpu", torch.float32)
    return {
        "encoded": encoded_digests(encoded),
        "wire": size.as_dict(),
        "decoded": decoded_digests(decoded),
    }


def planner_pick(context: Context, budget: str, table: Any, sensitivity: Any) -> dict[str, Any]:
    """kvlink.budget.plan for `budget` with the shipped table and profile, prefilled as the sender
    does (observe_for: the question); the pick, its bytes and its encoded message's digest."""
    from kvlink.budget import BudgetError, observe_for, plan

    lm = context.lm
    pre = context.prefill(observe_for(None))
    try:
        p = plan(
            pre, lm.geometry, lm.fingerprint, budget, quality=table, sensitivity=sensitivity,
            model_name=lm.name, session_id=SESSION_ID, message_id=MESSAGE_ID, chunk_bytes=CHUNK_BYTES,
        )  # fmt: skip
    except BudgetError as exc:
        return {"budget": budget, "error": str(exc), "smallest_fraction": exc.smallest_fraction}
    plain = p.recipe.with_zstd(None)
    chosen = [c for c in p.candidates if c.recipe in (p.recipe, plain)]
    return {
        "budget": budget,
        "label": p.recipe.name,
        "config": p.recipe.to_dict(),
        "total_bytes": p.total_bytes,
        "budget_bytes": p.budget_bytes,
        "fp16_bytes": p.fp16_bytes,
        "estimated_bytes": chosen[0].estimated_bytes if chosen else None,
        "expected_quality": chosen[0].expected_quality if chosen else None,
        "wire": p.wire.as_dict(),
        "allowance": p.allowance,
        "encoded": encoded_digests(p.encoded),
    }


def uses_profile(recipe: Any) -> bool:
    """Whether `recipe` projects with a calibrated profile."""
    return any(getattr(s, "mode", None) == "profile" for s in recipe.stages())


def calibrated_profile(lm: Any) -> Any:
    """The projection profile profile-r* configs encode with: calibrated in memory on the first
    PROFILE_TEXTS reserved paragraphs (kvlink.eval.tasks.calibration_texts), r_max = head_dim."""
    from kvlink.eval.tasks import calibration_texts
    from kvlink.lowrank import calibrate_profile
    from kvlink.prompt import context_ids

    ids = [context_ids(lm.tokenizer, text) for text in calibration_texts(PROFILE_TEXTS)]
    return calibrate_profile(lm.model, lm.tokenizer, ids, lm.geometry.head_dim, lm.fingerprint)


def environment(lm: Any) -> dict[str, Any]:
    import transformers

    return {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "dtype": str(lm.dtype),
        "device": str(lm.device),
        "geometry": vars(lm.geometry),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


MACHINE_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
)
"""The CPU flags recorded with a baseline: the vector units torch and MKL choose their float kernels by."""


def machine() -> dict[str, Any]:
    """The CPU the digests are computed on: the float32 prefill's bits depend on its vector units."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "model name", "flags") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name", platform.processor() or platform.machine()),
        "vendor": info.get("vendor_id", ""),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in MACHINE_FLAGS if f in flags],
    }


def machine_slug(made_on: dict[str, Any]) -> str:
    """A file-name part for a machine: vendor, family, model and a digest of the whole record (one model
    with other vector units enabled is another machine), e.g. `AuthenticAMD-25-17-1a2b3c`."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"{made_on['vendor']}-{made_on['family_model']}").strip("-")
    return f"{name}-{hashlib.sha256(json.dumps(made_on, sort_keys=True).encode()).hexdigest()[:6]}"


def baseline_for(made_on: dict[str, Any]) -> Path | None:
    """The committed baseline made on `made_on` (a `machine()`), or None if no committed one was."""
    for path in sorted(BASELINE.parent.glob("digests-12bfafe*.json")):
        if json.loads(path.read_text()).get("machine") == made_on:
            return path
    return None


def load_lm() -> Any:
    """The embedded model on CPU in float32, computing on THREADS threads."""
    from kvlink.models import load_model

    torch.set_num_threads(THREADS)
    return load_model(None, device="cpu", dtype=torch.float32)


def compute(
    lm: Any,
    contexts: Sequence[dict[str, str]],
    configs: dict[str, Any],
    table: Any,
    sensitivity: Any,
    budgets: Sequence[str] = BUDGETS,
    progress: Any = None,
) -> dict[str, Any]:
    """Every digest for `contexts` x `configs` (label -> Recipe) and the planner's picks at
    `budgets`; the picks' configs are encoded too when the table lacks them (e.g. a zstd variant).

    Returns {"environment", "profile_hash", "contexts": [{facts, prefills, configs: {label: ...},
    picks: [...]}], "configs": {label: to_dict()}}.
    """
    from kvlink.recipe import Recipe

    needs_profile = any(uses_profile(c) for c in configs.values())
    profile = calibrated_profile(lm) if needs_profile else None
    all_configs = dict(configs)
    fixed = [Context(lm, spec) for spec in contexts]
    picks = [[planner_pick(c, budget, table, sensitivity) for budget in budgets] for c in fixed]
    for pick in (p for ps in picks for p in ps if "config" in p):
        config = Recipe.from_dict(pick["config"])
        if config in all_configs.values():
            continue
        if pick["label"] in all_configs:
            raise ValueError(f"pick {pick['label']!r} is not the config of that label: {pick['config']}")
        all_configs[pick["label"]] = config
    out_contexts = []
    for context, context_picks in zip(fixed, picks, strict=True):
        results = {}
        for label, config in all_configs.items():
            results[label] = encode_decode(config, context, profile)
            if progress is not None:
                progress(context.spec["name"], label)
        out_contexts.append(
            {
                "facts": context.facts(),
                "prefills": context.prefill_digests(),
                "configs": results,
                "picks": context_picks,
            }
        )
    return {
        "environment": environment(lm),
        "profile_hash": profile.hash if profile is not None else None,
        "configs": {label: config.to_dict() for label, config in all_configs.items()},
        "contexts": out_contexts,
    }


def dumps(doc: Any, inline_depth: int = 6) -> str:
    """JSON of `doc`, indented down to `inline_depth` levels and one line per value below (and per
    short flat value): the baseline stays small and a changed digest is one changed line."""

    def flat(obj: Any) -> bool:
        values = obj.values() if isinstance(obj, dict) else obj
        return all(not isinstance(v, (dict, list)) or (isinstance(v, list) and flat(v)) for v in values)

    def dump(obj: Any, depth: int) -> str:
        text = json.dumps(obj)
        if depth >= inline_depth or not isinstance(obj, (dict, list)) or (flat(obj) and len(text) <= 1000):
            return text
        pad = " " * (depth + 1)
        if isinstance(obj, dict):
            items = [f"{pad}{json.dumps(str(k))}: {dump(v, depth + 1)}" for k, v in obj.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
        return "[\n" + ",\n".join(pad + dump(v, depth + 1) for v in obj) + "\n" + " " * depth + "]"

    return dump(doc, 0) + "\n"


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every leaf where `actual` differs from `expected` (dicts by key, lists by index), as
    'path: expected -> actual'; floats compare exactly but NaN equals NaN."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(expected) | set(actual), key=str):
            sub = f"{path}/{key}"
            if key not in actual:
                out.append(f"{sub}: missing now")
            elif key not in expected:
                out.append(f"{sub}: not in the baseline")
            else:
                out += differences(expected[key], actual[key], sub)
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items -> {len(actual)}"]
        return [
            d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")
        ]
    if (
        isinstance(expected, float)
        and isinstance(actual, float)
        and math.isnan(expected)
        and math.isnan(actual)
    ):
        return []
    return [] if expected == actual else [f"{path}: {expected!r} -> {actual!r}"]
