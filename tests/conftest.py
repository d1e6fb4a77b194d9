"""Fixtures that run the real thing: `nix-flake-webhook serve` (gunicorn, TLS) with certificates from webhook.certs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.apiserver import ApiServerWebhookClient
from webhook import certs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (gunicorn's master and workers)."""
    return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


def rss_mib(pids: list[int]) -> float:
    """Resident memory of ``pids`` together, in MiB."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


@dataclass
class RunningServer:
    """A `nix-flake-webhook serve` process and what a client needs to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    certs_dir: Path
    log_path: Path

    @property
    def ca_bundle(self) -> bytes:
        return (self.certs_dir / certs.CA_CERT).read_bytes()

    def client(self) -> ApiServerWebhookClient:
        return ApiServerWebhookClient(self.port, self.ca_bundle)

    def tls_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """Trusts the server's CA; without ``check_hostname`` for connections by IP (the chain is still verified)."""
        context = ssl.create_default_context(cadata=self.ca_bundle.decode())
        context.check_hostname = check_hostname
        return context

    def connect(
        self, server_hostname: str = "localhost", context: ssl.SSLContext | None = None, timeout: float = 5
    ) -> ssl.SSLSocket:
        """A TLS connection to the server, handshake done; trusting its CA unless ``context`` says otherwise."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            return (context or self.tls_context()).wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise

    def worker_pids(self) -> list[int]:
        return sorted(process_tree(self.proc.pid)[1:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_response(reader: BinaryIO) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one Content-Length framed HTTP response from ``reader``; the head is
    empty once the server has closed.  ``reader`` is a socket's ``makefile("rb")``, closed with it: an open one
    keeps the connection open, and the server then waits for it at shutdown."""
    head = b""
    while (line := reader.readline()) not in (b"\r\n", b""):
        head += line
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    return head, reader.read(length)


def start_server(
    workdir: Path,
    *args: str,
    spec: certs.CertSpec | None = None,
    env: dict[str, str] | None = None,
    program: tuple[str, ...] = ("webhook.cli", "serve"),
    wait: bool = True,
) -> RunningServer:
    """Generate certificates with our own code, start the server, wait until /readyz answers over TLS (if ``wait``)."""
    certs_dir = workdir / "certs"
    certs.ensure(certs_dir, spec or certs.CertSpec())
    port = free_port()
    log_path = workdir / f"{program[0]}.log"
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environment.update(env or {})
    command = [
        sys.executable, "-m", *program,
        "--bind", f"127.0.0.1:{port}",
        "--cert", str(certs_dir / certs.TLS_CERT),
        "--key", str(certs_dir / certs.TLS_KEY),
        *args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    server = RunningServer(proc, port, certs_dir, log_path)
    if not wait:
        return server
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(OSError), server.connect(timeout=2) as tls:
            tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if tls.recv(64).startswith(b"HTTP/1.1 200"):
                return server
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The webhook with its defaults (seed dialect, every source allowed)."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The webhook in the hex dialect with an allow-list and a pull policy, set from the environment."""
    workdir = tmp_path_factory.mktemp("strict")
    running = start_server(
        workdir,
        "--dialect", "hex", "--image-pull-policy", "Always", "--workers", "1",
        env={
            "NIX_FLAKE_WEBHOOK_ALLOW_SOURCE": "github:myorg/*,git+https://git.example.com/*",
            # As the Deployment sets it: a directory that does not exist yet.
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "tmp" / "metrics"),
        },
    )  # fmt: skip
    yield running
    stop_server(running)


@pytest.fixture
def apiserver(server: RunningServer) -> Iterator[ApiServerWebhookClient]:
    client = server.client()
    yield client
    client.close()
