"""Query-aware rounding of keys (a key Quantize stage with rounding "query", kvlink.quant.aware)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import random_ids
from kvlink import wire
from kvlink.cache import ContextKV, Observe, prefill
from kvlink.codec import Codec
from kvlink.eval.grid import parse_name
from kvlink.models import Geometry
from kvlink.quant.aware import quantize_query_aware, query_hessian
from kvlink.quant.base import QuantSpec, dequantize, quantize, scale_shape
from kvlink.recipe import build
from kvlink.rotation import rotate
from kvlink.stages import Rotate

FP = "f" * 64


def _keys(h: int = 2, t: int = 45, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Keys with channels of very different spread, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, t, d, generator=g) * torch.linspace(0.5, 8.0, d)


def _queries(q_heads: int = 4, n: int = 12, d: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q_heads, n, d, generator=g) * torch.linspace(6.0, 0.3, d)


def _logit_error(x: torch.Tensor, x_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over heads and tokens of e^T H e: the squared error of the observed queries' logits."""
    e = (x - x_hat).double()
    return float(torch.einsum("htd,hde,hte->", e, hessian, e))


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize(("fmt", "group"), [("int2", 8), ("int3", 32), ("int4", 7), ("int8", 16)])
def test_identity_hessian_is_nearest_rounding_exactly(axis: str, fmt: str, group: int) -> None:
    x = _keys()
    spec = QuantSpec(fmt, group, axis)
    plain = quantize(x, spec)
    aware = quantize_query_aware(x, spec, 5.0 * torch.eye(16, dtype=torch.float64).expand(2, 16, 16))
    assert torch.equal(aware.codes, plain.codes)
    assert torch.equal(aware.scale, plain.scale) and torch.equal(aware.zero, plain.zero)


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("fmt", ["int2", "int3", "int4"])
def test_query_aware_rounding_lowers_the_logit_error(axis: str, fmt: str) -> None:
    x, q = _keys(t=64), _queries()
    hessian = query_hessian(q, 2)
    spec = QuantSpec(fmt, 32 if axis == "channel" else 8, axis)
    plain = dequantize(quantize(x, spec))
    for damp, factor in ((0.1, 0.95), (0.01, 0.8)):
        aware = quantize_query_aware(x, spec, hessian, damp=damp)
        assert aware.codes.shape == quantize(x, spec).codes.shape
        assert tuple(aware.scale.shape) == scale_shape(x.shape, spec)  # type: ignore[union-attr, arg-type]
        got = _logit_error(x, dequantize(aware), hessian)
        assert got < factor * _logit_error(x, plain, hessian), (damp, got)


def test_channel_groups_follow_the_int_layout_rule() -> None:
    """Each group's zero/scale is the INT rule on the values it held when rounded: no code is clamped.

    So every decoded value lies inside its group's [zero, zero + (2^b - 1) * scale], and the
    first channel rounded (largest query weight, nothing compensated into it yet) is plain rounding.
    """
    x, q = _keys(t=50), _queries()
    hessian = query_hessian(q, 2)
    spec = QuantSpec("int3", 16, "channel")
    aware = quantize_query_aware(x, spec, hessian, damp=0.01)
    plain = quantize(x, spec)
    y, y_plain = dequantize(aware), dequantize(plain)
    first = hessian.diagonal(dim1=1, dim2=2).argmax(dim=1)  # (H,)
    for h in range(2):
        assert torch.equal(y[h, :, first[h]], y_plain[h, :, first[h]])
    assert not torch.equal(y, y_plain)


def test_query_hessian_groups_query_heads_by_kv_head() -> None:
    q = _queries(q_heads=4, n=3)
    hessian = query_hessian(q, 2)
    want = sum(q[i].double().T @ q[i].double() for i in (2, 3))  # q heads 2, 3 read KV head 1
    assert torch.allclose(hessian[1], want)
    with pytest.raises(ValueError, match="do not split into 3 KV groups"):
        query_hessian(q, 3)
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_query_aware(_keys(), QuantSpec("int4", 32, "channel"), hessian[:1])
    with pytest.raises(ValueError, match="damp must be"):
        quantize_query_aware(_keys(), QuantSpec("int4", 32, "channel"), hessian, damp=0.0)
    with pytest.raises(ValueError, match="handles formats"):
        quantize_query_aware(_keys(), QuantSpec("nf4", 32, "channel"), hessian)


def test_config_validates_round_k() -> None:
    assert build(k_bits=4, v_bits=4, round_k="query").name.endswith("round-query")
    assert parse_name("q2c75%/layer+kint4c/vint3t-g32+sink1+round-query") == build(
        selector="q2c", retention=0.75, scope="layer", k_bits=4, v_bits=3, sink=1, round_k="query"
    )
    with pytest.raises(ValueError, match="round_k must be one of"):
        build(k_bits=4, round_k="stochastic")
    with pytest.raises(ValueError, match="needs INT keys"):
        build(k_bits=16, v_bits=4, round_k="query")
    with pytest.raises(ValueError, match="needs INT keys"):
        build(k_bits="nf4", round_k="query")
    with pytest.raises(ValueError, match="choose one"):
        build(k_bits=4, lowrank="svd", k_rank=8, round_k="query")
    build(k_bits=4, v_bits=4, lowrank="svd", v_rank=8, round_k="query")  # low rank on V only is fine


def _prefilled(lm: Any, n_ctx: int = 48) -> Any:
    return prefill(lm.model, random_ids(n_ctx, seed=5), random_ids(9, seed=6), observe=Observe.QUESTION)


def _model_logit_error(pre: Any, decoded: ContextKV, geometry: Geometry) -> float:
    total = 0.0
    for layer, obs in enumerate(pre.observation.layers):
        keys = pre.kv.keys[layer].float()[:, decoded.positions[layer]]
        total += _logit_error(
            keys, decoded.keys[layer].float(), query_hessian(obs.queries, geometry.kv_heads)
        )
    return total


@pytest.mark.parametrize(
    "name",
    [
        "kint3c/vint3t-g32",
        "kint2c/vint2t-g32+sink1",
        "q2c50%/layer+kint3c/vint3t-g32+sink1",
        "kint3c/vint3t-g32+rot",
    ],
)
def test_codec_rounds_keys_for_the_question_same_bytes(tiny: Any, name: str) -> None:
    pre = _prefilled(tiny)
    nearest = parse_name(name)
    aware = nearest.with_quantize("k", rounding="query")
    enc_n = Codec(nearest, tiny.geometry).encode(pre)
    enc_a = Codec(aware, tiny.geometry).encode(pre)
    # the same parts of the same sizes; values untouched; keys rounded differently
    for tn, ta in zip(enc_n.tensors, enc_a.tensors):
        assert {k: len(p.data) for k, p in tn.parts.items()} == {k: len(p.data) for k, p in ta.parts.items()}
        if tn.kind == "v" or "sink" in tn.parts:
            same = ("v",) if tn.kind == "v" else ()
            for part in tn.parts:
                if tn.kind in same or part == "sink":
                    assert tn.parts[part].data == ta.parts[part].data
    assert enc_n.sizes().as_dict() == enc_a.sizes().as_dict()
    assert (
        Codec(aware, tiny.geometry)
        .predicted_sizes(pre.kv.length, Codec(aware, tiny.geometry).select(pre))
        .total
        == enc_a.sizes().total
    )
    dec_n = Codec(nearest, tiny.geometry).decode(enc_n)
    asm = wire.Assembler(FP, tiny.geometry)
    for frame in wire.to_frames(enc_a, "s", "m", FP, 1 << 20):
        asm.feed(frame)
    received = asm.finish()[0]
    assert received.recipe == aware  # travels, for the receiver's records
    assert all(q.rounding == "query" for q in received.recipe.quantizers("k"))
    dec_a = Codec(received.recipe, tiny.geometry).decode(received)
    for layer in range(tiny.geometry.num_layers):
        assert torch.equal(dec_a.values[layer], dec_n.values[layer])
        assert torch.equal(dec_a.positions[layer], dec_n.positions[layer])
    assert _model_logit_error(pre, dec_a, tiny.geometry) < 0.9 * _model_logit_error(pre, dec_n, tiny.geometry)


def test_rotated_keys_round_in_the_rotated_space(tiny: Any) -> None:
    """With rotation the queries are rotated too: the Hessian must be the one of the stored keys."""
    pre = _prefilled(tiny)
    config = build(k_bits=3, v_bits=3, rotate="k", round_k="query")
    enc = Codec(config, tiny.geometry).encode(pre)
    t = enc.tensors[0]
    seed = next(s.seed for s in config.pipeline("k", 0) if isinstance(s, Rotate))
    stored = rotate(pre.kv.keys[0].float(), seed, 0, "k")
    hessian = query_hessian(rotate(pre.observation.layers[0].queries, seed, 0, "k"), tiny.geometry.kv_heads)
    want = quantize_query_aware(stored, config.pipeline("k", 0)[-1].spec, hessian)
    assert t.parts["codes"].data == want.codes.numpy().tobytes()


def test_query_rounding_needs_observed_queries(tiny: Any) -> None:
    pre = prefill(tiny.model, random_ids(30, seed=5))  # no observation
    codec = Codec(build(k_bits=4, v_bits=4, round_k="query"), tiny.geometry)
    with pytest.raises(ValueError, match="observe='question'"):
        codec.encode(pre)
    with pytest.raises(ValueError, match="observe='question'"):
        codec.encode_kv(pre.kv)


def test_receiver_rejects_an_unknown_rounding_as_malformed() -> None:
    def key_quantize(msg: Any) -> Any:
        (pipeline,) = [p for p in msg.pipelines if p.kind == wire.pb.TENSOR_KIND_K]
        assert pipeline.stages[-1].name == "quantize"
        return pipeline.stages[-1]

    msg = wire.recipe_to_pb(build(k_bits=4, v_bits=4, round_k="query"))
    assert key_quantize(msg).params["rounding"] == "query"
    assert key_quantize(wire.recipe_to_pb(build(k_bits=4, v_bits=4))).params["rounding"] == "nearest"
    key_quantize(msg).params["rounding"] = "dithered"
    with pytest.raises(wire.WireError) as info:
        wire.recipe_from_pb(msg, 2, frozenset({"format:int4"}))
    assert info.value.code == "MALFORMED" and "rounding" in str(info.value)


def test_batched_rounding_equals_layer_by_layer(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are independent: all layers in one call or one layer per call give the same bytes."""
    import kvlink.stages.quantize as quantize_module

    pre = _prefilled(tiny)
    config = build(selector="q2c", retention=0.5, scope="layer", k_bits=3, v_bits=4, round_k="query")
    together = Codec(config, tiny.geometry).encode(pre)
    monkeypatch.setattr(quantize_module, "ROUND_BATCH_ELEMENTS", 1)
    one_by_one = Codec(config, tiny.geometry).encode(pre)
    for a, b in zip(together.tensors, one_by_one.tensors):
        assert (a.layer, a.kind) == (b.layer, b.kind)
        assert {k: p.data for k, p in a.parts.items()} == {k: p.data for k, p in b.parts.items()}


def _obq_reference(x: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The update from its definition, channel by channel in descending order of H's diagonal: round
    channel j, then move its error onto the channels F not rounded yet by -err * inv(H_FF)[j, F] /
    inv(H_FF)[j, j] (no Cholesky shortcut). Channel-axis groups: stats of the column when rounded."""
    h, t, d = x.shape
    g = spec.group_size
    out = torch.empty(h, t, d, dtype=torch.float64)
    for head in range(h):
        hm = hessian[head].double()
        hm = hm + damp * hm.diagonal().mean() * torch.eye(d, dtype=torch.float64)
        order = torch.argsort(hessian[head].diagonal(), descending=True).tolist()
        w = x[head].double().clone()
        for step, j in enumerate(order):
            rest = order[step:]
            inv = torch.linalg.inv(hm[rest][:, rest])
            col = quantize(w[:, j].float().view(1, t, 1), QuantSpec(spec.format, g, "channel"))
            rounded = dequantize(col).view(t).double()
            err = w[:, j] - rounded
            w[:, rest[1:]] -= err[:, None] * (inv[0, 1:] / inv[0, 0])[None, :]
            w[:, j] = rounded
        out[head] = w
    return out


def test_channel_order_rounding_matches_the_update_from_its_definition() -> None:
    """The Cholesky factor must be the one of H permuted into the rounding order."""
    x, q = _keys(t=40, d=8), _queries(d=8)[:, :, [3, 0, 6, 1, 7, 2, 5, 4]]  # weights out of channel order
    hessian = query_hessian(q, 2)
    assert not torch.equal(hessian[0].diagonal().argsort(descending=True), torch.arange(8))
    spec = QuantSpec("int3", 16, "channel")
    got = dequantize(quantize_query_aware(x, spec, hessian, damp=0.01)).double()
    want = _obq_reference(x, spec, hessian, 0.01)
    assert torch.allclose(got, want, atol=1e-5)
