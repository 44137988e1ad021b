"""INT keys with a bit width per channel (a key Quantize stage with widths "question", kvlink.quant.widths)."""

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
from kvlink.quant import QuantizedTensor, QuantSpec, dequantize, part_sizes, quantize
from kvlink.quant.aware import quantize_query_aware, query_hessian
from kvlink.quant.pack import pack_bits
from kvlink.quant.widths import (
    allocate_widths,
    channel_weights,
    distortion,
    pack_codes,
    quantize_widths,
    unpack_codes,
    unpack_widths,
)
from kvlink.recipe import build

FP = "f" * 64


def _widths(h: int, d: int, mean: int, seed: int) -> torch.Tensor:
    """Random widths in [0, 8] whose rows sum to mean * d (uneven on purpose, with 0s and 8s)."""
    g = torch.Generator().manual_seed(seed)
    w = allocate_widths(torch.rand(h, d, generator=g).double() ** 8 * 1e6, mean)
    assert int(w.min()) == 0 and int(w.max()) >= mean + 2
    return w


def _keys(h: int = 2, t: int = 45, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, t, d, generator=g) * torch.linspace(0.5, 8.0, d) + torch.linspace(-3, 30, d)


@pytest.mark.parametrize(
    ("h", "t", "d", "mean"), [(2, 45, 16, 3), (3, 1, 64, 4), (1, 130, 8, 2), (2, 7, 24, 3)]
)
def test_codes_pack_and_unpack_exactly_in_the_uniform_formats_bytes(
    h: int, t: int, d: int, mean: int
) -> None:
    widths = _widths(h, d, mean, seed=t)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (h, t, d), generator=g) % (1 << widths.long())[:, None, :]
    packed = pack_codes(codes, widths)
    assert packed.dtype == torch.uint8 and packed.numel() == h * t * d * mean // 8
    assert torch.equal(unpack_codes(packed, widths, t), codes.to(torch.uint8))
    # bit layout: the last row's first channel, of width w, is the low w bits of that row's first byte
    row_bytes = d * mean // 8
    first = int(widths[h - 1, 0])
    assert int(packed[(h * t - 1) * row_bytes]) & ((1 << first) - 1) == int(codes[h - 1, t - 1, 0])


@pytest.mark.parametrize("fmt", ["int4cw", "int3cw", "int2cw"])
def test_uniform_widths_are_the_int_layout_byte_for_byte(fmt: str) -> None:
    x = _keys(t=50)
    spec = QuantSpec(fmt, 16, "channel")
    plain = quantize(x, QuantSpec(fmt.removesuffix("cw"), 16, "channel"))
    mine = quantize(x, spec)  # no allocation: every channel at the mean
    assert torch.equal(mine.codes, plain.codes)
    assert torch.equal(mine.scale, plain.scale) and torch.equal(mine.zero, plain.zero)  # type: ignore[arg-type]
    assert torch.equal(dequantize(mine), dequantize(plain))
    sizes = part_sizes((2, 50, 16), spec)
    assert sizes["codes"] == int(plain.codes.numel()) and sizes["widths"] == 2 * 16 // 2


def test_every_value_decodes_within_half_a_step_and_width_zero_to_the_midpoint() -> None:
    x = _keys(t=70)
    spec = QuantSpec("int3cw", 32, "channel")
    widths = _widths(2, 16, 3, seed=3)
    q = quantize_widths(x, spec, widths)
    y = dequantize(q)
    assert q.scale is not None and q.zero is not None
    s = q.scale.float().repeat_interleave(32, dim=1)[:, :70]
    for h, i in itertools.product(range(2), range(16)):
        col, got = x[h, :, i], y[h, :, i]
        if int(widths[h, i]) == 0:
            for start in range(0, 70, 32):
                grp = col[start : start + 32]
                mid = ((grp.min() + grp.max()) / 2).half().float()
                assert torch.all(got[start : start + 32] == mid)
        else:
            assert torch.all((col - got).abs() <= s[h, :, i] / 2 + 1e-3 * col.abs().max())


def test_allocation_spends_the_mean_and_matches_exhaustive_search() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        weights = torch.rand(2, 4, generator=g).double() ** 4 * 10.0 ** (trial % 5)
        mean = 1 + trial % 4
        w = allocate_widths(weights, mean)
        assert w.dtype == torch.uint8 and torch.all(w.long().sum(1) == 4 * mean)
        for row in range(2):
            best = min(
                sum(float(weights[row, i]) * distortion(c[i]) for i in range(4))
                for c in itertools.product(range(9), repeat=4)
                if sum(c) == 4 * mean
            )
            got = sum(float(weights[row, i]) * distortion(int(w[row, i])) for i in range(4))
            assert got == pytest.approx(best, rel=1e-12)


def test_distortion_is_the_min_max_step() -> None:
    """Width w: step = range / (2^w - 1), error variance step^2 / 12; width 0 (midpoint) = width 1."""
    t = 20001
    x = torch.rand(1, t, 1, generator=torch.Generator().manual_seed(0)).expand(1, t, 8).contiguous()
    widths = torch.tensor([[0, 1, 2, 3, 5, 5, 8, 8]], dtype=torch.uint8)  # 32 bits: mean 4
    y = dequantize(quantize_widths(x, QuantSpec("int4cw", t, "channel"), widths))
    span = float(x.max() - x.min())
    for i, width in enumerate(widths[0].tolist()):
        mse = float(((y[0, :, i] - x[0, :, i]) ** 2).mean())
        assert mse == pytest.approx(distortion(width) * span**2 / 12, rel=0.05), width
    assert distortion(0) == distortion(1) == 1.0 and distortion(3) == 1 / 49


def test_allocation_follows_the_weights_and_keeps_zero_rows_uniform() -> None:
    weights = torch.tensor([[1.0, 16.0, 256.0, 4096.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    w = allocate_widths(weights, 3)
    assert w[0].tolist() == sorted(w[0].tolist()) and w[0, 0] < w[0, 3]  # 4x the weight: one more bit
    assert w[1].tolist() == [3, 3, 3, 3]
    assert allocate_widths(torch.full((1, 5), 7.0), 8).tolist() == [[8] * 5]  # capped at 8
    with pytest.raises(ValueError, match="finite and non-negative"):
        allocate_widths(torch.tensor([[1.0, -1.0]]), 2)
    with pytest.raises(ValueError, match="mean width"):
        allocate_widths(torch.ones(1, 4), 9)


def test_widths_from_the_queries_lower_their_logit_error_at_the_same_bytes() -> None:
    x = _keys(t=64, d=32)
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(4, 12, 32, generator=g) * torch.logspace(1, -1.5, 32)
    hessian = query_hessian(queries, 2)
    spec = QuantSpec("int3cw", 32, "channel")
    widths = allocate_widths(channel_weights(x, hessian.diagonal(dim1=1, dim2=2), 32), 3)

    def err(y: torch.Tensor) -> float:
        e = (x - y).double()
        return float(torch.einsum("htd,hde,hte->", e, hessian, e))

    uniform = quantize(x, spec)
    allocated = quantize_widths(x, spec, widths)
    assert allocated.codes.numel() == uniform.codes.numel()
    assert err(dequantize(allocated)) < 0.6 * err(dequantize(uniform))
    rounded = quantize_query_aware(x, spec, hessian, widths=widths)
    assert err(dequantize(rounded)) < err(dequantize(allocated))
    codes = unpack_codes(rounded.codes, widths, 64)
    assert torch.all(codes.long() < (1 << widths.long())[:, None, :])  # never above a channel's width


def test_query_rounding_with_uniform_widths_is_the_uniform_rounding() -> None:
    x = _keys(t=40)
    hessian = query_hessian(torch.randn(4, 9, 16), 2)
    uniform = torch.full((2, 16), 4, dtype=torch.uint8)
    a = quantize_query_aware(x, QuantSpec("int4cw", 16, "channel"), hessian, widths=uniform)
    b = quantize_query_aware(x, QuantSpec("int4", 16, "channel"), hessian)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)  # type: ignore[arg-type]


def test_bad_widths_are_refused_by_name() -> None:
    x = _keys(t=20)
    spec = QuantSpec("int3cw", 8, "channel")
    q = quantize_widths(x, spec, _widths(2, 16, 3, seed=5))
    assert q.widths is not None
    for widths, match in (
        (q.widths.clone().fill_(4), "sum to 64 bits, the format needs 48"),
        (torch.where(torch.arange(16) == 0, 9, q.widths), r"lie in \[0, 8\]"),
        (q.widths[:, :8], r"widths must be \(2, 16\)"),
    ):
        bad = QuantizedTensor(q.spec, q.shape, q.codes, q.scale, q.zero, widths.to(torch.uint8))
        with pytest.raises(ValueError, match=match):
            dequantize(bad)
    with pytest.raises(ValueError, match="needs the tensor's widths"):
        dequantize(QuantizedTensor(q.spec, q.shape, q.codes, q.scale, q.zero, None))
    with pytest.raises(ValueError, match="channel axis"):
        quantize(x, QuantSpec("int3cw", 8, "token"))
    with pytest.raises(ValueError, match="whole bytes"):
        quantize(x[:, :, :12], QuantSpec("int3cw", 8, "channel"))


def test_config_validation() -> None:
    recipe = build(k_bits=3, v_bits=3, k_widths="question")
    assert recipe.pipeline("k", 0)[-1].spec == QuantSpec("int3cw", 32, "channel")
    assert recipe.pipeline("v", 0)[-1].spec == QuantSpec("int3", 32, "token")
    assert build(k_bits=3, v_bits=3, k_widths="query") == recipe  # the name of before 2026-12 still reads
    mixed = build(k_layer_bits=(8, 4, 2), v_layer_bits=(4, 4, 4), k_widths="question")
    assert [mixed.pipeline("k", i)[-1].spec.format for i in range(3)] == ["int8", "int4cw", "int2cw"]
    assert "kwidths-question" in parse_name("q2c50%/layer+kint3c/vint3t-g32+kwidths-question").name
    assert all(
        q.widths == "question"
        for q in parse_name("kint4c/vint4t-g32+round-query+kwidths-question").quantizers("k")
    )
    for kwargs, match in (
        (dict(k_bits=8, v_bits=4), "INT2/3/4 keys"),
        (dict(k_bits="nf4", v_bits=4), "INT2/3/4 keys"),
        (dict(k_bits=4, v_bits=4, k_axis="token"), "channel axis"),
        (dict(k_bits=4, v_bits=4, rotate="k"), "choose one"),
    ):
        with pytest.raises(ValueError, match=match):
            build(k_widths="question", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k_widths must be one of"):
        build(k_bits=4, v_bits=4, k_widths="sometimes")
    with pytest.raises(ValueError, match="multiple of 8"):
        Codec(build(k_bits=4, v_bits=4, k_widths="question"), Geometry(2, 2, 12, 4))


def _prefilled(lm: Any, n_ctx: int = 48) -> Any:
    return prefill(lm.model, random_ids(n_ctx, seed=5), random_ids(9, seed=6), observe=Observe.QUESTION)


def _skewed(lm: Any) -> Any:
    """Key channels of very different spread, as trained models have (a random init's are alike):
    k_proj rows scaled by 0.1 ... 10 per RoPE pair (i, i + D/2 share a factor, so RoPE keeps it)."""
    d = lm.geometry.head_dim
    factor = torch.logspace(-1, 1, d // 2).repeat(2).repeat(lm.geometry.kv_heads)  # (kv_heads * D,)
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.k_proj.weight.mul_(factor[:, None])
            if layer.self_attn.k_proj.bias is not None:
                layer.self_attn.k_proj.bias.mul_(factor)
    return lm


def _logit_error(pre: Any, decoded: Any, geometry: Geometry) -> float:
    total = 0.0
    for layer, obs in enumerate(pre.observation.layers):
        e = (pre.kv.keys[layer].float()[:, decoded.positions[layer]] - decoded.keys[layer].float()).double()
        total += float(torch.einsum("htd,hde,hte->", e, query_hessian(obs.queries, geometry.kv_heads), e))
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
        "q2c50%/layer+kint4c/vint3t-g32+sink1",
        "kint4c/vint4t-g32+round-query",
        "kint3c/vint3t-g64+round-query",
    ],
)
def test_codec_sends_widths_from_the_question(tiny: Any, name: str) -> None:
    pre = _prefilled(_skewed(tiny))
    uniform = parse_name(name)
    config = uniform.with_quantize("k", widths="question")
    codec = Codec(config, tiny.geometry)
    enc_u, enc_w = Codec(uniform, tiny.geometry).encode(pre), codec.encode(pre)
    # the same payload; the widths (4 bits per head and channel of every key tensor) on top
    widths_bytes = tiny.geometry.num_layers * tiny.geometry.kv_heads * tiny.geometry.head_dim // 2
    assert enc_w.sizes().payload == enc_u.sizes().payload
    assert enc_w.sizes().total == enc_u.sizes().total + widths_bytes
    assert codec.predicted_sizes(pre.kv.length, codec.select(pre)).total == enc_w.sizes().total
    for tu, tw in zip(enc_u.tensors, enc_w.tensors, strict=True):
        if tw.kind == "v":
            assert {k: p.data for k, p in tu.parts.items()} == {k: p.data for k, p in tw.parts.items()}
        else:
            assert tw.spec.format == tu.spec.format + "cw" and "widths" in tw.parts
    received = _through_the_wire(enc_w, tiny.geometry)
    assert received.recipe == config
    dec_w = Codec(received.recipe, tiny.geometry).decode(received)
    dec_u = Codec(uniform, tiny.geometry).decode(enc_u)
    for layer in range(tiny.geometry.num_layers):
        assert torch.equal(dec_w.values[layer], dec_u.values[layer])
        assert torch.equal(dec_w.positions[layer], dec_u.positions[layer])
    assert _logit_error(pre, dec_w, tiny.geometry) < _logit_error(pre, dec_u, tiny.geometry)


def test_widths_need_observed_queries(tiny: Any) -> None:
    pre = prefill(tiny.model, random_ids(30, seed=5))
    with pytest.raises(ValueError, match="widths 'question' needs the observed queries"):
        Codec(build(k_bits=4, v_bits=4, k_widths="question"), tiny.geometry).encode(pre)


def test_receiver_without_the_formats_refuses_by_name() -> None:
    def key_quantize(msg: Any) -> Any:
        (pipeline,) = [p for p in msg.pipelines if p.kind == wire.pb.TENSOR_KIND_K]
        assert pipeline.stages[-1].name == "quantize"
        return pipeline.stages[-1]

    msg = wire.recipe_to_pb(build(k_bits=4, v_bits=4, k_widths="question"))
    assert key_quantize(msg).params["widths"] == "question"
    assert key_quantize(wire.recipe_to_pb(build(k_bits=4, v_bits=4))).params["widths"] == "uniform"
    old = frozenset({"format:int4"})  # a receiver of INT4 without the per-channel-width formats
    with pytest.raises(wire.WireError) as info:
        wire.recipe_from_pb(msg, 2, old)
    assert info.value.code == "UNKNOWN_CODEC" and "format:int4cw" in str(info.value)


def test_a_tampered_widths_part_costs_one_error(tiny: Any) -> None:
    """Widths that do not sum to the format's mean decode to a ValueError naming them, never garbage."""
    pre = _prefilled(tiny)
    config = build(k_bits=3, v_bits=3, k_widths="question")
    enc = Codec(config, tiny.geometry).encode(pre)
    t = enc.tensors[0]
    widths = unpack_widths(torch.frombuffer(bytearray(t.parts["widths"].data), dtype=torch.uint8), 2, 16)
    widths[0, 0] = (int(widths[0, 0]) + 1) % 9
    t.parts["widths"] = type(t.parts["widths"])(
        bytes(pack_bits(widths, 4).numpy()), len(t.parts["widths"].data)
    )
    with pytest.raises(ValueError, match="widths of head 0 sum to"):
        Codec(config, tiny.geometry).decode(enc)
