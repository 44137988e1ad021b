"""INT values with a bit width per token row (a value Quantize stage with widths "question", kvlink.quant.widths)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from conftest import random_ids
from kvlink import wire
from kvlink.cache import Observe, prefill
from kvlink.codec import Codec
from kvlink.eval.grid import parse_name
from kvlink.models import Geometry
from kvlink.quant import QuantSpec, dequantize, part_sizes, quantize
from kvlink.quant.pack import pack_bits
from kvlink.quant.widths import (
    allocate_token_widths,
    distortion,
    pack_token_codes,
    quantize_token_widths,
    token_weights,
    unpack_token_codes,
    unpack_widths,
)
from kvlink.recipe import build
from kvlink.select.base import attention_to_context

FP = "f" * 64


def _values(h: int = 2, t: int = 33, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, t, d, generator=g) * torch.linspace(0.2, 6.0, t)[:, None]


def _uneven(h: int, t: int, mean: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return allocate_token_widths(torch.rand(h, t, generator=g).double() ** 8 * 1e6, mean)


@pytest.mark.parametrize(
    ("h", "t", "d", "mean"), [(2, 33, 16, 3), (3, 1, 64, 4), (1, 131, 8, 2), (2, 7, 24, 3)]
)
def test_codes_pack_and_unpack_exactly_in_the_uniform_formats_bytes(
    h: int, t: int, d: int, mean: int
) -> None:
    widths = _uneven(h, t, mean, seed=t)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (h, t, d), generator=g) % (1 << widths.long())[:, :, None]
    packed = pack_token_codes(codes, widths)
    assert packed.dtype == torch.uint8 and packed.numel() == h * t * d * mean // 8
    assert torch.equal(unpack_token_codes(packed, widths, d), codes.to(torch.uint8))
    # bit layout: row (0, 1) starts right after row (0, 0)'s d * w bits, LSB first
    w0, w1 = int(widths[0, 0]), int(widths[0, 1]) if t > 1 else 0
    bits = "".join(f"{b:08b}"[::-1] for b in packed.tolist())
    if w0:
        assert int(bits[:w0][::-1], 2) == int(codes[0, 0, 0])
    if t > 1 and w1:
        assert int(bits[d * w0 : d * w0 + w1][::-1], 2) == int(codes[0, 1, 0])


@pytest.mark.parametrize("fmt", ["int4rw", "int3rw", "int2rw"])
def test_uniform_widths_are_the_int_layout_byte_for_byte(fmt: str) -> None:
    x = _values(2, 45, 16)
    spec = QuantSpec(fmt, 8, "token")
    q = quantize(x, spec)
    plain = quantize(x, QuantSpec(fmt[:4], 8, "token"))
    assert torch.equal(q.codes, plain.codes) and torch.equal(q.scale, plain.scale)  # type: ignore[arg-type]
    assert torch.equal(q.zero, plain.zero)  # type: ignore[arg-type]
    assert part_sizes(q.shape, spec) == {**plain.nbytes(), "widths": 45}
    assert torch.equal(dequantize(q), dequantize(plain))


def test_every_value_decodes_within_half_a_step_of_its_row() -> None:
    x = _values(3, 40, 32, seed=2)
    spec = QuantSpec("int3rw", 16, "token")
    widths = _uneven(3, 40, 3, seed=4)
    y = dequantize(quantize_token_widths(x, spec, widths))
    groups = x.view(3, 40, 2, 16)
    span = (groups.amax(-1) - groups.amin(-1)).repeat_interleave(16, dim=2)  # (H, T, D)
    levels = ((1 << widths.long()) - 1).float()[:, :, None]
    assert bool(((y - x).abs() <= span / levels / 2 * 1.01 + 1e-3).all())
    assert int(widths.min()) == 2 and int(widths.max()) >= 5  # rows at several widths


def test_allocation_spends_the_mean_and_matches_exhaustive_search() -> None:
    g = torch.Generator().manual_seed(3)
    for mean, t in ((2, 5), (3, 4), (4, 4)):
        weights = torch.rand(2, t, generator=g).double() ** 3
        widths = allocate_token_widths(weights, mean)
        assert torch.equal(widths.long().sum(1), torch.full((2,), mean * t))
        for row in range(2):
            best = min(
                sum(float(weights[row, i]) * distortion(c[i]) for i in range(t))
                for c in itertools.product(range(mean - 1, 9), repeat=t)
                if sum(c) == mean * t
            )
            got = sum(float(weights[row, i]) * distortion(int(widths[row, i])) for i in range(t))
            assert got == pytest.approx(best, rel=1e-12)


def test_allocation_follows_the_weights_and_keeps_zero_rows_uniform() -> None:
    weights = torch.tensor([[1.0, 1e6, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    widths = allocate_token_widths(weights, 3)
    assert widths[0].tolist() == [2, 6, 2, 2]  # the heavy row takes what the others give, down to mean - 1
    assert widths[1].tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="mean width of token rows"):
        allocate_token_widths(weights, 8)
    with pytest.raises(ValueError, match="finite and non-negative"):
        allocate_token_widths(-weights, 3)


def test_widths_from_the_attention_lower_the_output_error_at_the_same_bytes() -> None:
    x = _values(2, 64, 16, seed=7)
    g = torch.Generator().manual_seed(8)
    probs = torch.softmax(torch.randn(2, 5, 64, generator=g) * 3, dim=-1)  # (H, queries, T)
    spec = QuantSpec("int3rw", 16, "token")
    widths = allocate_token_widths(token_weights(x, probs.sum(1), 16), 3)
    aware = quantize_token_widths(x, spec, widths)
    uniform = quantize(x, spec)
    assert aware.codes.numel() == uniform.codes.numel()

    def err(y: torch.Tensor) -> float:
        return float((probs @ (y - x)).pow(2).sum())

    assert err(dequantize(aware)) < 0.8 * err(dequantize(uniform))


def test_bad_widths_are_refused_by_name() -> None:
    x = _values(2, 10, 16)
    spec = QuantSpec("int4rw", 16, "token")
    with pytest.raises(ValueError, match="sum to"):
        quantize_token_widths(x, spec, torch.full((2, 10), 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must be \(2, 10\)"):
        quantize_token_widths(x, spec, torch.full((2, 16), 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="need the token axis"):
        quantize(x, QuantSpec("int4rw", 16, "channel"))
    with pytest.raises(ValueError, match=r"attention mass must be \(2, 10\)"):
        token_weights(x, torch.ones(2, 9), 16)


def test_config_validation() -> None:
    recipe = build(k_bits=4, v_bits=3, v_widths="question")
    assert recipe.pipeline("v", 0)[-1].spec.format == "int3rw"
    assert build(k_bits=4, v_bits=3, v_widths="attention") == recipe  # the name of before 2026-12 still reads
    mixed = build(k_bits=4, v_bits=8, v_layer_bits=(8, 3), v_widths="question")
    assert [mixed.pipeline("v", i)[-1].spec.format for i in range(2)] == ["int8", "int3rw"]
    assert parse_name("q2c90%/layer+kint4c/vint3t-g64+sink1+kwidths-question+vwidths-question") == build(
        selector="q2c", retention=0.9, scope="layer", k_bits=4, v_bits=3, group_size=64, sink=1,
        k_widths="question", v_widths="question",
    )  # fmt: skip
    for kwargs, match in (
        (dict(k_bits=4, v_bits=8), "needs INT2/3/4 values"),
        (dict(k_bits=4, v_bits=4, v_axis="channel"), "token axis"),
        (dict(k_bits=4, v_bits=4, lowrank="svd", v_rank=8), "choose one"),
    ):
        with pytest.raises(ValueError, match=match):
            build(v_widths="question", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="v_widths must be one of"):
        build(k_bits=4, v_bits=4, v_widths="query")
    with pytest.raises(ValueError, match="multiple of 8"):
        Codec(build(k_bits=4, v_bits=4, v_widths="question"), Geometry(2, 2, 12, 4))


def _prefilled(lm: Any, n_ctx: int = 48) -> Any:
    return prefill(lm.model, random_ids(n_ctx, seed=5), random_ids(9, seed=6), observe=Observe.QUESTION)


def _output_error(pre: Any, decoded: Any) -> float:
    """Squared error of the question's attention outputs over the kept rows, all layers."""
    total = 0.0
    obs = pre.observation
    for layer, o in enumerate(obs.layers):
        kept = decoded.positions[layer]
        mass = attention_to_context(o, obs.length, obs.scale)[:, kept]  # (H, n)
        e = pre.kv.values[layer].float()[:, kept] - decoded.values[layer].float()
        total += float((mass[:, :, None] * e).pow(2).sum())
    return total


def _through_the_wire(encoded: Any, geometry: Geometry) -> Any:
    asm = wire.Assembler(FP, geometry)
    for frame in wire.to_frames(encoded, "s", "m", FP, 1 << 20):
        asm.feed(frame)
    return asm.finish()[0]


@pytest.mark.parametrize(
    "name",
    [
        "kint3c/vint3t-g32",
        "kint2c/vint2t-g32+sink1",
        "q2c50%/layer+kint4c/vint3t-g32+sink1+kwidths-question",
        "kint4c/vint4t-g8",
        "q2c50%+kint4c/vint3t-g32+v-rot",
    ],
)
def test_codec_sends_value_widths_from_the_question(tiny: Any, name: str) -> None:
    pre = _prefilled(tiny)
    uniform = parse_name(name)
    config = uniform.with_quantize("v", widths="question")
    codec = Codec(config, tiny.geometry)
    enc_u, enc_w = Codec(uniform, tiny.geometry).encode(pre), codec.encode(pre)
    kept = enc_w.tensors[1].stored[1]  # value rows per head and layer after the sink
    widths_bytes = tiny.geometry.num_layers * ((tiny.geometry.kv_heads * kept + 1) // 2)
    assert enc_w.sizes().payload == enc_u.sizes().payload
    assert enc_w.sizes().total == enc_u.sizes().total + widths_bytes
    assert codec.predicted_sizes(pre.kv.length, codec.select(pre)).total == enc_w.sizes().total
    for tu, tw in zip(enc_u.tensors, enc_w.tensors, strict=True):
        if tw.kind == "k":
            assert {k: p.data for k, p in tu.parts.items()} == {k: p.data for k, p in tw.parts.items()}
        else:
            assert tw.spec.format == tu.spec.format + "rw" and "widths" in tw.parts
    received = _through_the_wire(enc_w, tiny.geometry)
    assert received.recipe == config
    dec_w = Codec(received.recipe, tiny.geometry).decode(received)
    dec_u = Codec(uniform, tiny.geometry).decode(enc_u)
    for layer in range(tiny.geometry.num_layers):
        assert torch.equal(dec_w.keys[layer], dec_u.keys[layer])
        assert torch.equal(dec_w.positions[layer], dec_u.positions[layer])
    assert _output_error(pre, dec_w) < _output_error(pre, dec_u)


def test_value_widths_need_observed_queries(tiny: Any) -> None:
    pre = prefill(tiny.model, random_ids(30, seed=5))
    with pytest.raises(ValueError, match="widths 'question' needs the observed queries"):
        Codec(build(k_bits=4, v_bits=4, v_widths="question"), tiny.geometry).encode(pre)


def test_receiver_without_the_formats_refuses_by_name() -> None:
    def value_quantize(msg: Any) -> Any:
        (pipeline,) = [p for p in msg.pipelines if p.kind == wire.pb.TENSOR_KIND_V]
        assert pipeline.stages[-1].name == "quantize"
        return pipeline.stages[-1]

    msg = wire.recipe_to_pb(build(k_bits=4, v_bits=4, v_widths="question"))
    assert value_quantize(msg).params["widths"] == "question"
    assert value_quantize(wire.recipe_to_pb(build(k_bits=4, v_bits=4))).params["widths"] == "uniform"
    old = frozenset({"format:int4", "format:int4cw"})  # key widths, but no per-row value widths
    with pytest.raises(wire.WireError) as info:
        wire.recipe_from_pb(msg, 2, old)
    assert info.value.code == "UNKNOWN_CODEC" and "format:int4rw" in str(info.value)


def test_a_tampered_widths_part_costs_one_error(tiny: Any) -> None:
    """Row widths that do not sum to the format's mean decode to a ValueError naming them, never garbage."""
    pre = _prefilled(tiny)
    config = build(k_bits=3, v_bits=3, v_widths="question")
    enc = Codec(config, tiny.geometry).encode(pre)
    t = enc.tensors[1]
    h, n = t.stored[0], t.stored[1]
    widths = unpack_widths(torch.frombuffer(bytearray(t.parts["widths"].data), dtype=torch.uint8), h, n)
    widths[0, 0] = (int(widths[0, 0]) + 1) % 9
    t.parts["widths"] = type(t.parts["widths"])(
        bytes(pack_bits(widths, 4).numpy()), len(t.parts["widths"].data)
    )
    with pytest.raises(ValueError, match="widths of head 0 sum to"):
        Codec(config, tiny.geometry).decode(enc)
