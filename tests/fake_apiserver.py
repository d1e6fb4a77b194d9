"""An emulation of the kube-apiserver endpoints that `register` and `unregister` use.

Not a real API server: a small HTTPS Flask app that keeps Secrets and
MutatingWebhookConfigurations in memory and behaves like kube-apiserver for
the calls we make: bearer-token authentication (401), GET (404 with a Status
when absent), server-side apply as PATCH with ``application/apply-patch+yaml``
and a required ``fieldManager`` (create 201 / update 200, resourceVersion
bumped only on a real change, server defaults filled in), DELETE, a missing
namespace (404), and injectable failures (403, 409, ...) as Status objects.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from flask import Flask, Response, request
from werkzeug.serving import make_server

from tests.conftest import free_port
from webhook import certs

TOKEN = "emulated-token"
MWC_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/<name>"
SECRET_PATH = "/api/v1/namespaces/<namespace>/secrets/<name>"


def _status(code: int, reason: str, message: str) -> Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return Response(json.dumps(body), status=code, mimetype="application/json")


def _defaults(obj: dict[str, Any]) -> None:
    """A few of the defaults kube-apiserver fills into a MutatingWebhookConfiguration."""
    for hook in obj.get("webhooks", []):
        hook.setdefault("matchPolicy", "Equivalent")
        hook.setdefault("objectSelector", {})
        hook.setdefault("timeoutSeconds", 10)
        for rule in hook.get("rules", []):
            rule.setdefault("scope", "*")


def _merge(base: Any, applied: Any) -> Any:
    if isinstance(base, dict) and isinstance(applied, dict):
        merged = dict(base)
        for key, value in applied.items():
            merged[key] = _merge(base.get(key), value)
        return merged
    return copy.deepcopy(applied)


@dataclass
class FakeApiServer:
    """State and knobs of the emulated API server."""

    namespaces: set[str] = field(default_factory=lambda: {"default", "nix-flake-webhook"})
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    faults: dict[tuple[str, str], tuple[int, str, str]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    version: int = 100

    def app(self) -> Flask:
        app = Flask("fake-apiserver")

        @app.before_request
        def authenticate() -> Response | None:
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return _status(401, "Unauthorized", "Unauthorized")
            return None

        @app.route(SECRET_PATH, methods=["GET", "PATCH", "DELETE"])
        def secret(namespace: str, name: str) -> Response:
            if namespace not in self.namespaces:
                return _status(404, "NotFound", f'namespaces "{namespace}" not found')
            return self.handle("Secret", namespace, name)

        @app.route(MWC_PATH, methods=["GET", "PATCH", "DELETE"])
        def mwc(name: str) -> Response:
            return self.handle("MutatingWebhookConfiguration", "", name)

        return app

    def handle(self, kind: str, namespace: str, name: str) -> Response:
        self.requests.append((request.method, kind, request.headers.get("Content-Type", "")))
        fault = self.faults.get((request.method, kind))
        if fault is not None:
            return _status(*fault)
        key = (kind, namespace, name)
        current = self.objects.get(key)
        if request.method == "GET":
            if current is None:
                return _status(404, "NotFound", f'{kind.lower()}s "{name}" not found')
            return Response(json.dumps(current), mimetype="application/json")
        if request.method == "DELETE":
            if current is None:
                return _status(404, "NotFound", f'{kind.lower()}s "{name}" not found')
            del self.objects[key]
            return Response('{"kind":"Status","status":"Success"}', mimetype="application/json")
        if request.mimetype != "application/apply-patch+yaml":
            return _status(415, "UnsupportedMediaType", f"unsupported patch type {request.mimetype}")
        manager = request.args.get("fieldManager")
        if not manager:
            return _status(400, "BadRequest", "fieldManager is required for apply patch")
        applied = yaml.safe_load(request.get_data())
        if applied.get("kind") != kind or applied.get("metadata", {}).get("name") != name:
            return _status(400, "BadRequest", "the body's kind or name does not match the URL")
        merged = _merge(current or {}, applied)
        _defaults(merged)
        meta = merged.setdefault("metadata", {})
        if current is None:
            self.version += 1
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(self.version))
        elif {k: v for k, v in merged.items() if k != "metadata"} != {
            k: v for k, v in current.items() if k != "metadata"
        }:
            self.version += 1
            meta["resourceVersion"] = str(self.version)
        meta["managedFields"] = [{"manager": manager, "operation": "Apply"}]
        self.objects[key] = merged
        return Response(json.dumps(merged), status=201 if current is None else 200, mimetype="application/json")


@contextmanager
def running_fake_apiserver(workdir: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    """Serve the emulation over HTTPS on loopback; yield it and a kubeconfig that reaches it."""
    state = FakeApiServer()
    tls_dir = workdir / "apiserver-tls"
    certs.ensure(tls_dir, certs.CertSpec(service="kubernetes", namespace="default"))
    port = free_port()
    server = make_server(
        "127.0.0.1",
        port,
        state.app(),
        threaded=True,
        ssl_context=(str(tls_dir / certs.TLS_CERT), str(tls_dir / certs.TLS_KEY)),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "emulated",
                        "cluster": {
                            "server": f"https://127.0.0.1:{port}",
                            "certificate-authority": str(tls_dir / certs.CA_CERT),
                        },
                    }
                ],
                "users": [{"name": "admin", "user": {"token": TOKEN}}],
                "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "admin"}}],
                "current-context": "emulated",
            }
        )
    )
    try:
        yield state, kubeconfig
    finally:
        server.shutdown()
        thread.join(5)
