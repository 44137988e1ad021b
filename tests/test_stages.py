"""The shared test matrix of the stages (kvlink.stages): every registered stage, the same checks.

A new stage adds one row to MATRIX (docs/stages.md). Each row is a recipe that uses the stage; every
row is checked for:

- its parameters round-trip (Stage.params -> Stage.from_params), unknown or invalid ones are refused;
- its name round-trips through the config grammar (Recipe.name -> Recipe.from_name);
- it round-trips through the wire (kvlink.wire recipe_to_pb -> recipe_from_pb), and a receiver that
  lacks its capability refuses the header (UNKNOWN_CODEC);
- sizes are known before encoding (Codec.predicted_sizes equals what encode writes, part by part);
- encode -> wire frames -> Assembler -> decode gives the tensors the sender's own decode gives, at
  the original positions, within the row's error bound of the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvlink import wire
from kvlink.cache import ContextKV
from kvlink.capabilities import local_capabilities
from kvlink.codec import Codec
from kvlink.models import Geometry
from kvlink.predict import PredictorProfile, Rotary
from kvlink.recipe import Recipe, build
from kvlink.residual import ResidualProfile
from kvlink.stages import (
    Ans,
    Clamp,
    LowRank,
    Pca,
    Predict,
    Quantize,
    Rotate,
    Select,
    Sink,
    Stage,
    Zstd,
    registered_stages,
)
from kvlink.stages.ans import bound

G = Geometry(num_layers=3, kv_heads=2, head_dim=16, q_heads=4)
T = 37
FP = "f" * 64


@dataclass(frozen=True)
class Row:
    """One stage under test: the stage, a recipe that uses it, and the relative error its round trip may have."""

    stage: Stage
    recipe: Recipe
    max_error: float
    profile: Any = None  # the calibrated profile its codec needs (Codec's third argument)
    residual: Any = None  # the residual profile of transform coding (Codec's fourth)


INT4 = build(k_bits=4, v_bits=4)


def _predictors() -> PredictorProfile:
    """Cross-layer predictors for G with small seeded weights (the mechanics, not a fit)."""
    g = torch.Generator().manual_seed(1)
    f = G.kv_heads * G.head_dim
    rotary = Rotary(1.0 / 10000.0 ** (torch.arange(0, G.head_dim, 2, dtype=torch.float32) / G.head_dim))
    weights = {
        (layer, kind): torch.randn((f if (layer, kind) == (0, "v") else 2 * f) + 1, f, generator=g) * 0.05
        for layer in range(G.num_layers) for kind in ("k", "v") if (layer, kind) != (0, "k")
    }  # fmt: skip
    return PredictorProfile(FP, G.num_layers, G.kv_heads, G.head_dim, rotary, weights)


def _residual(predictors: PredictorProfile) -> ResidualProfile:
    """A residual profile for G bound to `predictors`: seeded orthonormal bases, zero means, integer scales
    and weights (the mechanics, not a fit)."""
    from kvlink import ans

    g = torch.Generator().manual_seed(2)
    f = G.kv_heads * G.head_dim
    keys = [(layer, kind) for layer in range(G.num_layers) for kind in ("k", "v")]
    bases = {key: torch.linalg.qr(torch.randn(f, f, generator=g))[0] for key in keys}
    scales = {key: torch.arange(f, 0, -1, dtype=torch.float32) // 4 - 2 for key in keys}
    weight = torch.tensor([[2.0, 0.0]] * G.num_layers)
    means = {key: torch.zeros(f) for key in keys}
    return ResidualProfile(FP, predictors.hash, G.num_layers, G.kv_heads, G.head_dim, means, bases, scales, weight,
                           ans.laplace_tables())  # fmt: skip


PREDICTORS = _predictors()
XL = Recipe.from_name("random50%@s3+xpred+fp16+pca1-r-96+ans")

MATRIX: dict[str, Row] = {
    "select": Row(Select("random", 0.5, "layer", seed=3), build(selector="random", retention=0.5, scope="layer", seed=3, k_bits=8, v_bits=8), 0.02),
    "sink": Row(Sink(2), INT4.with_transform(Sink(2)), 0.2),
    "clamp": Row(Clamp(2.0), INT4.with_transform(Clamp(2.0)), 0.35),
    "lowrank": Row(LowRank("svd", 8), build(lowrank="svd", k_rank=8, v_rank=8, k_bits=8, v_bits=8), 0.9),
    "rotate": Row(Rotate(5), INT4.with_transform(Rotate(5)), 0.2),
    "quantize": Row(Quantize("int3", 8, "channel"), Recipe(k=((Quantize("int3", 8, "channel"),),), v=((Quantize("nf4", 8, "token"),),)), 0.3),
    "zstd": Row(Zstd(3), build(k_bits=2, v_bits=2, zstd_level=3), 0.8),
    "predict": Row(Predict(), Recipe.from_name("random50%@s3+xpred+kint4c/vint4t-g32+sink1"), 0.3, PREDICTORS),
    "pca": Row(Pca(1, -96), XL, 0.1, PREDICTORS, _residual(PREDICTORS)),
    "ans": Row(Ans(), XL, 0.1, PREDICTORS, _residual(PREDICTORS)),
}  # fmt: skip


def test_every_registered_stage_has_a_row() -> None:
    assert set(MATRIX) == set(registered_stages())
    for name, row in MATRIX.items():
        assert row.stage.name == name and row.stage in set(row.recipe.stages()), name


def _kv() -> ContextKV:
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(G.kv_heads, T, G.head_dim, generator=g) * 2 for _ in range(G.num_layers)]
    values = [torch.randn(G.kv_heads, T, G.head_dim, generator=g) for _ in range(G.num_layers)]
    return ContextKV(keys, values, [torch.arange(T)] * G.num_layers, T)


def _kept(recipe: Recipe) -> list[torch.Tensor] | None:
    if recipe.select is None:
        return None
    from kvlink.cache import Observation, Observe
    from kvlink.select import get_selector

    obs = Observation(kind=Observe.NONE, length=T, num_layers=G.num_layers)
    return get_selector(recipe.method, seed=recipe.select.seed).keep(obs, recipe.retention, recipe.scope)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_parameters_round_trip_and_bad_ones_are_refused(name: str) -> None:
    stage = MATRIX[name].stage
    assert type(stage).from_params(stage.params()) == stage
    with pytest.raises(ValueError, match="has no parameters"):
        type(stage).from_params({**stage.params(), "bogus": "1"})
    for key in stage.params():
        with pytest.raises(ValueError):
            type(stage).from_params({**stage.params(), key: "x" * 300})


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_the_name_round_trips(name: str) -> None:
    recipe = MATRIX[name].recipe
    assert Recipe.from_name(recipe.name) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_the_wire_carries_it_and_a_receiver_without_it_refuses(name: str) -> None:
    row = MATRIX[name]
    assert wire.recipe_from_pb(wire.recipe_to_pb(row.recipe), G.num_layers) == row.recipe
    encoded = Codec(row.recipe, G, row.profile, row.residual).encode_kv(_kv(), _kept(row.recipe))
    header = wire.to_frames(encoded, "s", "m", FP, 1 << 20)[0]
    lacking = local_capabilities() - {row.stage.capability()}
    with pytest.raises(wire.WireError) as info:
        wire.Assembler(FP, G, capabilities=lacking).feed(header)
    assert info.value.code == "UNKNOWN_CODEC" and row.stage.capability() in info.value.message


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_sizes_encode_and_decode_through_the_wire(name: str) -> None:
    row = MATRIX[name]
    kv, kept = _kv(), _kept(row.recipe)
    codec = Codec(row.recipe, G, row.profile, row.residual)
    encoded = codec.encode_kv(kv, kept)
    predicted = codec.predicted_sizes(T, kept)
    if row.recipe.zstd is None and row.recipe.ans is None:
        assert encoded.sizes().as_dict() == predicted.as_dict()
    elif row.recipe.zstd is not None:  # zstd only shrinks parts
        assert encoded.sizes().total <= predicted.total
    else:  # every codes part is an rANS stream within its bound; every other part is exact
        codes = [t.parts["codes"] for t in encoded.tensors]
        assert all(len(c.data) <= bound(c.raw_size) for c in codes)
        assert encoded.sizes().total - sum(len(c.data) for c in codes) == predicted.total - sum(
            c.raw_size for c in codes
        )
    asm = wire.Assembler(FP, G)
    for frame in wire.to_frames(encoded, "s", "m", FP, 256):
        asm.feed(frame)
    received, _ = asm.finish()
    got, want = codec.decode(received), codec.decode(encoded)
    original = kv.select(kept) if kept is not None else kv
    for a, b, x, p, q in zip(got.keys + got.values, want.keys + want.values, original.keys + original.values,
                             got.positions * 2, original.positions * 2, strict=True):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(p, q)
        assert float((a - x).norm() / x.norm()) < row.max_error, name
