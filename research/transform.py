"""KVTC-style transform coding of a KV cache (research prototype; imports kvlink, never imported by it).

Per layer and per K/V, the kv_heads x head_dim = 192 features of a token are one vector x:

    y = (x - mu) @ U                   # PCA basis U (192 x 192), mean mu: profile data, fitted once
    s = round(y / step)                # ONE uniform step per tensor: step = c / sqrt(w[l, kind])
    x_hat = (s * step) @ U.T + mu

Keys are taken before RoPE ("pre", undone at their original positions; the receiver re-applies it) or
as cached ("post"). With entropy coding, one step for every component is the reverse water-filling
optimum: components whose variance lam_i is far below step^2 quantize to 0 and cost almost nothing.
`w[l, kind]` weighs the tensors: the shipped sensitivity profile's KL at INT2 over that tensor's INT2
MSE on the fit text (so a step buys the same KL everywhere), or 1 / variance ("flat": equal SNR).

Rate: the symbols of component i are coded with a quantized Laplace model of scale sqrt(lam_i / 2) / step
(lam_i from the profile: nothing per message but c and each tensor's symbol range); `rate_bits` is the
model's code length, `ans_bytes` the real size from constriction's rANS coder (within 0.1%). The first
position (the attention sink) travels as FP16 outside the transform, as the codec's `sink1`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kvlink.quant import QuantSpec, dequantize, quantize

from common import FitKV, rope, unrope

LN2 = math.log(2.0)


@dataclass
class Basis:
    """PCA of one (layer, kind): mean (F,), basis (F, F) columns by decreasing variance, variances (F,)."""

    mean: Tensor
    basis: Tensor
    var: Tensor

    @property
    def nbytes(self) -> int:  # as profile data in float16
        return 2 * (self.mean.numel() + self.basis.numel() + self.var.numel())


def _rows(x: Tensor) -> Tensor:
    """(H, n, D) -> (n, H*D)."""
    h, n, d = x.shape
    return x.permute(1, 0, 2).reshape(n, h * d)


def _unrows(y: Tensor, h: int) -> Tensor:
    n, f = y.shape
    return y.reshape(n, h, f // h).permute(1, 0, 2)


def fit_basis(x: Tensor, identity: bool = False) -> Basis:
    """PCA of the rows of x (H, N, D) (identity: no rotation, per-feature variances: the ablation)."""
    rows = _rows(x).double()
    mean = rows.mean(0)
    centered = rows - mean
    cov = centered.T @ centered / rows.shape[0]
    if identity:
        return Basis(mean.float(), torch.eye(cov.shape[0], device=cov.device), cov.diagonal().float())
    var, vec = torch.linalg.eigh(cov)
    order = var.argsort(descending=True)
    return Basis(mean.float(), vec[:, order].float(), var[order].clamp_min(1e-12).float())


@dataclass
class Profile:
    """Per layer: (key basis, value basis), weights w (L, 2), the key space ("pre" or "post")."""

    bases: list[tuple[Basis, Basis]]
    weight: Tensor
    keys: str

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.bases) + 4 * self.weight.numel()


def int2_mse(x: Tensor, kind: str) -> float:
    """MSE of x (H, N, D) under kvlink's INT2 groups of 64 (keys per channel, values per token)."""
    spec = QuantSpec("int2", 64, "channel" if kind == "k" else "token")
    return float((dequantize(quantize(x, spec)) - x).pow(2).mean())


def fit_profile(fit: FitKV, keys: str = "pre", weights: str = "sens", identity: bool = False,
                sens_k: tuple[float, ...] = (), sens_v: tuple[float, ...] = ()) -> Profile:  # fmt: skip
    """A Profile from the fit KV; weights "sens" (needs the sensitivity's per-layer K and V KL) or "flat"."""
    bases = []
    w = torch.zeros(len(fit.keys), 2, device=fit.keys[0].device)
    for layer in range(len(fit.keys)):
        k = fit.keys_pre[layer] if keys == "pre" else fit.keys[layer]
        v = fit.values[layer]
        bases.append((fit_basis(k, identity), fit_basis(v, identity)))
        for j, (x, kind, kl) in enumerate(((fit.keys[layer], "k", sens_k), (v, "v", sens_v))):
            if weights == "sens":
                w[layer, j] = max(kl[layer], 1e-7) / int2_mse(x, kind)
            else:
                w[layer, j] = 1.0 / float(x.var())
    return Profile(bases, w, keys)


def laplace_bits(sym: Tensor, scale: Tensor) -> Tensor:
    """Code length (bits) of integer symbols under a zero-mean Laplace of `scale` (symbol units) quantized to
    the integers; sym (n, F), scale (F,). Per component sums (F,)."""
    s = scale.float().clamp_min(1e-3)
    a = sym.float().abs()
    log_p0 = torch.log(-torch.expm1(-0.5 / s))  # P(0) = 1 - exp(-1/(2s))
    log_pm = math.log(0.5) - (a - 0.5) / s + torch.log(-torch.expm1(-1.0 / s))
    log_p = torch.where(a == 0, log_p0.expand_as(a), log_pm)
    return (-log_p / LN2).double().sum(0)


def ans_bytes(sym: Tensor, scale: Tensor) -> int:
    """Real rANS size (bytes) of the symbols with the same model (constriction). Without constriction
    installed (a machine with no registry): the model's code length + 0.1% + 8 bytes, a bound of the rANS
    size measured with constriction on the CPU screens (it came within 0.05% of the code length)."""
    try:
        if os.environ.get("RESEARCH_ANS", "1") == "0":  # long contexts on a GPU: skip the CPU coder
            raise ImportError("RESEARCH_ANS=0")
        import constriction
    except ImportError:
        return int(math.ceil(float(laplace_bits(sym, scale).sum()) / 8 * 1.001)) + 8

    lo, hi = int(sym.min()), int(sym.max())
    family = constriction.stream.model.QuantizedLaplace(lo, hi + 1)
    flat = sym.reshape(-1).to(torch.int32).cpu().numpy()
    scales = scale.double().clamp_min(1e-3).expand_as(sym).reshape(-1).cpu().numpy()
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(flat, family, np.zeros_like(scales), scales)
    return int(coder.get_compressed().nbytes)


@dataclass
class Coded:
    """One tensor's transform-coded rows: decoded (H, n, D), bits (model), symbols (n, F), scales (F,)."""

    decoded: Tensor
    bits: float
    sym: Tensor
    scale: Tensor


def code_tensor(x: Tensor, basis: Basis, step: float, positions: Tensor | None = None) -> Coded:
    """Transform-code x (H, n, D); `positions` given: x are keys after RoPE coded before it."""
    h = x.shape[0]
    src = unrope(x, positions) if positions is not None else x
    y = (_rows(src) - basis.mean) @ basis.basis
    sym = torch.round(y / step)
    y_hat = sym * step
    rec = _unrows(y_hat @ basis.basis.T + basis.mean, h)
    if positions is not None:
        rec = rope(rec, positions)
    scale = (basis.var / 2).sqrt() / step
    return Coded(rec, float(laplace_bits(sym, scale).sum()), sym, scale)


def steps(profile: Profile, c: float) -> Tensor:
    """(L, 2) quantization steps for the message's rate parameter c."""
    return c / profile.weight.sqrt()
