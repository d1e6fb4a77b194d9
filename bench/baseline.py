"""The baseline: the webhook's own gunicorn/gevent/TLS stack answering a constant `allowed: true`.

It takes the same lean path through the worker, reads the body and parses
nothing, so bench/load.py can show what our own logic costs on top of the
serving stack.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webhook.admission import ReviewResult
from webhook.mutate import Settings
from webhook.server import ServeOptions, WebhookServer, prepare_metrics_dir

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

ANSWER = b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"x","allowed":true}}'


class ConstantEndpoint:
    """Takes the worker's lean path like the webhook's endpoint, and answers without looking."""

    def answer(self, body: bytes | ReviewResult, start: float) -> ReviewResult:
        return ReviewResult(200, ANSWER, "allowed")


class ConstantApp:
    def __init__(self) -> None:
        self.extensions = {"nix_flake_webhook.mutate": ConstantEndpoint()}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))])
        return [ANSWER]


class BaselineServer(WebhookServer):
    def load(self) -> Any:
        return ConstantApp()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    prepare_metrics_dir()
    BaselineServer(ServeOptions(args.bind, Path(args.cert), Path(args.key)), Settings()).run()
