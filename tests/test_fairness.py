"""Fairness between clients and between workers.

* One worker: a greedy client that pipelines requests as fast as the worker
  answers them must not starve a polite one.  Without the worker's turn
  through the event loop before each read, the greedy connection's greenlet
  finds its next request already there, never yields, and the polite client
  waits for as long as the greedy one keeps writing.
* Two workers: connections opened together, as the API server opens its
  pool, are spread evenly; without the shared connection table one worker
  takes most of them in most rounds (measured: 4/4 in 2 of 20 rounds).
* The table itself, and the server hooks that claim and free its slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from tests.apiserver import ApiServerWebhookClient
from tests.conftest import RunningServer, read_response, start_server, stop_server
from tests.pods import container, replicaset_pod
from webhook.balance import DRAINING, FREE, ConnectionTable, crowded
from webhook.mutate import Settings
from webhook.server import ServeOptions, WebhookServer

POD = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake": "github:user/redis"})
BODY = json.dumps(ApiServerWebhookClient.review_for(POD)).encode()
REQUEST = (
    b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def greedy_client(server: RunningServer, stop: threading.Event, answered: list[int]) -> None:
    """Pipeline requests as fast as the server takes them, reading answers concurrently, until ``stop``."""

    async def run() -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=server.tls_context(), server_hostname="localhost"
        )

        async def drain() -> None:
            while chunk := await reader.read(65536):
                answered[0] += chunk.count(b"HTTP/1.1 200")

        draining = asyncio.create_task(drain())
        while not stop.is_set():
            writer.write(REQUEST * 8)
            await writer.drain()
        writer.close()
        draining.cancel()

    asyncio.run(run())


def test_a_greedy_client_does_not_starve_a_polite_one(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--workers", "1")
    stop = threading.Event()
    answered = [0]
    greedy = threading.Thread(target=greedy_client, args=(server, stop, answered))
    try:
        greedy.start()
        deadline = time.monotonic() + 5
        while answered[0] < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answered[0] >= 200, "the greedy client never got going"
        before = answered[0]
        with server.connect() as tls, tls.makefile("rb") as reader:
            latencies = []
            for _ in range(30):
                start = time.perf_counter()
                tls.sendall(REQUEST)
                head, body = read_response(reader)
                latencies.append(time.perf_counter() - start)
                assert head.startswith(b"HTTP/1.1 200") and b'"patch"' in body
        assert answered[0] > before + 30, "the greedy client was not being served alongside (nothing to be fair to)"
        assert max(latencies) < 0.1, f"the polite client waited {max(latencies) * 1000:.0f} ms"
    finally:
        stop.set()
        greedy.join(10)
        stop_server(server)


def socket_count(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(fd).startswith("socket:")
    return count


def test_connections_opened_together_are_spread_over_the_workers(tmp_path: Path) -> None:
    server = start_server(tmp_path)  # two workers, the default
    try:
        workers = server.worker_pids()
        assert len(workers) == 2

        def split() -> tuple[int, ...]:
            """Open 8 connections together, answer a review on each; how many each worker holds."""
            idle = {pid: socket_count(pid) for pid in workers}
            conns = [server.connect() for _ in range(8)]
            try:
                for tls in conns:
                    tls.sendall(REQUEST)
                for tls in conns:
                    with tls.makefile("rb") as reader:
                        assert read_response(reader)[0].startswith(b"HTTP/1.1 200")
                return tuple(sorted(socket_count(pid) - idle[pid] for pid in workers))
            finally:
                for tls in conns:
                    tls.close()
                time.sleep(0.3)  # let the workers see the closes

        # The second worker may still be starting when the first answers /readyz: wait until it takes its share.
        deadline = time.monotonic() + 20
        while split()[0] == 0 and time.monotonic() < deadline:
            pass
        splits = Counter(split() for _ in range(10))
        assert set(splits) <= {(4, 4), (3, 5)}, splits
        assert splits[(4, 4)] >= 6, splits
    finally:
        stop_server(server)


def test_a_worker_stands_back_only_for_a_peer_that_holds_fewer_and_accepts() -> None:
    assert crowded([3, 2], 0)
    assert not crowded([2, 3], 0)
    assert not crowded([2, 2], 0)
    assert not crowded([3, FREE, DRAINING], 0), "free slots and draining workers take no connections"
    assert crowded([3, DRAINING, 0], 0)
    assert not crowded([0], 0), "a lone worker always accepts"


def test_the_table_counts_per_slot_and_survives_nothing_odd() -> None:
    table = ConnectionTable(3)
    first, second = table.claim(), table.claim()
    assert (first, second) == (0, 1)
    table.opened(0)
    table.opened(0)
    table.closed(1)  # a close without an open (cannot happen) must not go negative
    assert list(table.counts) == [2, 0, FREE]
    assert table.crowded(0) and not table.crowded(1)
    table.drain(1)
    assert not table.crowded(0), "a draining peer is not waited for"
    table.opened(1)
    assert table.counts[1] == DRAINING, "a draining worker's closes and opens don't revive it"
    table.release(1)
    assert table.claim() == 1
    assert table.claim() == 2
    assert table.claim() is None


def test_the_server_claims_a_slot_per_worker_before_the_fork_and_frees_it_at_exit(tmp_path: Path) -> None:
    app = WebhookServer(ServeOptions("127.0.0.1:0", tmp_path / "tls.crt", tmp_path / "tls.key"), Settings())
    workers = [SimpleNamespace(pid=1000 + n) for n in range(2)]
    for worker in workers:
        app.cfg.pre_fork(None, worker)
    assert [w.connection_slot for w in workers] == [0, 1]
    app.cfg.child_exit(None, workers[0])
    replacement = SimpleNamespace(pid=1002)
    app.cfg.pre_fork(None, replacement)
    assert replacement.connection_slot == 0
