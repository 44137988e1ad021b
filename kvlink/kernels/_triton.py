"""Guarded Triton import: `HAS_TRITON`, and placeholders so kernel modules import without Triton.

With Triton missing, `triton.jit` returns the function unchanged (the kernel then
never runs: dispatch in `kvlink.kernels` only calls a kernel when HAS_TRITON).
Whether a kernel is compiled or interpreted is fixed when its module is imported
(`TRITON_INTERPRET=1` must be set before that), so `kvlink.kernels` imports the
kernel modules lazily, on first use.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Placeholder:
        """Stands in for `triton` and `triton.language`: decorators pass through, attributes are None."""

        def jit(self, fn: Any = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name: str) -> Any:
            return None

    triton = _Placeholder()  # type: ignore[assignment]
    tl = _Placeholder()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "tl", "triton"]
