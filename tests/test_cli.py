"""The commands as a user meets them (issue 20): what cannot work is refused in one line, with a specific
exit status, before any model loads; settings come from flags, KVLINK_* variables and a config file;
sizes take units; help shows true defaults; --json errors are JSON; the loading bar obeys the log level.

kvlink-send runs in process (its model loader replaced by one that fails the test if called); kvlink-serve
runs as a subprocess (its log must show that no model was loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import kvlink.client.ask as client_ask
import kvlink.client.main as client_main
from kvlink import cli
from kvlink.server.main import build_parser as serve_parser
from netutil import free_port

REPO = Path(__file__).resolve().parent.parent


# --- kvlink.cli ------------------------------------------------------------------------------------------------
def test_sizes_take_units() -> None:
    for text, n in (("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1.5gib", 3 << 29), ("64k", 64 << 10),
                    ("1_000_000", 1_000_000), ("2GB", 2 * 10**9), ("16 MiB", 16 << 20), ("7", 7)):  # fmt: skip
        assert cli.parse_size(text) == n, text
    for bad in ("lots", "0", "-1", "1.5", "4XB", "", "GiB"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            cli.parse_size(bad)
    assert [cli.format_size(n) for n in (2 << 30, 512 << 20, 3 << 29, 1000, 2 * 10**9)] == [
        "2GiB", "512MiB", "1.5GiB", "1000", "2000000000",
    ]  # fmt: skip


def test_server_addresses_need_a_port() -> None:
    assert cli.host_port("rx.example:50051") == "rx.example:50051"
    assert cli.host_port("[::1]:50051") == "[::1]:50051" and cli.host_port("unix:/tmp/s") == "unix:/tmp/s"
    for bad, needle in (
        ("rx.example", "has no port: give HOST:PORT, e.g. rx.example:50051"),
        ("::1", "e.g. [::1]:50051"),
        ("[::1]", "has no port"),
        ("rx:http", "the port must be a number"),
        (":50051", "has no host"),
    ):
        with pytest.raises(
            ValueError, match=needle.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
        ):
            cli.host_port(bad)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", formatter_class=cli.HelpFormatter)
    p.add_argument("--config")
    p.add_argument("--port", type=int, default=1)
    p.add_argument("--cache", type=cli.parse_size, default=2 << 30, help="bytes")
    p.add_argument("--level", choices=("a", "b"), default="a")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--name", action="append", default=[])
    p.add_argument("--model", default=None, help="which")
    return p


def test_settings_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config = tmp_path / "kvlink.toml"
    config.write_text('port = 3\ncache = "512MiB"\nlevel = "b"\nfast = true\nname = ["x", "y"]\n')
    env = {
        "KVLINK_PORT": "4",
        "KVLINK_CACHE": "1GiB",
    }  # (KVLINK_CACHE: the flag wins over the cache dir's name)
    args = cli.parse_with_settings(_parser(), ["--config", str(config), "--port", "5"], environ=env)
    assert (args.port, args.cache, args.level, args.fast, args.name) == (5, 1 << 30, "b", True, ["x", "y"])
    args = cli.parse_with_settings(_parser(), ["--config", str(config)], environ=env)
    assert args.port == 4
    args = cli.parse_with_settings(_parser(), [], environ={"KVLINK_CONFIG": str(config)})
    assert (args.port, args.cache) == (3, 512 << 20)
    args = cli.parse_with_settings(_parser(), [], environ={"KVLINK_FAST": "no", "KVLINK_NAME": "p,q"})
    assert (args.port, args.cache, args.fast, args.name) == (1, 2 << 30, False, ["p", "q"])


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        (
            "porter = 3\n",
            {},
            "unknown setting 'porter'; the settings are: cache, fast, level, model, name, port",
        ),
        ("port = [1, 2]\n", {}, "expected one value"),
        ("", {"KVLINK_CACHE": "lots"}, "$KVLINK_CACHE: expected a size like 4GiB"),
        ("", {"KVLINK_LEVEL": "c"}, "$KVLINK_LEVEL: invalid choice 'c'"),
        ("", {"KVLINK_FAST": "maybe"}, "$KVLINK_FAST: expected true or false"),
        ("port = \n", {}, "is not valid TOML"),
    ],
)
def test_bad_settings_are_refused_naming_their_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, env: dict[str, str], needle: str
) -> None:
    config = tmp_path / "kvlink.toml"
    config.write_text(text)
    with pytest.raises(SystemExit) as info:
        cli.parse_with_settings(_parser(), ["--config", str(config)], environ=env)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_every_kvlink_serve_flag_is_a_setting(tmp_path: Path) -> None:
    """Each flag of kvlink-serve, from the environment and from the file; sizes with units."""
    config = tmp_path / "serve.toml"
    config.write_text(
        'max-cached-bytes = "4GiB"\nmax_message_bytes = "64MiB"\nport = 6000\nlog-level = "debug"\n'
    )
    env = {"KVLINK_PORT": "6001", "KVLINK_MAX_BUFFERED_BYTES": "1GiB", "KVLINK_OPERATOR": "ops,root"}
    args = cli.parse_with_settings(serve_parser(), ["--config", str(config), "--rest-port", "9"], environ=env)
    assert (args.max_cached_bytes, args.max_message_bytes, args.max_buffered_bytes) == (
        4 << 30,
        64 << 20,
        1 << 30,
    )
    assert (args.port, args.rest_port, args.log_level, args.operator) == (6001, 9, "debug", ["ops", "root"])
    parser = serve_parser()
    checked = 0
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag in (None, "--help", "--config"):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            text, want = "true", True
        elif action.type is cli.parse_size:
            text, want = "3MiB", 3 << 20
        elif action.choices:
            text = want = list(action.choices)[-1]
        elif isinstance(action, argparse._AppendAction):
            text, want = "a,b", ["a", "b"]
        elif action.type is not None:
            text, want = "7", action.type("7")
        else:
            text = want = "somewhere"
        from_env = cli.parse_with_settings(serve_parser(), [], environ={cli.env_name(flag): text})
        assert getattr(from_env, action.dest) == want, flag
        config.write_text(f"{flag[2:]} = {json.dumps(want)}\n")
        from_file = cli.parse_with_settings(serve_parser(), ["--config", str(config)], environ={})
        assert getattr(from_file, action.dest) == want, flag
        checked += 1
    assert checked >= 25


def test_help_shows_true_defaults_without_noise() -> None:
    for module, wanted in (
        (
            "kvlink.server.main",
            [
                "auto (the default): 70%",
                "auto (the default): the smaller",
                "--config FILE",
                "KVLINK_MAX_CACHED_BYTES",
            ],
        ),
        (
            "kvlink.client.main",
            ["(default: 120.0)", "--temperature", "--top-p", "--stop TEXT", "--keep, --no-keep"],
        ),
        ("kvlink.client.ask", ["--message ID", "--session SID", "--release"]),
    ):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())
        assert (
            "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
        )
        assert "(default: )" not in text, module
        for needle in wanted:
            assert needle in text, (module, needle)


def test_json_errors_are_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    for main, argv in ((client_ask.main, ["--server", "127.0.0.1:1", "--json"]),
                       (client_main.main, ["--json", "--server", "x:1"])):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        out, err = capsys.readouterr()
        error = json.loads(out)["error"]
        assert error["exit_status"] == 2 and "the following arguments are required" in error["message"]
        assert err == ""


def test_the_loading_bar_obeys_the_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    root = logging.getLogger().level
    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        cli.configure_logging("info")
        assert hf_logging.is_progress_bar_enabled()
        cli.configure_logging("warning")
        assert not hf_logging.is_progress_bar_enabled()
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
        cli.configure_logging("debug")
        assert not hf_logging.is_progress_bar_enabled()  # not a terminal: no bar to draw
    finally:
        logging.getLogger().setLevel(root)
        hf_logging.enable_progress_bar()


def test_kvlink_send_shows_no_loading_bar_at_its_default_level(tmp_path: Path) -> None:
    """The model loads (the receiver is faked reachable) and nothing about "Loading weights" reaches stderr."""
    script = tmp_path / "run.py"
    script.write_text(
        "import kvlink.client.sender, kvlink.client.main, sys\n"
        "async def ok(*a, **k): pass\n"
        "kvlink.client.sender.probe = ok\n"
        "def stop(*a, **k): raise SystemExit(7)\n"
        "kvlink.client.sender.send_context = stop\n"
        "sys.exit(kvlink.client.main.main(sys.argv[1:]))\n"
    )
    context = tmp_path / "c.txt"
    context.write_text("Normandy is in France.")
    proc = subprocess.run(
        [sys.executable, str(script), "--server", "127.0.0.1:1", "--budget", "50%", "--context", str(context),
         "--question", "Where?"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    assert "Loading weights" not in proc.stderr and "%|" not in proc.stderr, proc.stderr


# --- kvlink-send: refusals before any model load -----------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """kvlink-send's model loader fails the test if called; a fake reachable receiver (the probe passes)."""
    calls: list[Any] = []

    def load(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError("the model was loaded")

    async def reachable(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr("kvlink.models.load_model", load)
    monkeypatch.setattr("kvlink.client.sender.probe", reachable)
    yield calls
    assert calls == [], "no model may be loaded before a refusal"


def _send(tmp_path: Path, *extra: str, context: bytes | str = "Normandy is a region in France.") -> list[str]:
    """kvlink-send's arguments: a context file and the usual flags, `extra` (flag, value) pairs replacing them."""
    path = tmp_path / "context.txt"
    if isinstance(context, bytes):
        path.write_bytes(context)
    else:
        path.write_text(context)
    flags = {
        "--server": "127.0.0.1:50051",
        "--budget": "18.75%",
        "--context": str(path),
        "--question": "Where?",
    }
    flags.update(zip(extra[::2], extra[1::2], strict=True))
    return [x for pair in flags.items() for x in pair]


@pytest.mark.parametrize(
    ("extra", "context", "needle"),
    [
        (("--budget", "18.75"), None, "--budget 18.75: a bare number is a fraction in (0, 1]; did you mean 18.75%?"),
        (("--server", "rx.example"), None, "--server 'rx.example' has no port: give HOST:PORT, e.g. rx.example:50051"),
        ((), b"PK\x03\x04\x00\x00binary", "the context file {path} is binary (a NUL byte at offset 4), not text"),
        ((), b"caf\xe9 au lait", "the context file {path} is not UTF-8 text (byte 0xe9 at offset 3)"),
        (("--model", "/no/such/model"), None, "model path '/no/such/model' does not exist"),
        (("--model", "kvlink-tests/no-such-model"), None, "model 'kvlink-tests/no-such-model' is not in the local "
         "Hugging Face cache"),
        (("--temperature", "-1"), None, "--temperature must be in [0, 100]"),
        (("--top-p", "0.5"), None, "--top-p 0.5 needs sampling"),
        (("--stop", ""), None, "a stop string must be non-empty text"),
    ],
)  # fmt: skip
def test_kvlink_send_refuses_before_loading(
    tmp_path: Path, no_model: list[Any], capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...], context: bytes | None, needle: str,
) -> None:  # fmt: skip
    argv = _send(tmp_path, *extra, **({} if context is None else {"context": context}))
    started = time.perf_counter()
    assert client_main.main(argv) == 2
    out, err = capsys.readouterr()
    path = repr(str(tmp_path / "context.txt"))
    assert err.strip() == f"kvlink-send: error: {needle.format(path=path)}" or (
        err.startswith("kvlink-send: error: ") and needle.format(path=path) in err
    )
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert time.perf_counter() - started < 30  # an unknown HF id fails at once, never retries a download
    assert client_main.main([*argv, "--json"]) == 2  # the same refusal as JSON on stdout
    error = json.loads(capsys.readouterr().out)["error"]
    assert needle.format(path=path) in error["message"] and error["exit_status"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_kvlink_send_refuses_cuda_without_cuda(
    tmp_path: Path, no_model: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert client_main.main([*_send(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlink-send: error: --device 'cuda': CUDA is not available on this machine")
    assert len(err.strip().splitlines()) == 1


def test_kvlink_send_checks_the_receiver_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kvlink.models.load_model", load)
    monkeypatch.setattr("kvlink.models.load_tokenizer", load)
    port = free_port()  # nothing listens there
    assert client_main.main(_send(tmp_path, "--server", f"127.0.0.1:{port}")) == 1
    err = capsys.readouterr().err
    assert f"kvlink-send: error: cannot reach the receiver at 127.0.0.1:{port}" in err
    assert "nothing was loaded or sent" in err and len(err.strip().splitlines()) == 1


def test_kvlink_send_refuses_a_context_longer_than_the_model(
    tmp_path: Path, no_model: list[Any], embedded: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the tokenizer loads: the numbers, and --truncate as the way out; with --truncate it goes on
    (to the model load, which the fixture stops)."""
    long = "The cat sat on the mat. " * 1500  # ~10.5k tokens; the embedded model has 8,192 positions
    argv = _send(tmp_path, context=long)
    assert client_main.main(argv) == 2
    err = capsys.readouterr().err
    assert "the context has 10,5" in err and "and the model has 8,192 (max_position_embeddings)" in err
    assert "pass --truncate to send its first 8,1" in err and len(err.strip().splitlines()) == 1
    assert client_main.main([*argv, "--truncate"]) == 1  # past the check: the (refused) model load
    assert "the model was loaded" in capsys.readouterr().err
    no_model.clear()


def test_kvlink_ask_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--server", "127.0.0.1:1", "--message", "m"]
    for argv, needle in (
        ([*base[:1], "rx.example", *base[2:], "Why?"], "has no port"),
        ([*base, "   "], "the question is empty"),
        (base, "give a question, or --release to free the context"),
        ([*base, "--temperature", "0", "--top-p", "0.3", "Why?"], "--top-p 0.3 needs sampling"),
    ):
        assert client_ask.main(argv) == 2
        assert needle in capsys.readouterr().err
    assert client_ask.main([*base, "Why?"]) == 1  # nobody listens: UNAVAILABLE
    assert "UNAVAILABLE" in capsys.readouterr().err


# --- kvlink-serve: refusals before any model load ------------------------------------------------------------------
def _serve(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvlink.server.main", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _refused_early(proc: subprocess.CompletedProcess[str], status: int, needle: str) -> None:
    assert proc.returncode == status, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "kvlink-serve" in line and "error" in line]
    assert lines and needle in lines[-1], proc.stderr
    assert "loading model" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@contextlib.contextmanager
def _listening(reuseport: bool = False) -> Iterator[int]:
    """A port something listens on: a plain socket, or a grpc server (which binds with SO_REUSEPORT)."""
    if reuseport:
        server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield port
        finally:
            server.stop(None)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("reuseport", [False, True], ids=["socket", "grpc-server"])
def test_kvlink_serve_refuses_a_grpc_port_in_use(reuseport: bool) -> None:
    """Also against a grpc server, which binds with SO_REUSEPORT: a second receiver must not share its port."""
    with _listening(reuseport) as port:
        proc = _serve("--port", str(port), "--rest-port", str(free_port()))
    _refused_early(proc, 1, f"--port {port}: 127.0.0.1:{port} is in use")


def test_kvlink_serve_refuses_a_rest_port_in_use() -> None:
    with _listening() as port:
        proc = _serve("--port", str(free_port()), "--rest-port", str(port))
    _refused_early(proc, 1, f"--rest-port {port}: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--model", "/no/such/model"), "model path '/no/such/model' does not exist"),
        (("--model", "kvlink-tests/no-such-model"), "is not in the local Hugging Face cache"),
        (("--device", "tpu"), "--device 'tpu' is not a device"),
        *(
            []
            if torch.cuda.is_available()
            else [(("--device", "cuda"), "CUDA is not available on this machine")]
        ),
    ],
)
def test_kvlink_serve_refuses_a_model_or_device_it_cannot_have(argv: tuple[str, ...], needle: str) -> None:
    started = time.perf_counter()
    proc = _serve(*argv, "--port", str(free_port()), "--rest-port", str(free_port()))
    _refused_early(proc, 2, needle)
    assert len(proc.stderr.strip().splitlines()) == 1 and time.perf_counter() - started < 60


def test_kvlink_serve_settings_errors_name_their_source(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('max-cached-bytes = "lots"\n')
    proc = _serve("--config", str(config))
    assert proc.returncode == 2 and "max-cached-bytes: expected a size like 4GiB" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "kvlink.server.main"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "KVLINK_MAX_MESSAGE_BYTES": "0"},
    )  # fmt: skip
    assert (
        proc.returncode == 2 and "$KVLINK_MAX_MESSAGE_BYTES: expected a positive whole number" in proc.stderr
    )


def test_probe_port_then_exclusive_bind() -> None:
    """The receiver's own grpc port is exclusive: a plain grpc server cannot share it once it is taken."""
    from kvlink.server.main import GRPC_SERVER_OPTIONS

    async def run() -> None:
        mine = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        port = mine.add_insecure_port("127.0.0.1:0")
        await mine.start()
        try:
            other = grpc.aio.server()
            with pytest.raises(RuntimeError, match="Failed to bind"):
                other.add_insecure_port(f"127.0.0.1:{port}")
        finally:
            await mine.stop(None)

    asyncio.run(run())
