"""gunicorn over TLS: worker settings, one cached SSL context per worker, certificate reload.

Why these settings (figures in shared/reference/serving-baseline.md and bench/):

* gevent workers, one per core: each connection is a greenlet, so clients
  that stall or idle hold no worker; gthread pins a thread per connection.
  The worker (webhook/worker.py) does the TLS itself, under deadlines.
* One SSL context per worker, rebuilt only when the files change: gunicorn
  otherwise parses the key on every connection, halving handshake rates,
  and the rebuild is where a renewed certificate is picked up.
* keep-alive 100 s: longer than the API server's 90 s idle-connection
  timeout, so its pooled connections are reused instead of re-handshaking.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from webhook.balance import ConnectionTable
from webhook.mutate import Settings

log = logging.getLogger("nix_flake_webhook.server")

KEEPALIVE_SECONDS = 100


class CertificateReloader:
    """Builds the SSL context once and again only when the certificate files change.

    The worker (webhook.worker) wraps every accepted connection with
    :meth:`wrap`.  A new pair is loaded into a fresh context and swapped in
    only when it is complete and matching, so a half-written rotation never
    reaches a client.
    """

    def __init__(self, certfile: Path, keyfile: Path, check_interval: float = 1.0) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self.check_interval = check_interval
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple[int, ...] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, ...]:
        stamps: list[int] = []
        for path in (self.certfile, self.keyfile):
            st = os.stat(path)
            stamps += [st.st_mtime_ns, st.st_size, st.st_ino]
        return tuple(stamps)

    def build(self) -> ssl.SSLContext:
        """A server context for the current files; raises ssl.SSLError/OSError when they don't fit."""
        # Looked up at call time: under gevent this is the cooperative SSLContext.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.certfile), str(self.keyfile))
        context.set_alpn_protocols(["http/1.1"])
        # kube-apiserver's client (client-go) keeps no TLS session cache, so session tickets would
        # never be used: issuing them costs every handshake about 45 of 370 µs of server CPU.
        context.num_tickets = 0
        context.options |= ssl.OP_NO_TICKET
        return context

    def context(self) -> ssl.SSLContext | None:
        """The current context, reloaded first if the files changed (checked at most once per interval)."""
        now = time.monotonic()
        if self._context is not None and now - self._checked < self.check_interval:
            return self._context
        with self._lock:
            self._checked = now
            try:
                stamp = self._file_stamp()
                if stamp != self._stamp or self._context is None:
                    self._context = self.build()
                    if self._stamp is not None:
                        log.info("reloaded TLS certificate from %s", self.certfile)
                    self._stamp = stamp
            except (OSError, ssl.SSLError, ValueError) as err:
                # Mid-rotation (new certificate, old key) or a broken file: keep serving the last good pair.
                log.warning("not reloading TLS certificate %s: %s", self.certfile, err)
        return self._context

    @property
    def loaded(self) -> bool:
        return self.context() is not None

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """Server-side TLS over ``sock``, handshake done (under the socket's own timeout)."""
        context = self.context()
        if context is None:
            raise ssl.SSLError(f"no usable TLS certificate in {self.certfile}")
        return context.wrap_socket(sock, server_side=True)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How to serve: address, TLS files, workers."""

    bind: str
    certfile: Path
    keyfile: Path
    workers: int = 2
    graceful_timeout: int = 25


class WebhookServer(BaseApplication):  # type: ignore[misc]
    """gunicorn application that serves :func:`webhook.app.create_app`."""

    def __init__(self, options: ServeOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.reloader = CertificateReloader(options.certfile, options.keyfile)
        # Room for a full set of replacement workers next to draining ones (a HUP).
        self.connections = ConnectionTable(2 * options.workers + 2)
        super().__init__()

    def load_config(self) -> None:
        opts = self.options

        def when_ready(_arbiter: Any) -> None:
            # Everything loaded so far lives as long as the server: keep it out of the collector's
            # way, so that full collections in the workers stay short (and shared pages stay shared).
            gc.collect()
            gc.freeze()

        def pre_fork(_arbiter: Any, worker: Any) -> None:
            worker.connection_slot = self.connections.claim()

        def child_exit(_server: Any, worker: Any) -> None:
            from webhook import metrics

            metrics.mark_process_dead(worker.pid)
            if worker.connection_slot is not None:
                self.connections.release(worker.connection_slot)

        config = {
            "bind": [opts.bind],
            "workers": opts.workers,
            # TLS is done by the worker itself (see webhook/worker.py), so gunicorn gets no certfile.
            "worker_class": "webhook.worker.WebhookWorker",
            "worker_connections": 1000,
            "keepalive": KEEPALIVE_SECONDS,
            "timeout": 30,
            "graceful_timeout": opts.graceful_timeout,
            "pre_fork": pre_fork,
            "child_exit": child_exit,
            "when_ready": when_ready,
            # No proxy sits in front of us and nothing reads the scheme or forwarded headers: trust
            # none of them, which also spares gunicorn an address lookup per request.
            "forwarded_allow_ips": "*",
            "forwarder_headers": "",
            "secure_scheme_headers": {},
            "preload_app": True,
            "control_socket_disable": True,
            "accesslog": None,
            "errorlog": "-",
            "on_starting": lambda _arbiter: log.warning(
                "serving https://%s, TLS 1.2+ with %s and %s, reloaded when they change (gunicorn says "
                "http:// below because the worker, not gunicorn, does the TLS)",
                opts.bind,
                opts.certfile,
                opts.keyfile,
            ),
            "loglevel": "info",
            "proc_name": "nix-flake-webhook",
        }
        for key, value in config.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from webhook.app import create_app

        return create_app(self.settings, ready=lambda: self.reloader.loaded)


def prepare_metrics_dir() -> Path:
    """A multiprocess directory for prometheus_client: the configured one, created and emptied, or a new one.

    Emptied because files left by a previous run (a restarted container keeps its emptyDir) would be
    read as live workers' values.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not configured:
        directory = Path(tempfile.mkdtemp(prefix="nix-flake-webhook-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        return directory
    directory = Path(configured)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


def serve(options: ServeOptions, settings: Settings) -> None:
    """Run gunicorn until it is told to stop (SIGTERM drains in-flight requests)."""
    CertificateReloader(options.certfile, options.keyfile).build()  # fail fast, with the file names
    prepare_metrics_dir()
    WebhookServer(options, settings).run()
