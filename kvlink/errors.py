"""Errors shared across kvlink's registries."""

from __future__ import annotations


class NotRegistered(ValueError):
    """A name no registry of this process holds (a stage, a selection method, a quantization format, a
    low-rank mode): a newer peer's option rather than a malformed one (the receiver answers UNKNOWN_CODEC)."""
