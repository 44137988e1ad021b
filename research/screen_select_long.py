"""Which positions to keep on long contexts: Q2C variants through kvlink's real codec (issue 24).

On 2k-8k-token contexts what decides the answer is which positions stay (research/results/xl-select-long-20q:
coding every position, or one global set, lost to Q2C per layer at the same bytes). This screen asks whether
Q2C's per-layer kept sets can be chosen better at the same kept count, so at the same exact wire bytes:

    q2c           kvlink's Q2C: the question's attention to each position, summed over its heads (baseline)
    q2cmax_k<n>_  the same scores max-pooled along positions per KV head (kernel n, stride 1), as SnapKV
                  pools its window's attention: a kept token brings its neighbours
    q2cavg_k<n>_  average-pooled instead
    q2chead_      each KV head's scores normalized to sum 1 before the sum (every head an equal say)
    q2cpeak_      each question row's attention normalized to its maximum per head before the sum (a row
                  that reads one position sharply counts as much as the row that spreads its mass)

The variants are registered as kvlink selectors inside this process only, so each runs through kvlink's
Evaluator (the real codec: exact wire bytes, the receiver's decode) as `<method><r>%/layer+<quantizer>`.

usage: PYTHONPATH=$PWD RESEARCH_DEVICE=cuda python research/screen_select_long.py N \
         --configs 'q2c40%/layer+fp16,q2cmax_k7_40%/layer+fp16,...' [--task long] [--shard K/N] [--name NAME]
         [--split evaluation]   # only to measure variants already chosen on the calibration split
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_screen, write_paired  # noqa: E402

from kvlink.cache import LayerObservation  # noqa: E402
from kvlink.select.base import attention_to_context, register  # noqa: E402
from kvlink.select.q2c import Q2C  # noqa: E402


def _pooled(kind: str, kernel: int) -> type[Q2C]:
    @dataclass
    class Pooled(Q2C):
        name: ClassVar[str] = f"q2c{kind}_k{kernel}_"

        def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
            attn = attention_to_context(obs, length, scale).unsqueeze(1)  # (H, 1, T)
            pool = F.max_pool1d if kind == "max" else F.avg_pool1d
            return pool(attn, kernel, stride=1, padding=kernel // 2).squeeze(1)  # type: ignore[operator]

    return register(Pooled)


@register
@dataclass
class HeadNormalized(Q2C):
    name: ClassVar[str] = "q2chead_"

    def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
        attn = attention_to_context(obs, length, scale)
        return attn / attn.sum(dim=1, keepdim=True).clamp_min(1e-30)


@register
@dataclass
class RowPeak(Q2C):
    name: ClassVar[str] = "q2cpeak_"

    def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
        total = None
        for row in range(int(obs.queries.shape[1])):  # one question row at a time: its own maximum
            one = LayerObservation(obs.queries[:, row : row + 1], obs.query_positions[row : row + 1], obs.keys,
                                   obs.key_positions)  # fmt: skip
            attn = attention_to_context(one, length, scale)
            attn = attn / attn[:, 1:].amax(dim=1, keepdim=True).clamp_min(1e-30)  # the sink aside
            total = attn if total is None else total + attn
        assert total is not None
        return total


for _kind in ("max", "avg"):
    for _kernel in (3, 7, 15, 31, 63):
        _pooled(_kind, _kernel)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--task", default="long", choices=("squad", "long"))
    ap.add_argument(
        "--split",
        default="calibration",
        choices=("calibration", "evaluation"),
        help="evaluation: to MEASURE variants chosen on the calibration split",
    )
    ap.add_argument("--configs", required=True, help="kvlink recipe names, the variants' methods included")
    ap.add_argument("--name", default="select-long")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pairs", default="", help="BASE:CANDIDATE,... to pair when the run is whole")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    shard = tuple(int(x) for x in args.shard.split("/"))
    configs = [c for c in args.configs.split(",") if c]
    run_screen(args.name, lambda c: {}, args.n, configs, 0, None, args.split, shard,  # type: ignore[arg-type]
               args.task, args.resume)  # fmt: skip
    if shard == (0, 1) and args.pairs:
        write_paired(args.name, [tuple(p.split(":", 1)) for p in args.pairs.split(",")])  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
