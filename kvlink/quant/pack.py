"""Dense LSB-first bit packing of quantization codes (the codes part of the wire layout).

Code i of a stream of `bits`-bit codes occupies bits [bits*i, bits*i + bits)
of the little-endian byte string; the stream is ceil(n*bits/8) bytes and the
unused high bits of the last byte are 0 (see kvlink.quant.base).

Both directions are vectorized by chunks: the smallest run of codes that
fills whole bytes (k = 8 / gcd(bits, 8) codes in m = k*bits/8 bytes, e.g. 2
INT4 codes in 1 byte, 8 INT3 codes in 3 bytes) is combined into one integer
word, which is then cut into bytes. The stream is padded with zero codes to a
whole number of chunks and truncated afterwards. The only Python loops run
over the k <= 8 codes or m <= 7 bytes of one chunk, never over elements.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvlink.quant.base import packed_size

__all__ = ["pack_bits", "unpack_bits"]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")


def _chunk(bits: int) -> tuple[int, int, torch.dtype]:
    """(codes per chunk, bytes per chunk, integer dtype wide enough for one chunk's word)."""
    k = 8 // math.gcd(bits, 8)
    m = k * bits // 8
    if m == 1:
        word = torch.uint8
    elif 8 * m < 32:
        word = torch.int32
    else:
        word = torch.int64  # 5 or 7 bits: 40 or 56 bits per chunk
    return k, m, word


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (any shape, flattened in C order, each < 2**bits) into a uint8 stream.

    Returns a new 1-D uint8 tensor of ceil(n*bits/8) bytes on the codes' device.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)  # C order
    n = flat.numel()
    if n:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(
                f"codes must lie in [0, {1 << bits}) for {bits} bits, got values in [{lo}, {hi}]"
            )
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    k, m, word_dtype = _chunk(bits)
    n_chunks = -(-n // k)
    wide = flat.to(word_dtype)
    if n_chunks * k > n:
        wide = torch.cat([wide, wide.new_zeros(n_chunks * k - n)])  # zero codes: the unused bits stay 0
    chunks = wide.reshape(n_chunks, k)  # (chunks, k): code j of a chunk starts at bit j*bits of its word
    word = chunks[:, 0].clone()
    for j in range(1, k):
        word |= chunks[:, j] << (j * bits)  # (chunks,)
    if m == 1:
        return word[: packed_size(n, bits)]
    shifts = torch.arange(0, 8 * m, 8, dtype=word_dtype, device=word.device)  # (m,)
    out = (word[:, None] >> shifts) & 0xFF  # (chunks, m): little-endian bytes of each word
    return out.to(torch.uint8).reshape(-1)[: packed_size(n, bits)]


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_bits`: the first n codes of a uint8 stream as a new 1-D uint8 tensor.

    `packed` must hold at least ceil(n*bits/8) bytes; bytes beyond that are ignored.
    """
    _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed must be a 1-D uint8 tensor, got dtype {packed.dtype} shape {tuple(packed.shape)}"
        )
    nbytes = packed_size(n, bits)
    if packed.numel() < nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    data = packed[:nbytes]
    if bits == 8:
        return data.clone()
    k, m, word_dtype = _chunk(bits)
    n_chunks = -(-n // k)
    if n_chunks * m > nbytes:
        data = torch.cat([data, data.new_zeros(n_chunks * m - nbytes)])
    chunks = data.reshape(n_chunks, m).to(word_dtype)  # (chunks, m)
    word = chunks[:, 0].clone()
    for i in range(1, m):
        word |= chunks[:, i] << (8 * i)  # (chunks,)
    shifts = torch.arange(0, k * bits, bits, dtype=word_dtype, device=word.device)  # (k,)
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)  # (chunks, k)
    return codes.to(torch.uint8).reshape(-1)[:n]
