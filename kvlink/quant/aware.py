"""Query-aware rounding of keys: INT codes chosen for the question's attention logits, not for the keys.

Plain quantization rounds every key entry to its nearest level, which minimizes
||k - k_hat||. What the receiver's attention sees is q . k_hat for the queries
that will read the cache, and the sender has a sample of them: the question's
own queries (the Q2C observation). With H = sum_q q q^T over those queries
(per KV head, (D, D)), the logit error of a token's key is e^T H e, e = k - k_hat.
Rounding the channels one at a time and moving each channel's rounding error
onto the channels not rounded yet, weighted by H^-1 (the GPTQ/OBQ update, here
applied to one key vector per token instead of one weight row), lowers that error
for the same codes, scales and zeros on the wire. The receiver decodes the
ordinary INT layout (kvlink.quant.intq): no wire bytes and no receiver support.

The queries of the answer are not those of the question, so H is damped toward
a multiple of the identity (`damp` times its mean diagonal): damp -> inf gives
plain nearest rounding back. Channels of the channel axis are taken in
descending order of H's diagonal (the channels the queries weigh most go first,
while every later channel can still absorb their error).

Shapes: keys (H, T, D) = (kv_heads, seq_len, head_dim); queries (q_heads, n, D),
post-RoPE like the keys, q head i reading KV head i // (q_heads / kv_heads).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvlink.quant.base import WIDTH_FORMATS, QuantizedTensor, QuantSpec
from kvlink.quant.intq import IntQuantizer, check_input, group_view, scale_zero
from kvlink.quant.pack import pack_bits
from kvlink.quant.widths import check_widths, group_stats, pack_codes

__all__ = ["DAMP", "quantize_query_aware", "query_hessian", "round_query_aware", "saliency"]

DAMP = 0.1  # CPU screen bench/results/screen-cpu/run3-gptq-20q: INT3 + sink KL 0.012 at 0.1, 0.017 at 0.01


def query_hessian(queries: Tensor, kv_heads: int) -> Tensor:
    """(q_heads, n, D) queries -> (kv_heads, D, D) float64: sum of q q^T over the queries of each KV group."""
    if queries.dim() != 3:
        raise ValueError(f"queries must be (q_heads, n, head_dim), got shape {tuple(queries.shape)}")
    q_heads, n, d = (int(s) for s in queries.shape)
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into {kv_heads} KV groups")
    q = queries.double().reshape(kv_heads, (q_heads // kv_heads) * n, d)  # (H, group * n, D)
    return q.transpose(1, 2) @ q


def saliency(hessian: Tensor, compensated: bool, damp: float = DAMP) -> Tensor:
    """(H, D) weight of each channel's rounding error in the logit error e^T H e.

    Rounded to nearest, channel i's error costs H_ii per unit squared. Rounded query-aware,
    the other channels absorb part of it (the GPTQ update), and what remains costs
    1 / [(H + damp)^-1]_ii, the conditional variance of the logits given the other channels
    (<= H_ii, equal when channel i is uncorrelated with the rest).
    """
    if not compensated:
        return hessian.diagonal(dim1=1, dim2=2).clone()
    return 1.0 / torch.linalg.inv(_damped(hessian, damp)).diagonal(dim1=1, dim2=2)


def _damped(hessian: Tensor, damp: float) -> Tensor:
    """H + damp * mean(diag H) * I per head, (H, D, D) float64; a head without queries gets I."""
    d = hessian.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=hessian.device)
    level = hessian.diagonal(dim1=1, dim2=2).mean(dim=1)  # (H,)
    # No queries at all (or all-zero ones): H = I, which is exactly nearest rounding.
    level = torch.where(level > 0, level, torch.ones_like(level))
    h = torch.where((hessian.diagonal(dim1=1, dim2=2).sum(1) > 0)[:, None, None], hessian.double(), eye)
    return h + damp * level[:, None, None] * eye


def _inverse_factor(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, (H, D, D) float64."""
    h = _damped(hessian, damp)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def quantize_query_aware(
    x: Tensor, spec: QuantSpec, hessian: Tensor, damp: float = DAMP, widths: Tensor | None = None
) -> QuantizedTensor:
    """Keys (H, T, D) -> INT codes, scales and zeros in the wire layout of kvlink.quant.intq.

    hessian: (H, D, D) from `query_hessian` (in the space of `x`: rotate the queries
    with the keys). widths: (H, D) for the per-channel-width formats (kvlink.quant.widths). Every group's scale and zero are the min/max rule of the INT
    layout applied to the group's values at the moment it is rounded, so
    `dequantize` of the result is exactly the rounding this function chose.
    """
    codes, scale, zero = round_query_aware(x, spec, hessian, damp, widths)
    shape = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
    if widths is None:
        return QuantizedTensor(
            spec=spec, shape=shape, codes=pack_bits(codes, spec.bits), scale=scale, zero=zero
        )
    packed = pack_codes(codes, widths.to(codes.device))
    return QuantizedTensor(
        spec, shape, packed, scale, zero, widths.to(device=codes.device, dtype=torch.uint8)
    )


def round_query_aware(
    x: Tensor, spec: QuantSpec, hessian: Tensor, damp: float = DAMP, widths: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`quantize_query_aware` before packing: (codes (H, T, D) uint8, scale, zero in wire layout).

    Rows of H are independent, so several layers' heads may be stacked into one call.
    widths: (H, D) bits per channel for the per-channel formats (kvlink.quant.widths;
    channel axis), whose rounding of channel i then uses qmax 2^w - 1 and the width-0 rule.
    """
    shape = check_input(x, spec, (*IntQuantizer.formats, *WIDTH_FORMATS))
    h, t, d = shape
    if (spec.format in WIDTH_FORMATS) != (widths is not None):
        raise ValueError(
            f"format {spec.format!r} and widths {'given' if widths is not None else 'None'} disagree"
        )
    if widths is not None:
        check_widths(widths, h, d, WIDTH_FORMATS[spec.format])
        if spec.axis != "channel":
            raise ValueError(f"per-channel widths need the channel axis, got axis {spec.axis!r}")
    if tuple(hessian.shape) != (h, d, d):
        raise ValueError(
            f"hessian must be ({h}, {d}, {d}) for keys of shape {shape}, got {tuple(hessian.shape)}"
        )
    if not (damp > 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be a positive finite number, got {damp!r}")
    qmax, g = (1 << spec.bits) - 1, spec.group_size
    hessian = hessian.to(x.device)
    if spec.axis == "channel":
        priority = hessian.diagonal(dim1=1, dim2=2)  # (H, D)
        if widths is not None:  # channels of width 0 cannot absorb error: they go first
            priority = torch.where(widths.to(x.device) == 0, math.inf, priority)
        order = torch.argsort(priority, dim=1, descending=True)  # (H, D)
    else:  # groups of channels: they must be rounded in their wire order
        order = torch.arange(d, device=x.device).expand(h, d)
    # The factor belongs to the rounding order: permute H first (a permuted Cholesky factor is not one).
    permuted = torch.gather(
        torch.gather(hessian, 1, order[:, :, None].expand(h, d, d)), 2, order[:, None, :].expand(h, d, d)
    )
    u = _inverse_factor(permuted, damp)
    work = torch.gather(
        x.double(), 2, order[:, None, :].expand(h, t, d)
    ).clone()  # (H, T, D) in rounding order
    codes = torch.empty(h, t, d, dtype=torch.uint8, device=x.device)
    qmax_rounding = None  # (H, D) per-channel qmax in rounding order
    if widths is not None:
        qmax_rounding = torch.gather((1 << widths.to(x.device).long()) - 1, 1, order)
    if spec.axis == "channel":
        scale = torch.empty(h, math.ceil(t / g), d, dtype=torch.float16, device=x.device)
    else:
        scale = torch.empty(h, t, math.ceil(d / g), dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    s_el = z_el = torch.empty(0)
    for j in range(d):
        col = work[:, :, j]  # (H, T)
        limit: float | Tensor = qmax
        if spec.axis == "channel":
            groups = group_view(col[:, :, None], spec)[:, 0]  # (H, ceil(T/G), G), channel order[:, j]
            if qmax_rounding is None:
                s, z = scale_zero(groups, qmax)  # (H, ceil(T/G))
            else:
                limit = qmax_rounding[:, j : j + 1].float()  # (H, 1)
                s, z = group_stats(groups, limit)
            scale.scatter_(2, order[:, None, j : j + 1].expand(h, s.shape[1], 1), s[:, :, None])
            zero.scatter_(2, order[:, None, j : j + 1].expand(h, s.shape[1], 1), z[:, :, None])
            s_el = s.float().repeat_interleave(g, dim=1)[:, :t]  # (H, T)
            z_el = z.float().repeat_interleave(g, dim=1)[:, :t]
        elif j % g == 0:  # entering a group of channels: its stats from the values as they are now
            s, z = scale_zero(work[:, :, j : j + g], qmax)  # (H, T)
            scale[:, :, j // g], zero[:, :, j // g] = s, z
            s_el, z_el = s.float(), z.float()
        code = torch.round((col.float() - z_el) / s_el)  # (H, T)
        if isinstance(limit, Tensor):
            code = torch.minimum(code.clamp(min=0), limit)
        else:
            code = code.clamp(0, qmax)
        rounded = (code * s_el + z_el).double()  # what the receiver will decode
        codes[:, :, j] = code.to(torch.uint8)
        err = (col - rounded) / u[:, j, j][:, None]  # (H, T)
        work[:, :, j + 1 :] -= err[:, :, None] * u[:, j, j + 1 :][:, None, :]
    natural = torch.empty_like(codes).scatter_(2, order[:, None, :].expand(h, t, d), codes)  # (H, T, D)
    return natural, scale, zero
