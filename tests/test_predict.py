"""Cross-layer predictors (kvlink.predict) and the Predict stage (kvlink.stages.predict, token `xpred`).

- the profile: the model's rotary embedding as the model computes it; fitting is deterministic (same
  bytes, same hash, the hash is the file's sha256) and a changed profile has another hash;
- the codec: the message has exactly its plain twin's parts and bytes (predicted sizes = written); the
  prediction is undone exactly (an FP16 residual gives the cache back to float16 tolerance, and
  decoding with another profile gives something else); keys come back at their ORIGINAL positions
  under a global Q2C selection; a receiver's codec built from the file alone decodes bit for bit
  what the sender's does; fewer errors than the twin at INT2;
- what it composes with: a per-layer selection, a pipeline without it, a low-rank latent and
  question-aware keys are refused with a ValueError naming the problem;
- the receiver: it advertises `predict` only when it holds a predictor profile (of its model), and
  decodes a message with the profile the message names;
- the wire: a receiver without the capability, or holding another profile, refuses the header
  (UNKNOWN_CODEC naming the capability or the hash); over real gRPC (kvlink-serve --profile FILE) a
  predicted message is answered as the sender answers it locally, and one of an unknown profile is
  refused by its hash;
- the embedded model: predicted + INT2 has a lower KL to the full cache than plain INT2 on two questions.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from conftest import TINY_FAMILIES, ToyTokenizer, random_ids, tiny_model
from kvlink import wire
from kvlink.budget import Constraints
from kvlink.cache import ContextKV, prefill
from kvlink.capabilities import local_capabilities
from kvlink.client.sender import SendError, hello, send_context, transfer
from kvlink.codec import Codec
from kvlink.eval import fidelity
from kvlink.eval.squad import load_squad
from kvlink.generate import greedy_answer
from kvlink.models import LoadedModel, wrap
from kvlink.predict import PredictorProfile, Rotary, fit_predictors, fit_texts, is_predictor_file
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import Recipe
from kvlink.stages import Predict
from netutil import Receiver, free_port

INT2 = "kint2c/vint2t-g16+sink1"
FIT = f"xpred+{INT2}"


def _lm(family: str) -> LoadedModel:
    return wrap(tiny_model(family, seed=TINY_FAMILIES.index(family)), ToyTokenizer(), name=f"tiny-{family}")


def _fit(lm: LoadedModel, name: str = FIT) -> PredictorProfile:
    texts = [random_ids(64, seed=100 + i) for i in range(6)]
    return fit_predictors(lm.model, texts, Recipe.from_name(name), lm.fingerprint)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def fitted(request: pytest.FixtureRequest) -> tuple[LoadedModel, PredictorProfile]:
    lm = _lm(request.param)
    return lm, _fit(lm)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _errors(kv: ContextKV, decoded: ContextKV, layers: range) -> float:
    return sum(_rel(decoded.keys[i], kv.keys[i]) + _rel(decoded.values[i], kv.values[i]) for i in layers)


# --- the profile -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_rotary_embedding_is_the_models(family: str) -> None:
    model = tiny_model(family)
    rotary = Rotary.of_model(model)
    positions = torch.tensor([0, 1, 5, 37, 200])
    x = torch.zeros(1, positions.numel(), 16)
    cos, sin = model.model.rotary_emb(x, positions[None])
    mine = rotary.cos_sin(positions)
    torch.testing.assert_close(mine[0] * rotary.scaling, cos[0])
    torch.testing.assert_close(mine[1] * rotary.scaling, sin[0])
    k = torch.randn(2, positions.numel(), 16)
    torch.testing.assert_close(rotary.undo(rotary.apply(k, mine), mine), k, atol=1e-5, rtol=1e-5)


def test_fitting_is_deterministic_and_the_hash_is_the_files(tmp_path: Path) -> None:
    lm = _lm("qwen2")
    a, b = _fit(lm), _fit(lm)
    assert a.to_bytes() == b.to_bytes() and a.hash == b.hash
    assert (0, "k") not in a.weights and (0, "v") in a.weights  # layer 0 keys: never predicted
    assert a.fitted_for == FIT and a.tokens == 6 * 64 and a.texts == 6
    path = a.save(tmp_path / "p.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == a.hash
    assert is_predictor_file(path)
    loaded = PredictorProfile.load(path)
    assert loaded.hash == a.hash and loaded.to_bytes() == a.to_bytes()
    weights = dict(a.weights)
    weights[(1, "v")] = weights[(1, "v")] + 1e-3
    other = PredictorProfile(a.fingerprint, a.layers, a.kv_heads, a.head_dim, a.rotary, weights)
    assert other.hash != a.hash
    with pytest.raises(ValueError, match="expected"):
        PredictorProfile(
            a.fingerprint, a.layers, a.kv_heads, a.head_dim, a.rotary, {(1, "k"): weights[(0, "v")]}
        )
    with pytest.raises(ValueError, match="not a kvlink predictor profile"):
        PredictorProfile.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


# --- the codec ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("twin", [INT2, "kint4c/vint3t-g32+sink2+zstd3", "kint3c/vint2t-g16+rot"])
def test_the_message_is_its_twins_size_and_decodes_better(
    fitted: tuple[LoadedModel, PredictorProfile], twin: str
) -> None:
    lm, profile = fitted
    kv = prefill(lm.model, random_ids(75, seed=7)).kv
    plain = Codec(Recipe.from_name(twin), lm.geometry)
    codec = Codec(Recipe.from_name(f"xpred+{twin}"), lm.geometry, profile)
    assert codec.recipe.name == f"xpred+{twin}"
    assert next(s for s in codec.recipe.stages() if isinstance(s, Predict)).profile == profile.hash
    encoded, twin_encoded = codec.encode_kv(kv), plain.encode_kv(kv)
    assert codec.predicted_sizes(75).as_dict() == plain.predicted_sizes(75).as_dict()
    if "zstd" not in twin:
        assert encoded.sizes().as_dict() == codec.predicted_sizes(75).as_dict()
        for t, u in zip(encoded.tensors, twin_encoded.tensors, strict=True):
            assert {n: len(p.data) for n, p in t.parts.items()} == {
                n: len(p.data) for n, p in u.parts.items()
            }
    decoded = codec.decode(encoded)
    assert _errors(kv, decoded, range(1, 3)) < _errors(kv, plain.decode(twin_encoded), range(1, 3))
    # A receiver that holds only the file decodes exactly what the sender's codec decodes.
    receiver = Codec(encoded.recipe, lm.geometry, PredictorProfile.from_bytes(profile.to_bytes()))
    for a, b in zip(receiver.decode(encoded).keys, decoded.keys, strict=True):
        assert torch.equal(a, b)


def test_the_prediction_is_undone_exactly(fitted: tuple[LoadedModel, PredictorProfile]) -> None:
    lm, profile = fitted
    kv = prefill(lm.model, random_ids(60, seed=8)).kv
    codec = Codec(Recipe.from_name("xpred+fp16"), lm.geometry, profile)
    encoded = codec.encode_kv(kv)
    decoded = codec.decode(encoded)
    for x, y in zip(decoded.keys + decoded.values, kv.keys + kv.values, strict=True):
        torch.testing.assert_close(x, y, atol=2e-3 * float(y.abs().max()), rtol=0)
    # What travels is a residual: layer 1's keys are not the plain FP16 twin's bytes ...
    twin = Codec(Recipe.from_name("fp16"), lm.geometry).encode_kv(kv)
    assert encoded.tensors[2].parts["codes"].data != twin.tensors[2].parts["codes"].data
    assert encoded.tensors[0].parts["codes"].data == twin.tensors[0].parts["codes"].data  # layer 0 K: plain
    # ... and the prediction added back is the profile's: another profile's gives another cache.
    weights = {key: w * 1.5 for key, w in profile.weights.items()}
    other = PredictorProfile(
        profile.fingerprint, profile.layers, profile.kv_heads, profile.head_dim, profile.rotary, weights
    )
    forged = Codec(Recipe.from_name("xpred+fp16"), lm.geometry, other)
    with pytest.raises(ValueError, match=profile.hash):
        forged.decode(encoded)  # the message names its profile
    relabelled = forged.encode_kv(kv)
    relabelled.tensors = encoded.tensors
    assert _rel(forged.decode(relabelled).values[2], kv.values[2]) > 0.05


def test_keys_come_back_at_their_original_positions() -> None:
    lm = _lm("llama")
    profile = _fit(lm)
    ctx, q = random_ids(80, seed=9), random_ids(6, seed=10)
    recipe = Recipe.from_name("q2c50%+xpred+fp16")
    pre = prefill(lm.model, ctx, q, observe=recipe.needs())
    codec = Codec(recipe, lm.geometry, profile)
    encoded = codec.encode(pre)
    decoded = codec.decode(encoded)
    kept = codec.select(pre)
    assert kept is not None and kept[0].numel() == 40 and not torch.equal(kept[0], torch.arange(40))
    original = pre.kv.select(kept)
    for layer in range(lm.geometry.num_layers):
        assert torch.equal(decoded.positions[layer], kept[0])
        want = original.keys[layer]
        torch.testing.assert_close(decoded.keys[layer], want, atol=2e-3 * float(want.abs().max()), rtol=0)
    # The answer from the predicted cache is the one from the selected FP16 cache.
    plain = Codec(Recipe.from_name("q2c50%+fp16"), lm.geometry)
    tok = ToyTokenizer()
    a = greedy_answer(lm.model, tok, decoded, q, max_new_tokens=5, stop_at_eos=False).token_ids
    b = greedy_answer(lm.model, tok, plain.decode(plain.encode(pre)), q, max_new_tokens=5, stop_at_eos=False)
    assert a == b.token_ids


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("q2c50%/layer+xpred+kint4c/vint4t-g16", "ONE kept position set"),
        ("k-xpred+kint4c/vint4t-g16", "every K and V pipeline"),
        ("xpred+kint4c/vint4t-g16+round-query", "question-aware key quantization"),
        ("xpred+kint4c/vint4t-g16+kwidths-question", "question-aware key quantization"),
    ],
)
def test_what_it_does_not_compose_with_is_refused(name: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Recipe.from_name(name)


def test_a_codec_without_the_profile_or_with_a_bad_one_refuses() -> None:
    lm = _lm("mistral")
    recipe = Recipe.from_name(FIT)
    with pytest.raises(ValueError, match="predictor profile"):
        Codec(recipe, lm.geometry)
    with pytest.raises(ValueError, match="sha256"):
        Predict("not-a-hash")
    profile = _fit(lm)
    small = PredictorProfile("f" * 64, 2, 2, 16, profile.rotary, {})
    with pytest.raises(ValueError, match="layers, kv_heads, head_dim"):
        Codec(recipe, lm.geometry, small)


# --- the wire ----------------------------------------------------------------------------------------------
def test_the_header_names_the_profile_and_a_receiver_without_it_refuses() -> None:
    lm = _lm("qwen2")
    profile = _fit(lm)
    codec = Codec(Recipe.from_name(FIT), lm.geometry, profile)
    kv = prefill(lm.model, random_ids(50, seed=11)).kv
    encoded = codec.encode_kv(kv)
    frames = wire.to_frames(encoded, "s", "m", lm.fingerprint, 512)
    for caps, hashes, needle in (
        (local_capabilities(predictors=False), None, "predict"),
        (None, ["0" * 64], profile.hash),
        (None, [], profile.hash),
    ):
        with pytest.raises(wire.WireError) as info:
            wire.Assembler(lm.fingerprint, lm.geometry, capabilities=caps, profile_hashes=hashes).feed(
                frames[0]
            )
        assert info.value.code == "UNKNOWN_CODEC" and needle in info.value.message
    asm = wire.Assembler(lm.fingerprint, lm.geometry, profile_hashes=[profile.hash])
    for frame in frames:
        asm.feed(frame)
    received, _ = asm.finish()
    got = Codec(received.recipe, lm.geometry, profile).decode(received)
    for a, b in zip(
        got.keys + got.values, codec.decode(encoded).keys + codec.decode(encoded).values, strict=True
    ):
        assert torch.equal(a, b)


def test_a_receiver_advertises_predict_only_with_a_predictor_profile_and_decodes_with_the_one_named() -> None:
    from kvlink.metrics import MetricsRegistry
    from kvlink.server.service import KVLinkService
    from kvlink.server.store import SessionStore

    lm = _lm("llama")
    profile = _fit(lm)
    plain = KVLinkService(lm, SessionStore(), MetricsRegistry())
    holding = KVLinkService(lm, SessionStore(), MetricsRegistry(), profiles=[profile])
    assert "predict" not in plain.capabilities and plain.profile_hashes == ()
    assert "predict" in holding.capabilities and holding.profile_hashes == (profile.hash,)
    assert "lowrank:profile" not in holding.capabilities  # a predictor profile is no projection
    encoded = Codec(Recipe.from_name(FIT), lm.geometry, profile).encode_kv(
        prefill(lm.model, random_ids(30)).kv
    )
    assert holding.profile_of(encoded) is holding.predictors[profile.hash]
    assert plain.profile_of(encoded) is None
    other = PredictorProfile("0" * 64, profile.layers, profile.kv_heads, profile.head_dim, profile.rotary, {})
    with pytest.raises(ValueError, match="fitted for model"):
        KVLinkService(lm, SessionStore(), MetricsRegistry(), profiles=[other])


# --- the embedded model ------------------------------------------------------------------------------------
EMBEDDED_FIT = "xpred+kint2c/vint2t-g64+sink1"


@pytest.fixture(scope="module")
def embedded_profile(embedded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Predictors of the embedded model fitted on 16 of the calibration split's odd paragraphs."""
    ids = [context_ids(embedded.tokenizer, text) for text in fit_texts(16)]
    profile = fit_predictors(embedded.model, ids, Recipe.from_name(EMBEDDED_FIT), embedded.fingerprint)
    return profile.save(tmp_path_factory.mktemp("xpred") / "smollm2-xpred.safetensors")


def test_on_the_embedded_model_int2_with_predictors_has_a_lower_kl(
    embedded: LoadedModel, embedded_profile: Path
) -> None:
    profile = PredictorProfile.load(embedded_profile)
    squad = load_squad()
    fit = set(fit_texts())
    chosen = [qa for qa in squad[:40] if qa.context not in fit][:2]
    predicted = Codec(Recipe.from_name(EMBEDDED_FIT), embedded.geometry, profile)
    plain = Codec(Recipe.from_name("kint2c/vint2t-g64+sink1"), embedded.geometry)
    for qa in chosen:
        ctx, q = context_ids(embedded.tokenizer, qa.context), question_ids(embedded.tokenizer, qa.question)
        kv = prefill(embedded.model, ctx).kv
        reference = greedy_answer(
            embedded.model, embedded.tokenizer, kv, q, max_new_tokens=8, stop_at_eos=False
        )
        caches = [kv, predicted.decode(predicted.encode_kv(kv)), plain.decode(plain.encode_kv(kv))]
        out = fidelity.batched_answers(
            embedded.model, embedded.tokenizer, caches, q, [reference.token_ids], 0
        )
        logits = out.forced[0]  # (3, n, vocab)
        kl_predicted, kl_plain = (
            fidelity.mean_kl(logits[0], logits[1]),
            fidelity.mean_kl(logits[0], logits[2]),
        )
        print(f"{qa.qid}: KL predicted+INT2 {kl_predicted:.4f}, plain INT2 {kl_plain:.4f}")
        assert kl_predicted < 0.7 * kl_plain, (kl_predicted, kl_plain)


@pytest.fixture(scope="module")
def predicting_rx(embedded_profile: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """kvlink-serve --profile <predictor file>."""
    rx = Receiver(
        args=["--max-new-tokens", "16", "--profile", str(embedded_profile)],
        log=tmp_path_factory.mktemp("serve") / "xpred.log", port=free_port(), rest_port=free_port(),
    )  # fmt: skip
    rx.start()
    try:
        rx.wait_ready()
        yield rx
    finally:
        assert rx.stop() == 0, rx.log_tail()


async def test_over_grpc_a_predicted_message_is_answered_and_an_unknown_profile_refused_by_its_hash(
    predicting_rx: Receiver, embedded: LoadedModel, embedded_profile: Path
) -> None:
    profile = PredictorProfile.load(embedded_profile)
    async with grpc.aio.insecure_channel(predicting_rx.target) as channel:
        welcome = await hello(channel, embedded.fingerprint, timeout=30)
    assert "predict" in welcome.capabilities and profile.hash in welcome.profile_hashes
    qa = load_squad()[0]
    recipe = Recipe.from_name("xpred+kint4c/vint4t-g64+sink1")
    result = await send_context(
        predicting_rx.target, qa.context, qa.question, 1.0, lm=embedded,
        constraints=Constraints(recipe=recipe, zstd=False), max_new_tokens=6, profile=profile,
    )  # fmt: skip
    assert result.plan.recipe.name == recipe.name
    local = Codec(recipe, embedded.geometry, profile)
    ctx, q = context_ids(embedded.tokenizer, qa.context), question_ids(embedded.tokenizer, qa.question)
    kv = local.decode(local.encode_kv(prefill(embedded.model, ctx).kv))
    expected = greedy_answer(embedded.model, embedded.tokenizer, kv, q, max_new_tokens=6)
    assert list(result.answer.token_ids) == expected.token_ids

    # Another profile (one weight moved): the sender is refused at the Hello ...
    weights = dict(profile.weights)
    weights[(1, "k")] = weights[(1, "k")] * 1.01
    other = PredictorProfile(
        profile.fingerprint, profile.layers, profile.kv_heads, profile.head_dim, profile.rotary, weights
    )
    with pytest.raises(SendError) as info:
        await send_context(
            predicting_rx.target, qa.context, qa.question, 1.0, lm=embedded,
            constraints=Constraints(recipe=recipe, zstd=False), profile=other,
        )  # fmt: skip
    assert info.value.code == "UNKNOWN_CODEC" and other.hash in info.value.message
    # ... and the receiver itself refuses such a header, naming the hash, and keeps serving.
    encoded = Codec(recipe, embedded.geometry, other).encode_kv(prefill(embedded.model, ctx[:64]).kv)
    frames = wire.to_frames(encoded, "s", uuid.uuid4().hex, embedded.fingerprint, 1 << 20)
    async with grpc.aio.insecure_channel(predicting_rx.target) as channel:
        with pytest.raises(SendError) as refused:
            await transfer(channel, frames, timeout=60)
    err = refused.value
    assert (err.status, err.code) == (grpc.StatusCode.UNIMPLEMENTED, "UNKNOWN_CODEC")
    assert other.hash in err.message and profile.hash in err.message
    assert predicting_rx.alive(), predicting_rx.log_tail()
