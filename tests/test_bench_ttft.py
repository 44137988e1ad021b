"""kvlink-bench ttft (kvlink.eval.bench_ttft): mechanics on CPU.

One run of the real thing on a tiny random geometry (kvlink-serve in a subprocess, send_streamed through
paced proxies, a warm and a cold sender, the link change, JSON, Markdown and plot), then what it wrote
is checked cell by cell. Timing is not asserted (a shared CPU); what the link decides is: the bytes of
each option and the order of choices and receipts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvlink.eval import bench_ttft as bt
from kvlink.stream import PINNED

TINY = "random:tiny-llama"
SEGMENTS = 4  # 1,000-1,024 context tokens in segments of 256


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("ttft")
    argv = [
        "--model", TINY, "--tokens", "1024", "--segment-tokens", "256", "--rates", "20M",
        "--senders", "warm,cold", "--statics", "text,fp16", "--drop", "20M:5M", "--threads", "0",
        "--max-new-tokens", "2", "--out", str(out),
    ]  # fmt: skip
    assert bt.main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def test_every_cell_is_written(run: tuple[dict[str, Any], Path]) -> None:
    result, out = run
    assert result["meta"]["random_weights"] and result["meta"]["segment_tokens"] == 256
    assert result["meta"]["device"] == result["meta"]["receiver_device"] == "cpu"
    assert "Sender on cpu, receiver on cpu." in (out / "results.md").read_text()
    rates = result["receiver"]["prefill_tokens_per_s"]
    assert rates and all(n > 0 and r > 0 for n, r in rates) and result["receiver"]["text_segments"]
    (ctx,) = result["contexts"]
    assert 900 <= ctx["tokens"] <= 1024 and ctx["sender_prefill_s"] > 0  # the warm sender read it once
    cells = result["cells"]
    assert {(c["sender"], c["method"]) for c in cells} == {
        (s, m) for s in ("warm", "cold") for m in ("adaptive", "text", "fp16")
    }
    for c in cells:
        assert c["ttft_s"] > 0 and c["predicted_ttft_s"] > 0 and c["rate_bps"] == 20e6
        assert math.isclose(c["error"], c["predicted_ttft_s"] / c["ttft_s"] - 1)
        assert len(c["options"]) == len(c["segments"]) == len(c["receipts"]) == SEGMENTS
        assert [s["index"] for s in c["segments"]] == list(range(SEGMENTS))
        assert c["proxy_bytes_up"] >= c["wire_bytes"] > 0  # everything crossed the paced proxy
        if c["method"] != "adaptive":
            assert c["options"] == [c["method"]] * SEGMENTS  # a static sends every segment as itself
            assert set(c["static_predictions_s"]) == {c["method"]}
        else:
            assert set(c["static_predictions_s"]) == {"text", "fp16", *PINNED}  # what it chooses from
            assert set(c["options"]) <= {"text", "fp16", *PINNED}
    by = {(c["sender"], c["method"]): c for c in cells}
    fp16, text = by["warm", "fp16"], by["warm", "text"]
    fp16_bytes = 2 * 2 * 2 * 16 * 2 * ctx["tokens"]  # K and V, 2 layers, 2 heads of 16, 2 bytes
    assert fp16_bytes <= fp16["wire_bytes"] <= 1.05 * fp16_bytes
    assert text["wire_bytes"] <= 4 * ctx["tokens"] + SEGMENTS * 1024  # token ids: varints, and framing
    assert 99 <= fp16["percent_of_fp16"] <= 102
    assert "prefill_s" not in by["warm", "fp16"]["timings"] and by["cold", "fp16"]["timings"]["prefill_s"] > 0
    assert (out / "ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| context | sender | link | adaptive TTFT" in (out / "results.md").read_text()
    # Each row was appended as it came (what a run cut short leaves): the cells, then the link change's two.
    (change,) = result["link_change"]
    logged = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps([*cells, change["adaptive"], change["static"]], default=str))


def test_summary_compares_adaptive_with_the_best_static(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    assert len(result["summary"]) == 2
    for s in result["summary"]:
        mine = {c["method"]: c for c in result["cells"] if c["sender"] == s["sender"]}
        best = min(("text", "fp16"), key=lambda m: mine[m]["ttft_s"])
        assert s["best_static"] == best
        assert math.isclose(s["ratio"], mine["adaptive"]["ttft_s"] / mine[best]["ttft_s"])
        assert s["adaptive_schedule"] == mine["adaptive"]["options"]
        assert sum(s["adaptive_options"].values()) == SEGMENTS
        assert math.isclose(s["max_abs_error"], max(abs(c["error"]) for c in mine.values()))


def test_each_segment_is_chosen_at_most_two_segments_ahead(run: tuple[dict[str, Any], Path]) -> None:
    """The estimate a segment was chosen with is one of those after the receipts of the two segments
    before it: chosen once segment j-2 is answered (samples of 64 KiB+: FP16 segments of 256 tokens)."""
    result, _ = run
    cell = next(c for c in result["cells"] if c["sender"] == "warm" and c["method"] == "fp16")
    after = {r["index"]: r["estimate_gbps"] for r in cell["receipts"]}
    assert len(set(after.values())) > 1  # the estimate moved with the samples
    for seg in cell["segments"][2:]:
        j = seg["index"]
        assert seg["link_gbps"] in {after[j - 2], after[j - 1]}, (j, seg["link_gbps"], after)


def test_link_change(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    (change,) = result["link_change"]
    assert change["sender"] == "warm" and (change["start_bps"], change["end_bps"]) == (20e6, 5e6)
    assert change["drop_after_receipts"] == SEGMENTS // 2 == change["drop_segment"]
    steady = next(c for c in result["cells"] if c["sender"] == "warm" and c["method"] == "adaptive")
    assert change["steady_schedule"] == steady["options"]
    assert change["best_static"] == min(
        ("text", "fp16"),
        key=lambda m: next(
            c["ttft_s"] for c in result["cells"] if c["sender"] == "warm" and c["method"] == m
        ),
    )
    for run_ in (change["adaptive"], change["static"]):
        assert run_["drop"]["after_receipts"] == SEGMENTS // 2 and run_["drop"]["to_bps"] == 5e6
    assert math.isclose(change["speedup"], change["static"]["ttft_s"] / change["adaptive"]["ttft_s"])
    lag = change["lag_segments"]
    assert lag is None or (change["change_segment"] - change["drop_segment"] == lag >= 0)


# --- argument parsing -------------------------------------------------------------------------------
def test_parsers() -> None:
    assert bt.parse_tokens("2k, 1500") == [2048, 1500]
    assert bt.parse_rates("10M,1G") == [10e6, 1e9]
    assert bt.parse_drop("30M:3M") == (30e6, 3e6) and bt.parse_drop(" ") is None
    for bad, fn in (("2x", bt.parse_tokens), ("16", bt.parse_tokens), ("unpaced", bt.parse_rates),
                    ("30M", bt.parse_drop)):  # fmt: skip
        with pytest.raises(ValueError, match=repr(bad)):
            fn(bad)


def test_bad_settings_exit_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert bt.main(["--senders", "lukewarm", "--out", "/nonexistent/x"]) == 2
    assert "'lukewarm'" in capsys.readouterr().err
    assert bt.main(["--drop-after", "1.5", "--out", "/nonexistent/x"]) == 2


def test_a_spent_time_budget_starts_no_cell(tmp_path: Path) -> None:
    argv = [
        "--model", TINY, "--tokens", "512", "--segment-tokens", "256", "--rates", "20M,40M", "--senders", "warm",
        "--statics", "text", "--drop", "20M:5M", "--threads", "0", "--max-new-tokens", "1",
        "--time-budget", "0.001", "--out", str(tmp_path),
    ]  # fmt: skip
    assert bt.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cells = result["cells"]
    assert [(c["rate_bps"], c["method"]) for c in cells] == [(20e6, "adaptive"), (40e6, "adaptive")]
    assert all(c["skipped"] == bt.OUT_OF_TIME and "ttft_s" not in c for c in cells)
    assert result["link_change"] == []  # not started either
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 2


def test_contexts_longer_than_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation split's articles hold ~23k tokens: a longer context is cut from every shipped
    paragraph, cycled, for a random-weight model only (a real model's answers would be read)."""
    import dataclasses

    from kvlink.models import load_model

    lm = load_model(TINY)
    (ctx,) = bt.load_contexts(lm, [30_000], 1)
    assert ctx.eid == "cycled:30000" and 29_000 <= ctx.tokens <= 30_100 and ctx.answers == ()
    with pytest.raises(ValueError, match="evaluation split"):
        bt.load_contexts(dataclasses.replace(lm, random_weights=False), [30_000], 1)
    (short,) = bt.load_contexts(lm, [2048], 1)  # within the split: a long-context QA example of it
    assert short.eid.startswith("long:") and short.answers


def test_stages_of_each_cell(run: tuple[dict[str, Any], Path]) -> None:
    result, out = run
    for c in result["cells"]:
        st = bt.stages(c)
        assert math.isclose(st["link_s"], 8 * c["proxy_bytes_up"] / 20e6)
        parts = {"sender": st["sender_s"], "link": st["link_s"], "receiver": st["receiver_s"]}
        assert st["slowest"] == max(parts, key=parts.__getitem__)
        assert math.isclose(st["pipelined"], c["ttft_s"] / parts[st["slowest"]])
        if c["sender"] == "warm":  # it holds the prefill: it encodes, never prefills
            assert math.isclose(st["sender_s"], sum(s["encode_s"] + s["plan_s"] for s in c["segments"]))
        if c["method"] == "text":  # every segment recomputed by the receiver
            assert st["receiver_s"] >= sum(s["receiver"]["recompute_s"] for s in c["segments"]) > 0
    assert "| sender | link | method | TTFT s | sender s |" in (out / "results.md").read_text()


def test_a_failed_cell_is_recorded_and_each_context_is_freed(tmp_path: Path) -> None:
    """A receiver that refuses FP16 segments as too large: that cell is recorded as failed and the next
    one runs; every context a cell sent is freed on the receiver after its answer."""
    import asyncio

    import httpx

    from kvlink.models import load_model
    from kvlink.server.local import LocalReceiver

    lm = load_model(TINY)
    (ctx,) = bt.load_contexts(lm, [512], 1)
    serve = ["--model", TINY, "--device", "cpu", "--max-message-bytes", "16KiB", "--cost-probe-tokens", "0"]
    with LocalReceiver(serve, log=tmp_path / "rx.log") as rx:
        rx.wait_healthy()
        host, _, port = rx.target.rpartition(":")

        async def cells() -> list[dict[str, Any]]:
            return [
                await bt.run_cell(lm, (host, int(port)), ctx, "cold", 50e6, method, 256, 1)
                for method in ("fp16", "text")
            ]

        failed, sent = asyncio.run(cells())
        metrics = httpx.get(f"{rx.rest}/metrics", timeout=10).text
        held = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("kvlink_cached_messages ")
        )
    assert failed["failed"] and failed["skipped"].startswith("failed: ") and "ttft_s" not in failed
    assert "TOO_LARGE" in failed["skipped"]
    assert sent["ttft_s"] > 0 and sent["options"] == ["text", "text"]
    assert held == 0  # the text cell's context was freed after its answer
