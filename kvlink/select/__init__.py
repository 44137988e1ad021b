"""Position selection: one module per method; importing this package registers them all."""

from kvlink.select import h2o, q2c, random, snapkv, streaming  # noqa: F401  (registration side effects)
from kvlink.select.base import (
    SCOPES,
    Selector,
    attention_to_context,
    get_selector,
    keep_count,
    registered_selectors,
    top_positions,
)

__all__ = [
    "SCOPES",
    "Selector",
    "attention_to_context",
    "get_selector",
    "keep_count",
    "registered_selectors",
    "top_positions",
]
