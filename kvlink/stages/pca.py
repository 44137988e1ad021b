"""Pca: transform coding of a cross-layer residual (issue 24's `xl`): sink rows, principal components, a step.

After Predict, each tensor is the residual of its cross-layer prediction. This stage keeps its first
`sink` rows at float16 (the `sink` part: kvlink.stages.sink's functions, the Sink stage's bytes and layout),
rotates the other rows (one row per position, heads side by side: (N, H * D)) into the principal
components of the residual profile (kvlink.residual.ResidualProfile: per (layer, kind) a mean and an
orthonormal basis) and rounds them to
one step per tensor, 2^(rate / 32) times the profile's weight for that tensor. The Quantize stage after
it is float16 and carries the integer symbols exactly (|symbol| <= FP16_EXACT: a finer rate is refused,
and the planner fits the finest rate within it; with question-aware steps a row past it is coded at a
coarser shift instead, `raise_shifts`); the Ans entropy stage
codes them under the profile's Laplace tables (kvlink.stages.ans). The receiver's arithmetic on the way
out is the closed loop's, so the sender predicts from what the receiver decodes.

    xpred+fp16+pca1-r-96+ans        # predictors, 1 sink row, rate index -96 (finer: lower), rANS
    xpred+fp16+pca1+ans             # the rate left to the planner: the finest that fits the budget
    xpred+fp16+pca1-q0.5+ans        # question-aware steps per position (below)

Question-aware steps (`question` = gamma > 0): every position still travels, but position t's step is the
tensor's times 2^(g_t / 8), g_t = round(8 * gamma * log2(median_s / s_t)) within +-127 (kvlink.ans.MAX_SHIFT),
s_t the attention the question gives position t in this layer (Q2C's score, kvlink.select.q2c), the median
over the tensor's coded rows. A position the question hardly reads gets a coarse step (its residual rounds
to zero and the cross-layer prediction stands in for it), one it reads a fine one: selection made soft
inside the coder (research/README.md, "Question-aware steps"). The g_t travel as each tensor's `shifts`
part (one signed byte a coded row) and move the row's rANS tables by g_t (kvlink.ans), so the entropy model
follows the step. The sender needs the question's observation (a prefill with observe="question").

The residual profile travels by hash (`profile`; "": the codec's own, bound when the codec is made), like
Predict's predictors; a receiver decodes the stage only when it holds it.

Composes with: Predict (required: the profile is fitted on its residuals), a float16 Quantize, the
Ans entropy stage (required: float16 symbols unentropy-coded cost more than float16 itself); in every
K and V pipeline; not with Sink, Clamp, Rotate or a low-rank latent (this stage is their place).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.cache import Observe
from kvlink.stages.base import Item, Transform, register
from kvlink.stages.predict import bind_profile, check_profile_held, in_every_pipeline
from kvlink.stages.sink import put_sink, sink_count, sink_part_sizes, sink_rows, sink_stored

_HASH = re.compile(r"[0-9a-f]{64}")
_USES = "codes with residual profile"
RATES = range(-640, 641)
"""Rate indices a message may take (1/32 octaves of the step: 2^-20 .. 2^20 before the tensor weights)."""
FP16_EXACT = 2048
"""The largest symbol magnitude float16 holds exactly: a rate whose symbols go beyond it is refused."""
MAX_QUESTION = 4.0
"""The largest question-aware exponent gamma a stage takes (1 already spans 127/8 octaves at 2^16 : 1)."""


@register
@dataclass(frozen=True)
class Pca(Transform):
    """The first `sink` rows at float16, the rest in the residual profile's components at one step."""

    name: ClassVar[str] = "pca"
    order: ClassVar[int] = 7  # after Predict (5), before everything else
    quantized_only: ClassVar[bool] = False  # its Quantize is float16: it carries the symbols
    needs_float32: ClassVar[bool] = True
    stackable: ClassVar[bool] = False  # a basis and a step per tensor

    sink: int = 1
    rate: int | None = None
    profile: str = ""
    question: float = 0.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.question, bool)
            or not isinstance(self.question, int | float)
            or not (0.0 <= float(self.question) <= MAX_QUESTION)
        ):
            raise ValueError(
                f"pca question exponent must be a number in [0, {MAX_QUESTION}], got {self.question!r}"
            )
        object.__setattr__(self, "question", float(self.question))
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"pca sink rows must be an integer >= 0, got {self.sink!r}")
        if self.rate is not None and (
            isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate not in RATES
        ):
            raise ValueError(
                f"pca rate must be an integer in [{RATES.start}, {RATES.stop - 1}], got {self.rate!r}"
            )
        if not isinstance(self.profile, str) or (self.profile and not _HASH.fullmatch(self.profile)):
            raise ValueError(f"pca profile must be a sha256 hex digest or '', got {str(self.profile)[:80]!r}")

    def size_key(self) -> tuple[Any, ...]:
        return ("pca", self.sink, self.rate, self.question)

    def needs(self) -> Observe:
        return Observe.QUESTION if self.question else Observe.NONE

    def check(self, geometry: Any) -> None:
        if self.rate is None:  # a codec and a message always have one
            raise ValueError(
                "pca's rate is left to the planner (a budget fits it); to encode directly, name one: "
                f"pca{self.sink}-r<rate>"
            )

    def profiles(self) -> tuple[str, ...]:
        return (self.profile,)

    def capability(self) -> str:
        return "pca"

    def count(self, n: int) -> int:
        return sink_count(self.sink, n)

    def stored(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return sink_stored(self.sink, shape)

    def part_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        sizes = sink_part_sizes(self.sink, shape)
        if self.question:
            sizes["shifts"] = shape[1] - self.count(shape[1])
        return sizes

    def check_recipe(self, recipe: Any) -> None:
        select = recipe.select.needs() if recipe.select is not None else Observe.NONE
        if self.question and select not in (Observe.NONE, Observe.QUESTION):
            raise ValueError(
                f"pca's question-aware steps read the question's attention, and {recipe.select.method} observes "
                f"{select.value!r}: one prefill gives one observation"
            )
        if not recipe.has("predict"):
            raise ValueError("pca codes a cross-layer residual: it needs xpred (the Predict stage)")
        if getattr(recipe, "ans", None) is None:
            raise ValueError("pca's symbols travel rANS-coded: it needs the ans entropy stage")
        for pipeline in in_every_pipeline(self, recipe, "one rate and profile for the message"):
            others = [s.name for s in pipeline[:-1] if s.name not in ("predict", "pca")]
            if others:
                raise ValueError(f"pca with {others}: pca keeps its own sink rows and basis")
            if pipeline[-1].format != "fp16":  # type: ignore[attr-defined]
                raise ValueError(
                    f"pca's symbols are carried by a float16 Quantize, got {pipeline[-1].format!r}"  # type: ignore[attr-defined]
                )

    def at(self, rate: int) -> Pca:
        """This stage at rate index `rate`."""
        return Pca(self.sink, rate, self.profile, self.question)

    def bind(self, profile_hash: str) -> Pca:
        """This stage naming `profile_hash` (ValueError when it names another profile)."""
        return Pca(self.sink, self.rate, bind_profile(self.profile, profile_hash, _USES), self.question)

    def check_held(self, held: str | None) -> None:
        """ValueError unless a codec holding residual profile `held` (a hash; None: none) decodes it."""
        check_profile_held(self.profile, held, _USES)

    def step(self, profile: Any, layer: int, kind: str) -> float:
        assert self.rate is not None  # check(): a codec's recipe has a rate
        return profile.step(layer, kind, self.rate)  # type: ignore[no-any-return]

    def shifts(self, item: Item) -> Tensor | None:
        """The coded rows' step shifts (N - sink,) int64 from the question's attention to this layer's
        positions (the sender's side; None without question-aware steps)."""
        if not self.question:
            return None
        observation = item.info.get("observation")
        if observation is None or observation.kind is not Observe.QUESTION:
            raise ValueError(
                "pca with question-aware steps needs the question's observation (a prefill with "
                "observe='question')"
            )
        return question_shifts(observation, item.layer, item.info["positions"], self.sink, self.question)

    def apply(self, item: Item, context: Any) -> None:
        from kvlink.codec import Part
        from kvlink.predict import rows, unrows

        profile = item.info["pca"]
        x = item.x
        assert x is not None
        r = rows(x.float())
        s = self.count(int(r.shape[0]))
        put_sink(item, unrows(r[:s], x.shape[0]))
        mean, basis = profile.means[(item.layer, item.kind)], profile.bases[(item.layer, item.kind)]
        step = self.step(profile, item.layer, item.kind)
        y = (r[s:] - mean.to(r.device)) @ basis.to(r.device)
        shifts = self.shifts(item)
        if shifts is not None:
            symbols, shifts = code_rows(y, step, shifts, FP16_EXACT)
            raw = shifts.to(torch.int8).cpu().numpy().tobytes()
            item.parts["shifts"] = Part(raw, len(raw))
        else:
            symbols = torch.round(y / step)
        peak = int(symbols.abs().max()) if symbols.numel() else 0
        if peak > FP16_EXACT:  # float16 would round it: never a silent error
            raise ValueError(
                f"pca rate {self.rate} is too fine for this cache: layer {item.layer} {item.kind} has symbols up "
                f"to {peak}, beyond the +-{FP16_EXACT} float16 carries exactly; name a coarser rate, or leave it "
                f"to the planner (pca{self.sink})"
            )
        item.x = unrows(symbols, x.shape[0])

    def undo_one(self, x: Tensor, item: Item, parts: Mapping[str, bytes], dtype: torch.dtype) -> Tensor:
        from kvlink.predict import rows, unrows

        profile = item.info["pca"]
        h, n, d = item.shape
        s = self.count(n)
        mean, basis = profile.means[(item.layer, item.kind)], profile.bases[(item.layer, item.kind)]
        step = self.step(profile, item.layer, item.kind)
        steps: Tensor | float = step
        if self.question:
            shifts = torch.frombuffer(bytearray(parts["shifts"]), dtype=torch.int8).to(torch.int64)
            steps = step * row_scales(shifts, x.device)[:, None]
        body = (rows(x.float()) * steps) @ basis.T.to(x.device) + mean.to(x.device)
        head = rows(sink_rows(parts["sink"], (h, s, d), x.device).float())
        return unrows(torch.cat([head, body]), h)

    def token(self) -> str:
        question = f"-q{self.question:g}" if self.question else ""
        return f"pca{self.sink}{question}" + ("" if self.rate is None else f"-r{self.rate}")

    @classmethod
    def parse_token(cls, text: str) -> Pca | None:
        m = re.fullmatch(r"pca(\d+)(?:-q(\d+(?:\.\d+)?))?(?:-r(-?\d+))?", text)
        if not m:
            return None
        return cls(int(m[1]), None if m[3] is None else int(m[3]), question=float(m[2] or 0.0))


def row_scales(shifts: Tensor, device: torch.device | str) -> Tensor:
    """Each row's step multiplier 2^(shift / SCALE_STEPS) (float32 on `device`): exact powers of two's
    eighth roots, the same on every machine for the same shifts."""
    from kvlink import ans

    return torch.exp2(shifts.to(device=device, dtype=torch.float64) / ans.SCALE_STEPS).float()


def code_rows(y: Tensor, step: float, shifts: Tensor, limit: int | None) -> tuple[Tensor, Tensor]:
    """The symbols round(y / (step 2^(shift / 8))) of coefficients `y` (rows, F) and the shifts (rows,) they
    were coded with: `shifts`, or where a symbol would pass `limit` (None: no limit) those rows' raised
    (raise_shifts). The stage and kvlink.xl's closed loop code with this one function."""
    symbols = torch.round(y / (step * row_scales(shifts, y.device)[:, None]))
    if limit is not None and symbols.numel() and symbols.abs().max() > limit:
        shifts = raise_shifts(y, step, shifts, limit)
        symbols = torch.round(y / (step * row_scales(shifts, y.device)[:, None]))
    return symbols, shifts


def raise_shifts(y: Tensor, step: float, shifts: Tensor, limit: int) -> Tensor:
    """`shifts` (rows,) with every row of coefficients `y` (rows, F) whose largest symbol,
    round(y / (step 2^(shift / 8))), would pass `limit` moved to the least coarser shift that keeps it within
    (at most kvlink.ans.MAX_SHIFT: a row beyond even that is left for the caller to refuse). The question's
    most-read rows get the finest steps and so the largest symbols; without this one such row caps the rate
    of the whole message at float16's exact integers, with it that row alone is coded at 1/4096 of its peak
    instead of finer. Sender and planner compute the same (the same arithmetic as the symbols); the moved
    shifts travel, so a receiver needs nothing new."""
    from kvlink import ans

    g = shifts.clone()
    if not y.numel():
        return g
    while True:  # one pass almost always; each further one moves a row by at least one
        peak = torch.round(y / (step * row_scales(g, y.device)[:, None])).abs().amax(dim=1).cpu()
        over = (peak > limit) & (g < ans.MAX_SHIFT)
        if not over.any():
            return g
        need = torch.ceil(ans.SCALE_STEPS * torch.log2(peak[over].double() / limit)).clamp_min(1)
        g[over] = (g[over] + need.to(g.dtype)).clamp(max=ans.MAX_SHIFT)


def question_shifts(observation: Any, layer: int, positions: Tensor, sink: int, gamma: float) -> Tensor:
    """(N - sink,) int64 step shifts of the rows after the first `sink` of a tensor at `positions` (N,):
    round(8 * gamma * log2(median / s)) within +-kvlink.ans.MAX_SHIFT, s the attention each position gets
    from the question in `layer` (summed over the question's tokens and heads, as Q2C scores it)."""
    from kvlink import ans
    from kvlink.select.base import attention_to_context

    obs = observation.layers[layer]
    scores = attention_to_context(obs, observation.length, observation.scale).sum(dim=0).double().cpu()
    s = scores[positions.cpu()][sink:].clamp_min(1e-30)
    if not s.numel():
        return torch.zeros(0, dtype=torch.int64)
    g = torch.round(ans.SCALE_STEPS * gamma * torch.log2(s.median() / s))
    return g.clamp(-ans.MAX_SHIFT, ans.MAX_SHIFT).to(torch.int64)
