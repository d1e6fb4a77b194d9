"""Open-loop load: requests at a fixed rate whatever the server's speed, as pod creations arrive.

Closed-loop tools (wrk) wait for an answer before sending the next request and
so hide queueing.  Here request *i* is due at ``start + i / rate``; its latency
is measured from that due time, so time spent waiting for a free connection
or for the server counts.  Several processes share the rate, each with its own
event loop and pool of kept-alive TLS connections (or a fresh connection per
request with ``fresh=True``, a reconnect storm).

Used by bench/load.py; also runnable on its own:
``python -m bench.openloop https://127.0.0.1:8443/mutate CA RATE SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import ssl
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import uvloop

from bench.reviews import admission_body

MAX_CONNECTIONS = 32  # per process
WARM_CONNECTIONS = 8  # per process, opened before the clock starts in kept-alive runs


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    #: from the moment each request was written: what is left when the generator's own lag is taken out
    from_write: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0


def _request(host: str, port: int, path: str, body: bytes, close: bool) -> bytes:
    head = (
        f"POST {path}?timeout=10s HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, */*\r\nUser-Agent: bench-openloop\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, outcome: Outcome
) -> bool:
    written = time.perf_counter()
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status_ok = head.startswith(b"HTTP/1.1 200")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    outcome.from_write.append(time.perf_counter() - written)
    return status_ok


async def _run(
    url: str, cafile: str, server_name: str, rate: float, seconds: float, fresh: bool, offset: float
) -> Outcome:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 443, parts.path or "/mutate"
    context = ssl.create_default_context(cafile=cafile)
    payload = _request(server_name, port, path, admission_body(1), close=fresh)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    outcome = Outcome()
    tasks: set[asyncio.Task[None]] = set()
    # Like an API server's connection pool: a bounded number of connections, requests queue for one.
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def one(due: float) -> None:
        async with slots:
            await exchange(due)

    async def exchange(due: float) -> None:
        connection = None
        try:
            if idle and not fresh:
                connection = idle.pop()
            else:
                connection = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=context, server_hostname=server_name), 10
                )
            ok = await asyncio.wait_for(_exchange(*connection, payload, outcome), 10)
            outcome.latencies.append(time.perf_counter() - due)
            if not ok:
                outcome.errors += 1
            if fresh:
                connection[1].close()
            else:
                idle.append(connection)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            outcome.errors += 1
            if connection is not None:
                connection[1].close()

    if not fresh:
        # Steady state, as an API server that has been up for a while: its pool is open already.
        # Fresh connections are what the storm run measures.
        for _ in range(WARM_CONNECTIONS):
            with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
                idle.append(
                    await asyncio.wait_for(
                        asyncio.open_connection(host, port, ssl=context, server_hostname=server_name), 10
                    )
                )
    start = time.perf_counter() + 0.2 + offset
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        outcome.sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    for _, writer in idle:
        writer.close()
    return outcome


def _worker(args: tuple[str, str, str, float, float, bool, float], queue: multiprocessing.Queue[Outcome]) -> None:
    queue.put(uvloop.run(_run(*args)))


def run(
    url: str, cafile: str, server_name: str, rate: float, seconds: float, fresh: bool = False, processes: int = 2
) -> Outcome:
    """Send ``rate`` requests per second for ``seconds``; return every latency (s) and the error count."""
    queue: multiprocessing.Queue[Outcome] = multiprocessing.Queue()
    per = rate / processes
    procs = [
        multiprocessing.Process(target=_worker, args=((url, cafile, server_name, per, seconds, fresh, i / rate), queue))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    merged = Outcome()
    for _ in procs:
        part = queue.get(timeout=seconds + 60)
        merged.latencies += part.latencies
        merged.from_write += part.from_write
        merged.errors += part.errors
        merged.sent += part.sent
    for proc in procs:
        proc.join(10)
    return merged


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2], "localhost", float(sys.argv[3]), float(sys.argv[4]))
    ms = [v * 1000 for v in result.latencies]
    print(f"sent={result.sent} errors={result.errors} p50={percentile(ms, 50):.2f}ms p99={percentile(ms, 99):.2f}ms")
