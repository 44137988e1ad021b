"""Ans: the rANS entropy stage of transform coding (kvlink.ans), after the Pca stage.

Every tensor's `codes` part (the float16 integer symbols Pca rounded, (H, N', D)) travels as one rANS
stream coded row by row (one row per position, heads side by side) under the residual profile's
Laplace table of each component at the message's rate (ResidualProfile.tables_for). The tables are the
profile's integers, so sender and receiver agree bit for bit. Unlike Zstd it is not optional per part:
under a recipe with Ans every codes part is a stream, and its size depends on the data (the planner
measures it by encoding, as for zstd). A stream is at most `bound(raw)` bytes: a receiver refuses a
larger one before decoding, and the decoder checks every stream exactly (kvlink.ans).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kvlink.stages.base import Stage, register


def bound(raw_size: int) -> int:
    """The most bytes a stream of `raw_size` bytes of float16 symbols takes: the header, one 16-bit word
    and one 16-bit escape per symbol."""
    from kvlink import ans

    return ans.HEADER + 2 * raw_size


def _pca(tensor: Any) -> Any:
    return next(s for s in tensor.stages if s.name == "pca")


def _tables(residual: Any, tensors: list[Any]) -> np.ndarray:
    rates = [_pca(t).rate for t in tensors]
    if any(r is None for r in rates):
        raise ValueError("ans needs the pca stage's rate: a message always has one")
    return np.stack([residual.tables_for(t.layer, t.kind, r) for t, r in zip(tensors, rates, strict=True)])


def _shifts(tensors: list[Any], rows: int) -> np.ndarray | None:
    """(B, rows) the rows' table shifts (Pca's question-aware steps: each tensor's `shifts` part, one
    signed byte a row), or None when the message has none (one Pca stage for the message)."""
    if not _pca(tensors[0]).question:
        return None
    out = np.zeros((len(tensors), rows), dtype=np.int64)
    for i, t in enumerate(tensors):
        part = t.parts.get("shifts")
        data = part.data if part is not None else b""
        if part is None or part.zstd or len(data) != rows:
            raise ValueError(f"layer {t.layer} {t.kind}: shifts part of {len(data)} bytes, expected {rows}")
        out[i] = np.frombuffer(data, dtype=np.int8)
    return out


@register
@dataclass(frozen=True)
class Ans(Stage):
    """rANS under the residual profile's tables on every codes part (no parameters: the profile and the
    rate are the Pca stage's)."""

    name: ClassVar[str] = "ans"
    role: ClassVar[str] = "entropy"

    def size_key(self) -> tuple[Any, ...]:
        return ("ans",)

    def check_recipe(self, recipe: Any) -> None:
        if not recipe.has("pca"):
            raise ValueError("ans codes the symbols of the pca stage: it needs pca")
        if recipe.zstd is not None:
            raise ValueError("ans with zstd: choose one entropy stage")

    def compress(self, tensors: list[Any], residual: Any, device: str | None = None) -> None:
        """Replace each tensor's codes part (float16 symbols) by its rANS stream, all tensors in one call
        (with the kernel on a CUDA `device`, the sender's: the same bytes)."""
        from kvlink import ans
        from kvlink.codec import Part

        if not tensors:
            return
        symbols = np.stack([_symbols(t.parts["codes"].data, t.stored) for t in tensors])
        shifts = _shifts(tensors, symbols.shape[1])
        streams = ans.encode(symbols, _tables(residual, tensors), residual.tables, shifts, device)
        for t, stream in zip(tensors, streams, strict=True):
            t.parts["codes"] = Part(stream, t.parts["codes"].raw_size)

    def decompress(self, tensors: list[Any], residual: Any, device: str | None = None) -> list[bytes]:
        """The float16 symbol bytes of each tensor's codes part (its rANS stream), all tensors in one call;
        AnsError (a ValueError) naming the tensor for a stream that does not decode exactly."""
        from kvlink import ans
        from kvlink.predict import unrows

        if not tensors:
            return []
        stored = {t.stored for t in tensors}
        if len(stored) != 1:
            raise ValueError(f"ans tensors of a message share one stored shape, got {sorted(stored)}")
        h, n, _ = stored.pop()
        for t in tensors:
            if len(t.parts["codes"].data) > bound(t.parts["codes"].raw_size):
                raise ValueError(
                    f"layer {t.layer} {t.kind}: rANS stream of {len(t.parts['codes'].data)} bytes exceeds the "
                    f"bound {bound(t.parts['codes'].raw_size)}"
                )
        try:
            symbols = ans.decode(
                [t.parts["codes"].data for t in tensors],
                n,
                _tables(residual, tensors),
                residual.tables,
                device,
                _shifts(tensors, n),
            )
        except ans.AnsError as exc:
            raise ans.AnsError(f"ans codes part: {exc}") from None
        out = []
        for i in range(len(tensors)):
            rows_ = torch.from_numpy(symbols[i]).to(torch.float16)
            out.append(unrows(rows_, h).contiguous().numpy().tobytes())
        return out

    def token(self) -> str:
        return "ans"


def _symbols(data: bytes, stored: tuple[int, int, int]) -> np.ndarray:
    """(N', H * D) int32 symbols of a float16 codes part of stored shape (H, N', D)."""
    from kvlink.predict import rows
    from kvlink.stages.tensors import from_bytes

    x = from_bytes(data, torch.float16, stored, "cpu")
    return rows(x.float()).round().to(torch.int32).numpy()  # type: ignore[no-any-return]
