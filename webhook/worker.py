"""The gunicorn worker: gevent, with TLS done here rather than by gevent's server.

Why not gunicorn's stock gevent TLS: its server wraps accepted sockets before
handing them over, with no timeout on the handshake, and a connection whose
handshake finishes just after SIGTERM closed the listener is dropped
unanswered (gevent's closed server has no handler any more, and gunicorn asks
the closed listener for its address).  Here the socket is handed over first
and wrapped inside its own greenlet, with a deadline on the handshake and on
every later read and write, with the certificate the
:class:`~webhook.server.CertificateReloader` currently holds, and with the
listener's address remembered from start-up.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

HANDSHAKE_TIMEOUT_SECONDS = 10.0


class _Listener:
    """Stands in for a listening socket that SIGTERM may close while accepted connections are still served."""

    def __init__(self, name: Any) -> None:
        self.name = name

    def getsockname(self) -> Any:
        return self.name


class WebhookWorker(GeventWorker):  # type: ignore[misc]
    """GeventWorker whose connections are TLS-wrapped, under deadlines, by the app's certificate reloader."""

    def run(self) -> None:
        self.listeners = {id(sock): _Listener(sock.getsockname()) for sock in self.sockets}
        super().run()

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        listener = self.listeners.get(id(listener), listener)
        reloader = self.app.reloader
        client.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            tls = reloader.wrap(client)
        except (OSError, ssl.SSLError, ValueError) as err:
            self.log.debug("TLS handshake with %s failed: %s", addr, err)
            client.close()
            return
        # Above keep-alive, so idle connections are closed by it first; bounds a stalled body or reader.
        tls.settimeout(self.cfg.keepalive + 20.0)
        AsyncWorker.handle(self, listener, tls, addr)
