"""fp16 sink entries (the Sink stage): exact, outside the quantization groups, counted, on the wire."""

from __future__ import annotations

import pytest
import torch

from kvlink import wire
from kvlink.budget import Constraints, QualityTable, candidate_recipes
from kvlink.cache import ContextKV
from kvlink.capabilities import local_capabilities
from kvlink.codec import Codec
from kvlink.models import Geometry
from kvlink.recipe import Recipe, build
from kvlink.stages import Rotate, Sink

G = Geometry(num_layers=2, kv_heads=2, head_dim=16, q_heads=4)
FP = "f" * 64
NO_SINK = local_capabilities() - {"sink"}
"""A receiver that decodes everything but fp16 sink entries."""


def _sink(recipe: Recipe) -> int:
    """The recipe's sink entries (its Sink stage's n; 0 without one)."""
    return max((s.n for s in recipe.stages() if isinstance(s, Sink)), default=0)


def _sink_kv(length: int = 40) -> ContextKV:
    """Keys whose first position carries a huge value in two channels (an attention sink)."""
    torch.manual_seed(3)
    keys = [torch.randn(2, length, 16) for _ in range(2)]
    for k in keys:
        k[:, 0, 3] = 60.0
        k[:, 0, 9] = -45.0
    values = [torch.randn(2, length, 16) for _ in range(2)]
    return ContextKV(keys, values, [torch.arange(length)] * 2, length)


def _through_wire(encoded, capabilities: frozenset[str] | None = None):  # type: ignore[no-untyped-def]
    asm = wire.Assembler(FP, G, capabilities=capabilities)
    for frame in wire.to_frames(encoded, "s", "m", FP, 1 << 20):
        asm.feed(frame)
    return asm.finish()[0]


@pytest.mark.parametrize("sink", [1, 4])
def test_sink_entries_are_exact_and_leave_the_groups(sink: int) -> None:
    kv = _sink_kv()
    config = build(k_bits=4, v_bits=4, sink=sink)
    codec = Codec(config, G)
    encoded = codec.encode_kv(kv)
    for t in encoded.tensors:
        assert t.sink == sink and t.stored == (2, 40 - sink, 16) and t.shape == (2, 40, 16)
        assert len(t.parts["sink"].data) == 2 * sink * 16 * 2
    decoded = codec.decode(_through_wire(encoded))
    plain = Codec(build(k_bits=4, v_bits=4), G).decode(Codec(build(k_bits=4, v_bits=4), G).encode_kv(kv))
    for layer in range(2):
        k, v = decoded.keys[layer], decoded.values[layer]
        want_k = kv.keys[layer][:, :sink].half().float()
        assert torch.equal(k[:, :sink], want_k) and torch.equal(
            v[:, :sink], kv.values[layer][:, :sink].half().float()
        )
        # the rest is the plain quantization of the rest: the sink no longer sets the first group's scale
        rest = Codec(build(k_bits=4, v_bits=4), G).encode_kv(
            ContextKV([x[:, sink:] for x in kv.keys], [x[:, sink:] for x in kv.values],
                      [torch.arange(40 - sink)] * 2, 40 - sink))  # fmt: skip
        body = Codec(build(k_bits=4, v_bits=4), G).decode(rest)
        assert torch.equal(k[:, sink:], body.keys[layer]) and torch.equal(v[:, sink:], body.values[layer])
        err = float((k - kv.keys[layer]).norm() / kv.keys[layer].norm())
        err_plain = float((plain.keys[layer] - kv.keys[layer]).norm() / kv.keys[layer].norm())
        assert err < err_plain / 3


def test_sink_bytes_are_predicted_counted_as_payload_and_fp16_tensors_have_none() -> None:
    kv = _sink_kv()
    config = build(k_bits=4, v_bits=16, sink=2)
    codec = Codec(config, G)
    encoded = codec.encode_kv(kv)
    assert [t.sink for t in encoded.tensors] == [2, 0, 2, 0]  # V is fp16: nothing to set aside
    sizes = encoded.sizes()
    assert sizes.as_dict() == codec.predicted_sizes(kv.length).as_dict()
    plain = Codec(config.without("sink"), G).predicted_sizes(kv.length)
    # two layers of K: 2 fp16 entries more, 2 quantized entries fewer (channel groups of 32: same scales)
    assert sizes.payload == plain.payload + 2 * (2 * 2 * 16 * 2) - 2 * (2 * 2 * 16 // 2)
    assert config.name.endswith("+sink2")


def test_sink_larger_than_the_kept_set_keeps_everything_at_fp16() -> None:
    kv = _sink_kv(length=3)
    config = build(k_bits=2, v_bits=2, sink=8)
    decoded = Codec(config, G).decode(_through_wire(Codec(config, G).encode_kv(kv)))
    assert all(torch.equal(a, b.half().float()) for a, b in zip(decoded.keys, kv.keys, strict=True))


def test_sink_with_selection_rotation_and_low_rank() -> None:
    kv = _sink_kv()
    kept = [torch.tensor([0, 5, 6, 7, 20, 39])] * 2
    for config in (
        build(selector="q2c", retention=0.15, k_bits=3, v_bits=3, sink=1, rotate="kv"),
        build(selector="q2c", retention=0.15, k_bits=8, v_bits=8, sink=2, lowrank="svd", k_rank=4),
    ):
        codec = Codec(config, G)
        decoded = codec.decode(_through_wire(codec.encode_kv(kv, kept)))
        assert torch.equal(decoded.positions[0], kept[0])
        sink = _sink(config)
        first = kv.keys[0][:, kept[0][:sink]]  # the first kept entries, not the first positions
        assert torch.equal(decoded.keys[0][:, :sink], first.half().float())


def test_a_receiver_without_sinks_refuses_and_a_wrong_sink_count_is_refused() -> None:
    kv = _sink_kv()
    encoded = Codec(build(k_bits=4, v_bits=4, sink=1), G).encode_kv(kv)
    old = frozenset({"format:int4", "format:fp16", "zstd"})  # no selection, no low rank, no sink entries
    with pytest.raises(wire.WireError, match="sink") as info:
        _through_wire(encoded, old)
    assert info.value.code == "UNKNOWN_CODEC"
    # a header whose tensors carry another sink count than its config declares
    encoded.recipe = encoded.recipe.without("sink").with_transform(Sink(2))
    with pytest.raises(wire.WireError, match="stored shape") as info:
        _through_wire(encoded)
    assert info.value.code == "SHAPE"
    with pytest.raises(ValueError, match="sink must be a non-negative integer"):
        build(k_bits=4, sink=-1)


def test_planner_weighs_sinks_only_where_the_receiver_reads_them() -> None:
    assert any(c.has("sink") for c in candidate_recipes(G))
    assert not any(c.has("sink") for c in candidate_recipes(G, Constraints(capabilities=NO_SINK)))
    assert {_sink(c) for c in candidate_recipes(G, Constraints(sink=4))} == {4}
    assert not any(c.has("sink") and c.format("k") == c.format("v") == "fp16" for c in candidate_recipes(G))
    with pytest.raises(ValueError, match="the receiver does not decode fp16 sink entries"):
        Constraints(sink=1, capabilities=NO_SINK)
    config = build(k_bits=4, v_bits=4, sink=1)
    prior = QualityTable()
    assert prior.expected(config) < prior.expected(config.without("sink"))  # unmeasured: just below


def test_sender_narrows_sinks_to_the_receiver() -> None:
    from kvlink.client.main import build_parser, constraints_from_args
    from kvlink.client.sender import SendError, _for_receiver

    old = frozenset({"format:int4", "zstd"})  # no selection, no low rank, no sink entries
    narrowed = candidate_recipes(G, _for_receiver(None, old))
    assert narrowed and not any(c.has("sink") for c in narrowed)
    assert any(c.has("sink") for c in candidate_recipes(G, _for_receiver(None, wire.local_capabilities())))
    with pytest.raises(SendError, match="does not decode fp16 sink entries"):
        _for_receiver(Constraints(sink=1), old)
    args = build_parser().parse_args(["--server", "h:1", "--budget", "10%", "--context", "-", "--question", "q",
                                      "--sink", "4"])  # fmt: skip
    assert constraints_from_args(args).sink == 4


def test_an_unmeasured_config_takes_its_closest_measured_twin() -> None:
    from kvlink.budget import UNMEASURED_ROTATION, quality_key

    layer_sink = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=4, sink=1)
    plain = layer_sink.without("layer-scope").without("sink")
    assert plain == build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
    table = QualityTable(entries={quality_key(layer_sink): 0.72, quality_key(plain): 0.70})
    assert table.expected(layer_sink) == 0.72
    assert table.expected(layer_sink.with_transform(Rotate())) == pytest.approx(0.72 * UNMEASURED_ROTATION)
    sink4 = layer_sink.without("sink").with_transform(Sink(4))
    assert table.expected(sink4) == pytest.approx(0.70 * UNMEASURED_ROTATION**2)
    sink_rot_v = plain.with_transform(Sink(1)).with_transform(Rotate(), kinds=("v",))
    assert table.expected(sink_rot_v) == pytest.approx(0.70 * UNMEASURED_ROTATION**2)
