"""Bits per layer and per K/V from a measured sensitivity profile.

A model's layers do not need their bits equally: on SmolLM2-135M the KL that
one layer's keys alone cause at INT2 spans 500x across layers (the keys of
layers 17, 18 and 23 dominate). A `Sensitivity` holds that measurement, one
number per (K/V, layer): the mean KL of the next-token distributions over
held-out answers when only that tensor is quantized at `bits` (the rest at
INT8), as `kvlink-bench sensitivity` measures it (kvlink.eval.sensitivity).

`Sensitivity.allocate(average)` turns it into per-layer bits (k_layer_bits,
v_layer_bits of kvlink.recipe.build): every tensor starts at the smallest step, and the upgrade with
the largest predicted KL drop per added bit goes next until the mean reaches
`average` bits per entry (K and V of a layer hold the same number of entries).
The predicted KL of a tensor at b bits is its measured KL * 4^-(b - bits):
each bit halves the quantization step and quarters its error. Ties go to the
earlier tensor (K before V, lower layer first), so the allocation is
deterministic.

Profiles are found like quality tables: the one measured on this machine for
the model's fingerprint (<cache_dir>/sensitivity/<fingerprint>.json), else the
one shipped with kvlink (kvlink/data/sensitivity/) for the model its fingerprint
names (kvlink.models.calibration_name), else for its name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvlink.models import cache_dir, calibration_name, model_slug

logger = logging.getLogger(__name__)

STEPS: tuple[int, ...] = (2, 3, 4, 8)
"""The widths an allocation moves through (INT formats the codec packs)."""

SHIPPED_DIR = Path(__file__).parent / "data" / "sensitivity"


@dataclass(frozen=True)
class Sensitivity:
    """Measured KL per layer of K (`k`) and of V (`v`), each tensor alone at `bits` bits."""

    model: str
    k: tuple[float, ...]
    v: tuple[float, ...]
    bits: int = 2
    group_size: int = 64
    sink: int = 1
    examples: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", tuple(float(x) for x in self.k))
        object.__setattr__(self, "v", tuple(float(x) for x in self.v))
        if not self.k or len(self.k) != len(self.v):
            raise ValueError(f"need one K and one V value per layer, got {len(self.k)} and {len(self.v)}")
        bad = [x for x in (*self.k, *self.v) if not (x >= 0.0)]  # also refuses NaN
        if bad:
            raise ValueError(f"sensitivities must be finite and >= 0, got {bad[0]!r}")
        if self.bits not in STEPS:
            raise ValueError(f"bits must be one of {STEPS}, got {self.bits!r}")

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def allocate(
        self, average: float, steps: Sequence[int] = STEPS
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(k_layer_bits, v_layer_bits) with mean bits per entry at most `average` (greedy, see the module)."""
        steps = tuple(sorted(set(steps)))
        if not steps or any(s not in STEPS for s in steps):
            raise ValueError(f"steps must be a non-empty subset of {STEPS}, got {steps!r}")
        n = 2 * self.num_layers
        if not (steps[0] <= average <= steps[-1]):
            raise ValueError(f"average bits must be in [{steps[0]}, {steps[-1]}], got {average!r}")
        sens = (self.k, self.v)
        bits = [[steps[0]] * self.num_layers for _ in range(2)]
        spare = round(average * n) - steps[0] * n  # bits left to hand out, over all tensors

        def predicted(kind: int, layer: int, b: int) -> float:
            return sens[kind][layer] * 4.0 ** (self.bits - b)

        while True:
            best: tuple[float, int, int, int] | None = None
            for kind in range(2):
                for layer, b in enumerate(bits[kind]):
                    if b == steps[-1]:
                        continue
                    nb = steps[steps.index(b) + 1]
                    if nb - b > spare:
                        continue
                    gain = (predicted(kind, layer, b) - predicted(kind, layer, nb)) / (nb - b)
                    if best is None or gain > best[0]:
                        best = (gain, kind, layer, nb)
            if best is None:
                return tuple(bits[0]), tuple(bits[1])
            _, kind, layer, nb = best
            spare -= nb - bits[kind][layer]
            bits[kind][layer] = nb

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model, "bits": self.bits, "group_size": self.group_size, "sink": self.sink,
            "examples": self.examples, "k": list(self.k), "v": list(self.v),
        }  # fmt: skip

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                model=str(data["model"]), k=data["k"], v=data["v"], bits=int(data.get("bits", 2)),
                group_size=int(data.get("group_size", 64)), sink=int(data.get("sink", 1)),
                examples=int(data.get("examples", 0)), source=str(path),
            )  # fmt: skip
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot read sensitivity profile {str(path)!r}: {exc}") from None

    @classmethod
    def for_model(cls, fingerprint: str, model_name: str = "") -> Sensitivity | None:
        """This machine's profile for the fingerprint, else the shipped one for the model the fingerprint
        names (a local copy under any path) or for `model_name`, else None."""
        shipped = calibration_name(fingerprint, model_name)
        for path in (default_path(fingerprint), shipped_path(shipped) if shipped else None):
            if path is not None and path.is_file():
                profile = cls.load(path)
                logger.info("per-layer bits from the sensitivity profile %s", path)
                return profile
        return None


def shipped_path(model_name: str) -> Path:
    """The shipped profile of `model_name` (e.g. smollm2-135m-instruct): data/sensitivity/<name>.json."""
    return SHIPPED_DIR / f"{model_slug(model_name)}.json"


def default_path(fingerprint: str) -> Path:
    """Where `kvlink-bench sensitivity` writes a model's profile: <cache_dir>/sensitivity/<fingerprint>.json."""
    return cache_dir() / "sensitivity" / f"{fingerprint}.json"


ALLOCATION_AVERAGES: tuple[float, ...] = (3.0, 3.5)
"""Mean bits per entry of the per-layer allocations the planner weighs (and names resolve)."""


def known_allocation(bits_id: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The per-layer allocation whose `bits-<id>` is `bits_id`, among those of the shipped sensitivity
    profiles at ALLOCATION_AVERAGES (None when none has it)."""
    from kvlink.recipe import layer_bits_id

    for path in sorted(SHIPPED_DIR.glob("*.json")):
        profile = Sensitivity.load(path)
        for average in ALLOCATION_AVERAGES:
            allocation = profile.allocate(average)
            if layer_bits_id(*allocation) == bits_id:
                return allocation
    return None
