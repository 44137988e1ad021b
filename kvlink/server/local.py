"""A kvlink-serve subprocess on free loopback ports, for the demo and the load benchmark; and a
throwaway Redis for a fleet of them.

    with LocalReceiver(["--max-new-tokens", "8"]) as rx:
        ...                      # load the sender's model meanwhile
        rx.wait_healthy()
        send_context(rx.target, ...)
    rx.returncode                # 0 after a graceful SIGTERM shutdown

    with LocalRedis() as store:  # redis-server (or valkey-server) on a free loopback port
        store.wait_ready()       # "redis 7.0.15"
        store.url()              # redis://:PASSWORD@127.0.0.1:PORT/0, for kvlink-serve --store-url-file

The receiver starts when the object is made, so the caller can do other work
while it loads; leaving the `with` block stops it (SIGTERM, then kill after
`stop_timeout` seconds). Its log goes to `log`, or to a temporary file that is
removed at stop unless `keep_log`. The Redis keeps nothing on disk, binds
127.0.0.1 only and requires a random password, which reaches it on its standard
input, never on its command line (hand url() to receivers in a file).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
"""The folder that holds the kvlink package (the repository, or site-packages): the receiver's working
directory, so that `python -m kvlink.server.main` finds this very package (never kvlink/ itself, whose
subpackages would shadow the standard library's: kvlink/select)."""


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM `proc` if it still runs, wait up to `timeout` s (then kill it); its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalReceiver:
    """kvlink-serve with `args` (beyond --port/--rest-port) in a subprocess; see the module docstring.
    env: variables added to this process's environment for it (OMP_NUM_THREADS=1: its CPU threads)."""

    def __init__(
        self,
        args: Sequence[str] = (),
        log: Path | None = None,
        keep_log: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port, self.rest_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.rest = f"http://127.0.0.1:{self.rest_port}"
        if log is None:
            fd, name = tempfile.mkstemp(prefix="kvlink-serve-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log, self.keep_log = log, keep_log
        cmd = [sys.executable, "-m", "kvlink.server.main", "--port", str(self.port), "--rest-port", str(self.rest_port),
               *args]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
            )
        self.returncode: int | None = None

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Return once GET /healthz answers 200; RuntimeError (with the log's tail) if it exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the receiver exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.rest}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the receiver was not healthy after {timeout:.0f} s; log: {self.log}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait up to `timeout` s (then kill); the exit status, also kept in `returncode`."""
        self.returncode = terminate(self.proc, timeout)
        if not self.keep_log:
            self.log.unlink(missing_ok=True)
        return self.returncode

    def __enter__(self) -> LocalReceiver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalRedis:
    """redis-server, or valkey-server, on a free 127.0.0.1 port with a random password and no persistence,
    in a temporary folder removed at stop (see the module docstring). RuntimeError when neither is on PATH
    (`make redis-server` installs Debian's)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise RuntimeError("no redis-server or valkey-server on PATH: `make redis-server` installs one")
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="kvlink-redis-"))
        cmd = [binary, "-", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"requirepass {self.password}\n".encode())
        self.proc.stdin.close()

    def url(self, db: int = 0) -> str:
        """redis://:PASSWORD@127.0.0.1:PORT/DB (it holds the password: hand it over in a file)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def wait_ready(self, timeout: float = 30.0) -> str:
        """The server's name and version once it answers (RuntimeError with its log if it exits or times out)."""
        from kvlink.server.shared import SharedStore, StoreUnavailable

        store = SharedStore.from_url(self.url())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                return store.ping()
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer within {timeout:.0f} s:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        terminate(self.proc, timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
