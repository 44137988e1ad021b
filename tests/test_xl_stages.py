"""Transform coding as stages (kvlink.stages.pca, kvlink.stages.ans): a recipe `xpred+fp16+pca1-r<rate>+ans`
codes exactly what the kvlink.xl core codes (the same rANS streams, byte for byte, and the same decoded
cache), crosses the wire, and refuses what does not compose, a foreign profile and a damaged stream."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_stream import receiver
from test_xl import _fit, _kv

from conftest import TINY_FAMILIES, random_ids
from kvlink import ans, wire, xl
from kvlink.capabilities import CapabilityError, check, local_capabilities
from kvlink.codec import Codec, EncodedKV, Part, decode_cost
from kvlink.recipe import Recipe
from kvlink.stages.ans import bound

FP = "f" * 64


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def fitted(request: pytest.FixtureRequest):
    return _fit(request.param)


def _codec(lm, predictors, residual, rate: int = -32) -> Codec:
    return Codec(Recipe.from_name(f"xpred+fp16+pca1-r{rate}+ans"), lm.geometry, predictors, residual)


@pytest.mark.parametrize("rate", [-32, 64])
def test_the_stages_code_exactly_what_the_xl_core_codes(fitted, rate: int) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm)
    core = xl.encode(kv, predictors, residual, rate=rate)
    codec = _codec(lm, predictors, residual, rate)
    encoded = codec.encode_kv(kv)
    assert [t.parts["codes"].data for t in encoded.tensors] == core.streams
    assert [t.parts["sink"].data for t in encoded.tensors] == core.sinks
    assert encoded.sizes().total == core.nbytes  # the message's parts are the core's body, nothing else
    assert encoded.recipe.name == f"xpred+fp16+pca1-r{rate}+ans"
    pca = next(s for s in encoded.recipe.stages() if s.name == "pca")
    assert pca.profile == residual.hash  # the residual profile travels by hash, like the predictors
    mine, theirs = codec.decode(encoded), xl.decode(core, predictors, residual, kv.positions[0])
    for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values, strict=True):
        assert torch.equal(a, b)
    assert decode_cost(encoded, torch.float32) > sum(
        4 * k.numel() + 4 * v.numel() for k, v in zip(kv.keys, kv.values)
    )


def test_a_coarser_rate_costs_fewer_bytes_and_errs_more(fitted) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm)
    sizes, errors = [], []
    for rate in (-96, 0, 96):
        codec = _codec(lm, predictors, residual, rate)
        encoded = codec.encode_kv(kv)
        decoded = codec.decode(encoded)
        sizes.append(encoded.sizes().total)
        errors.append(max(float((d - k).abs().max()) for d, k in zip(decoded.values, kv.values)))
    assert sizes[0] > sizes[1] > sizes[2]
    assert errors[0] < errors[1] < errors[2]


def _frames(encoded: EncodedKV) -> list:
    return wire.to_frames(encoded, "session-1", "message-1", FP, 1 << 10)


def _assemble(frames, lm, hashes):
    asm = wire.Assembler(FP, geometry=lm.geometry, profile_hashes=hashes)
    for frame in frames:
        asm.feed(frame)
    assert asm.complete
    return asm.finish()[0]


def test_a_message_crosses_the_wire_and_decodes_the_same(fitted) -> None:
    lm, predictors, residual = fitted
    codec = _codec(lm, predictors, residual)
    encoded = codec.encode_kv(_kv(lm))
    received = _assemble(_frames(encoded), lm, {predictors.hash, residual.hash})
    assert received.recipe == encoded.recipe and received.tensors == encoded.tensors
    mine, theirs = codec.decode(encoded), codec.decode(received)
    for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values, strict=True):
        assert torch.equal(a, b)


def test_a_stream_beyond_its_bound_is_refused_before_decoding(fitted) -> None:
    lm, predictors, residual = fitted
    codec = _codec(lm, predictors, residual)
    encoded = codec.encode_kv(_kv(lm))
    first = encoded.tensors[0]
    raw = first.parts["codes"].raw_size
    padded = Part(first.parts["codes"].data + bytes(bound(raw)), raw)
    bad = replace(
        encoded, tensors=[replace(first, parts={**first.parts, "codes": padded}), *encoded.tensors[1:]]
    )
    with pytest.raises(wire.WireError) as info:
        _assemble(_frames(bad), lm, {predictors.hash, residual.hash})
    assert info.value.code == "SHAPE" and "rANS stream exceeds the bound" in info.value.message
    with pytest.raises(ValueError, match=r"layer 0 k: rANS stream of .* exceeds the bound"):
        codec.decode(bad)


def test_a_damaged_stream_is_refused_naming_it(fitted) -> None:
    lm, predictors, residual = fitted
    codec = _codec(lm, predictors, residual)
    encoded = codec.encode_kv(_kv(lm))
    third = encoded.tensors[2]
    data = third.parts["codes"].data
    for damaged in (data[:-2], data[: ans.HEADER] + bytes(len(data) - ans.HEADER)):
        part = Part(damaged, third.parts["codes"].raw_size)
        tensors = [
            *encoded.tensors[:2],
            replace(third, parts={**third.parts, "codes": part}),
            *encoded.tensors[3:],
        ]
        with pytest.raises(ans.AnsError, match=r"ans codes part: .*stream 2"):
            codec.decode(replace(encoded, tensors=tensors))


def test_a_codec_without_the_right_profiles_refuses(fitted) -> None:
    lm, predictors, residual = fitted
    recipe = Recipe.from_name("xpred+fp16+pca1-r0+ans")
    with pytest.raises(ValueError, match="pca needs the residual profile"):
        Codec(recipe, lm.geometry, predictors)
    _, _, other_residual = _fit("qwen2" if lm.name != "tiny-qwen2" else "llama")
    with pytest.raises(ValueError, match="residual profile belongs to predictors"):
        Codec(recipe, lm.geometry, predictors, other_residual)
    encoded = _codec(lm, predictors, residual).encode_kv(_kv(lm))
    refitted = replace(residual, tokens=residual.tokens + 1)  # the same arithmetic, another profile (hash)
    with pytest.raises(ValueError, match=r"residual profile .* which this codec lacks"):
        Codec(recipe, lm.geometry, predictors, refitted).decode(encoded)


def test_names_read_back_and_what_does_not_compose_is_refused() -> None:
    recipe = Recipe.from_name("xpred+fp16+pca2-r-96+ans")
    assert recipe.name == "xpred+fp16+pca2-r-96+ans"
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert {"predict", "pca", "ans"} <= recipe.capabilities()
    for name, needle in [
        ("xpred+fp16+pca1-r0", "needs the ans entropy stage"),
        ("fp16+pca1-r0+ans", "needs xpred"),
        ("xpred+fp16+ans", "ans codes the symbols of the pca stage"),
        ("xpred+kint4c/vint4t-g32+pca1-r0+ans", "float16 Quantize"),
        ("xpred+fp16+pca1-r0+ans+zstd3", "choose one entropy stage"),
        ("xpred+fp16+pca1-r641+ans", r"rate must be an integer in \[-640, 640\]"),
        ("q2c50%/layer+xpred+fp16+pca1-r0+ans", "ONE kept position set"),
    ]:
        with pytest.raises(ValueError, match=needle):
            Recipe.from_name(name)


def test_a_receiver_without_residual_profiles_does_not_advertise_transform_coding() -> None:
    recipe = Recipe.from_name("xpred+fp16+pca1-r0+ans")
    held = local_capabilities(residuals=False)
    assert "predict" in held and not {"pca", "ans"} & held
    with pytest.raises(CapabilityError, match="ans, pca"):
        check(recipe, held)
    check(recipe, local_capabilities())


def test_global_selection_composes(fitted) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm, n=80)
    codec = Codec(Recipe.from_name("random50%+xpred+fp16+pca1-r-32+ans"), lm.geometry, predictors, residual)
    kept = [
        torch.sort(torch.randperm(80, generator=torch.Generator().manual_seed(3))[:40]).values
    ] * lm.geometry.num_layers
    encoded = codec.encode_kv(kv, kept)
    decoded = codec.decode(encoded)
    assert all(torch.equal(p, kept[0]) for p in decoded.positions)
    core = xl.encode(kv.select(kept), predictors, residual, rate=-32)
    assert [t.parts["codes"].data for t in encoded.tensors] == core.streams


# --- the receiver -----------------------------------------------------------------------------------------
TINY = "random:tiny-llama"
CONTEXT = " ".join(f"Paragraph {i} says that the code of box {i} is {7 * i + 3}." for i in range(12))
QUESTION = "What is the code of box 4?"


@pytest.fixture(scope="module")
def served():
    """The tiny random Llama with a real tokenizer, its predictors and residual profile fitted on it."""
    from kvlink.layerbits import Sensitivity
    from kvlink.models import load_model
    from kvlink.predict import fit_predictors
    from kvlink.residual import fit_residuals

    lm = load_model(TINY)
    texts = [random_ids(64, seed=200 + i) for i in range(6)]
    recipe = Recipe.from_name("xpred+kint2c/vint2t-g16+sink1")
    predictors = fit_predictors(lm.model, texts, recipe, lm.fingerprint)
    layers = lm.geometry.num_layers
    sensitivity = Sensitivity("tiny", k=(0.1,) * layers, v=(0.05,) * layers)
    return lm, predictors, fit_residuals(lm.model, texts, predictors, recipe, sensitivity)


async def test_a_receiver_holding_the_profiles_answers_as_the_sender_does_locally(served) -> None:
    from kvlink.budget import Constraints
    from kvlink.cache import prefill
    from kvlink.client.sender import send_context
    from kvlink.generate import greedy_answer
    from kvlink.prompt import context_ids, question_ids
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = served
    profiles = TransformProfiles(predictors, residual)
    free = Recipe.from_name("xpred+fp16+pca1+ans")  # the planner fits the rate to the budget
    async with receiver(lm, profiles=[residual, predictors]) as (target, service):
        assert {"pca", "ans", "predict"} <= service.capabilities
        assert {predictors.hash, residual.hash} <= set(service.profile_hashes)
        result = await send_context(
            target, CONTEXT, QUESTION, 0.5, lm=lm, constraints=Constraints(recipe=free, zstd=False),
            max_new_tokens=6, profile=profiles,
        )  # fmt: skip
        held = service.store.get("anonymous", result.session_id, result.message_id)
    recipe = result.plan.recipe
    assert recipe.name.startswith("xpred+fp16+pca1-r") and result.plan.total_bytes <= result.plan.budget_bytes
    local = Codec(recipe, lm.geometry, profiles)
    ctx, q = context_ids(lm.tokenizer, CONTEXT), question_ids(lm.tokenizer, QUESTION)
    kv = local.decode(local.encode_kv(prefill(lm.model, ctx).kv))
    assert held is not None  # the receiver's cache is the sender's own decode, bit for bit
    for a, b in zip(held.keys + held.values, kv.keys + kv.values, strict=True):
        assert torch.equal(a.cpu(), b.to(a.dtype).cpu())
    expected = greedy_answer(lm.model, lm.tokenizer, kv, q, max_new_tokens=6)
    assert list(result.answer.token_ids) == expected.token_ids


async def test_a_question_aware_message_is_sent_and_answered_as_the_sender_decodes_it(served) -> None:
    from kvlink.budget import Constraints
    from kvlink.cache import Observe, prefill
    from kvlink.client.sender import send_context
    from kvlink.generate import greedy_answer
    from kvlink.prompt import context_ids, question_ids
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = served
    profiles = TransformProfiles(predictors, residual)
    free = Recipe.from_name("xpred+fp16+pca1-q0.5+ans")
    async with receiver(lm, profiles=[residual, predictors]) as (target, service):
        result = await send_context(
            target, CONTEXT, QUESTION, 0.3, lm=lm, constraints=Constraints(recipe=free, zstd=False),
            max_new_tokens=6, profile=profiles,
        )  # fmt: skip
        held = service.store.get("anonymous", result.session_id, result.message_id)
    recipe = result.plan.recipe
    assert (
        recipe.name.startswith("xpred+fp16+pca1-q0.5-r")
        and result.plan.total_bytes <= result.plan.budget_bytes
    )
    assert all("shifts" in t.parts for t in result.plan.encoded.tensors)
    ctx, q = context_ids(lm.tokenizer, CONTEXT), question_ids(lm.tokenizer, QUESTION)
    pre = prefill(lm.model, ctx, q, observe=Observe.QUESTION)
    local = Codec(recipe, lm.geometry, profiles)
    kv = local.decode(local.encode_kv(pre.kv, observation=pre.observation))
    assert held is not None  # the receiver's cache is the sender's own decode, bit for bit
    for a, b in zip(held.keys + held.values, kv.keys + kv.values, strict=True):
        assert torch.equal(a.cpu(), b.to(a.dtype).cpu())
    expected = greedy_answer(lm.model, lm.tokenizer, kv, q, max_new_tokens=6)
    assert list(result.answer.token_ids) == expected.token_ids


async def test_a_receiver_without_the_residual_profile_is_refused_at_the_hello(served) -> None:
    from kvlink.budget import Constraints
    from kvlink.client.sender import SendError, send_context
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = served
    recipe = Recipe.from_name("xpred+fp16+pca1-r-64+ans")
    async with receiver(lm, profiles=[predictors]) as (target, service):
        assert "predict" in service.capabilities and not {"pca", "ans"} & service.capabilities
        with pytest.raises(SendError) as info:
            await send_context(
                target, CONTEXT, QUESTION, 1.0, lm=lm, constraints=Constraints(recipe=recipe, zstd=False),
                profile=TransformProfiles(predictors, residual),
            )  # fmt: skip
    assert info.value.code == "UNKNOWN_CODEC" and residual.hash in info.value.message
    assert predictors.hash not in info.value.message.split("holds:")[0]  # the one it lacks is named


def test_a_residual_profile_without_its_predictors_is_refused_at_start(served) -> None:
    from kvlink.metrics import MetricsRegistry
    from kvlink.server.service import KVLinkService
    from kvlink.server.store import SessionStore

    lm, _, residual = served
    with pytest.raises(ValueError, match="give that predictor profile too"):
        KVLinkService(lm, SessionStore(), MetricsRegistry(), profiles=[residual])


def test_kvlink_send_reads_a_residual_profile_and_its_predictors(served, tmp_path) -> None:
    from kvlink.client.main import UsageError, read_profile
    from kvlink.residual import TransformProfiles

    _, predictors, residual = served
    p, r = predictors.save(tmp_path / "p.safetensors"), residual.save(tmp_path / "r.safetensors")
    both = read_profile([str(r), str(p)])
    assert isinstance(both, TransformProfiles) and both.hashes == (predictors.hash, residual.hash)
    assert read_profile([str(p)]).hash == predictors.hash and read_profile([]) is None
    with pytest.raises(UsageError, match="give that predictor profile too"):
        read_profile([str(r)])


# --- the planner: the rate fitted to a budget ----------------------------------------------------------------
def test_the_planner_fits_the_finest_rate_that_fits_the_budget(fitted) -> None:
    from kvlink.budget import BudgetError, Constraints, framed_size, plan
    from kvlink.cache import prefill
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = fitted
    profiles = TransformProfiles(predictors, residual)
    pre = prefill(lm.model, random_ids(300, seed=4))
    free = Recipe.from_name("xpred+fp16+pca1+ans")
    assert free.name == "xpred+fp16+pca1+ans" and Recipe.from_dict(free.to_dict()) == free
    with pytest.raises(ValueError, match="rate is left to the planner"):
        Codec(free, lm.geometry, profiles)
    for budget in (0.3, 0.2):
        chosen = plan(pre, lm.geometry, lm.fingerprint, budget, constraints=Constraints(recipe=free, zstd=False),
                      session_id="s" * 32, message_id="m" * 32, profile=profiles)  # fmt: skip
        pca = next(s for s in chosen.recipe.stages() if s.name == "pca")
        assert pca.rate is not None and chosen.total_bytes <= chosen.budget_bytes
        finer = Codec(chosen.recipe.replacing(pca, pca.at(pca.rate - 1)), lm.geometry, profiles)
        size, allowance = framed_size(finer.encode_kv(pre.kv), "s" * 32, "m" * 32, lm.fingerprint, 1 << 20)
        assert size.total + allowance > chosen.budget_bytes  # one step finer does not fit
    with pytest.raises(BudgetError, match="pca1-r640"):
        plan(pre, lm.geometry, lm.fingerprint, 0.002, constraints=Constraints(recipe=free, zstd=False),
             profile=profiles)  # fmt: skip
    with pytest.raises(ValueError, match="TransformProfiles"):
        plan(pre, lm.geometry, lm.fingerprint, 0.25, constraints=Constraints(recipe=free, zstd=False),
             profile=predictors)  # fmt: skip


def test_a_rate_too_fine_for_float16_symbols_is_refused_and_the_planner_stops_short_of_it(fitted) -> None:
    from kvlink.budget import Constraints, plan
    from kvlink.cache import prefill
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = fitted
    profiles = TransformProfiles(predictors, residual)
    pre = prefill(lm.model, random_ids(300, seed=4))
    with pytest.raises(ValueError, match=r"pca rate -600 is too fine for this cache: .* symbols up to \d+"):
        _codec(lm, predictors, residual, -600).encode_kv(pre.kv)
    free = Recipe.from_name("xpred+fp16+pca1+ans")
    chosen = plan(pre, lm.geometry, lm.fingerprint, 1.0, constraints=Constraints(recipe=free, zstd=False),
                  profile=profiles)  # fmt: skip
    pca = next(s for s in chosen.recipe.stages() if s.name == "pca")
    assert chosen.total_bytes <= chosen.budget_bytes
    with pytest.raises(ValueError, match="too fine"):  # a whole FP16 budget: the finest rate float16 carries
        Codec(chosen.recipe.replacing(pca, pca.at(pca.rate - 1)), lm.geometry, profiles).encode_kv(pre.kv)


# --- question-aware steps (pca1-q<gamma>) ---------------------------------------------------------------
def _asked(lm, n: int = 90):
    from kvlink.cache import Observe, prefill

    return prefill(lm.model, random_ids(n, seed=21), random_ids(7, seed=22), observe=Observe.QUESTION)


def _layer_shifts(pre, codec_recipe, kv) -> torch.Tensor:
    from kvlink.stages.pca import question_shifts

    pca = next(s for s in codec_recipe.stages() if s.name == "pca")
    return torch.stack(
        [
            question_shifts(pre.observation, layer, kv.positions[0], pca.sink, pca.question)
            for layer in range(kv.num_layers)
        ]
    )


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_question_aware_steps_code_exactly_what_the_xl_core_codes_with_those_shifts(
    fitted, gamma: float
) -> None:
    lm, predictors, residual = fitted
    pre = _asked(lm)
    kv = pre.kv.to(dtype=torch.float32)
    recipe = Recipe.from_name(f"xpred+fp16+pca1-q{gamma:g}-r-32+ans")
    assert (
        recipe.name == f"xpred+fp16+pca1-q{gamma:g}-r-32+ans" and Recipe.from_dict(recipe.to_dict()) == recipe
    )
    codec = Codec(recipe, lm.geometry, predictors, residual)
    encoded = codec.encode_kv(kv, observation=pre.observation)
    shifts = _layer_shifts(pre, recipe, kv)
    assert shifts.abs().max() > 0 and shifts.abs().max() <= ans.MAX_SHIFT
    core = xl.encode(kv, predictors, residual, rate=-32, shifts=shifts)
    assert [t.parts["codes"].data for t in encoded.tensors] == core.streams
    for t in encoded.tensors:  # each tensor carries its layer's shifts, one signed byte a coded row
        assert t.parts["shifts"].data == shifts[t.layer].to(torch.int8).numpy().tobytes()
    assert encoded.sizes().total == core.nbytes
    mine, theirs = codec.decode(encoded), xl.decode(core, predictors, residual, kv.positions[0])
    for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values, strict=True):
        assert torch.equal(a, b)
    # and across the wire, to the same cache
    decoded = codec.decode(_assemble(_frames(encoded), lm, {predictors.hash, residual.hash}))
    for a, b in zip(mine.keys + mine.values, decoded.keys + decoded.values, strict=True):
        assert torch.equal(a, b)


def test_a_position_the_question_reads_more_gets_a_finer_step_and_a_smaller_error(fitted) -> None:
    from kvlink.select.base import attention_to_context

    lm, predictors, residual = fitted
    pre = _asked(lm)
    kv = pre.kv.to(dtype=torch.float32)
    recipe = Recipe.from_name("xpred+fp16+pca1-q1-r0+ans")
    shifts = _layer_shifts(pre, recipe, kv)
    obs = pre.observation
    for layer in range(kv.num_layers):
        s = attention_to_context(obs.layers[layer], obs.length, obs.scale).sum(0)[1:]
        order = torch.argsort(s, descending=True)
        assert torch.all(shifts[layer][order][1:] >= shifts[layer][order][:-1])  # more read: never coarser
        assert shifts[layer][order[0]] < 0 < shifts[layer][order[-1]]
    codec = Codec(recipe, lm.geometry, predictors, residual)
    decoded = codec.decode(codec.encode_kv(kv, observation=pre.observation))
    plain = Codec(Recipe.from_name("xpred+fp16+pca1-r0+ans"), lm.geometry, predictors, residual)
    flat = plain.decode(plain.encode_kv(kv))
    last = kv.num_layers - 1
    rows_err = (decoded.values[last] - kv.values[last]).pow(2).sum((0, 2))[1:]
    flat_err = (flat.values[last] - kv.values[last]).pow(2).sum((0, 2))[1:]
    fine, coarse = shifts[last] < -8, shifts[last] > 8  # an octave finer / coarser than the plain step
    assert fine.any() and coarse.any()
    assert rows_err[fine].mean() < flat_err[fine].mean() and rows_err[coarse].mean() > flat_err[coarse].mean()


def test_question_aware_steps_need_the_question_and_refuse_bad_shifts(fitted) -> None:
    lm, predictors, residual = fitted
    pre = _asked(lm)
    kv = pre.kv.to(dtype=torch.float32)
    codec = Codec(Recipe.from_name("xpred+fp16+pca1-q0.5-r0+ans"), lm.geometry, predictors, residual)
    assert codec.recipe.needs().value == "question"
    with pytest.raises(ValueError, match="needs the question's observation"):
        codec.encode_kv(kv)
    encoded = codec.encode_kv(kv, observation=pre.observation)
    for data, needle in (
        (b"\x01" * 3, r"layer 2 v: shifts part of 3 bytes, expected 89"),
        (None, "of 0 bytes"),
    ):
        t = encoded.tensors[5]
        parts = dict(t.parts)
        if data is None:
            del parts["shifts"]
        else:
            parts["shifts"] = Part(data, len(data))
        bad = replace(encoded, tensors=[*encoded.tensors[:5], replace(t, parts=parts), *encoded.tensors[6:]])
        with pytest.raises(ValueError, match=needle):
            codec.decode(bad)
    for name, needle in (
        ("xpred+fp16+pca1-q5-r0+ans", r"question exponent must be a number in \[0, 4.0\]"),
        ("xpred+fp16+pca1-qx-r0+ans", "pca1-qx-r0"),
        (
            "snapkv50%+xpred+fp16+pca1-q0.5-r0+ans",
            "snapkv observes 'window': one prefill gives one observation",
        ),
    ):
        with pytest.raises(ValueError, match=needle):
            Recipe.from_name(name)


def test_a_row_float16_would_round_is_moved_to_the_least_coarser_shift() -> None:
    from kvlink.stages.pca import FP16_EXACT, raise_shifts

    y = torch.zeros(4, 3)
    y[0, 1], y[1, 2], y[2, 0], y[3, 0] = 1000.0, -5000.0, 1e9, 2048.4
    moved = raise_shifts(y, 1.0, torch.tensor([0, 0, ans.MAX_SHIFT, 0]), FP16_EXACT)
    # 5000 / 2^(10/8) = 2102 would still pass 2048, 5000 / 2^(11/8) = 1927 does not; 2048.4 rounds to 2048;
    # a row already at the coarsest shift stays there (the caller refuses it)
    assert moved.tolist() == [0, 11, ans.MAX_SHIFT, 0]
    assert raise_shifts(y[:0], 1.0, torch.zeros(0, dtype=torch.int64), FP16_EXACT).numel() == 0


def test_a_row_too_fine_for_float16_is_coded_coarser_instead_of_capping_the_message(fitted) -> None:
    """With question-aware steps the most-read rows get the finest steps and the largest symbols: at a rate
    where a few would pass float16's exact integers, only those rows move coarser (their shifts part says
    by how much), the core with max_symbol codes the same streams, and the planner's estimate is finite."""
    from kvlink.stages.pca import FP16_EXACT

    lm, predictors, residual = fitted
    pre = _asked(lm)
    kv = pre.kv.to(dtype=torch.float32)
    shifts = _layer_shifts(pre, Recipe.from_name("xpred+fp16+pca1-q1+ans"), kv)
    base = shifts.repeat_interleave(2, dim=0)  # each layer's shifts for its K and its V

    def peak(rate: int) -> int:
        symbols = xl._chain(predictors, residual, rate, kv.positions[0], 1, kv=kv, shifts=base)[2]
        return int(symbols.abs().max())

    rate = next(r for r in range(0, -641, -16) if peak(r) > FP16_EXACT)  # the coarsest rate past float16
    codec = Codec(Recipe.from_name(f"xpred+fp16+pca1-q1-r{rate}+ans"), lm.geometry, predictors, residual)
    encoded = codec.encode_kv(kv, observation=pre.observation)  # refused as too fine before
    core = xl.encode(kv, predictors, residual, rate=rate, shifts=shifts, max_symbol=FP16_EXACT)
    assert core.shifts is not None and core.shifts.shape == base.shape
    assert [t.parts["codes"].data for t in encoded.tensors] == core.streams
    for i, t in enumerate(encoded.tensors):
        assert t.parts["shifts"].data == core.shifts[i].to(torch.int8).numpy().tobytes()
    moved = core.shifts != base
    assert moved.any() and bool((core.shifts[moved] > base[moved]).all())
    assert moved.float().mean() < 0.1  # a few rows, not the message
    symbols = xl._chain(predictors, residual, rate, kv.positions[0], 1, kv=kv, shifts=core.shifts)[2]
    assert int(symbols.abs().max()) <= FP16_EXACT
    mine, theirs = codec.decode(encoded), xl.decode(core, predictors, residual, kv.positions[0])
    for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values, strict=True):
        assert torch.equal(a, b)
    estimate = xl.estimated_bytes(kv, predictors, residual, rate, 1, FP16_EXACT, shifts=shifts)
    lanes = 2 * ans.LANES * len(core.streams)
    assert abs(estimate - core.nbytes) <= 0.002 * core.nbytes + lanes


def test_the_planner_fits_a_question_aware_rate_to_the_budget(fitted) -> None:
    from kvlink.budget import Constraints, framed_size, plan
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = fitted
    profiles = TransformProfiles(predictors, residual)
    pre = _asked(lm, n=200)
    free = Recipe.from_name("xpred+fp16+pca1-q0.5+ans")
    chosen = plan(pre, lm.geometry, lm.fingerprint, 0.25, constraints=Constraints(recipe=free, zstd=False),
                  session_id="s" * 32, message_id="m" * 32, profile=profiles)  # fmt: skip
    pca = next(s for s in chosen.recipe.stages() if s.name == "pca")
    assert pca.rate is not None and pca.question == 0.5 and chosen.total_bytes <= chosen.budget_bytes
    finer = Codec(chosen.recipe.replacing(pca, pca.at(pca.rate - 1)), lm.geometry, profiles)
    encoded = finer.encode_kv(pre.kv, observation=pre.observation)
    size, allowance = framed_size(encoded, "s" * 32, "m" * 32, lm.fingerprint, 1 << 20)
    assert size.total + allowance > chosen.budget_bytes  # one step finer does not fit


def test_a_sender_on_the_kernel_codes_the_same_streams(fitted, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage and the core code with kvlink.kernels.ans's encoder where the kernels run (here Triton's
    interpreter, KVLINK_KERNELS=triton), and the streams are the reference's, byte for byte."""
    import kvlink.kernels.ans as kernel

    lm, predictors, residual = fitted
    pre = _asked(lm)
    kv = pre.kv.to(dtype=torch.float32)
    codec = Codec(Recipe.from_name("xpred+fp16+pca1-q0.5-r-32+ans"), lm.geometry, predictors, residual)
    shifts = _layer_shifts(pre, codec.recipe, kv)
    monkeypatch.setenv("KVLINK_KERNELS", "reference")
    reference = [t.parts["codes"].data for t in codec.encode_kv(kv, observation=pre.observation).tensors]
    core = xl.encode(kv, predictors, residual, rate=-32, shifts=shifts).streams
    calls = []

    def encode_lanes(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    real = kernel.encode_lanes
    monkeypatch.setattr(kernel, "encode_lanes", encode_lanes)
    monkeypatch.setenv("KVLINK_KERNELS", "triton")
    encoded = codec.encode_kv(kv, observation=pre.observation)
    assert [t.parts["codes"].data for t in encoded.tensors] == reference == core
    assert xl.encode(kv, predictors, residual, rate=-32, shifts=shifts).streams == core
    assert len(calls) == 2 and calls[0][0] == 2 * kv.num_layers  # one call a message, every tensor in it
