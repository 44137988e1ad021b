"""Bits per layer and per K/V (kvlink.layerbits; a recipe with one pipeline per layer): the
allocation, the codec, the wire, the planner, the benchmark's `mix` token and the measurement."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import random_ids
from kvlink import wire
from kvlink.budget import (
    Constraints,
    QualityTable,
    candidate_recipes,
    observe_for,
    plan,
    quality_key,
    with_rounding,
)
from kvlink.cache import ContextKV, prefill
from kvlink.capabilities import local_capabilities
from kvlink.codec import Codec
from kvlink.layerbits import STEPS, Sensitivity
from kvlink.models import Geometry
from kvlink.quant.formats import format_spec
from kvlink.recipe import Recipe, build, layer_bits_id
from kvlink.stages import Sink

G = Geometry(num_layers=3, kv_heads=2, head_dim=16, q_heads=4)
FP = "f" * 64


def _layer_bits(recipe: Recipe, kind: str) -> tuple[int, ...]:
    """Bits of each layer's `kind` tensors when the recipe has one pipeline per layer, else ()."""
    if not recipe.per_layer(kind):
        return ()
    return tuple(format_spec(q.format).bits for q in recipe.quantizers(kind))


def _mix(profile: Sensitivity, average: float, group: int = 64) -> str:
    """The formats token and bits-<id> of `profile`'s allocation at `average` bits (the name grammar)."""
    k_bits, v_bits = profile.allocate(average)
    k_mean, v_mean = sum(k_bits) / len(k_bits), sum(v_bits) / len(v_bits)
    return f"kmix{k_mean:.3g}c/vmix{v_mean:.3g}t-g{group}+bits-{layer_bits_id(k_bits, v_bits)}"


def _profile(
    k: tuple[float, ...] = (0.001, 0.5, 0.01), v: tuple[float, ...] = (0.002, 0.02, 0.0)
) -> Sensitivity:
    return Sensitivity(model="toy", k=k, v=v)


def _predicted(s: Sensitivity, k_bits: tuple[int, ...], v_bits: tuple[int, ...]) -> float:
    return sum(x * 4.0 ** (s.bits - b) for x, b in zip((*s.k, *s.v), (*k_bits, *v_bits), strict=True))


# --- allocation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("average", [2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 8.0])
def test_allocation_spends_the_mean_and_follows_the_sensitivity(average: float) -> None:
    s = _profile()
    k_bits, v_bits = s.allocate(average)
    bits = (*k_bits, *v_bits)
    assert all(b in STEPS for b in bits) and len(k_bits) == len(v_bits) == 3
    assert sum(bits) <= round(average * 6)
    assert sum(bits) > round(average * 6) - 4  # at most one step (4 -> 8 is the widest) left unspent
    # more sensitive tensors never get fewer bits
    sens = (*s.k, *s.v)
    for i, j in itertools.permutations(range(6), 2):
        if sens[i] > sens[j]:
            assert bits[i] >= bits[j], (sens, bits)


def test_allocation_is_no_worse_than_any_uniform_split_of_the_same_bits() -> None:
    s = _profile()
    for k_uniform, v_uniform in [(4, 3), (3, 4), (3, 3), (4, 4), (2, 4), (8, 2)]:
        average = (k_uniform + v_uniform) / 2
        mixed = s.allocate(average)
        uniform = ((k_uniform,) * 3, (v_uniform,) * 3)
        assert _predicted(s, *mixed) <= _predicted(s, *uniform) + 1e-12, (k_uniform, v_uniform, mixed)


def test_allocation_matches_exhaustive_search_on_a_small_model() -> None:
    """With steps of one bit (2/3/4) greedy on a convex cost is optimal: check against every allocation."""
    s = _profile(k=(0.3, 0.02, 0.9), v=(0.05, 0.0, 0.11))
    for average in (2.5, 3.0, 3.5):
        k_bits, v_bits = s.allocate(average, steps=(2, 3, 4))
        best = min(
            _predicted(s, combo[:3], combo[3:])
            for combo in itertools.product((2, 3, 4), repeat=6)
            if sum(combo) <= round(average * 6)
        )
        assert _predicted(s, k_bits, v_bits) == pytest.approx(best)


def test_allocation_is_deterministic_and_ties_go_to_earlier_tensors() -> None:
    flat = Sensitivity(model="toy", k=(1.0, 1.0, 1.0), v=(1.0, 1.0, 1.0))
    assert flat.allocate(2.5) == ((3, 3, 3), (2, 2, 2)) == flat.allocate(2.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": (0.1,), "v": (0.1, 0.2)}, "one K and one V value per layer"),
        ({"k": (), "v": ()}, "one K and one V value per layer"),
        ({"k": (-0.1,), "v": (0.1,)}, "finite and >= 0"),
        ({"k": (float("nan"),), "v": (0.1,)}, "finite and >= 0"),
        ({"k": (0.1,), "v": (0.1,), "bits": 5}, "bits must be one of"),
    ],
)
def test_sensitivity_refuses_bad_profiles(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sensitivity(model="toy", **kwargs)


@pytest.mark.parametrize(("average", "steps"), [(1.5, STEPS), (9.0, STEPS), (3.0, (2, 5)), (3.0, ())])
def test_allocate_refuses_bad_requests(average: float, steps: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"average bits|steps must be"):
        _profile().allocate(average, steps)


def test_profile_round_trips_and_is_found_by_fingerprint_then_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvlink import layerbits

    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(layerbits, "SHIPPED_DIR", tmp_path / "shipped")
    assert Sensitivity.for_model("abc", "Some/Model") is None
    shipped = _profile()
    shipped.save(layerbits.shipped_path("Some/Model"))
    found = Sensitivity.for_model("abc", "Some/Model")
    assert found is not None and (found.k, found.v) == (shipped.k, shipped.v)
    assert found.source.endswith("Some--Model.json")
    mine = _profile(k=(1.0, 2.0, 3.0))
    mine.save(layerbits.default_path("abc"))
    local = Sensitivity.for_model("abc", "Some/Model")
    assert local is not None and local.k == (1.0, 2.0, 3.0)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read sensitivity profile"):
        Sensitivity.load(tmp_path / "broken.json")


def test_shipped_profile_of_the_embedded_model_loads() -> None:
    from kvlink.layerbits import shipped_path

    profile = Sensitivity.load(shipped_path("smollm2-135m-instruct"))
    assert profile.num_layers == 30 and profile.examples >= 16
    k_bits, v_bits = profile.allocate(3.5)
    assert (sum(k_bits) + sum(v_bits)) / 60 <= 3.5


# --- codec ---------------------------------------------------------------------------------------
def _kv(length: int = 40) -> ContextKV:
    torch.manual_seed(5)
    keys = [torch.randn(2, length, 16) for _ in range(3)]
    values = [torch.randn(2, length, 16) for _ in range(3)]
    return ContextKV(keys, values, [torch.arange(length)] * 3, length)


def test_each_layer_is_quantized_at_its_own_width() -> None:
    kv = _kv()
    config = build(k_layer_bits=(8, 2, 4), v_layer_bits=(2, 8, 3), group_size=8)
    assert (config.format("k"), config.format("v")) == ("int8", "int8")  # canonical: the widest entry
    codec = Codec(config, G)
    encoded = codec.encode_kv(kv)
    assert [t.spec.format for t in encoded.tensors] == ["int8", "int2", "int2", "int8", "int4", "int3"]
    decoded = codec.decode(encoded)
    for layer, (kb, vb) in enumerate(zip(_layer_bits(config, "k"), _layer_bits(config, "v"), strict=True)):
        for kind, bits in (("k", kb), ("v", vb)):
            uniform = Codec(build(k_bits=bits, v_bits=bits, group_size=8), G)
            alone = uniform.decode(uniform.encode_kv(kv))
            got, ref = (decoded.keys, alone.keys) if kind == "k" else (decoded.values, alone.values)
            assert torch.equal(got[layer], ref[layer])  # bit for bit the uniform codec at that width
    err = [(decoded.keys[i] - kv.keys[i]).abs().mean().item() for i in range(3)]
    assert err[0] < err[2] < err[1]  # 8 < 4 < 2 bits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_layer_bits": (4, 5, 4)}, "entries must be one of"),
        ({"k_layer_bits": (4, 16, 4)}, "entries must be one of"),
        ({"v_layer_bits": (4, True, 4)}, "entries must be one of"),
        ({"k_layer_bits": "444"}, "sequence of bit widths"),
        ({"v_layer_bits": (4, 4, 4), "lowrank": "svd", "v_rank": 4}, "choose one"),
    ],
)
def test_layer_bits_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_layer_bits_must_cover_every_layer() -> None:
    with pytest.raises(ValueError, match="k has 2 per-layer pipelines, the model has 3 layers"):
        build(k_layer_bits=(4, 4)).check(G)


def test_label_names_the_allocation_and_config_survives_json() -> None:
    a = build(k_layer_bits=(8, 2, 4), v_layer_bits=(2, 4, 3))
    b = build(k_layer_bits=(4, 2, 8), v_layer_bits=(2, 4, 3))
    assert a.name.startswith("kmix4.67c/vmix3t-g32+bits-") and a.name != b.name
    assert Recipe.from_dict(a.to_dict()) == a
    assert build(k_layer_bits=[8, 2, 4]) == build(k_layer_bits=(8, 2, 4))  # type: ignore[arg-type]


# --- wire ----------------------------------------------------------------------------------------
def _frames(config: Recipe) -> list[Any]:
    encoded = Codec(config, G).encode_kv(_kv())
    return wire.to_frames(encoded, "s", "m", FP, 1 << 20)


def _refused(frames: list[Any], capabilities: frozenset[str] | None = None) -> wire.WireError:
    asm = wire.Assembler(FP, G, capabilities=capabilities)
    with pytest.raises(wire.WireError) as info:
        for frame in frames:
            asm.feed(frame)
    return info.value


def test_a_receiver_without_layer_bits_refuses_them_by_name() -> None:
    no_int2 = frozenset({"format:int8", "format:int4", "zstd"})
    err = _refused(_frames(build(k_layer_bits=(8, 2, 4), v_bits=4)), no_int2)
    assert err.code == "UNKNOWN_CODEC" and "format:int2" in err.message


def test_tampered_layer_bits_are_refused() -> None:
    frames = _frames(build(k_layer_bits=(8, 2, 4), v_bits=4))
    keys = [p for p in frames[0].header.recipe.pipelines if p.kind == wire.pb.TENSOR_KIND_K]
    assert [(list(p.layers), p.stages[-1].params["format"]) for p in keys] == [
        ([0], "int8"), ([1], "int2"), ([2], "int4"),
    ]  # fmt: skip
    short = wire.parse_frame(wire.frame_bytes(frames[0]))
    del short.header.recipe.pipelines[2]  # layer 2's keys without a pipeline
    err = _refused([short, *frames[1:]])
    assert err.code == "SHAPE" and "k layers without a pipeline" in err.message
    swapped = wire.parse_frame(wire.frame_bytes(frames[0]))
    swapped.header.recipe.pipelines[0].layers[:] = [1]  # the recipe says 2, 8, 4 bits;
    swapped.header.recipe.pipelines[1].layers[:] = [0]  # the entries still say 8, 2, 4
    err = _refused([swapped, *frames[1:]])
    assert err.code == "MALFORMED" and "layer 0 k: spec" in err.message
    odd = wire.parse_frame(wire.frame_bytes(frames[0]))
    odd.header.recipe.pipelines[1].stages[-1].params["format"] = "int6"
    err = _refused([odd, *frames[1:]])
    assert err.code == "UNKNOWN_CODEC" and "int6" in err.message


def test_sender_drops_layer_bits_for_a_receiver_without_them() -> None:
    from kvlink.client.sender import _for_receiver

    profile = _tiny_profile(G.num_layers)
    old = frozenset({"format:int4", "zstd"})  # the widths of no allocation but INT4
    narrowed = candidate_recipes(G, _for_receiver(None, old), profile)
    assert narrowed and not any(c.per_layer("k") or c.per_layer("v") for c in narrowed)
    local = candidate_recipes(G, _for_receiver(None, wire.local_capabilities()), profile)
    assert any(c.per_layer("k") for c in local)


# --- planner ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefilled() -> tuple[Any, Any]:
    from conftest import ToyTokenizer, tiny_model
    from kvlink.models import wrap

    lm = wrap(tiny_model("llama", seed=0), ToyTokenizer())
    pre = prefill(lm.model, random_ids(200, seed=1), random_ids(8, seed=2), observe=observe_for(None))
    return lm, pre


def _tiny_profile(num_layers: int) -> Sensitivity:
    return Sensitivity(model="tiny", k=[0.1 * (i + 1) for i in range(num_layers)], v=[0.01] * num_layers)


def test_planner_weighs_allocations_only_where_measured(prefilled: tuple[Any, Any]) -> None:
    lm, pre = prefilled
    profile = _tiny_profile(lm.geometry.num_layers)
    mixed = [c for c in candidate_recipes(lm.geometry, None, profile) if _layer_bits(c, "k")]
    assert mixed and {_layer_bits(c, "k") for c in mixed} == {profile.allocate(a)[0] for a in (3.0, 3.5)}
    assert not [c for c in candidate_recipes(lm.geometry, Constraints(k_bits=4), profile) if c.per_layer("k")]
    assert not [c for c in candidate_recipes(lm.geometry, None, None) if c.per_layer("k")]
    assert any(2 in _layer_bits(c, "v") for c in mixed)
    formats = {"format:fp16", "format:int8", "format:int4", "format:int3"}
    no_int2 = Constraints(capabilities=frozenset({c for c in local_capabilities() if not c.startswith("format:")}
                                                 | formats))  # fmt: skip
    kept = [c for c in candidate_recipes(lm.geometry, no_int2, profile) if c.per_layer("k")]
    assert all(2 not in (*_layer_bits(c, "k"), *_layer_bits(c, "v")) for c in kept)
    unmeasured = plan(pre, lm.geometry, lm.fingerprint, 0.3, sensitivity=profile)
    assert not unmeasured.recipe.per_layer("k")
    assert not any(c.recipe.per_layer("k") for c in unmeasured.candidates)
    # measured (here: as the best config of all) -> planned, sent, and within the budget
    target = next(
        c for c in mixed if c.method == "q2c" and c.retention == 0.9 and c.quantizers("k")[0].group == 64
    )
    table = QualityTable(entries={quality_key(target): 0.999})
    picked = plan(pre, lm.geometry, lm.fingerprint, 0.3, quality=table, sensitivity=profile)
    assert picked.recipe.with_zstd(None) == target
    assert [t.spec.format for t in picked.encoded.tensors[::2]] == [
        f"int{b}" for b in _layer_bits(target, "k")
    ]
    assert picked.total_bytes <= picked.budget_bytes
    off = plan(pre, lm.geometry, lm.fingerprint, 0.3, quality=table, sensitivity=profile,
               constraints=Constraints(layer_bits=False))  # fmt: skip
    assert not off.recipe.per_layer("k")
    # only its query-rounded twin measured: planned with rounding, unless rounding is pinned to nearest
    target_query = with_rounding(target)
    assert target_query is not None
    rounded = QualityTable(entries={quality_key(target_query): 0.999})
    aware = plan(pre, lm.geometry, lm.fingerprint, 0.3, quality=rounded, sensitivity=profile)
    assert aware.recipe.with_zstd(None) == target_query
    nearest = plan(pre, lm.geometry, lm.fingerprint, 0.3, quality=rounded, sensitivity=profile,
                   constraints=Constraints(round_k="nearest"))  # fmt: skip
    assert not nearest.recipe.per_layer("k")


def test_kvlink_send_can_rule_out_layer_bits() -> None:
    from kvlink.client.main import build_parser, constraints_from_args

    base = ["--server", "h:1", "--budget", "10%", "--context", "-", "--question", "q"]
    assert constraints_from_args(build_parser().parse_args(base)).layer_bits is True
    assert constraints_from_args(build_parser().parse_args([*base, "--no-layer-bits"])).layer_bits is False


# --- benchmark names and measurement ---------------------------------------------------------------
def test_mix_token_allocates_from_the_profile() -> None:
    from kvlink.eval.grid import parse_name, resolve

    profile = _profile()
    config = parse_name(f"q2c90%/layer+{_mix(profile, 3.5)}+sink1+round-query", profile)
    assert (_layer_bits(config, "k"), _layer_bits(config, "v")) == profile.allocate(3.5)
    keys = config.quantizers("k")
    sinks = {s.n for s in config.stages() if isinstance(s, Sink)}
    rounding = {q.rounding for q in keys}
    assert (config.retention, config.scope, {q.group for q in keys}, sinks, rounding) == (
        0.9, "layer", {64}, {1}, {"query"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="kvlink-bench sensitivity"):
        parse_name(_mix(profile, 3.0))  # without the profile its bits come from
    assert _layer_bits(resolve([_mix(profile, 3.0)], G, profile)[0].config, "k") == profile.allocate(3.0)[0]


def test_measure_finds_the_sensitive_layer() -> None:
    """A tiny model whose layer 1 keys are scaled up 30x: that tensor alone at INT2 costs the most."""
    from conftest import ToyTokenizer, tiny_model
    from kvlink.eval import sensitivity
    from kvlink.models import wrap

    lm = wrap(tiny_model("llama", seed=0), ToyTokenizer())
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.k_proj.weight.mul_(30.0)

    from kvlink.eval.splits import calibration_examples

    qids = [qa.qid for qa in calibration_examples()[:2]]  # profiles are measured on the calibration split

    class Ids:  # an Example whose ids are given (the toy tokenizer has no text side)
        def __init__(self, seed: int) -> None:
            self.eid, self.seed = f"squad:{qids[seed - 1]}", seed

        def encode(self, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return random_ids(60, seed=self.seed), random_ids(6, seed=self.seed + 100)

    examples: Any = [Ids(1), Ids(2)]
    with pytest.raises(ValueError, match="calibration-split examples only"):
        sensitivity.measure(lm, [*examples, type("Other", (), {"eid": "t:3"})()], bits=2, group_size=16)
    profile = sensitivity.measure(lm, examples, bits=2, group_size=16, sink=1, max_new_tokens=4, batch=3)
    assert profile.examples == 2 and profile.num_layers == lm.geometry.num_layers
    assert all(x >= 0 for x in (*profile.k, *profile.v))
    assert profile.k[1] == max(profile.k) and profile.k[1] > 0
    configs = sensitivity.variant_configs(lm.geometry.num_layers, 2, 16, 1)
    assert len(configs) == 2 * lm.geometry.num_layers
    kind, layer, config = configs[lm.geometry.num_layers + 1]  # V of layer 1
    v_bits, k_bits = _layer_bits(config, "v"), _layer_bits(config, "k")
    assert (kind, layer) == ("v", 1) and v_bits[1] == 2
    assert set(v_bits[:1] + v_bits[2:]) == {8} and set(k_bits) == {8}
    # measure swaps one tensor into two whole-cache encodes: bit for bit the cache of each variant's config
    kv = prefill(lm.model, random_ids(40, seed=7)).kv.to(dtype=torch.float16)
    swapped = list(sensitivity.variant_caches(kv, lm, 2, 16, 1))
    assert [(k, layer) for k, layer, _ in swapped] == [(k, layer) for k, layer, _ in configs]
    for (_, _, cache), (_, _, config) in zip(swapped, configs, strict=True):
        codec = Codec(config, lm.geometry)
        want = codec.decode(codec.encode_kv(kv), lm.device, lm.dtype)
        assert all(
            torch.equal(a, b) for a, b in zip(cache.keys + cache.values, want.keys + want.values, strict=True)
        )


def test_report_and_calibrate_key_mix_configs_by_the_bits_the_run_used() -> None:
    """A `mix` name does not say its bits: the summary and the planner check take them from run.json."""
    from kvlink.eval import report
    from kvlink.eval.commands.calibrate import quality_table
    from kvlink.eval.grid import parse_name

    profile = _profile()
    name = f"{_mix(profile, 3.5)}+sink1"  # its bits-<id> is of this profile: no shipped one resolves it
    mix = parse_name(name, profile)
    int4 = build(k_bits=4, v_bits=4)
    meta = {"configs": [{"name": name, "aliases": [], **mix.to_dict()},
                        {"name": int4.name, "aliases": [], **int4.to_dict()}]}  # fmt: skip
    records = [
        {"task": "squad", "config": config, "eid": f"e{i}", "fidelity": q, "wire_frac": frac}
        for i in range(3)
        for config, q, frac in ((name, 0.9, 0.25), (int4.name, 0.8, 0.32))
    ]
    summary = report.summarize(records, n_boot=50, codecs=report.run_codecs(meta))
    row = next(r for r in summary if r["config"] == name)
    assert row["key"] == quality_key(mix) and "bits-" in row["key"] and row["family"] == "quant"
    table = quality_table({"meta": {"fingerprint": "abc"}, "summary": summary}, "squad")
    assert table.entries[quality_key(mix)] == pytest.approx(0.9)
    check = report.planner_check(summary, table, (0.3,), "squad")[0]
    assert check["pick"] == name and check["expected_quality"] == pytest.approx(0.9)
