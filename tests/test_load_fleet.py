"""The load benchmark over a fleet (python -m kvlink.eval.bench_load --replicas 2): its mechanics, on a tiny
random model (CPU, about a minute).

The benchmark starts a real redis-server itself (kvlink.server.local.LocalRedis: a free loopback port, a
random password handed to the replicas by --store-url-file), two kvlink-serve replicas sharing it and one
receiver without a store as the baseline; 4 senders send 12 messages to each. random:tiny-qwen2's answers
differ from context to context, so an answer taken from another context would show. Asserted, in the
JSON it writes: nothing lost and every answer its own context's, in both runs; every Ask of the fleet
went to the replica that did not take the Transfer, and each replica ended holding every message (those
it received and those it fetched from the store, verified and decoded); the store counted each message
once; the comparison carries both runs' p50/p99 and their ratio.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvlink.eval import bench_load

MODEL = "random:tiny-qwen2"
SENDERS, MESSAGES, CONTEXTS, WARMUP = 4, 12, 4, 1


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
        pytest.fail("no redis-server or valkey-server on PATH: run `make redis-server`")
    out = tmp_path_factory.mktemp("load") / "fleet.json"
    argv = ["--model", MODEL, "--senders", str(SENDERS), "--messages", str(MESSAGES), "--contexts", str(CONTEXTS),
            "--replicas", "2", "--warmup", str(WARMUP), "--timeout", "120", "--out", str(out)]  # fmt: skip
    assert bench_load.main(argv) == 0
    return dict(json.loads(out.read_text()))


def test_a_fleet_of_two_loses_nothing_and_answers_each_from_its_own_context(result: dict[str, Any]) -> None:
    single, fleet = result["single"], result["fleet"]
    for run, replicas in ((single, 1), (fleet, 2)):
        assert run["replicas"] == replicas and run["model"] == MODEL
        assert (run["lost"], run["errors"], run["ok"]) == (0, {}, MESSAGES), run["errors"]
        assert run["answer_mismatches"] == 0
        assert run["distinct_answers"] == CONTEXTS, (
            "the contexts' own answers must differ for the check to bite"
        )
        assert run["latency_s"]["transfer"]["n"] == run["latency_s"]["ask"]["n"] == MESSAGES
    # Round robin: each replica took half the transfers and the asks about the other half.
    assert fleet["jobs_per_replica"] == {"transfers": [6, 6], "asks": [6, 6]}
    assert fleet["routing"] == bench_load.ROUTING
    assert single["jobs_per_replica"] == {"transfers": [MESSAGES], "asks": [MESSAGES]}


def test_each_replica_fetched_what_the_other_received(result: dict[str, Any]) -> None:
    fleet = result["fleet"]
    held = MESSAGES + WARMUP * 2  # the measured messages and the warm-up's, all of them on both replicas
    for replica in fleet["receiver"]["replicas"]:
        assert replica["store"]["messages"] == held and replica["store"]["evicted"] == 0, replica["store"]
        assert replica["errors"] == {}
    shared = fleet["receiver"]["fleet"]
    assert shared["messages"] == held and shared["held"]["messages"] == held  # stored once each
    store = result["store"]
    assert store["started_here"] is True and store["server"].split()[0] in ("redis", "valkey")
    assert store["url"].startswith("redis://127.0.0.1:") and "@" not in store["url"], (
        "no password in the JSON"
    )
    assert result["single"]["receiver"]["store"]["messages"] == MESSAGES + WARMUP


def test_the_comparison_carries_both_runs_and_their_ratios(result: dict[str, Any]) -> None:
    comparison = result["comparison"]
    assert comparison["lost"] == {"single": 0, "fleet": 0}
    assert comparison["answer_mismatches"] == {"single": 0, "fleet": 0}
    for kind in ("transfer", "ask", "total"):
        for q in ("p50", "p99"):
            figures = comparison["latency_s"][kind][q]
            assert figures["single"] == result["single"]["latency_s"][kind][q]
            assert figures["fleet"] == result["fleet"]["latency_s"][kind][q]
            assert figures["ratio"] == pytest.approx(figures["fleet"] / figures["single"])
    assert result["command"].startswith("python -m kvlink.eval.bench_load --model")


def test_a_fleet_without_a_redis_server_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, no valkey-server
    assert bench_load.main(["--replicas", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert "no redis-server or valkey-server on PATH" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert bench_load.main(["--replicas", "2", "--server", "127.0.0.1:1"]) == 2
    assert "a running fleet is --server, repeated" in capsys.readouterr().err
