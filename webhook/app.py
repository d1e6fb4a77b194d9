"""The WSGI application: POST /mutate, /healthz, /readyz, /metrics.  No decisions here.

POST /mutate is served by :class:`MutateEndpoint`, not by a Flask view: it
is the only hot path, and Flask's request context costs several times what
the whole admission decision does (bench/RESULTS.md).  The endpoint sits in
front of Flask as WSGI middleware, and the worker (webhook/worker.py) calls
its ``answer`` directly on its lean path.  Everything else, errors included,
goes through Flask.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import msgspec
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from webhook import metrics
from webhook.admission import MAX_BODY_BYTES, ReviewResult, bad_request, review
from webhook.mutate import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

MUTATE_PATH = "/mutate"
_JSON_HEADERS = [("Content-Type", "application/json")]
_STATUS_LINES = {200: "200 OK", 400: "400 Bad Request", 408: "408 Request Timeout", 413: "413 Request Entity Too Large"}


def log_review(result: ReviewResult, seconds: float) -> None:
    """One JSON line per review on stderr (written whole, so lines from workers don't interleave)."""
    fields = result.log_fields()
    fields["latencyMs"] = round(seconds * 1000, 3)
    fields["ts"] = _timestamp(int(time.time()))
    os.write(2, msgspec.json.encode(fields) + b"\n")


@lru_cache(maxsize=2)
def _timestamp(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def _read_body(environ: WSGIEnvironment) -> bytes | ReviewResult:
    length_text = environ.get("CONTENT_LENGTH") or ""
    stream = environ["wsgi.input"]
    try:
        if not length_text:
            body: bytes = stream.read(MAX_BODY_BYTES + 1)  # chunked: read one byte past the limit to detect it
        else:
            try:
                length = int(length_text)
            except ValueError:
                return bad_request(f"invalid Content-Length {length_text[:20]!r}")
            if length > MAX_BODY_BYTES:
                return bad_request(f"request body is over {MAX_BODY_BYTES} bytes", 413)
            body = stream.read(length)
    except TimeoutError:
        return bad_request("timed out reading the request body", 408)
    except Exception as err:  # the server's own framing errors (bad chunks, early EOF): the client's fault
        return bad_request(f"could not read the request body ({type(err).__name__})")
    if len(body) > MAX_BODY_BYTES:
        return bad_request(f"request body is over {MAX_BODY_BYTES} bytes", 413)
    return body


class MutateEndpoint:
    """POST /mutate: as WSGI middleware in front of Flask, and as :meth:`answer` for the worker's lean path."""

    def __init__(self, settings: Settings, fallback: WSGIApplication) -> None:
        self.settings = settings
        self.fallback = fallback

    def answer(self, body: bytes | ReviewResult, start: float) -> ReviewResult:
        """Review ``body`` (or pass on a transport error), count it and log it."""
        result = body if isinstance(body, ReviewResult) else review(body, self.settings)
        seconds = time.perf_counter() - start
        metrics.record(result, seconds)
        log_review(result, seconds)
        return result

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != MUTATE_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.fallback(environ, start_response)
        start = time.perf_counter()
        result = self.answer(_read_body(environ), start)
        start_response(status_line(result.status), [*_JSON_HEADERS, ("Content-Length", str(len(result.body)))])
        return [result.body]


def status_line(status: int) -> str:
    return _STATUS_LINES.get(status, f"{status} Error")


def _json(payload: dict[str, Any], status: int) -> Response:
    return Response(msgspec.json.encode(payload), status=status, mimetype="application/json")


def create_app(settings: Settings, ready: Callable[[], bool] = lambda: True) -> Flask:
    """The application for ``settings``; ``ready`` tells /readyz whether the TLS certificate is loaded."""
    app = Flask("nix_flake_webhook")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"status": "ok"}, 200)

    @app.get("/readyz")
    def readyz() -> Response:
        if ready():
            return _json({"status": "ready"}, 200)
        return _json({"status": "not ready", "error": "TLS certificate not loaded"}, 503)

    @app.get("/metrics")
    def metrics_view() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, status=200, content_type=content_type)

    @app.route(MUTATE_PATH, methods=["GET", "PUT", "PATCH", "DELETE"])
    def mutate_other_methods() -> Response:
        return _json({"error": "use POST with an AdmissionReview", "code": 405}, 405)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        code = err.code or 400
        return _json({"error": err.description or err.name, "code": code}, code)

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> Response:
        # A bug must not become a 500: the API server would then apply failurePolicy to every pod.
        app.logger.exception("unexpected error")
        return _json({"error": f"internal error: {type(err).__name__}", "code": 400}, 400)

    endpoint = MutateEndpoint(settings, app.wsgi_app)
    app.wsgi_app = endpoint  # type: ignore[method-assign]
    app.extensions["nix_flake_webhook.mutate"] = endpoint  # the worker's lean path answers through it
    return app
