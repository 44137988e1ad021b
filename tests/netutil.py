"""Loopback plumbing shared by the fault, load and security tests: a kvlink-serve subprocess, a TCP proxy
that injects faults (bit flips, a cut connection, another source address), a raw Transfer (frames as
given) with the receiver's refusal read back, and a throwaway PKI made with `cryptography` at test time.
Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from kvlink import wire
from kvlink.server.local import free_port as free_port  # re-exported for the tests

REPO = Path(__file__).resolve().parent.parent


# --- the receiver process ----------------------------------------------------------------------------------
@dataclass
class Receiver:
    """A kvlink-serve subprocess. headers: what REST calls need (the bearer token, when there is one)."""

    args: list[str]
    log: Path
    port: int
    rest_port: int
    headers: dict[str, str] = field(default_factory=dict)
    health_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start (or start again, same ports and flags); the log is appended to."""
        cmd = [sys.executable, "-m", "kvlink.server.main", "--port", str(self.port), "--rest-port", str(self.rest_port),
               *self.args]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"kvlink-serve exited with {self.returncode()}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.rest}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise AssertionError(f"kvlink-serve not healthy after {timeout} s:\n{self.log_tail()}")

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit status (kill -9 after `timeout`, which fails the caller's check)."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def stats(self) -> dict[str, Any]:
        reply = httpx.get(f"{self.rest}/v1/stats", headers=self.headers, timeout=10)
        reply.raise_for_status()
        return dict(reply.json())


@contextlib.contextmanager
def serving(receiver: Receiver, request: Any) -> Iterator[Receiver]:
    """Start `receiver`, wait until healthy (the sender's embedded model loads meanwhile), and stop it
    with SIGTERM at the end, which must exit 0 after a graceful shutdown."""
    receiver.start()
    try:
        request.getfixturevalue("embedded")  # the sender's copy loads while the receiver loads its own
        receiver.wait_ready()
        yield receiver
    finally:
        rc = receiver.stop()
        assert rc == 0, f"kvlink-serve exited with {rc}:\n{receiver.log_tail()}"
        assert "kvlink-serve stopped" in receiver.log_text(), receiver.log_tail()


async def settle(rx: Receiver, timeout: float = 15.0) -> dict[str, Any]:
    """/v1/stats once no call is in progress and no transfer holds chunk data (fails after `timeout`).
    Async, so that the caller's event loop (its channels, a proxy) keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await asyncio.to_thread(rx.stats)
        calls = stats["calls"]
        idle = (
            calls["transfers_in_flight"],
            calls["asks_in_flight"],
            calls["calls"],
            calls["buffered_bytes"],
        )
        if idle == (0, 0, 0, 0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"calls did not return to baseline within {timeout} s: {calls}")
        await asyncio.sleep(0.05)


# --- a TCP proxy that injects faults ----------------------------------------------------------------------
@dataclass
class Fault:
    """What happens to one proxied connection. Flips: (byte offset in that direction's stream, XOR mask).
    cut_after: abort both sides once the client has sent this many bytes (the part before is delivered)."""

    c2s: Sequence[tuple[int, int]] = ()
    s2c: Sequence[tuple[int, int]] = ()
    cut_after: int | None = None


class FaultProxy:
    """127.0.0.1 TCP proxy to `target`. Each new connection takes the next queued Fault (none: clean).
    source: the local address of the upstream connections (e.g. 127.0.0.2, to look like another peer)."""

    def __init__(self, target: str, source: str | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.source = source
        self.faults: list[Fault] = []
        self.connections = 0
        self.c2s = 0
        self.s2c = 0
        self.flipped = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def arm(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # whatever is still open dies with the proxy
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        fault = self.faults.pop(0) if self.faults else Fault()
        local = (self.source, 0) if self.source else None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target, local_addr=local)
        except OSError:
            writer.transport.abort()
            return
        writers = (writer, up_writer)
        self._writers.extend(writers)
        await asyncio.gather(
            self._pipe(reader, up_writer, "c2s", fault.c2s, fault.cut_after, writers),
            self._pipe(up_reader, writer, "s2c", fault.s2c, None, writers),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
        flips: Sequence[tuple[int, int]], cut_after: int | None, both: tuple[asyncio.StreamWriter, ...],
    ) -> None:  # fmt: skip
        at = 0
        try:
            while data := await reader.read(1 << 16):
                buf = bytearray(data)
                for offset, mask in flips:
                    if at <= offset < at + len(buf):
                        buf[offset - at] ^= mask
                        self.flipped += 1
                if cut_after is not None and at + len(buf) >= cut_after:
                    writer.write(bytes(buf[: cut_after - at]))
                    with contextlib.suppress(ConnectionError, OSError):
                        await writer.drain()
                    for w in both:  # the connection dies: RST both ways
                        w.transport.abort()
                    return
                at += len(buf)
                setattr(self, direction, getattr(self, direction) + len(buf))
                writer.write(bytes(buf))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.close()


async def raw_transfer(
    ch: grpc.aio.Channel,
    raws: Sequence[bytes],
    timeout: float,
    close: bool = True,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> tuple[list[Any], grpc.aio.AioRpcError | None]:
    """Write frames as given (no Outbox: duplicates and any order allowed) while reading every signal.

    The reader runs from the start: once a write has lost the race with the receiver's abort, grpc.aio
    reports INTERNAL for the call and drops what was not read yet, the receiver's Error signal included."""
    call = ch.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(
        timeout=timeout, metadata=metadata
    )
    signals: list[Any] = []

    async def read() -> grpc.aio.AioRpcError | None:
        try:
            while (got := await call.read()) is not grpc.aio.EOF:  # (`signal` is the module here)
                signals.append(got)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    reader = asyncio.create_task(read())
    try:
        for raw in raws:
            await call.write(raw)
        if close:
            await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the receiver ended the call; its verdict is what the reader got
    return signals, await reader


def refusal(signals: list[Any], error: grpc.aio.AioRpcError | None) -> wire.WireError | None:
    """The receiver's refusal of a raw Transfer: its Error signal, else the call's trailing metadata."""
    for s in signals:
        event = wire.read_signal(s)
        if isinstance(event, wire.RemoteError):
            return wire.WireError(event.code, event.message)
    return wire.error_from_rpc(error) if error is not None else None


def can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


# --- a throwaway PKI -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it,
    and an unrelated CA (whose trust must get nowhere)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_pki(directory: Path) -> Pki:
    """Generate the certificates with `cryptography` (EC P-256, valid for a day)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )

    def ca(cn: str) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        )  # fmt: skip
        cert = (
            builder(cn, name(cn), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(cn: str, ca_key: Any, ca_cert: x509.Certificate, server: bool) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = builder(cn, ca_cert.subject, key.public_key())
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def cert_pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key, ca_cert = ca("kvlink test CA")
    server_key, server_cert = leaf("kvlink-receiver", ca_key, ca_cert, server=True)
    client_key, client_cert = leaf("kvlink-sender", ca_key, ca_cert, server=False)
    _, other = ca("some other CA")
    d = directory
    return Pki(
        ca=write(d / "ca.crt", cert_pem(ca_cert)),
        server_cert=write(d / "tls.crt", cert_pem(server_cert)),
        server_key=write(d / "tls.key", key_pem(server_key)),
        client_cert=write(d / "client.crt", cert_pem(client_cert)),
        client_key=write(d / "client.key", key_pem(client_key)),
        other_ca=write(d / "other-ca.crt", cert_pem(other)),
    )
