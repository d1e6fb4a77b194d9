"""Flask application: /mutate, /healthz, /readyz, /metrics.  No decisions here."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from webhook import metrics
from webhook.admission import MAX_BODY_BYTES, ReviewResult, review
from webhook.mutate import Settings

log = logging.getLogger("nix_flake_webhook.review")


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _log_review(result: ReviewResult, seconds: float) -> None:
    fields = result.log_fields()
    fields["latencyMs"] = round(seconds * 1000, 3)
    fields["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.info(json.dumps(fields, separators=(",", ":")))


def _json(payload: dict[str, object], status: int) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def create_app(settings: Settings, ready: Callable[[], bool] = lambda: True) -> Flask:
    """The WSGI application for ``settings``; ``ready`` tells /readyz whether TLS is loaded."""
    _setup_logging()
    app = Flask("nix_flake_webhook")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.post("/mutate")
    def mutate_view() -> Response:
        start = time.perf_counter()
        result = review(request.get_data(cache=False), settings)
        seconds = time.perf_counter() - start
        metrics.record(result, seconds)
        _log_review(result, seconds)
        return Response(result.body, status=result.status, mimetype="application/json")

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

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        code = err.code or 400
        return _json({"error": err.description or err.name, "code": code}, code)

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> Response:
        # A bug must not become a 500: the API server would then apply failurePolicy to every pod.
        app.logger.exception("unexpected error")
        return _json({"error": f"internal error: {type(err).__name__}", "code": 400}, 400)

    return app
