"""How much an entropy coder could save on the quantized codes, against zstd, measured.

    stats = code_statistics(kv, build(k_bits=4, v_bits=4), geometry)

For every quantized tensor of a message: its packed codes (the payload), the
order-0 empirical entropy of its symbols (what a static per-tensor arithmetic
or rANS coder reaches, plus one frequency table per tensor, counted here), the
order-1 entropy given the same channel's symbol at the previous kept position
(a lower bound for a context-modelling coder: its tables are NOT counted), and
zstd at `level` over the packed codes (what the codec already does, timed).
`kvlink-bench entropy` runs it over contexts and writes JSON.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from kvlink.cache import ContextKV
from kvlink.codec import Codec
from kvlink.models import Geometry
from kvlink.quant import BITS
from kvlink.quant.pack import unpack_bits
from kvlink.recipe import Recipe


def entropy_bits(symbols: Tensor) -> float:
    """Total bits of `symbols` under their own empirical distribution (order 0)."""
    if symbols.numel() == 0:
        return 0.0
    _, counts = torch.unique(symbols.reshape(-1), return_counts=True)
    p = counts.double() / symbols.numel()
    return float(-(counts.double() * p.log2()).sum())


def conditional_entropy_bits(symbols: Tensor, context: Tensor, alphabet: int) -> float:
    """Total bits of `symbols` given `context` (same shape): H(symbols, context) - H(context)."""
    joint = symbols.long() * alphabet + context.long()
    return entropy_bits(joint) - entropy_bits(context)


def code_statistics(kv: ContextKV, config: Recipe, geometry: Geometry, level: int = 3) -> dict[str, Any]:
    """Bytes of the message and of its codes: raw, order-0 / order-1 entropy, zstd (see module doc)."""
    import zstandard

    codec = Codec(config.with_zstd(None), geometry)
    encoded = codec.encode_kv(kv)
    compressor = zstandard.ZstdCompressor(level=level)
    codes = order0 = order1 = zstd = 0.0
    zstd_s = 0.0
    for t in encoded.tensors:
        bits = BITS[t.spec.format]
        if bits >= 16 or "codes" not in t.parts:
            continue
        packed = t.parts["codes"].data
        n = t.stored[0] * t.stored[1] * t.stored[2]
        symbols = unpack_bits(torch.frombuffer(bytearray(packed), dtype=torch.uint8), bits, n).view(t.stored)
        codes += len(packed)
        order0 += entropy_bits(symbols) / 8 + (1 << bits) * 2  # + a 16-bit frequency per symbol
        first = entropy_bits(symbols[:, :1])
        order1 += (first + conditional_entropy_bits(symbols[:, 1:], symbols[:, :-1], 1 << bits)) / 8
        t0 = time.perf_counter()
        zstd += min(len(compressor.compress(packed)), len(packed))
        zstd_s += time.perf_counter() - t0
    total = encoded.sizes().total
    return {
        "config": config.name,
        "message_bytes": total,
        "codes_bytes": int(codes),
        "order0_bytes": order0,
        "order1_bytes": order1,
        "zstd_bytes": int(zstd),
        "zstd_s": zstd_s,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Savings over a set of messages of one config, as fractions of the whole messages' bytes."""
    message = sum(r["message_bytes"] for r in rows)
    codes = sum(r["codes_bytes"] for r in rows)
    out = {"messages": len(rows), "codes_share": codes / message if message else 0.0}
    for name in ("order0", "order1", "zstd"):
        coded = sum(r[f"{name}_bytes"] for r in rows)
        out[f"{name}_saving"] = (codes - coded) / message if message else 0.0
        out[f"{name}_bits_per_code_bit"] = coded / codes if codes else 0.0
    out["zstd_ms_per_message"] = 1000 * sum(r["zstd_s"] for r in rows) / max(len(rows), 1)
    return out
