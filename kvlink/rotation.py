"""Randomized Hadamard rotation along head_dim, applied before quantization and undone after it.

Quantization error of a group is set by its range; a few channels of huge
magnitude (keys have them) stretch every group they fall in. An orthogonal
rotation R = diag(s) @ H / sqrt(D) (H the Sylvester Hadamard matrix, s random
signs) spreads each vector's energy evenly over its D coordinates (the
incoherence processing of QuIP# / QuaRot), so groups see near-Gaussian values
with a small range. The receiver undoes it exactly: R^-1 = H / sqrt(D) @ diag(s),
so x = (x_rot @ H / sqrt(D)) * s. It costs no wire bytes: the signs are derived
from (seed, layer, kind) by SHA-256 on both sides, identical on every platform.

    y = rotate(x, seed=0, layer=3, kind="k")      # (H, N, D) -> (H, N, D), float32
    x = unrotate(y, seed=0, layer=3, kind="k")    # the same x up to float rounding

D must be a power of two (64 and 128, the common head sizes, are).
"""

from __future__ import annotations

import functools
import hashlib

import torch
from torch import Tensor

ROTATIONS: tuple[str, ...] = ("none", "k", "v", "kv")
"""Which tensors a codec rotates: neither, keys, values, or both."""


def rotates(rotation: str, kind: str) -> bool:
    """Whether `rotation` ("none", "k", "v", "kv") applies to tensors of `kind` ("k" or "v")."""
    return kind in rotation and rotation != "none"


def check_dim(d: int) -> None:
    """ValueError unless `d` is a power of two (the Sylvester construction's sizes)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {d}")


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(d: int) -> Tensor:
    check_dim(d)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / d**0.5).to(torch.float32)


def hadamard(d: int, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal (D, D) Sylvester Hadamard matrix H / sqrt(D), float32; symmetric, its own inverse."""
    return _hadamard_cpu(d).to(device)


@functools.lru_cache(maxsize=4096)
def _signs_cpu(seed: int, layer: int, kind: str, d: int) -> Tensor:
    bits = bytearray()
    counter = 0
    while len(bits) * 8 < d:
        bits += hashlib.sha256(f"kvlink/rotation/v1/{seed}/{layer}/{kind}/{counter}".encode()).digest()
        counter += 1
    flags = [(bits[i // 8] >> (i % 8)) & 1 for i in range(d)]
    return torch.tensor([1.0 - 2.0 * f for f in flags], dtype=torch.float32)


def signs(seed: int, layer: int, kind: str, d: int, device: torch.device | str = "cpu") -> Tensor:
    """The (D,) random signs of (seed, layer, kind): bit i of SHA-256 stream -> -1 when set, +1 otherwise."""
    return _signs_cpu(int(seed), int(layer), kind, int(d)).to(device)


def rotate(x: Tensor, seed: int, layer: int, kind: str) -> Tensor:
    """x (..., D) -> x @ diag(s) @ H / sqrt(D), float32 on x's device."""
    d = int(x.shape[-1])
    s = signs(seed, layer, kind, d, x.device)
    return (x.float() * s) @ hadamard(d, x.device)


def unrotate(y: Tensor, seed: int, layer: int, kind: str) -> Tensor:
    """Inverse of `rotate`: y (..., D) -> (y @ H / sqrt(D)) * s, float32 on y's device."""
    d = int(y.shape[-1])
    return (y.float() @ hadamard(d, y.device)) * signs(seed, layer, kind, d, y.device)
