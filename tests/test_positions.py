"""Kept-position sets on the wire (kvlink.positions): varints against the plain loop, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvlink import positions as pos


def _loop_varints(values: np.ndarray) -> bytes:
    """LEB128 the plain way: the specification of the vectorized encoder."""
    out = bytearray()
    for value in values.tolist():
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


@pytest.mark.parametrize("high", [1, 2, 128, 300, 70_000, 2**35])
@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_varints_match_the_loop(n: int, high: int) -> None:
    values = np.random.default_rng(n + high).integers(0, high, n)
    assert pos._varints(values) == _loop_varints(values)
    if n:
        assert np.array_equal(pos._read_varints(pos._varints(values), n), values)


def test_varints_at_the_byte_boundaries() -> None:
    edges = np.array([0, 127, 128, 16_383, 16_384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**35 - 1])
    assert pos._varints(edges) == _loop_varints(edges)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_positions_round_trip(keep: float) -> None:
    length = 10_000
    g = torch.Generator().manual_seed(int(keep * 100))
    kept = torch.sort(torch.randperm(length, generator=g)[: int(keep * length)]).values
    encoding, data = pos.encode_positions(kept, length)
    assert encoding == (pos.DELTA_VARINT if keep < 0.5 else pos.BITMAP)
    assert len(data) == pos.encoded_size(kept, length)
    assert torch.equal(pos.decode_positions(encoding, data, length, kept.numel()), kept)
