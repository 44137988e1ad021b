"""What a receiver decodes (the capabilities its Welcome advertises) and the refusals of a header
that needs more (UNKNOWN_CODEC). The capabilities themselves, one per registered stage, format and
selection method, are kvlink.capabilities'; this module is the wire's side of them: what this
process advertises, and the checks header validation (kvlink.wire.validation) runs against them.

`capabilities` None means everything registered in this process; `profile_hashes` None means any
calibrated profile.
"""

from __future__ import annotations

from collections.abc import Collection

from kvlink import capabilities as caps
from kvlink.quant import BITS
from kvlink.recipe import Recipe
from kvlink.wire._common import WireError


def local_capabilities() -> frozenset[str]:
    """What this process encodes and decodes: everything registered in kvlink (kvlink.capabilities)."""
    return caps.local_capabilities()


def check_recipe(recipe: Recipe, capabilities: frozenset[str] | None) -> None:
    """UNKNOWN_CODEC when `recipe` needs a stage or format that `capabilities` lacks."""
    lacking = caps.missing(recipe, capabilities)
    if lacking:
        raise WireError(
            "UNKNOWN_CODEC", f"the recipe needs {', '.join(lacking)}, which this receiver does not decode"
        )


def check_format(fmt: str, capabilities: frozenset[str] | None, where: str) -> None:
    """UNKNOWN_CODEC unless `fmt` (a tensor entry's format, at `where`) is one this receiver decodes."""
    if fmt not in BITS or not caps.decodes(capabilities, f"format:{fmt}"):
        raise WireError("UNKNOWN_CODEC", f"{where}: format {fmt[:32]!r} is not one this receiver decodes")


def check_zstd(chunk_id: int, capabilities: frozenset[str] | None) -> None:
    """UNKNOWN_CODEC unless this receiver reads zstd (chunk `chunk_id` is compressed with it)."""
    if not caps.decodes(capabilities, "zstd"):
        raise WireError(
            "UNKNOWN_CODEC", f"chunk {chunk_id} is zstd-compressed, which this receiver does not read"
        )


def check_profile(recipe: Recipe, profile_hash: str | None, profile_hashes: Collection[str] | None) -> None:
    """A header's calibrated profile: a low-rank 'profile' stage needs its hash (MALFORMED without),
    one of `profile_hashes` (UNKNOWN_CODEC otherwise); a hash without such a stage is MALFORMED. A stage
    that names profiles in its parameters (Stage.profiles: Predict) needs each one held (UNKNOWN_CODEC)."""
    profiled = any(s.name == "lowrank" and getattr(s, "mode", "") == "profile" for s in recipe.stages())
    if profiled:
        if profile_hash is None:
            raise WireError("MALFORMED", "lowrank 'profile' needs the profile hash in the header")
        if profile_hashes is not None and profile_hash not in profile_hashes:
            raise WireError(
                "UNKNOWN_CODEC",
                f"calibrated profile {profile_hash!r} is not held here; held: {sorted(profile_hashes)}",
            )
    elif profile_hash is not None:
        raise WireError(
            "MALFORMED", f"profile hash {profile_hash[:64]!r} given without a profile low-rank stage"
        )
    for stage in recipe.stages():
        for needed in stage.profiles():
            if not needed:
                raise WireError("MALFORMED", f"stage {stage.name!r} names no calibrated profile")
            if profile_hashes is not None and needed not in profile_hashes:
                raise WireError(
                    "UNKNOWN_CODEC",
                    f"stage {stage.name!r} needs the calibrated profile {needed!r}, which this receiver "
                    f"does not hold; held: {sorted(profile_hashes)}",
                )
