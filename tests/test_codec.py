"""The codec pipeline and invariant 1: the compressed cache is the one that decodes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import random_ids
from kvlink.cache import ContextKV, Observe, prefill
from kvlink.codec import Codec
from kvlink.generate import greedy_answer
from kvlink.models import Geometry
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import Recipe, build
from kvlink.select import get_selector
from kvlink.stages import Quantize, Rotate


def _observe(config: Recipe) -> Observe:
    return config.needs()


def _round_trip(lm: Any, ctx: torch.Tensor, q: torch.Tensor, config: Recipe, n: int = 8) -> tuple[Any, Any]:
    """(sender's own answer from its full cache, receiver's answer from the decoded bytes)."""
    pre = prefill(lm.model, ctx, q, observe=_observe(config))
    sender = greedy_answer(lm.model, lm.tokenizer, pre.kv, q, max_new_tokens=n, stop_at_eos=False)
    codec = Codec(config, lm.geometry)
    encoded = codec.encode(pre)
    receiver_kv = Codec(config, lm.geometry).decode(encoded)  # a fresh codec: only the bytes travel
    receiver = greedy_answer(lm.model, lm.tokenizer, receiver_kv, q, max_new_tokens=n, stop_at_eos=False)
    return sender, receiver


def test_full_precision_round_trip_reproduces_the_sender(tiny: Any) -> None:
    """Invariant 1 on tiny Llama / Qwen2 (attention bias) / Mistral: same tokens, logits within fp16 rounding."""
    ctx, q = random_ids(64, seed=11), random_ids(6, seed=12)
    sender, receiver = _round_trip(tiny, ctx, q, build())
    assert receiver.token_ids == sender.token_ids
    torch.testing.assert_close(receiver.logits, sender.logits, atol=2e-2, rtol=1e-3)


def test_int2_quarter_round_trip_changes_the_logits(tiny: Any) -> None:
    """A heavily compressed transfer must change what the receiver computes."""
    ctx, q = random_ids(64, seed=13), random_ids(6, seed=14)
    config = build(selector="q2c", retention=0.25, k_bits=2, v_bits=2)
    sender, receiver = _round_trip(tiny, ctx, q, config, n=1)
    assert (receiver.prompt_logits - sender.prompt_logits).abs().max() > 0.05


def test_receiver_reads_the_bytes_not_a_copy(tiny: Any) -> None:
    """Flipping payload bytes after encoding changes the decoded cache: there is no hidden full copy."""
    pre = prefill(tiny.model, random_ids(40, seed=15), None)
    config = build(k_bits=8, v_bits=8)
    codec = Codec(config, tiny.geometry)
    encoded = codec.encode(pre)
    clean = codec.decode(encoded)
    part = encoded.tensors[0].parts["codes"]
    part.data = bytes(b ^ 0xFF for b in part.data)
    dirty = codec.decode(encoded)
    assert not torch.allclose(clean.keys[0], dirty.keys[0])
    torch.testing.assert_close(clean.values[0], dirty.values[0])


def test_embedded_model_full_precision_round_trip(embedded: Any) -> None:
    from kvlink.eval.squad import load_squad

    example = load_squad()[0]
    ctx = context_ids(embedded.tokenizer, example.context)
    q = question_ids(embedded.tokenizer, example.question)
    sender, receiver = _round_trip(embedded, ctx, q, build(), n=12)
    assert receiver.token_ids == sender.token_ids
    torch.testing.assert_close(receiver.logits, sender.logits, atol=5e-2, rtol=1e-3)
    _, crushed = _round_trip(embedded, ctx, q, build(selector="q2c", retention=0.25, k_bits=2, v_bits=2), n=1)
    assert (crushed.prompt_logits - sender.prompt_logits).abs().max() > 0.5


SIZE_CONFIGS = [
    build(),
    build(k_bits=8, v_bits=4, group_size=16),
    build(k_bits=3, v_bits=2, k_axis="token", v_axis="channel", group_size=7),
    build(k_bits="nf4", v_bits="nf4"),
    build(selector="random", retention=0.4, k_bits=4, v_bits=4),
    build(selector="streaming", retention=0.3, scope="layer", k_bits=2, v_bits=8),
    build(lowrank="svd", k_rank=8, v_rank=12, k_bits=4, v_bits=8),
    build(selector="random", retention=0.5, lowrank="svd", k_rank=4, v_rank=None, v_bits=3),
    Recipe(  # a pipeline per layer: INT8 keys in the first two layers, INT2 after
        k=((Quantize("int8", 32, "channel"),),) * 2 + ((Quantize("int2", 32, "channel"),),),
        v=((Quantize("int3", 32, "token"),),),
    ),
    Recipe(k=((Quantize("fp16", 32, "channel"),),), v=((Rotate(), Quantize("int2", 32, "token")),)),
    build(group_size=16, sink=1, k_layer_bits=(8, 2, 4), v_layer_bits=(3, 3, 2)),
    build(selector="random", retention=0.5, scope="layer", k_layer_bits=(2, 3, 8), v_bits=4, rotate="kv"),
]


@pytest.mark.parametrize("config", SIZE_CONFIGS, ids=lambda c: c.name)
def test_sizes_are_known_before_encoding(config: Recipe) -> None:
    """predicted_sizes (no bytes written) equals what encode produces, part by part."""
    g = Geometry(num_layers=3, kv_heads=2, head_dim=32, q_heads=4)
    torch.manual_seed(0)
    length = 53
    kv = ContextKV(
        [torch.randn(2, length, 32) for _ in range(3)],
        [torch.randn(2, length, 32) for _ in range(3)],
        [torch.arange(length)] * 3,
        length,
    )
    codec = Codec(config, g)
    kept = None
    if config.select is not None:
        from kvlink.cache import Observation

        obs = Observation(kind=Observe.NONE, length=length, num_layers=3)
        kept = get_selector(config.method).keep(obs, config.retention, config.scope)
    predicted = codec.predicted_sizes(length, kept)
    encoded = codec.encode_kv(kv, kept)
    assert encoded.sizes().as_dict() == predicted.as_dict()
    decoded = codec.decode(encoded)
    n_kept = kept[0].numel() if kept else length
    assert decoded.keys[1].shape == (2, n_kept, 32) and decoded.length == length
    if kept:
        assert all(torch.equal(d, k) for d, k in zip(decoded.positions, kept))


def test_zstd_is_lossless_and_only_used_where_it_pays() -> None:
    g = Geometry(num_layers=2, kv_heads=2, head_dim=16, q_heads=2)
    kv = ContextKV(
        [torch.zeros(2, 40, 16), torch.randn(2, 40, 16)],
        [torch.randn(2, 40, 16)] * 2,
        [torch.arange(40)] * 2,
        40,
    )
    plain = Codec(build(k_bits=4, v_bits=4), g)
    packed = Codec(build(k_bits=4, v_bits=4, zstd_level=3), g)
    a, b = plain.encode_kv(kv), packed.encode_kv(kv)
    assert b.tensors[0].parts["codes"].zstd  # all-zero keys compress
    assert b.sizes().total < a.sizes().total
    assert all(len(p.data) <= p.raw_size for t in b.tensors for p in t.parts.values())
    da, db = plain.decode(a), packed.decode(b)
    for x, y in zip(da.keys + da.values, db.keys + db.values):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_bits": 5}, "bits must be one of .* got 5"),
        ({"v_bits": "int9"}, "got 'int9'"),
        ({"selector": "q2c", "retention": 0}, "retention must be in \\(0, 1\\], got 0"),
        ({"selector": "q2c", "retention": 1.5}, "got 1.5"),
        ({"selector": "magic"}, "unknown selection method 'magic'; registered: .*q2c"),
        ({"group_size": 0}, "group_size .* got 0"),
        ({"k_axis": "row"}, "got 'row'"),
        ({"lowrank": "pca9"}, "got 'pca9'"),
        ({"retention": 0.5}, "needs a selection method"),
    ],
)
def test_bad_configs_raise_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_rank_above_head_dim_is_refused() -> None:
    g = Geometry(num_layers=1, kv_heads=1, head_dim=16, q_heads=1)
    with pytest.raises(ValueError, match="rank 17 exceeds head_dim 16"):
        Codec(build(lowrank="svd", k_rank=17), g)
    with pytest.raises(ValueError, match="needs a calibrated model profile"):
        Codec(build(lowrank="profile", k_rank=4), g)


@pytest.mark.parametrize(
    ("config", "launches"),
    [
        (build(k_bits=4, v_bits=4), 2),  # K per channel, V per token: one stack each
        (build(k_bits=4, v_bits=4, k_axis="token"), 1),  # K and V of every layer: one launch
        (build(k_bits=8, v_bits=2, k_axis="channel", v_axis="token"), 2),  # one stack per spec
        (build(k_bits=3, v_bits="nf4", group_size=8), 2),
        (build(lowrank="svd", k_rank=4, v_rank=None, k_bits=4, v_bits=4), 4),  # K: 3 fused expands
        (build(k_bits=4, v_bits=4, k_axis="token", sink=2), 1),  # sink entries: copied around it
        (build(lowrank="svd", k_rank=4, k_bits=4, v_bits=4, sink=1), 4),  # and one by one
    ],
    ids=lambda v: v.name if isinstance(v, Recipe) else str(v),
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_stacks_alike_tensors_into_one_launch(
    config: Recipe, launches: int, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message's tensors quantized alike decode as one (n*H, N, D) stack: same values as one by one."""
    import kvlink.kernels as kernels
    from kvlink.codec import _quantized

    monkeypatch.setenv("KVLINK_KERNELS", backend)
    g = Geometry(num_layers=3, kv_heads=2, head_dim=16, q_heads=4)
    torch.manual_seed(1)
    kv = ContextKV([torch.randn(2, 21, 16) for _ in range(3)], [torch.randn(2, 21, 16) for _ in range(3)],
                   [torch.arange(21)] * 3, 21)  # fmt: skip
    codec = Codec(config, g)
    encoded = codec.encode_kv(kv, None)
    calls: list[str] = []
    for name in ("dequantize_into", "dequantize_expand"):
        original = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k)
        )
    decoded = codec.decode(encoded, dtype=torch.float16)
    assert len(calls) == launches
    for t in encoded.tensors:  # each tensor decoded on its own, through the same backend
        parts = codec._checked_parts(t)
        q = _quantized(t.spec, t.stored, [parts], "cpu")
        if t.lowrank == "svd":
            basis = torch.frombuffer(bytearray(parts["basis"]), dtype=torch.float16).view(2, t.stored[2], 16)
            alone = kernels.dequantize_expand(q, basis, None, torch.float16)
        else:
            alone = kernels.dequantize_into(q, torch.float16)
        got = (decoded.keys if t.kind == "k" else decoded.values)[t.layer]
        assert got.dtype == torch.float16 and got.shape == t.shape
        sink = (kv.keys if t.kind == "k" else kv.values)[t.layer][:, : t.sink].half()
        torch.testing.assert_close(got[:, : t.sink], sink, rtol=0, atol=0)
        torch.testing.assert_close(got[:, t.sink :], alone, rtol=0, atol=0)


def test_a_pipeline_per_layer_travels_by_wire() -> None:
    """Mixed precision by layer: each layer's pipeline is its own (here INT8 keys in layer 0, INT2 after),
    each tensor carries its spec, and the receiver decodes what came; one that lacks INT8 refuses it."""
    from kvlink import wire
    from kvlink.capabilities import local_capabilities

    g = Geometry(num_layers=3, kv_heads=2, head_dim=16, q_heads=4)
    torch.manual_seed(2)
    kv = ContextKV([torch.randn(2, 30, 16) for _ in range(3)], [torch.randn(2, 30, 16) for _ in range(3)],
                   [torch.arange(30)] * 3, 30)  # fmt: skip
    int8, int2 = Quantize("int8", 32, "channel"), Quantize("int2", 32, "channel")
    config = Recipe(k=((int8,), (int2,), (int2,)), v=((Quantize("fp16", 32, "token"),),))
    assert [config.pipeline("k", layer)[-1].format for layer in range(3)] == ["int8", "int2", "int2"]
    encoded = Codec(config, g).encode_kv(kv)
    assert [t.spec.format for t in encoded.tensors if t.kind == "k"] == ["int8", "int2", "int2"]
    asm = wire.Assembler("f" * 64, g)
    for frame in wire.to_frames(encoded, "s", "m", "f" * 64, 1 << 20):
        asm.feed(frame)
    received, _ = asm.finish()
    assert received.recipe == config
    got, want = Codec(config, g).decode(received), Codec(config, g).decode(encoded)
    assert all(torch.equal(a, b) for a, b in zip(got.keys, want.keys, strict=True))
    errors = [float((d - x).norm() / x.norm()) for d, x in zip(got.keys, kv.keys, strict=True)]
    assert errors[0] < errors[1] / 10 and errors[0] < errors[2] / 10  # INT8 layer 0 vs INT2 layers
    no_int8 = local_capabilities() - {"format:int8"}
    with pytest.raises(wire.WireError, match="format:int8"):
        wire.Assembler("f" * 64, g, capabilities=no_int8).feed(
            wire.to_frames(encoded, "s", "m", "f" * 64, 1 << 20)[0]
        )
    with pytest.raises(ValueError, match="3 per-layer pipelines, the model has 4 layers"):
        Codec(config, Geometry(num_layers=4, kv_heads=2, head_dim=16, q_heads=4))


_PEAK_SCRIPT = """
import sys, threading, time, psutil, torch
from kvlink.cache import ContextKV
from kvlink.codec import Codec, decode_cost
from kvlink.recipe import Recipe, build
from kvlink.models import Geometry
from kvlink.server.memory import return_freed_memory_promptly
return_freed_memory_promptly()  # as kvlink-serve does at start-up
config, tokens = eval(sys.argv[1]), int(sys.argv[2])
g = Geometry(num_layers=30, kv_heads=3, head_dim=64, q_heads=9)
def kv(t):
    torch.manual_seed(0)
    return ContextKV([torch.randn(3, t, 64) for _ in range(30)], [torch.randn(3, t, 64) for _ in range(30)],
                     [torch.arange(t)] * 30, t)
def predictors():
    from kvlink.predict import PredictorProfile, Rotary
    torch.manual_seed(1)
    f = 3 * 64
    w = {(l, k): torch.randn((f if (l, k) == (0, "v") else 2 * f) + 1, f) * 0.01
         for l in range(30) for k in "kv" if (l, k) != (0, "k")}
    return PredictorProfile("f" * 64, 30, 3, 64, Rotary(1 / 10000 ** (torch.arange(0, 64, 2) / 64)), w)
codec = Codec(config, g, predictors() if config.has("predict") else None)
codec.decode(codec.encode_kv(kv(16)))  # first-call costs out of the way
encoded = codec.encode_kv(kv(tokens))
proc = psutil.Process()
start = proc.memory_info().rss
peak, done = [start], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0002)
watcher = threading.Thread(target=poll)
watcher.start()
decoded = codec.decode(encoded)
done.set()
watcher.join()
print(peak[0] - start, decode_cost(encoded, torch.float32))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    ["build(k_bits=2, v_bits=2, zstd_level=3)", "build(k_bits=4, v_bits=4, rotate='kv', sink=1)",
     "build(k_bits='nf4', v_bits=3)", "Recipe.from_name('xpred+kint2c/vint2t-g64+sink1')"],
)  # fmt: skip
def test_decode_cost_bounds_the_decodes_peak_memory(config: str) -> None:
    """The receiver admits a decode against its memory budget with decode_cost: it must be an upper bound of
    what the decode really takes (resident memory sampled while it runs, in a fresh process)."""
    import subprocess
    import sys

    for tokens in (300, 6000):  # a stack smaller than DECODE_STACK_BYTES, and several of them
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, config, str(tokens)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        rise, cost = map(int, out.stdout.split())
        assert 0 < rise <= cost, (config, tokens, rise, cost)
