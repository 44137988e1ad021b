"""kvlink-bench scale (kvlink.eval.bench_scale) and its paced link (kvlink.eval.link): mechanics on CPU.

The end-to-end test runs the real thing on a tiny random geometry: kvlink-serve in a subprocess, the
sender's gRPC path through the paced proxy (its own process), the text method, the JSON, Markdown and
plot, and --resume. Timing is checked only where the link sets it (a slow paced link); CPU figures of
a shared machine are not asserted otherwise.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvlink.eval import bench_scale as bs
from kvlink.eval.link import (
    LocalLink,
    PacedProxy,
    TokenBucket,
    parse_rate,
    rate_label,
    read_size,
    tcp_throughput,
)

TINY = "random:tiny-llama"


# --- the link -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "bps"),
    [("1G", 1e9), ("10Gbit", 10e9), ("100M", 100e6), ("2.5e9", 2.5e9), ("25gbps", 25e9), ("unpaced", None)],
)
def test_parse_rate(text: str, bps: float | None) -> None:
    assert parse_rate(text) == bps
    if bps is not None:
        assert parse_rate(rate_label(bps)) == bps


@pytest.mark.parametrize("bad", ["fast", "-1G", "0.0", "nanG", "1X"])
def test_parse_rate_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        parse_rate(bad)


def test_read_size_is_two_ms_of_the_rate_within_bounds() -> None:
    assert read_size(None) == 1 << 20
    assert read_size(1e9) == 250_000  # 2 ms at 125 MB/s
    assert read_size(20e6) == 16 << 10  # floor
    assert read_size(100e9) == 1 << 20  # ceiling


def test_token_bucket_passes_a_burst_then_paces() -> None:
    bucket = TokenBucket(rate=1e6, burst=10_000)  # 1 MB/s
    assert bucket.take(10_000) == 0.0  # the full bucket passes at once
    started = time.perf_counter()
    slept = sum(bucket.take(10_000) for _ in range(5))  # 50 kB more: ~50 ms
    elapsed = time.perf_counter() - started
    assert slept >= 0.04 and 0.045 <= elapsed <= 0.2
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1)


def test_proxy_forwards_both_ways_byte_for_byte() -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data[::-1])

    threading.Thread(target=echo, daemon=True).start()
    with PacedProxy(("127.0.0.1", server.getsockname()[1]), None) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.sendall(b"kvlink")
            assert c.recv(100) == b"knilvk"
        time.sleep(0.05)
        assert proxy.bytes_up == proxy.bytes_down == 6
    server.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_paced_link_is_accurate(mode: str) -> None:
    """2.5 MB at 20 Mbit/s take 1 s through the proxy, whether in this process or its own."""
    rate = 20e6
    r = tcp_throughput(2_500_000, rate, mode)
    assert r["bytes"] == 2_500_000
    assert r["seconds"] == pytest.approx(1.0, rel=0.1)
    assert r["bits_per_s"] == pytest.approx(rate, rel=0.1)


def test_local_link_reports_its_port_and_stops() -> None:
    with LocalLink("127.0.0.1:9", 1e9) as link:
        assert link.target.startswith("127.0.0.1:") and link.port > 0
        assert link.proc.poll() is None
    assert link.proc.poll() is not None


# --- methods, lengths, contexts ---------------------------------------------------------------------------------
def test_methods_and_lengths() -> None:
    assert bs.parse_tokens("8k,32k,128k") == [8192, 32768, 131072]
    assert bs.parse_tokens("4096") == [4096]
    with pytest.raises(ValueError, match="'lots'"):
        bs.parse_tokens("lots")
    assert bs.method("text").text and not bs.method("fp16").text
    assert bs.method("q2c50-int4").config == dict(
        selector="q2c", retention=0.5, k_bits=4, v_bits=4, group_size=64
    )
    planned = bs.method("plan:12.5%")
    assert planned.budget == 0.125 and planned.config is None and not planned.text
    with pytest.raises(ValueError, match="registered"):
        bs.method("int5")
    with pytest.raises(ValueError, match="already registered"):
        bs.register(bs.Method("fp16"))


def test_context_of_real_text_has_the_asked_length() -> None:
    from kvlink.models import load_model
    from kvlink.prompt import encode_text

    lm = load_model(TINY)
    text, question = bs.context_text(lm.tokenizer, 3000)  # past one paragraph, short of cycling
    assert abs(len(encode_text(lm.tokenizer, text)) - 3000) <= 3
    assert question.endswith("?")
    long, _ = bs.context_text(lm.tokenizer, 70_000)  # longer than the shipped paragraphs: cycled
    assert abs(len(encode_text(lm.tokenizer, long)) - 70_000) <= 10


# --- crossovers ---------------------------------------------------------------------------------------------
RATES = (1e9, 10e9, 25e9, 100e9)


def _series(a: float, bits: float) -> list[tuple[float, float]]:
    return [(r, a + bits / r) for r in RATES]


def test_fit_inverse_recovers_a_line_in_one_over_rate() -> None:
    fit = bs.fit_inverse(_series(0.25, 4e9))
    assert fit is not None
    assert fit[0] == pytest.approx(0.25) and fit[1] == pytest.approx(4e9)
    assert bs.fit_inverse([(1e9, 1.0), (1e9, 2.0)]) is None


def test_crossover_on_synthetic_numbers() -> None:
    # KV: 0.1 s fixed + 4 Gbit on the wire; text: 1.5 s of re-prefill + 1 Mbit of token ids.
    text = _series(1.5, 1e6)
    x = bs.crossover(_series(0.1, 4e9), text)
    assert x["verdict"] == "crossover"
    assert x["rate_bps"] == pytest.approx((4e9 - 1e6) / 1.4)  # ~2.86 Gbit/s: between the paced rates
    assert not x["extrapolated"]
    assert x["kv_fixed_s"] == pytest.approx(0.1) and x["text_fixed_s"] == pytest.approx(1.5)
    # Fixed costs above the re-prefill: no link is fast enough.
    assert bs.crossover(_series(2.0, 1e9), text)["verdict"] == "never"
    # Fewer wire bits than the text's: KV wins at any rate.
    assert bs.crossover(_series(0.1, 1e5), text)["verdict"] == "always"
    # A crossover below the slowest measured rate is flagged as extrapolated.
    low = bs.crossover(_series(0.1, 1e8), text)
    assert low["verdict"] == "crossover" and low["extrapolated"] and low["rate_bps"] < min(RATES)
    assert bs.crossover([(1e9, 1.0)], text)["verdict"] == "unknown"


def test_summary_ratios_and_crossovers_from_cells() -> None:
    cells = []
    for rate in RATES:
        label = rate_label(rate)
        for name, (a, bits) in {"text": (1.5, 1e6), "fp16": (0.2, 32e9), "q2c50-int4": (0.1, 4e9)}.items():
            cells.append({"key": f"m|32k|{name}|{label}", "model": "m", "tokens": 32768, "method": name,
                          "link": label, "rate_bps": rate, "ttft_s": a + bits / rate, "note": bs.RANDOM_NOTE})  # fmt: skip
    summary, crossovers = bs.summarize(cells)
    at10 = {s["method"]: s for s in summary if s["link"] == "10G"}
    assert at10["q2c50-int4"]["text_over_this"] == pytest.approx(1.5001 / 0.5)
    assert at10["q2c50-int4"]["fp16_over_this"] == pytest.approx(3.4 / 0.5)
    by = {c["method"]: c for c in crossovers}
    assert set(by) == {"fp16", "q2c50-int4"}
    assert by["fp16"]["rate_bps"] == pytest.approx((32e9 - 1e6) / 1.3)
    assert all(c["note"] == bs.RANDOM_NOTE for c in crossovers)


# --- the text method ---------------------------------------------------------------------------------------------
def test_text_method_reads_the_context_as_a_receiver_would() -> None:
    """The re-prefill's first token is the one the KV path at full precision answers with."""
    from kvlink.cache import prefill
    from kvlink.generate import greedy_answer
    from kvlink.models import load_model
    from kvlink.prompt import context_ids, question_ids

    lm = load_model(TINY, "cpu", "fp32")
    text, question = bs.context_text(lm.tokenizer, 300)
    ctx = bs.Context(
        300, text, question, context_ids(lm.tokenizer, text), question_ids(lm.tokenizer, question)
    )
    measured = bs.measure_text(lm, ctx, repeats=2)
    assert measured["tokens"] == ctx.length + ctx.question_ids.numel()
    assert measured["text_bytes"] == 4 * measured["tokens"] + 5
    assert measured["prefill_s"] > 0 and 1 <= len(measured["runs"]) <= 2
    answer = greedy_answer(lm.model, lm.tokenizer, prefill(lm.model, ctx.context_ids).kv, ctx.question_ids, 1)
    assert measured["token"] == answer.token_ids[0]
    # Over a link: the token ids at its rate, then the measured re-prefill.
    cell = bs.text_cell(measured, 1e9, 20e9)
    assert cell["timings"]["transfer_s"] == pytest.approx(8 * measured["text_bytes"] / 1e9)
    assert cell["ttft_s"] == pytest.approx(cell["timings"]["transfer_s"] + measured["prefill_s"])
    assert cell["transfer_computed"]


# --- end to end ----------------------------------------------------------------------------------------------
RATE = 8e6  # slow enough that the link, not the machine, sets the transfer time of a ~0.4 MB message


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("scale")
    argv = ["--model", TINY, "--tokens", "1500", "--links", "unpaced,8M", "--methods", "text,fp16,q2c50-int4",
            "--device", "cpu", "--out", str(out), "--ceiling-bytes", str(16 << 20), "--cell-timeout", "120"]  # fmt: skip
    before = signal.getsignal(signal.SIGTERM)
    assert bs.main(argv) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # its own SIGTERM handler does not outlive the run
    return out, json.loads((out / "results.json").read_text())


def test_scale_writes_every_cell_with_its_stages(scale_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = scale_run
    assert {"meta", "links", "contexts", "cells", "summary", "crossovers", "note"} <= set(result)
    assert result["note"] == bs.RANDOM_NOTE
    cells = {(c["method"], c["link"]): c for c in result["cells"]}
    assert set(cells) == {(m, link) for m in ("text", "fp16", "q2c50-int4") for link in ("unpaced", "8M")}
    for (name, _), c in cells.items():
        assert c["note"] == bs.RANDOM_NOTE and "error" not in c, c
        assert c["model"] == "random:tiny-llama:layers=2:seed=0" and c["tokens"] == 1500
        assert c["context_tokens"] > 1500  # the prompt template's tokens come on top
        assert c["ttft_s"] > 0
        if name == "text":
            assert c["transfer_computed"]
            continue
        t = c["timings"]
        for stage in ("plan_s", "select_s", "quantize_s", "pack_s", "transfer_s", "receive_s", "decode_s",
                      "first_token_s", "ask_s"):  # fmt: skip
            assert stage in t, (name, stage)
        assert c["ttft_s"] == pytest.approx(t["plan_s"] + t["pack_s"] + t["transfer_s"] + t["ask_s"])
        assert c["encode_gbps"] > 0 and c["wire_gbps"] > 0
        assert c["receiver"]["host_peak_bytes"] is not None  # from the receiver's REST memory figures
    fp16, q2c = cells[("fp16", "unpaced")], cells[("q2c50-int4", "unpaced")]
    assert fp16["fraction"] > 1.0 and fp16["config"] == "fp16"  # the framing puts it just over FP16
    assert 0.12 < q2c["fraction"] < 0.25 and q2c["kept_tokens"] == math.ceil(0.5 * q2c["context_tokens"])
    contexts = {c["key"].split("|")[2]: c for c in result["contexts"]}
    assert contexts["text"]["text"]["prefill_s"] > 0 and contexts["sender"]["sender"]["prefill_s"] > 0
    links = result["links"]
    assert links["tcp_direct_bps"] > 0 and links["tcp_proxy_unpaced_bps"] > 0
    md = (out / "results.md").read_text()
    assert bs.RANDOM_NOTE in md and "Crossover" in md and "q2c50-int4" in md
    assert (out / "ttft.png").stat().st_size > 1000


def test_scale_paced_transfer_takes_bytes_over_rate(scale_run: tuple[Path, dict[str, Any]]) -> None:
    """Through the proxy at 8 Mbit/s the message takes its bytes at that rate (less the one burst the
    bucket lets through at once), from the receiver's first frame to its last and at the sender."""
    _, result = scale_run
    burst = read_size(RATE)
    for name in ("fp16", "q2c50-int4"):
        c = next(c for c in result["cells"] if (c["method"], c["link"]) == (name, "8M"))
        expected, least = 8 * c["wire_bytes"] / RATE, 8 * (c["wire_bytes"] - burst) / RATE
        assert least * 0.8 <= c["timings"]["receive_s"] <= expected * 1.25 + 0.05, (name, expected)
        assert c["timings"]["transfer_s"] >= least * 0.8, (
            name,
            least,
        )  # the sender counts from its first write
    unpaced = next(c for c in result["cells"] if (c["method"], c["link"]) == ("fp16", "unpaced"))
    assert unpaced["timings"]["receive_s"] < 0.5 * 8 * unpaced["wire_bytes"] / RATE


def test_scale_resume_measures_nothing_again(scale_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = scale_run
    lines = (out / "cells.jsonl").read_text().splitlines()
    argv = ["--model", TINY, "--tokens", "1500", "--links", "unpaced,8M", "--methods", "text,fp16,q2c50-int4",
            "--device", "cpu", "--out", str(out), "--resume"]  # fmt: skip
    started = time.perf_counter()
    assert bs.main(argv) == 0
    assert (out / "cells.jsonl").read_text().splitlines() == lines
    assert time.perf_counter() - started < 60  # no receiver, no transfer
    again = json.loads((out / "results.json").read_text())
    assert len(again["cells"]) == len(result["cells"])


def test_scale_extrapolates_slow_paced_cells(tmp_path: Path) -> None:
    unpaced = {"wire_bytes": 1_000_000, "ttft_s": 0.5, "wall_s": 0.6,
               "timings": {"plan_s": 0.1, "pack_s": 0.05, "transfer_s": 0.3, "receive_s": 0.2, "ask_s": 0.05}}  # fmt: skip
    row = bs.extrapolated_cell(unpaced, 1e6)
    assert row["extrapolated"] and row["timings"]["receive_s"] == pytest.approx(8.0)
    assert row["timings"]["transfer_s"] == pytest.approx(8.1)  # + the 0.1 s after the last frame
    assert row["ttft_s"] == pytest.approx(0.1 + 0.05 + 8.1 + 0.05)
    assert unpaced["timings"]["receive_s"] == 0.2  # the twin is left as it was


def test_memory_plan_skips_what_cannot_fit() -> None:
    from kvlink.geometries import parse

    spec = parse("random:qwen2.5-32b")
    config = spec.config(type("T", (), {"__len__": lambda self: 49152, "bos_token_id": 1, "eos_token_id": 2,
                                        "pad_token_id": None})())  # fmt: skip
    weights = 2 * spec.arch.param_count(49152)
    h200 = 139 * bs.GIB
    fits = bs.prefill_peak_bytes(weights, config, bs.kv_bytes(spec.geometry, 32768), 32768)
    too_big = bs.prefill_peak_bytes(weights, config, bs.kv_bytes(spec.geometry, 131072), 131072)
    assert fits < 0.92 * h200 < too_big


def test_cli_lists_and_dispatches_scale(capsys: pytest.CaptureFixture[str]) -> None:
    from kvlink.eval import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "scale" in capsys.readouterr().out
    assert cli.main(["scale", "--links", "warp9"]) == 2
    assert "warp9" in capsys.readouterr().err


def test_receiver_memory_figures() -> None:
    """The receiver's memory figures: REST /v1/stats shows them to an operator, POST .../memory/reset
    starts new peaks (operators only)."""
    from fastapi.testclient import TestClient

    from kvlink.metrics import MetricsRegistry
    from kvlink.models import load_model
    from kvlink.server.guard import Guard, Identity
    from kvlink.server.rest import create_app
    from kvlink.server.service import KVLinkService
    from kvlink.server.store import SessionStore

    tenants = {"op-token": Identity("ops", operator=True), "alice-token": Identity("alice")}
    service = KVLinkService(load_model(TINY), SessionStore(), MetricsRegistry(), guard=Guard(tenants=tenants))
    figures = service.memory_stats()
    assert figures["device"] is None  # a CPU receiver
    assert (
        figures["host"]["rss_bytes"] > 0 and figures["host"]["peak_rss_bytes"] >= figures["host"]["rss_bytes"]
    )
    blob = bytearray(64 << 20)  # the peak rises ...
    blob[::4096] = b"x" * len(blob[::4096])
    assert service.memory_stats()["host"]["peak_rss_bytes"] >= figures["host"]["rss_bytes"] + (48 << 20)
    del blob
    client = TestClient(create_app(service))
    ops, alice = {"Authorization": "Bearer op-token"}, {"Authorization": "Bearer alice-token"}
    after = client.post("/v1/stats/memory/reset", headers=ops).json()["host"]  # ... and a reset starts anew
    assert after["peak_rss_bytes"] < after["rss_bytes"] + (32 << 20)
    assert client.get("/v1/stats", headers=ops).json()["memory"]["host"]["rss_bytes"] > 0
    assert "memory" not in client.get("/v1/stats", headers=alice).json()
    assert client.post("/v1/stats/memory/reset", headers=alice).status_code == 403
