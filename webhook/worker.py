"""The gunicorn worker: gevent, with TLS done here, and a lean path for the one hot request.

TLS: gunicorn's stock gevent server wraps accepted sockets before handing
them over, with no deadline on the handshake, and a connection whose
handshake finishes just after SIGTERM closed the listener is dropped
unanswered (gevent's closed server has no handler any more, and gunicorn asks
the closed listener for its address).  Here the socket is handed over first
and wrapped inside its own greenlet, with a deadline on the handshake and on
every later read and write, with the certificate the
:class:`~webhook.server.CertificateReloader` currently holds, and with the
listener's address remembered from start-up.

The lean path: a kept-alive connection from kube-apiserver carries nothing
but ``POST /mutate`` with a Content-Length.  Those requests are parsed with
gunicorn's own C parser (gunicorn_h1c) and answered through the app's
:class:`~webhook.app.MutateEndpoint` directly, which saves gunicorn's request,
environ and response objects (about a third of the CPU per request,
bench/RESULTS.md).  The first request that is anything else (another path or
method, chunked, ``Expect``, HTTP/1.0, a parse error) hands the connection,
with the bytes already read, to gunicorn's normal handling for good.

Fairness: every connection takes its turn through the event loop before each
request, and new connections go to the worker holding fewer
(webhook/balance.py), so one fast client can't monopolise a worker and one
worker doesn't carry the API server's whole pool while the other idles.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import time
from email.utils import formatdate
from functools import partial
from typing import Any

import gevent
from gevent.server import StreamServer
from gevent.socket import wait_read
from gunicorn.workers import ggevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from webhook.admission import MAX_BODY_BYTES, bad_request
from webhook.app import MutateEndpoint, status_line
from webhook.balance import STAND_BACK_SECONDS, ConnectionTable

try:
    from gunicorn_h1c import IncompleteError, parse_request
except ImportError:  # without the C parser every request takes gunicorn's path
    parse_request = None

HANDSHAKE_TIMEOUT_SECONDS = 10.0
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
MAX_HEAD_BYTES = 16 * 1024
RECV_BYTES = 64 * 1024


class _Listener:
    """Stands in for a listening socket that SIGTERM may close while accepted connections are still served."""

    def __init__(self, name: Any) -> None:
        self.name = name

    def getsockname(self) -> Any:
        return self.name


class _Replay:
    """The TLS socket with the bytes already read put back in front, for gunicorn's parser."""

    def __init__(self, sock: ssl.SSLSocket, pending: bytes) -> None:
        self._sock = sock
        self._pending = pending

    def recv(self, size: int) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending[:size], self._pending[size:]
            return chunk
        return self._sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.value


class _BalancedServer(StreamServer):  # type: ignore[misc]
    """gevent's accept loop, standing back once when this worker holds more connections than a peer."""

    def __init__(self, *args: Any, table: ConnectionTable, slot: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table
        self.slot = slot
        self.stood_back = False

    def _do_read(self) -> None:
        if not self.stood_back and self.table.crowded(self.slot):
            # gevent's own way to pause accepting (it uses it after accept errors); a peer that is
            # waiting on the same socket takes the connection meanwhile.
            self.stood_back = True
            self.stop_accepting()
            self._timer = self.loop.timer(STAND_BACK_SECONDS)
            self._timer.start(self._start_accepting_if_started)
            return
        self.stood_back = False
        super()._do_read()

    def do_read(self) -> Any:
        accepted = super().do_read()
        if accepted:
            self.table.opened(self.slot)
        return accepted

    def do_close(self, *args: Any) -> None:
        self.table.closed(self.slot)
        super().do_close(*args)


class WebhookWorker(GeventWorker):  # type: ignore[misc]
    """GeventWorker with its own TLS under deadlines, a lean path for POST /mutate and balanced accepts."""

    def init_process(self) -> None:
        # Until gunicorn installs this worker's signal handlers, after gevent's patching, the
        # master's are still in place and swallow a SIGTERM: a pod deleted while it starts then
        # waits out the whole graceful timeout.  Take it from the start.
        signal.signal(signal.SIGTERM, self.handle_exit)
        super().init_process()

    def run(self) -> None:
        self.listeners = {id(sock): _Listener(sock.getsockname()) for sock in self.sockets}
        extensions = getattr(self.wsgi, "extensions", {})
        self.endpoint: MutateEndpoint | None = (
            extensions.get("nix_flake_webhook.mutate") if parse_request is not None else None
        )
        if self._balance is not None:
            # GeventWorker.run builds its accept loops from this module global; this process is ours.
            table, slot = self._balance
            ggevent.StreamServer = partial(_BalancedServer, table=table, slot=slot)
        super().run()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._balance is not None:
            table, slot = self._balance
            table.drain(slot)
        super().handle_exit(sig, frame)

    @property
    def _balance(self) -> tuple[ConnectionTable, int] | None:
        """The shared connection table and this worker's slot in it (set up by the server before the fork)."""
        table: ConnectionTable | None = getattr(self.app, "connections", None)
        slot: int | None = getattr(self, "connection_slot", None)
        return None if table is None or slot is None else (table, slot)

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        listener = self.listeners.get(id(listener), listener)
        client.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            tls = self.app.reloader.wrap(client)
        except (OSError, ssl.SSLError, ValueError) as err:
            self.log.debug("TLS handshake with %s failed: %s", addr, err)
            client.close()
            return
        # Acknowledge the client's last handshake message now: a client that leaves Nagle on holds its
        # first request until then, and with no session ticket to carry the ACK, the kernel's delayed
        # ACK made that 40 ms.
        if QUICKACK is not None:
            with contextlib.suppress(OSError):  # gone already: the first read will tell
                tls.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        # Above keep-alive, so idle connections are closed by it first; bounds a stalled body or reader.
        tls.settimeout(self.cfg.keepalive + 20.0)
        connection: Any = tls
        if self.endpoint is not None:
            try:
                pending = self._serve_mutations(tls, self.endpoint)
            except OSError:  # reset, TLS error, or a deadline passed: the client is gone
                pending = None
            if pending is None:
                tls.close()
                return
            if pending:
                connection = _Replay(tls, pending)
        AsyncWorker.handle(self, listener, connection, addr)

    def _serve_mutations(self, tls: ssl.SSLSocket, endpoint: MutateEndpoint) -> bytes | None:
        """Answer POST /mutate requests until the connection ends (None) or needs gunicorn (the unread bytes)."""
        buffer = b""
        while True:
            request, read = self._read_head(tls, buffer)
            if request is None or read is None:
                return read  # None: closed or idle; bytes: for gunicorn
            buffer = read
            length, close = _framing(request)
            if length is None:
                return buffer
            start = time.perf_counter()
            end = request["consumed"] + length
            result = None
            while len(buffer) < end:
                try:
                    chunk = tls.recv(RECV_BYTES)
                except TimeoutError:
                    result = endpoint.answer(bad_request("timed out reading the request body", 408), start)
                    break
                if not chunk:
                    return None  # the client went away mid-body
                buffer += chunk
            if result is None:
                body, buffer = buffer[request["consumed"] : end], buffer[end:]
                try:
                    result = endpoint.answer(body, start)
                except Exception:  # a bug must cost one request a 400, never the connection its answer
                    self.log.exception("error answering POST /mutate")
                    result = bad_request("internal error in nix-flake-webhook; please report it")
            close = close or not self.alive or result.status == 408
            tls.sendall(
                b"HTTP/1.1 %s\r\nServer: nix-flake-webhook\r\n%sContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n%s\r\n%s"
                % (
                    status_line(result.status).encode(),
                    _Date.header(),
                    len(result.body),
                    b"Connection: close\r\n" if close else b"",
                    result.body,
                )
            )
            if close:
                return None

    def _read_head(self, tls: ssl.SSLSocket, buffer: bytes) -> tuple[dict[str, Any] | None, bytes | None]:
        """(the next request head, all bytes read); (None, bytes) for gunicorn to take; (None, None) when done.

        Waits at most keep-alive for a request.  It does not stop waiting at SIGTERM: a client may be
        writing the next POST right then, and a POST on a connection closed under it is not retried;
        requests go on being answered, with ``Connection: close``, until the graceful timeout.
        """
        with gevent.Timeout(self.cfg.keepalive, False):
            while True:
                try:
                    return parse_request(buffer), buffer
                except IncompleteError:
                    if len(buffer) > MAX_HEAD_BYTES:
                        return None, buffer
                except ValueError:  # gunicorn_h1c.ParseError: gunicorn answers it properly
                    return None, buffer
                if not tls.pending():
                    # Through the event loop even when the next request is already here: otherwise a
                    # client that answers faster than we loop keeps this greenlet running and starves
                    # every other connection on the worker (p99 36-60 ms at 2-8 connections, 0.5-2 ms
                    # with this; bench/RESULTS.md).  Pipelined requests already read are served
                    # without a turn, at most one 64 KiB read's worth.
                    wait_read(tls.fileno())
                chunk = tls.recv(RECV_BYTES)
                if not chunk:
                    break
                buffer += chunk
        return None, None  # closed by the client, or idle past keep-alive


def _framing(request: dict[str, Any]) -> tuple[int | None, bool]:
    """(body length, close after) for a plain HTTP/1.1 POST /mutate; (None, _) when gunicorn should take it."""
    if request["method"] != b"POST" or request["minor_version"] != 1:
        return None, False
    path = request["path"]
    if path != b"/mutate" and not path.startswith(b"/mutate?"):
        return None, False
    length: int | None = None
    close = False
    for name, value in request["headers"]:
        lower = name.lower()
        if lower == b"content-length":
            if length is not None or not value.isdigit():
                return None, False
            length = int(value)
        elif lower in (b"transfer-encoding", b"expect"):
            return None, False
        elif lower == b"connection":
            close = b"close" in value.lower()
    if length is None or length > MAX_BODY_BYTES:
        return None, False
    return length, close
