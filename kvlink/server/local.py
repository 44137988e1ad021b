"""A kvlink-serve subprocess on free loopback ports, for the demo and the load benchmark.

    with LocalReceiver(["--max-new-tokens", "8"]) as rx:
        ...                      # load the sender's model meanwhile
        rx.wait_healthy()
        send_context(rx.target, ...)
    rx.returncode                # 0 after a graceful SIGTERM shutdown

The receiver starts when the object is made, so the caller can do other work
while it loads; leaving the `with` block stops it (SIGTERM, then kill after
`stop_timeout` seconds). Its log goes to `log`, or to a temporary file that is
removed at stop unless `keep_log`.
"""

from __future__ import annotations

import os
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = int(self.proc.returncode)
        if not self.keep_log:
            self.log.unlink(missing_ok=True)
        return self.returncode

    def __enter__(self) -> LocalReceiver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
