"""What a peer decodes, as data, and the one check everyone makes against it.

    caps = local_capabilities()                # everything registered in this process
    missing(recipe, caps)                      # [] when a receiver with `caps` decodes `recipe`
    check(recipe, caps)                        # raises CapabilityError naming what is missing

A capability is a string a stage names (Stage.capability): "select:q2c",
"sink", "rotate", "clamp", "lowrank:svd", "lowrank:profile", "predict", "format:int4cw",
"zstd", "pca", "ans". A receiver lists its own in its Welcome (a "lowrank:profile" or a
"predict" only when it holds such a profile, whose hashes it lists too); the
planner weighs only recipes the receiver decodes, the
sender refuses a pinned one it does not, and the receiver refuses a header whose
recipe needs one it lacks (UNKNOWN_CODEC) - all through `missing`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from kvlink.quant import registered_formats
from kvlink.select import registered_selectors


class CapabilityError(ValueError):
    """A recipe needs capabilities a peer lacks; `missing` lists them."""

    def __init__(self, missing: list[str], what: str) -> None:
        self.missing = missing
        super().__init__(f"{what} does not decode {', '.join(missing)}")


def local_capabilities(
    profiles: bool = True, text_segments: bool = True, predictors: bool = True, residuals: bool = True
) -> frozenset[str]:
    """Every capability of this process: its selectors, stages and formats (low rank by a calibrated
    profile only when `profiles`: a receiver advertises it only when it holds one), segmented contexts
    ("segment", kvlink.stream) and recomputing text segments ("segment:text", unless `text_segments`
    is False: a receiver may refuse to spend its model's time on them). "predict" (cross-layer
    predictors, kvlink.stages.predict) only when `predictors`: a receiver advertises it only when it
    holds a predictor profile. "pca" and "ans" (transform coding, kvlink.stages.pca) only when
    `residuals`: a receiver advertises them only when it holds a residual profile."""
    from kvlink.stages import registered_stages

    caps = {f"select:{m}" for m in registered_selectors()}
    caps |= {"segment", *(["segment:text"] if text_segments else [])}
    caps |= {f"format:{f}" for f in registered_formats()}
    for name, _cls in registered_stages().items():
        if name in ("select", "quantize"):
            continue
        if name == "lowrank":
            caps |= {"lowrank:svd", *(["lowrank:profile"] if profiles else [])}
        elif name == "predict":
            caps |= {"predict"} if predictors else set()
        elif name in ("pca", "ans"):
            caps |= {name} if residuals else set()
        else:
            caps.add(name)
    return frozenset(caps)


def missing(recipe: object, capabilities: Collection[str] | None) -> list[str]:
    """The capabilities `recipe` (a kvlink.recipe.Recipe) needs that `capabilities` lacks, sorted (None:
    a peer that decodes everything)."""
    if capabilities is None:
        return []
    return sorted(recipe.capabilities() - set(capabilities))  # type: ignore[attr-defined]


def check(recipe: object, capabilities: Collection[str] | None, what: str = "the receiver") -> None:
    """CapabilityError unless `capabilities` decode `recipe`."""
    lacking = missing(recipe, capabilities)
    if lacking:
        raise CapabilityError(lacking, what)


def decodes(capabilities: Collection[str] | None, *needed: str) -> bool:
    """Whether `capabilities` hold every one of `needed` (None: all)."""
    return capabilities is None or all(n in capabilities for n in needed)


def formats(capabilities: Iterable[str]) -> list[str]:
    """The quantization formats among `capabilities`."""
    return sorted(c.split(":", 1)[1] for c in capabilities if c.startswith("format:"))
