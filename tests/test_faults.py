"""Fault tests against the real server: soak, slow clients, SIGTERM under load, rotation under load, garbage.

Each is bounded to a few seconds; none is timed against a target (the
benchmarks in bench/ print figures), except that a well-behaved client must
not wait over 100 ms while misbehaving ones hold connections.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apiserver import ApiServerWebhookClient, WebhookCallFailed
from tests.conftest import RunningServer, process_tree, rss_mib, start_server, stop_server
from tests.pods import container, replicaset_pod
from webhook import certs

POD = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake": "github:user/redis"})


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path)
    yield running
    stop_server(running)


def hammer(server: RunningServer, requests: int, threads: int) -> list[str]:
    """Send ``requests`` admissions over ``threads`` kept-alive connections; return the failures.

    A lean client (one pre-encoded review, the answer checked for status, uid and patch) so that
    20,000 requests take seconds; tests/apiserver.py checks answers in full elsewhere.
    """
    failures: list[str] = []
    review = ApiServerWebhookClient.review_for(POD)
    body = json.dumps(review).encode()
    uid = review["request"]["uid"].encode()

    def work() -> None:
        context = server.tls_context(check_hostname=False)
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        try:
            for _ in range(requests // threads):
                try:
                    conn.request("POST", "/mutate?timeout=10s", body=body, headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = response.read()
                    if response.status != 200 or uid not in answer or b'"patch"' not in answer:
                        failures.append(f"{response.status}: {answer[:200]!r}")
                except (OSError, http.client.HTTPException) as err:
                    failures.append(repr(err))
                    conn.close()
        finally:
            conn.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return failures


def test_soak_20000_admissions(own_server: RunningServer) -> None:
    assert hammer(own_server, 2000, 4) == []  # warm up: imports, caches, buffers
    before = rss_mib(process_tree(own_server.proc.pid))
    workers = own_server.worker_pids()
    assert hammer(own_server, 20000, 4) == []
    after = rss_mib(process_tree(own_server.proc.pid))
    assert after < before * 1.10, f"RSS grew from {before:.1f} to {after:.1f} MiB"
    assert own_server.worker_pids() == workers  # no worker died or was recycled


def _timed_get(server: RunningServer, path: str) -> float:
    context = server.tls_context(check_hostname=False)
    start = time.perf_counter()
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=5)
    conn.request("GET", path)
    assert conn.getresponse().status == 200
    conn.close()
    return time.perf_counter() - start


def test_slow_and_idle_clients_do_not_delay_others(own_server: RunningServer) -> None:
    context = own_server.tls_context(check_hostname=False)
    held: list[socket.socket] = []
    try:
        body = json.dumps(ApiServerWebhookClient.review_for(POD)).encode()
        half = (
            f"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body[: len(body) // 2]
        for _ in range(50):  # send half a request, then stall
            tls = own_server.connect()
            tls.sendall(half)
            held.append(tls)
        for _ in range(25):  # finish the handshake, then idle
            held.append(own_server.connect())
        for _ in range(25):  # never even start TLS
            held.append(socket.create_connection(("127.0.0.1", own_server.port), 5))
        conn = http.client.HTTPSConnection("127.0.0.1", own_server.port, context=context, timeout=5)
        worst = 0.0
        for _ in range(20):
            worst = max(worst, _timed_get(own_server, "/healthz"))
            start = time.perf_counter()
            conn.request("POST", "/mutate?timeout=10s", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200 and b'"patch"' in response.read()
            worst = max(worst, time.perf_counter() - start)
        conn.close()
        assert worst < 0.1, f"a well-behaved client waited {worst * 1000:.0f} ms"
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()


def test_sigterm_while_workers_start_stops_at_once(tmp_path: Path) -> None:
    """A pod deleted as it starts: the workers are forked but still setting up (gevent's patching)."""
    server = start_server(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 20
        while len(process_tree(server.proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(process_tree(server.proc.pid)) == 3, server.log()
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(20)
        # The graceful timeout is 25 s: a worker that lost the signal is only killed after it.
        assert time.monotonic() - start < 5, server.log()
    finally:
        stop_server(server)


def test_sigterm_answers_every_accepted_request(own_server: RunningServer) -> None:
    answered: list[int] = []
    failures: list[str] = []
    refused = 0
    stop = threading.Event()
    lock = threading.Lock()
    body = json.dumps(ApiServerWebhookClient.review_for(POD)).encode()

    def work() -> None:
        nonlocal refused
        context = own_server.tls_context(check_hostname=False)
        conn: http.client.HTTPSConnection | None = None
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", own_server.port, context=context, timeout=10)
                try:
                    conn.connect()
                except OSError:
                    # Refused or reset before TLS was up: never accepted, so a client may retry elsewhere.
                    with lock:
                        refused += 1
                    conn = None
                    time.sleep(0.01)
                    continue
            current = conn
            try:
                current.request("POST", "/mutate?timeout=10s", body=body, headers={"Content-Type": "application/json"})
                response = current.getresponse()
                response.read()
                with lock:
                    answered.append(response.status)
                if response.will_close:
                    current.close()
                    conn = None
            except (OSError, http.client.HTTPException) as err:
                # The request was written on an established connection and got no answer.
                with lock:
                    failures.append(repr(err))
                current.close()
                conn = None

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    own_server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    own_server.proc.wait(30)
    took = time.monotonic() - started
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert answered and set(answered) == {200}
    assert failures == [], failures[:5]
    assert refused > 0  # the load really ran past the shutdown
    assert took < 25, f"exit took {took:.1f} s, over the graceful timeout"


def test_certificate_rotation_under_load(own_server: RunningServer) -> None:
    failures: list[str] = []
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            client = own_server.client()  # a new connection each round: handshakes race the rotation
            try:
                for _ in range(20):
                    client.admit(POD)
            except (WebhookCallFailed, AssertionError, ssl.SSLError) as err:
                failures.append(repr(err))
            finally:
                client.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        for round_ in range(3):
            certs.ensure(own_server.certs_dir, certs.CertSpec(extra_sans=(f"rotation-{round_}.example.com",)))
            time.sleep(1.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == [], failures[:5]
    with own_server.connect("rotation-2.example.com") as tls:
        assert tls.version() is not None  # new connections present the newest certificate


def test_garbage_kills_no_worker(own_server: RunningServer) -> None:
    workers = own_server.worker_pids()
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b'POST /mutate HTTP/1.1\r\nContent-Length: 5\r\n\r\n{"a"',
        b"POST /mutate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /mutate HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /mutate HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        b"\x16\x03\x01garbage-inside-tls\r\n\r\n",
        b"POST /mutate?timeout=" + b"9" * 10000 + b" HTTP/1.1\r\n\r\n",
        b"POST /mutate HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
        os.urandom(4096),
    ]
    for payload in payloads:
        with contextlib.suppress(OSError):
            tls = own_server.connect()
            tls.sendall(payload)
            reply = tls.recv(200)
            assert not reply.startswith(b"HTTP/1.1 5"), (payload[:40], reply)
            tls.close()
    # Plain TCP garbage where TLS is expected.
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", own_server.port), 5) as raw:
        raw.sendall(os.urandom(2048))
    client = own_server.client()
    assert client.admit(POD).patched
    client.close()
    assert own_server.worker_pids() == workers
