"""End-to-end load on the real `nix-flake-webhook serve` (production settings, TLS), and on a baseline.

Prints one table: closed-loop keep-alive runs with wrk (as kube-apiserver
keeps connections), a run that opens a new TLS connection per request,
open-loop runs at fixed rates (bench/openloop.py), a reconnect storm, server
CPU per request and total RSS.  The baseline is the same gunicorn/gevent/TLS
stack answering a constant ``allowed: true`` without parsing, so the
difference is what our own logic costs.

    python -m bench.load [--seconds 15] [--quick]

Needs `wrk` (Debian package; installed by this script when missing and root).
Load goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import openloop
from bench.reviews import admission_body
from tests.conftest import RunningServer, process_tree, rss_mib, start_server, stop_server

SNI = "localhost"


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is needed: apt-get install wrk")
    return found


@dataclass
class Server:
    """A running server under test, with what the tables report about it."""

    running: RunningServer

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def certs_dir(self) -> Path:
        return self.running.certs_dir

    def pids(self) -> list[int]:
        return process_tree(self.running.proc.pid)

    def rss_mib(self) -> float:
        return rss_mib(self.pids())

    def cpu_seconds(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / ticks

    def stop(self) -> None:
        stop_server(self.running)


def start(kind: str, workdir: Path) -> Server:
    """The webhook as `nix-flake-webhook serve`, or the baseline; the review log goes to a file, as to a runtime's pipe."""
    program = ("webhook.cli", "serve") if kind == "webhook" else ("bench.baseline",)
    return Server(start_server(workdir / kind, program=program))


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{extra}
wrk.body = {body}
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %f %f %f %f %d %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    errors, summary.errors.status))
end
"""


def wrk_run(wrk: str, server: Server, connections: int, seconds: int, fresh: bool, workdir: Path) -> dict[str, float]:
    script = workdir / f"wrk-{fresh}.lua"
    extra = 'wrk.headers["Connection"] = "close"' if fresh else ""
    script.write_text(LUA.format(body=json.dumps(admission_body(1).decode()), extra=extra))
    cpu0 = server.cpu_seconds()
    client0 = _children_cpu_seconds()
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
         f"https://127.0.0.1:{server.port}/mutate?timeout=10s"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cpu = server.cpu_seconds() - cpu0
    client = _children_cpu_seconds() - client0
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    requests, duration, p50, p90, p99, errors, non2xx = (float(x) for x in line.split()[1:])
    return {
        "rps": requests / duration,
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "errors": errors + non2xx,
        "requests": requests,
        "cpu_us": cpu / max(requests, 1) * 1e6,
        "client_us": client / max(requests, 1) * 1e6,
    }


def _children_cpu_seconds() -> float:
    """CPU used by finished child processes (wrk): the load generator's share of the two cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def open_run(server: Server, rate: float, seconds: float, fresh: bool) -> dict[str, float]:
    result = openloop.run(
        f"https://127.0.0.1:{server.port}/mutate", str(server.certs_dir / "ca.crt"), SNI, rate, seconds, fresh
    )
    ms = [v * 1000 for v in result.latencies]
    from_write = [v * 1000 for v in result.from_write]
    return {
        "write_p99": openloop.percentile(from_write, 99),
        "rps": result.sent / seconds,
        "p50": openloop.percentile(ms, 50),
        "p90": openloop.percentile(ms, 90),
        "p99": openloop.percentile(ms, 99),
        "errors": result.errors,
    }


def row(label: str, r: dict[str, float], note: str = "") -> None:
    """One line of the table; CPU columns only for closed-loop runs, which measure them."""
    cpu = f" {r['cpu_us']:>11.0f} {r['client_us']:>11.0f}" if "cpu_us" in r else ""
    print(
        f"{label:<34} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p90']:>8.2f} {r['p99']:>8.2f} {r['errors']:>7.0f}{cpu}{note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15, help="length of each closed-loop and open-loop run")
    parser.add_argument("--quick", action="store_true", help="5 s runs, no soak: a smoke test of the script")
    args = parser.parse_args()
    seconds = 5 if args.quick else args.seconds
    wrk = ensure_wrk()
    print(f"# load benchmark, {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load generator on the same machine")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for kind in ("webhook", "baseline"):
            server = start(kind, workdir)
            try:
                rss_start = server.rss_mib()
                print(f"\n## {kind}: RSS at start {rss_start:.0f} MiB")
                print(
                    f"{'run':<34} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu µs/req':>11}"
                    f" {'wrk µs/req':>11}"
                )
                for connections in (1, 8, 32):
                    row(
                        f"keep-alive, {connections} connection(s)",
                        wrk_run(wrk, server, connections, seconds, False, workdir),
                    )
                row("new TLS connection per request", wrk_run(wrk, server, 8, seconds, True, workdir))
                if kind == "webhook":
                    for rate in (1000, 2000, 3000):
                        o = open_run(server, rate, seconds, fresh=False)
                        row(f"open loop {rate}/s, kept alive", o, f"   (p99 from the write: {o['write_p99']:.2f} ms)")
                    row("storm 1000/s, fresh connections", open_run(server, 1000, min(seconds, 5), fresh=True))
                    if not args.quick:
                        before = server.rss_mib()
                        total = 0.0
                        while total < 100_000:
                            total += wrk_run(wrk, server, 8, 10, False, workdir)["requests"]
                        print(f"RSS over {total:,.0f} more requests: {before:.0f} MiB -> {server.rss_mib():.0f} MiB")
                print(f"RSS at end {server.rss_mib():.0f} MiB (master + workers)")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
