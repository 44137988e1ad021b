"""A paced TCP link on loopback for benchmarks: a proxy with one token bucket per direction.

    with LocalLink("127.0.0.1:50051", rate_bps=10e9) as link:  # a subprocess: python -m kvlink.eval.link
        send_context(link.target, ...)                         # gRPC's HTTP/2 bytes cross it both ways
    proxy = PacedProxy(("127.0.0.1", 50051), rate_bps=20e6).start()   # or threads in this process
    tcp_throughput(proxy.target, 256 << 20)                    # raw TCP bits/s through it

The proxy accepts connections on 127.0.0.1 and forwards each one to the
target, byte for byte, in both directions (it never parses what it carries).
Each direction of the link has its own token bucket of `rate_bps` (a full-duplex
link), shared by every connection through the proxy; the bucket holds one read
(the burst: rate x 2 ms, between 16 KiB and 1 MiB), so over any stretch longer
than a few reads the bytes leave at most at the rate, and an idle link banks no
more than one burst. Sockets are TCP_NODELAY both sides, so the proxy adds no
Nagle delay of its own. Unpaced (`rate_bps=None`) it forwards as fast as one
thread per direction can (`tcp_throughput` measures that ceiling).

Standard library only: the subprocess starts in a fraction of a second.

`kvlink-bench e2e` uses the simpler PacedSocketPair instead: one connected pair of
sockets in this process, paced on the sending side only, carrying gRPC-framed
messages one way (`framed_transfer`); no proxy, no server, no HTTP/2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

MIN_READ = 16 << 10
MAX_READ = 1 << 20
BURST_S = 0.002
"""Seconds of the link's rate one read (and the bucket) may hold."""


def parse_rate(text: str) -> float | None:
    """'1G', '25G', '100Mbit', '2.5e9' -> bits per second; 'unpaced' (or 'none', 'inf') -> None."""
    raw = text.strip().lower()
    if raw in ("unpaced", "none", "inf", "0"):
        return None
    raw = raw.removesuffix("bps").removesuffix("bit/s").removesuffix("bit")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(raw[-1:], 1.0)
    number = raw[:-1] if raw[-1:] in "kmg" else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"a link rate like 1G, 10G, 100M or 'unpaced', got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"a link rate must be positive, got {text!r}")
    return value


def rate_label(rate_bps: float | None) -> str:
    """10e9 -> '10G', 1.5e8 -> '150M', None -> 'unpaced'."""
    if rate_bps is None:
        return "unpaced"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:g}{unit}"
    return f"{rate_bps:g}"


def read_size(rate_bps: float | None) -> int:
    """Bytes one read of the proxy takes (and its bucket holds): BURST_S of the rate, clamped."""
    if rate_bps is None:
        return MAX_READ
    return int(min(MAX_READ, max(MIN_READ, rate_bps / 8 * BURST_S)))


class TokenBucket:
    """`rate` bytes per second with a bucket of `burst` bytes; thread-safe.

    take(n) lets n bytes pass: it takes them from the bucket, going into debt if
    needed, and sleeps until the debt is paid back. A debt, not a wait for
    enough tokens, so a sleep that overshoots is made up by the next takes.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of bytes per second, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1 byte, got {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.perf_counter()
        self._lock = threading.Lock()

    def set_rate(self, rate: float, burst: int | None = None) -> None:
        """Pace at `rate` bytes per second from now on, with a bucket of `burst` bytes (unchanged when
        None): a link whose rate changes mid-transfer. What the old bucket held beyond the new one is
        dropped, so the new rate holds at once."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of bytes per second, got {rate!r}")
        with self._lock:
            now = time.perf_counter()
            self.burst = burst or self.burst
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self.rate = rate

    def take(self, n: int) -> float:
        """Let `n` bytes pass (blocking); returns the seconds slept."""
        with self._lock:
            now = time.perf_counter()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate) - n
            self._stamp = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


class PacedProxy:
    """Forward TCP connections from a loopback port to `target`, each direction paced at `rate_bps`.

    start() binds (port 0: a free one, see `port`/`target`) and serves in daemon threads; close()
    stops accepting and closes every connection. bytes_up / bytes_down count what was forwarded
    (client to target, and back).
    """

    def __init__(self, target: tuple[str, int], rate_bps: float | None = None, port: int = 0) -> None:
        self.upstream = target
        self.rate_bps = rate_bps
        self.read = read_size(rate_bps)
        rate = None if rate_bps is None else rate_bps / 8
        self.up = None if rate is None else TokenBucket(rate, self.read)
        self.down = None if rate is None else TokenBucket(rate, self.read)
        self.bytes_up = 0
        self.bytes_down = 0
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def set_rate(self, rate_bps: float) -> None:
        """Pace both directions at `rate_bps` from now on (a proxy started paced)."""
        if self.up is None or self.down is None:
            raise ValueError("an unpaced proxy cannot change its rate: start it with one")
        self.rate_bps = rate_bps
        burst = min(self.read, read_size(rate_bps))  # the pumps keep reading up to self.read bytes
        self.up.set_rate(rate_bps / 8, burst)
        self.down.set_rate(rate_bps / 8, burst)

    @property
    def target(self) -> str:
        """Where clients connect: 127.0.0.1:<port>."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> PacedProxy:
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, self.up, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.down, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None, way: str) -> None:
        view = memoryview(bytearray(self.read))
        try:
            # At most a bucket's worth per read: after a rate change the data keeps flowing evenly.
            while (n := src.recv_into(view[: bucket.burst] if bucket is not None else view)) > 0:
                if bucket is not None:
                    bucket.take(n)
                dst.sendall(view[:n])
                if way == "up":
                    self.bytes_up += n
                else:
                    self.bytes_down += n
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on; the other direction ends it in turn

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> PacedProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalLink:
    """A PacedProxy in its own process (so that its threads never wait for the caller's GIL).

    The process prints its port and serves until stopped; leaving the `with` block stops it.
    """

    def __init__(self, target: str, rate_bps: float | None = None, startup_s: float = 30.0) -> None:
        self.rate_bps = rate_bps
        rate = "unpaced" if rate_bps is None else repr(float(rate_bps))
        cmd = [sys.executable, "-m", "kvlink.eval.link", "--target", target, "--rate", rate]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], startup_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            self.close()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"the link process did not start: {line!r} {err[-2000:]}")
        self.port = int(line.split()[1].rsplit(":", 1)[1])
        self.target = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> LocalLink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


LINK_MODES: tuple[str, ...] = ("process", "thread", "direct")


def tcp_throughput(
    nbytes: int = 256 << 20, rate_bps: float | None = None, mode: str = "process"
) -> dict[str, float]:
    """Raw TCP from one thread of this process to a sink thread of it: bytes, seconds, bits_per_s.

    mode "process": through a LocalLink of `rate_bps` (how the benchmark runs it); "thread": through a
    PacedProxy in this process; "direct": no link at all (the loopback's own ceiling). Seconds run
    from the first byte sent to the last one received.
    """
    if mode not in LINK_MODES:
        raise ValueError(f"mode must be one of {LINK_MODES}, got {mode!r}")
    sink = socket.create_server(("127.0.0.1", 0))
    sink_target = f"127.0.0.1:{sink.getsockname()[1]}"
    got = {"n": 0, "t": 0.0}

    def drain() -> None:
        conn, _ = sink.accept()
        view = memoryview(bytearray(MAX_READ))
        with conn:
            while (n := conn.recv_into(view)) > 0:
                got["n"] += n
        got["t"] = time.perf_counter()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    chunk = bytes(MAX_READ)
    with contextlib.ExitStack() as stack:
        dest = sink_target
        if mode == "process":
            dest = stack.enter_context(LocalLink(sink_target, rate_bps)).target
        elif mode == "thread":
            dest = stack.enter_context(PacedProxy(_split(sink_target), rate_bps)).target
        with socket.create_connection(_split(dest)) as out:
            out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sent = 0
            while sent < nbytes:
                n = min(len(chunk), nbytes - sent)
                out.sendall(chunk if n == len(chunk) else chunk[:n])
                sent += n
            out.shutdown(socket.SHUT_WR)
            reader.join(timeout=3600)
    sink.close()
    seconds = got["t"] - started
    return {"bytes": float(got["n"]), "seconds": seconds, "bits_per_s": 8 * got["n"] / seconds}


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host or "127.0.0.1", int(port)


# --- the paced socket pair of kvlink-bench e2e: in-process, one way ---------------------------------
GRPC_PREFIX = struct.Struct(">BI")  # gRPC message framing: compressed flag, big-endian length
PACE_CHUNK = 64 * 1024


def parse_bandwidth(text: str) -> float:
    """'100M', '1G', '10Gbit', '2.5e9' -> bits per second (kvlink-bench e2e's --bandwidth; unlike
    parse_rate, no 'unpaced', and a bad value raises argparse.ArgumentTypeError)."""
    raw = text.strip().lower().removesuffix("bps").removesuffix("bit/s").removesuffix("bit")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(raw[-1:], 1.0)
    number = raw[:-1] if raw[-1:] in "kmg" else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bandwidth like 100M, 1G or 10G, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"bandwidth must be positive, got {text!r}")
    return value


class PacedSocketPair:
    """A loopback TCP connection whose sender is paced by a token bucket at `bits_per_s`.

    `send(blobs)` (sender thread) writes the blobs back to back, never getting ahead of
    start + bytes_sent / rate; the receiver reads from `self.receiver`. The bucket holds
    one PACE_CHUNK (the burst): a 64 KiB chunk leaves when its last byte's time is due.
    """

    def __init__(self, bits_per_s: float) -> None:
        self.rate = bits_per_s / 8.0  # bytes per second
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.sender = socket.create_connection(server.getsockname())
        self.receiver, _ = server.accept()
        server.close()
        for s in (self.sender, self.receiver):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.started = 0.0
        self.sent = 0

    def send(self, blobs: Sequence[bytes]) -> None:
        self.started = time.perf_counter()
        sent = 0
        for blob in blobs:
            view = memoryview(blob)
            for start in range(0, len(view), PACE_CHUNK):
                piece = view[start : start + PACE_CHUNK]
                due = self.started + (sent + len(piece)) / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self.sender.sendall(piece)
                sent += len(piece)
        self.sent = sent

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.receiver.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError(f"link closed after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def framed_transfer(link: PacedSocketPair, blobs: Sequence[bytes], on_message: Any) -> float:
    """Send gRPC-framed `blobs` over `link` in a thread; the caller's thread reads each message and
    hands it to `on_message`. Returns the seconds from the first byte sent to the last one read."""
    framed = [GRPC_PREFIX.pack(0, len(b)) + b for b in blobs]
    thread = threading.Thread(target=link.send, args=(framed,), daemon=True)
    thread.start()
    for _ in framed:
        _flag, size = GRPC_PREFIX.unpack(link.recv_exact(GRPC_PREFIX.size))
        on_message(link.recv_exact(size))
    done = time.perf_counter()
    thread.join()
    return done - link.started


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvlink.eval.link", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="where connections are forwarded")
    p.add_argument("--rate", default="unpaced", help="bits per second each way: 10G, 100M, 2.5e9, unpaced")
    p.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: a free one)")
    args = p.parse_args(argv)
    try:
        rate = parse_rate(args.rate)
    except ValueError as exc:
        p.error(str(exc))
    proxy = PacedProxy(_split(args.target), rate, args.port).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening {proxy.target} -> {args.target} at {rate_label(rate)}", flush=True)
    stop.wait()
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
