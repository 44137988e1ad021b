"""Recipes in the service (issue 19): what a named recipe asks for is what travels, over real gRPC.

- kvlink-serve --profile FILE advertises the profile's hash at the Hello and decodes a message projected
  with it; a receiver without it refuses the same send at the Hello, by the profile's hash, and keeps
  serving.
- SnapKV's window (Select("snapkv", r, window=W), "snapkv50%@w64"): the last W positions are kept, the
  rest scored from the last W queries; the sender's prefill observes as many as the recipe's window.
- The kernel dispatch refuses a format it has no Triton kernel for (FormatSpec.kernel=False) instead of
  decoding it as INT; the reference still decodes it.
- kvlink-send --config NAME: the name is what is sent; a bad name fails in one line naming the token
  before anything loads; a recipe over the budget fails with the budget error.

Two kvlink-serve subprocesses (with and without the profile) serve the module; the sender is this process
with the session's embedded model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import kvlink.client.main as client_main
from conftest import ToyTokenizer, random_ids, tiny_model
from kvlink import kernels
from kvlink.budget import Constraints, observe_for, window_for
from kvlink.cache import Observe, prefill
from kvlink.client.sender import SendError, hello, send_context
from kvlink.codec import Codec
from kvlink.eval.squad import QAExample, load_squad
from kvlink.generate import greedy_answer
from kvlink.lowrank import ModelProfile, calibrate_profile
from kvlink.models import LoadedModel, wrap
from kvlink.positions import decode_positions
from kvlink.prompt import context_ids, question_ids
from kvlink.quant import QuantizedTensor, Quantizer, QuantSpec, dequantize, quantize
from kvlink.quant import base as quant_base
from kvlink.quant import formats as quant_formats
from kvlink.quant.formats import FormatSpec, register_format
from kvlink.recipe import Recipe
from kvlink.stages import Select
from netutil import REPO, FaultProxy, Receiver, free_port

EXAMPLE = 0  # SQuAD answerable question 0: 199 context tokens ("In what country is Normandy located?")
CALIBRATION = range(40, 44)  # other SQuAD paragraphs, the profile's calibration text
ANSWER_TOKENS = 6
PROFILED = "profile-r32+kint8c/vint8t-g32"
PLAIN = "q2c50%+kint8c/vint8t-g32"


# --- the receivers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example() -> QAExample:
    return load_squad()[EXAMPLE]


@pytest.fixture(scope="module")
def profile_path(embedded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A low-rank projection of the embedded model (r_max = head_dim) calibrated on four other paragraphs."""
    squad = load_squad()
    texts = [context_ids(embedded.tokenizer, squad[i].context)[:256] for i in CALIBRATION]
    profile = calibrate_profile(
        embedded.model, embedded.tokenizer, texts, embedded.geometry.head_dim, embedded.fingerprint
    )
    return profile.save(tmp_path_factory.mktemp("profile") / "smollm2.safetensors")


@pytest.fixture(scope="module")
def profile(profile_path: Path) -> ModelProfile:
    """The sender's copy: the file the receiver loads."""
    return ModelProfile.load(profile_path)


@pytest.fixture(scope="module")
def receivers(
    profile_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Receiver, Receiver]]:
    """(kvlink-serve --profile FILE, kvlink-serve without one), started together; each must stop with 0."""
    logs = tmp_path_factory.mktemp("serve")
    common = ["--max-new-tokens", "32", "--log-level", "info"]
    with_profile = Receiver(
        args=[*common, "--profile", str(profile_path)], log=logs / "with-profile.log", port=free_port(),
        rest_port=free_port(),
    )  # fmt: skip
    plain = Receiver(args=common, log=logs / "plain.log", port=free_port(), rest_port=free_port())
    both = (with_profile, plain)
    for rx in both:
        rx.start()
    try:
        for rx in both:
            rx.wait_ready()
        yield both
    finally:
        for rx in both:
            rc = rx.stop()
            assert rc == 0, f"kvlink-serve exited with {rc}:\n{rx.log_tail()}"


@pytest.fixture(scope="module")
def profiled_rx(receivers: tuple[Receiver, Receiver]) -> Receiver:
    return receivers[0]


@pytest.fixture(scope="module")
def plain_rx(receivers: tuple[Receiver, Receiver]) -> Receiver:
    return receivers[1]


async def _welcome(rx: Receiver, lm: LoadedModel) -> Any:
    async with grpc.aio.insecure_channel(rx.target) as channel:
        return await hello(channel, lm.fingerprint, timeout=30)


def _local_answer(
    lm: LoadedModel, result: Any, question: str, profile: ModelProfile | None = None
) -> list[int]:
    """The greedy answer decoded here from exactly the message that was sent (invariant 1)."""
    encoded = result.plan.encoded
    cache = Codec(encoded.recipe, encoded.geometry, profile).decode(encoded)
    q = question_ids(lm.tokenizer, question)
    return list(greedy_answer(lm.model, lm.tokenizer, cache, q, max_new_tokens=ANSWER_TOKENS).token_ids)


# --- 1. kvlink-serve --profile over real gRPC ------------------------------------------------------------------
async def test_the_welcome_advertises_the_profile_only_where_it_is_held(
    profiled_rx: Receiver, plain_rx: Receiver, embedded: LoadedModel, profile: ModelProfile
) -> None:
    welcome = await _welcome(profiled_rx, embedded)
    assert welcome.profile_hashes == (profile.hash,)
    assert "lowrank:profile" in welcome.capabilities
    bare = await _welcome(plain_rx, embedded)
    assert bare.profile_hashes == ()
    assert "lowrank:profile" not in bare.capabilities and "lowrank:svd" in bare.capabilities


async def test_a_profile_recipe_is_decoded_and_answered_by_the_receiver_that_holds_it(
    profiled_rx: Receiver, embedded: LoadedModel, example: QAExample, profile: ModelProfile
) -> None:
    recipe = Recipe.from_name(PROFILED)
    result = await send_context(
        profiled_rx.target, example.context, example.question, 1.0, lm=embedded,
        constraints=Constraints(recipe=recipe, zstd=False), max_new_tokens=ANSWER_TOKENS, profile=profile,
    )  # fmt: skip
    assert result.plan.recipe == recipe
    assert result.plan.encoded.profile_hash == profile.hash
    # Only the rank-32 latent travels, at INT8 (one byte a value), and no basis (the receiver holds it).
    g = embedded.geometry
    assert result.receipt.payload == 2 * g.num_layers * g.kv_heads * result.context_tokens * 32
    assert result.receipt.factors == 0
    assert result.answer.token_ids, "the receiver answered nothing"
    assert list(result.answer.token_ids) == _local_answer(embedded, result, example.question, profile)


async def test_a_profile_recipe_is_refused_at_the_hello_by_a_receiver_without_it_which_keeps_serving(
    plain_rx: Receiver, embedded: LoadedModel, example: QAExample, profile: ModelProfile
) -> None:
    """Refused before the prefill and before any Transfer (the Transfer goes through a proxy that sees no
    connection), naming the profile's hash; a plain send right after is answered."""
    async with FaultProxy(plain_rx.target) as proxy:
        with pytest.raises(SendError) as info:
            await send_context(
                plain_rx.target, example.context, example.question, 1.0, lm=embedded,
                constraints=Constraints(recipe=Recipe.from_name(PROFILED)), max_new_tokens=ANSWER_TOKENS,
                profile=profile, transfer_target=proxy.address,
            )  # fmt: skip
        assert proxy.connections == 0 and proxy.c2s == 0, "a tensor was sent before the refusal"
    err = info.value
    assert (err.status, err.code, err.rpc) == (grpc.StatusCode.UNIMPLEMENTED, "UNKNOWN_CODEC", "Hello")
    assert profile.hash in err.message and "holds: none" in err.message and "--profile" in err.message
    assert plain_rx.alive(), plain_rx.log_tail()

    result = await send_context(
        plain_rx.target, example.context, example.question, 1.0, lm=embedded,
        constraints=Constraints(recipe=Recipe.from_name(PLAIN)), max_new_tokens=ANSWER_TOKENS,
    )  # fmt: skip
    assert result.plan.recipe.with_zstd(None) == Recipe.from_name(PLAIN)
    assert list(result.answer.token_ids) == _local_answer(embedded, result, example.question)


async def test_another_profile_is_refused_by_its_hash_and_none_at_all_before_connecting(
    profiled_rx: Receiver, embedded: LoadedModel, profile: ModelProfile
) -> None:
    """A profile the receiver does not hold (one mean moved: another hash) is named at the Hello; a
    profile recipe without any profile fails before anything connects."""
    means = dict(profile.means)
    means[(0, "k")] = means[(0, "k")] + 1e-3
    other = ModelProfile(profile.fingerprint, profile.r_max, profile.tokens, profile.bases, means)
    assert other.hash != profile.hash
    async with FaultProxy(profiled_rx.target) as proxy:
        with pytest.raises(SendError) as info:
            await send_context(
                profiled_rx.target, "Normandy is a region in France.", "Where?", 1.0, lm=embedded,
                constraints=Constraints(recipe=Recipe.from_name(PROFILED)), profile=other,
                transfer_target=proxy.address,
            )  # fmt: skip
        assert proxy.connections == 0, "the message was sent before the refusal"
    assert (
        info.value.rpc == "Hello" and info.value.code == "UNKNOWN_CODEC" and other.hash in info.value.message
    )
    assert profile.hash in info.value.message  # what it holds instead
    with pytest.raises(ValueError, match="projects with a calibrated profile"):
        await send_context(
            "127.0.0.1:1", "Normandy is a region in France.", "Where?", 1.0, lm=embedded,
            constraints=Constraints(recipe=Recipe.from_name(PROFILED)),
        )  # fmt: skip


# --- 2. SnapKV's window ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    return wrap(tiny_model("llama"), ToyTokenizer(), name="tiny-llama")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_snapkv_keeps_its_window_and_scores_from_its_window_queries(tiny_llama: Any, scope: str) -> None:
    length = 96
    ctx = random_ids(length, seed=5)
    captured = prefill(tiny_llama.model, ctx, observe=Observe.WINDOW, window=32)
    kept: dict[int, list[torch.Tensor]] = {}
    for w in (8, 32):
        stage = Select("snapkv", 0.5, scope, window=w)
        kept[w] = stage.keep(captured)
        for layer in kept[w]:
            assert set(range(length - w, length)) <= set(layer.tolist()), f"window {w}: the last {w} not kept"
            assert layer.numel() == length // 2
        # Scored from the last w queries: the same as a prefill that captured only those.
        exact = prefill(tiny_llama.model, ctx, observe=Observe.WINDOW, window=w)
        assert all(torch.equal(a, b) for a, b in zip(kept[w], stage.keep(exact), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(kept[8], kept[32], strict=True)), "the window is unused"


@pytest.mark.parametrize("window", [8, 32, 64])
def test_the_window_round_trips_through_the_name(window: int) -> None:
    recipe = Recipe(select=Select("snapkv", 0.5, window=window))
    assert ("@w" in recipe.name) == (window != 32)
    assert Recipe.from_name(recipe.name) == recipe
    assert Recipe.from_name(recipe.name).select.window == window  # type: ignore[union-attr]


def test_the_prefill_observes_a_pinned_recipes_window() -> None:
    """kvlink.budget tells the sender's prefill what a pinned recipe needs: its selector's observation
    (not the planner's default Q2C) and at least the default 32 window queries."""
    wide = Constraints(recipe=Recipe.from_name("snapkv50%@w64+kint8c/vint8t-g32"))
    assert (observe_for(wide), window_for(wide)) == (Observe.WINDOW, 64)
    narrow = Constraints(recipe=Recipe.from_name("snapkv50%@w8+kint8c/vint8t-g32"))
    assert (observe_for(narrow), window_for(narrow)) == (Observe.WINDOW, 32)
    assert observe_for(Constraints(recipe=Recipe.from_name(PLAIN))) is Observe.QUESTION
    assert window_for(None) == 32


async def test_a_wide_snapkv_window_is_scored_from_all_its_queries_over_grpc(
    plain_rx: Receiver, embedded: LoadedModel, example: QAExample
) -> None:
    """snapkv50%@w64 sent by send_context keeps what 64 window queries pick, not what 32 would."""
    recipe = Recipe.from_name("snapkv50%@w64+kint8c/vint8t-g32")
    result = await send_context(
        plain_rx.target, example.context, example.question, 1.0, lm=embedded,
        constraints=Constraints(recipe=recipe, zstd=False), max_new_tokens=ANSWER_TOKENS,
    )  # fmt: skip
    assert result.plan.recipe == recipe
    ctx, q = (
        context_ids(embedded.tokenizer, example.context),
        question_ids(embedded.tokenizer, example.question),
    )
    assert recipe.select is not None
    wanted = recipe.select.keep(prefill(embedded.model, ctx, q, Observe.WINDOW, 64))
    short = recipe.select.keep(prefill(embedded.model, ctx, q, Observe.WINDOW, 32))
    assert not torch.equal(wanted[0], short[0]), "this context does not tell 32 from 64 queries"
    (encoding, data, count), *_ = result.plan.encoded.positions  # one set shared by every layer
    assert torch.equal(decode_positions(encoding, data, int(ctx.numel()), count), wanted[0])
    assert list(result.answer.token_ids) == _local_answer(embedded, result, example.question)


# --- 3. the kernel dispatch refuses a format without a kernel --------------------------------------------------
class NegatedInt4(Quantizer):
    """A test format: the INT4 codes of -x (decoded as INT4 it would come back with the wrong sign)."""

    formats = ("int4neg",)

    @staticmethod
    def _int4(spec: QuantSpec) -> QuantSpec:
        return QuantSpec("int4", spec.group_size, spec.axis)

    def quantize(self, x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        return replace(quantize(-x, self._int4(spec)), spec=spec)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return -dequantize(replace(q, spec=self._int4(q.spec)), torch.float32).to(dtype)


@pytest.fixture
def kernelless() -> Iterator[str]:
    """The int4neg format, registered with kernel=False and a reference quantizer, and removed after (the
    registries have no unregister: nothing in kvlink removes a format)."""
    spec = register_format(FormatSpec("int4neg", 4, "int", kernel=False))
    quant_base.register(NegatedInt4())
    try:
        yield spec.name
    finally:
        quant_formats._SPECS.pop(spec.name)
        quant_base._REGISTRY.pop(spec.name)


def _tensor() -> torch.Tensor:
    return torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3))  # (H, T, D)


def test_the_triton_path_refuses_a_format_without_a_kernel(
    kernelless: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVLINK_KERNELS", "triton")  # TRITON_INTERPRET=1 (conftest): Triton on CPU
    x = _tensor()
    assert kernels.backend_for(x.device) == "triton"
    spec = QuantSpec(kernelless, 8, "token")
    q = quantize(x, spec)
    with pytest.raises(
        ValueError, match=r"no Triton dequantize kernel for format 'int4neg'.*KVLINK_KERNELS=reference"
    ):
        kernels.dequantize_into(q)
    basis = torch.eye(16).expand(2, 16, 16)  # (H, r, D)
    with pytest.raises(ValueError, match="no Triton dequantize kernel for format 'int4neg'"):
        kernels.dequantize_expand(q, basis)
    with pytest.raises(ValueError, match="no Triton quantize kernel for format 'int4neg'"):
        kernels.quantize_pack(x, spec)
    # The same path runs a format that has a kernel (so the refusal above is the format's, not the path's).
    int4 = quantize(x, QuantSpec("int4", 8, "token"))
    assert torch.allclose(kernels.dequantize_into(int4), dequantize(int4), atol=1e-6)


def test_the_reference_decodes_a_format_without_a_kernel(
    kernelless: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVLINK_KERNELS", "reference")
    x = _tensor()
    q = kernels.quantize_pack(x, QuantSpec(kernelless, 8, "token"))
    assert q.scale is not None
    bound = q.scale.float().repeat_interleave(8, dim=2) / 2 + 1e-6  # INT4 error: half a step, per group
    assert ((kernels.dequantize_into(q) - x).abs() <= bound).all()
    expanded = kernels.dequantize_expand(q, torch.eye(16).expand(2, 16, 16))
    assert torch.allclose(expanded, kernels.dequantize_into(q), atol=1e-6)


# --- 4. kvlink-send --config NAME -----------------------------------------------------------------------------
def _argv(rx: Receiver, context: Path, example: QAExample, *more: str) -> list[str]:
    return ["--server", rx.target, "--context", str(context), "--question", example.question,
            "--max-new-tokens", "4", "--json", *more]  # fmt: skip


def test_the_config_name_is_what_is_sent(
    plain_rx: Receiver, embedded: LoadedModel, example: QAExample, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """With room in the budget the name is sent as given; with one byte less than its plain message the
    planner adds zstd (level 3) to the same recipe, and the label says so."""
    monkeypatch.setattr("kvlink.models.load_model", lambda *a, **k: embedded)  # loaded once per session
    context = tmp_path / "context.txt"
    context.write_text(example.context)
    argv = _argv(plain_rx, context, example, "--config", PLAIN)
    assert client_main.main([*argv, "--budget", "100%"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config_label"] == PLAIN and Recipe.from_dict(data["config"]) == Recipe.from_name(PLAIN)
    assert data["answer"] and data["receipt"]["total"] <= data["budget_bytes"]

    tight = (data["planned_bytes"] - 0.5) / data["fp16_bytes"]  # one byte under the plain message
    assert client_main.main([*argv, "--budget", repr(tight)]) == 0
    squeezed = json.loads(capsys.readouterr().out)
    assert squeezed["budget_bytes"] == data["planned_bytes"] - 1
    assert squeezed["config_label"] == f"{PLAIN}+zstd3"
    assert squeezed["receipt"]["total"] <= squeezed["budget_bytes"] and squeezed["answer"]


@pytest.mark.parametrize(
    ("name", "token"),
    [("q2c50%+kint4c/vint4t-g32+bogus7", "bogus7"), ("q2c50%+kint9c/vint4t-g32", "kint9c/vint4t-g32"),
     ("q2c150%+kint4c/vint4t-g32", "q2c150%")],
)  # fmt: skip
def test_a_bad_config_name_fails_in_one_line_before_anything_loads(
    name: str, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2, one line naming the token; checked before the receiver (nothing listens there) and before
    the model (which does not exist)."""
    context = tmp_path / "context.txt"
    context.write_text("Normandy is a region in France.")
    argv = ["--server", f"127.0.0.1:{free_port()}", "--model", str(tmp_path / "no-such-model"),
            "--context", str(context), "--question", "Where?", "--budget", "50%", "--config", name]  # fmt: skip
    assert client_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvlink-send: error: "), err
    assert repr(token) in err and "Traceback" not in err


def test_a_bad_config_name_through_the_script(tmp_path: Path) -> None:
    context = tmp_path / "context.txt"
    context.write_text("Normandy is a region in France.")
    proc = subprocess.run(
        [sys.executable, "-m", "kvlink.client.main", "--server", f"127.0.0.1:{free_port()}", "--context", str(context),
         "--question", "Where?", "--budget", "50%", "--config", "q2c50%+kint4c/vint4t-g32+bogus7", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    error = json.loads(lines[0])["error"] if len(lines) == 1 else {}
    assert error.get("exit_status") == 2 and "'bogus7'" in error["message"], proc.stdout


def test_a_config_over_the_budget_fails_with_the_budget_error(
    plain_rx: Receiver, embedded: LoadedModel, example: QAExample, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr("kvlink.models.load_model", lambda *a, **k: embedded)
    context = tmp_path / "context.txt"
    context.write_text(example.context)
    argv = _argv(plain_rx, context, example, "--config", PLAIN, "--budget", "5%")
    argv.remove("--json")
    assert client_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "budget 5% of FP16 cannot be met: the smallest achievable message is" in err
    assert f"(with {PLAIN})" in err
    assert plain_rx.alive()


def test_kvlink_send_profile_sends_a_profile_recipe(
    profiled_rx: Receiver, embedded: LoadedModel, example: QAExample, profile: ModelProfile, profile_path: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`kvlink-send --config profile-r32+... --profile FILE` sends the latent the receiver's copy of the same
    profile expands; a --profile that is not a profile file fails in one line, exit 2, naming it."""
    monkeypatch.setattr("kvlink.models.load_model", lambda *a, **k: embedded)
    context = tmp_path / "context.txt"
    context.write_text(example.context)
    argv = _argv(profiled_rx, context, example, "--config", PROFILED, "--no-zstd", "--budget", "100%")
    assert client_main.main([*argv, "--profile", str(profile_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config_label"] == PROFILED and data["receipt"]["factors"] == 0 and data["answer"]
    bogus = tmp_path / "not-a-profile.safetensors"
    bogus.write_bytes(b"not a profile")
    assert client_main.main([*argv, "--profile", str(bogus)]) == 2
    out = capsys.readouterr()
    assert "--profile" in out.out + out.err and str(bogus) in out.out + out.err
