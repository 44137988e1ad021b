"""Debian's chromium, headless, for the dashboard's tests (tests/test_dashboard.py; `make chromium` installs it).

    html = dump_dom(url, profile)              # the DOM once the page's timers and fetches have run
    with Browser(profile) as browser:          # the DevTools protocol over a pipe: wait for content
        page = browser.open(url)
        page.wait_for("document.querySelectorAll('tr.message').length >= 2")

Both run `chromium --headless=new --no-sandbox --disable-gpu` with a profile folder of their own. The
protocol travels over --remote-debugging-pipe (the browser reads commands from its fd 3 and writes
replies and events to its fd 4, each a JSON object ending in NUL), so no port and no websocket library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--metrics-recording-only", "--mute-audio")  # fmt: skip


def chromium() -> str | None:
    """The chromium executable on PATH (Debian's package names it chromium), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, profile: Path, budget_ms: int = 6000, timeout: float = 90.0) -> str:
    """The serialized DOM of `url` after `budget_ms` of virtual time (timers run, fetches complete)."""
    exe = chromium()
    assert exe is not None, "no chromium on PATH: make chromium"
    out = subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def screenshot(url: str, path: Path, profile: Path, size: str = "1280,900", budget_ms: int = 6000) -> None:
    """A PNG of `url` at `size` (width,height) after `budget_ms` of virtual time."""
    exe = chromium()
    assert exe is not None, "no chromium on PATH: make chromium"
    out = subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--hide-scrollbars",
         f"--window-size={size}", f"--screenshot={path}", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and path.is_file(), out.stderr[-3000:]


SHIM = """
import os, sys
commands, replies = int(sys.argv[1]), int(sys.argv[2])
os.dup2(commands, 3)
os.dup2(replies, 4)
os.close(commands)
os.close(replies)
os.execv(sys.argv[3], sys.argv[3:])
"""
"""Runs as `python -c SHIM COMMANDS_FD REPLIES_FD CHROMIUM ARGS...` (both fds above 4)."""


def _above_4(fd: int) -> int:
    """`fd`, or a copy of it numbered 10 or more when it is 3 or 4 (the original is closed)."""
    if fd > 4:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


WATCH = """
window.__problems = [];
window.addEventListener("error", (e) => window.__problems.push("error: " + e.message));
window.addEventListener("unhandledrejection", (e) => window.__problems.push("rejection: " + e.reason));
document.addEventListener("securitypolicyviolation", (e) =>
  window.__problems.push("CSP: " + e.violatedDirective + " " + e.blockedURI));
"""
"""Run before each page's own scripts (the debugger's, so the page's policy does not apply to it)."""


class Page:
    """One tab, attached with a flat session: evaluate JavaScript in it, wait for a condition."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str) -> Any:
        """The value of `expression` (awaited when it is a promise); AssertionError if it throws."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        reply = self.browser.call("Runtime.evaluate", params, self.session)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate `expression` every 0.1 s until it is truthy; its value, or AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"not true after {timeout} s: {expression}\npage text:\n{body}")
            time.sleep(0.1)

    def navigate(self, url: str) -> None:
        self.browser.call("Page.navigate", {"url": url}, self.session)

    def problems(self) -> list[str]:
        """Uncaught errors, rejected promises and Content-Security-Policy violations since the page loaded."""
        return list(self.evaluate("window.__problems || ['the watch script did not run']"))


class Browser:
    """A headless chromium driven over the DevTools protocol on a pipe; a context manager that closes it."""

    def __init__(self, profile: Path) -> None:
        exe = chromium()
        assert exe is not None, "no chromium on PATH: make chromium"
        commands_r, self._commands = os.pipe()  # we write commands, the browser reads them on its fd 3
        self._replies, replies_w = os.pipe()  # the browser writes on its fd 4, we read
        # Above 4, so that putting one on fd 3 or 4 never overwrites the other.
        commands_r, replies_w = _above_4(commands_r), _above_4(replies_w)
        # A Python shim puts the two pipe ends on the fds the protocol expects, then becomes chromium
        # (not a shell: Debian's sh takes single-digit fds only, and pytest holds the low ones).
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SHIM, str(commands_r), str(replies_w), exe, *FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(commands_r, replies_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(commands_r)
        os.close(replies_w)
        self._next_id = 0
        self._buffer = b""

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                return dict(message.get("result", {}))

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._replies], [], [], max(left, 0))
            if not ready:
                raise AssertionError("chromium did not answer over the DevTools pipe in time")
            data = os.read(self._replies, 1 << 16)
            if not data:
                raise AssertionError(f"chromium closed the DevTools pipe (exit status {self.proc.poll()})")
            self._buffer += data
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    def open(self, url: str) -> Page:
        """A new tab on `url`, attached; its pages record what went wrong in Page.problems()."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH}, session)
        page = Page(self, session)
        page.navigate(url)
        return page

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._commands, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
