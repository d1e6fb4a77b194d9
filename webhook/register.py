"""Register the webhook with a cluster: the TLS Secret and the MutatingWebhookConfiguration.

The objects are built by pure functions (from the same YAML that
manifests/base holds); :class:`Registrar` only talks to the API server, with
server-side apply under the field manager ``nix-flake-webhook``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as TransportError

from webhook import certs

FIELD_MANAGER = "nix-flake-webhook"
SECRET_NAME = "nix-flake-webhook-tls"
APPLY = "application/apply-patch+yaml"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


class RegistrationError(Exception):
    """One line saying what failed against the cluster and what to do about it."""


def webhook_configuration(ca_bundle: bytes, service: str, namespace: str) -> dict[str, Any]:
    """The MutatingWebhookConfiguration from manifests/base, pointed at ``service.namespace``, trusting ``ca_bundle``."""
    text = resources.files("webhook").joinpath("data/mutatingwebhookconfiguration.yaml").read_text()
    config: dict[str, Any] = yaml.safe_load(text)
    for hook in config["webhooks"]:
        hook["clientConfig"]["service"].update(name=service, namespace=namespace)
        hook["clientConfig"]["caBundle"] = base64.b64encode(ca_bundle).decode()
        for expression in hook["namespaceSelector"]["matchExpressions"]:
            if expression["key"] == "kubernetes.io/metadata.name":
                expression["values"] = [*SYSTEM_NAMESPACES, namespace]
    return config


def tls_secret(cert: bytes, key: bytes, ca: bytes, namespace: str, name: str = SECRET_NAME) -> dict[str, Any]:
    """The kubernetes.io/tls Secret the Deployment mounts."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "nix-flake-webhook"}},
        "data": {
            "tls.crt": base64.b64encode(cert).decode(),
            "tls.key": base64.b64encode(key).decode(),
            "ca.crt": base64.b64encode(ca).decode(),
        },
    }


def desired_objects(certs_dir: Path, service: str, namespace: str) -> list[dict[str, Any]]:
    """Ensure certificates for ``service.namespace`` in ``certs_dir`` and build both objects from them."""
    certs.ensure(certs_dir, certs.CertSpec(service=service, namespace=namespace))
    bundle = certs.ca_bundle(certs_dir)
    secret = tls_secret(
        (certs_dir / certs.TLS_CERT).read_bytes(),
        (certs_dir / certs.TLS_KEY).read_bytes(),
        (certs_dir / certs.CA_CERT).read_bytes(),
        namespace,
    )
    return [secret, webhook_configuration(bundle, service, namespace)]


def contains(have: Any, want: Any) -> bool:
    """True when every field of ``want`` is in ``have`` with the same value (server defaults ignored)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and contains(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(contains, have, want))
    return bool(have == want)


def describe(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']} {where}{meta['name']}"


@dataclass
class Registrar:
    """Applies and deletes the webhook's objects through the kubernetes client."""

    api: k8s.ApiClient

    def _read(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        meta = obj["metadata"]
        found: Any
        try:
            if obj["kind"] == "Secret":
                found = k8s.CoreV1Api(self.api).read_namespaced_secret(meta["name"], meta["namespace"])
            else:
                found = k8s.AdmissionregistrationV1Api(self.api).read_mutating_webhook_configuration(meta["name"])
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        result: dict[str, Any] = self.api.sanitize_for_serialization(found)  # type: ignore[no-untyped-call]
        return result

    def _apply(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        body: Any = obj
        if obj["kind"] == "Secret":
            k8s.CoreV1Api(self.api).patch_namespaced_secret(
                meta["name"], meta["namespace"], body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY
            )
        else:
            k8s.AdmissionregistrationV1Api(self.api).patch_mutating_webhook_configuration(
                meta["name"], body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY
            )

    def apply(self, obj: dict[str, Any]) -> str:
        """Server-side apply ``obj`` unless the cluster already holds it; say what happened."""
        try:
            existing = self._read(obj)
            if existing is not None and contains(existing, obj):
                return f"{describe(obj)} unchanged"
            self._apply(obj)
        except (ApiException, TransportError) as err:
            raise RegistrationError(explain_api_error(err, f"apply {describe(obj)}")) from None
        return f"{describe(obj)} {'created' if existing is None else 'configured'}"

    def delete(self, kind: str, name: str, namespace: str | None = None) -> str:
        """Delete one object; an absent one is not an error."""
        label = f"{kind} {namespace + '/' if namespace else ''}{name}"
        try:
            if kind == "Secret":
                assert namespace is not None
                k8s.CoreV1Api(self.api).delete_namespaced_secret(name, namespace)
            else:
                k8s.AdmissionregistrationV1Api(self.api).delete_mutating_webhook_configuration(name)
        except ApiException as err:
            if err.status == 404:
                return f"{label} already absent"
            raise RegistrationError(explain_api_error(err, f"delete {label}")) from None
        except TransportError as err:
            raise RegistrationError(explain_api_error(err, f"delete {label}")) from None
        return f"{label} deleted"


def explain_api_error(err: Exception, action: str) -> str:
    """One line: what failed, the API server's own words, and the likely fix."""
    if isinstance(err, ApiException):
        message = err.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(err.body or "{}").get("message", message)
        hint = {
            401: "the kubeconfig's credentials were rejected; log in again",
            403: "the kubeconfig user may not do this; it needs get/patch/delete on secrets in the webhook's "
            "namespace and on mutatingwebhookconfigurations",
            404: "the namespace does not exist; apply manifests/base first (kubectl apply -k manifests/base)",
            409: "another field manager owns these fields; retry, or remove the other manager's fields",
            422: "the API server refused the object as invalid",
        }.get(err.status or 0, "")
        return f"cannot {action}: HTTP {err.status}: {message}" + (f" ({hint})" if hint else "")
    return f"cannot {action}: the Kubernetes API is unreachable ({err}); check the kubeconfig's server address"


def load_api_client(kubeconfig: str | None, context: str | None) -> k8s.ApiClient:
    """An API client from a kubeconfig (default search) or, inside a pod, the in-cluster config."""
    from kubernetes import config

    try:
        if kubeconfig is None and context is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                return k8s.ApiClient()
            except config.ConfigException:
                pass
        api: k8s.ApiClient = config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
        return api
    except (config.ConfigException, OSError, TypeError, ValueError) as err:
        raise RegistrationError(f"cannot load a kubeconfig: {err}; pass --kubeconfig or set KUBECONFIG") from None


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    """The objects as a multi-document YAML stream (what --dry-run prints)."""
    return yaml.safe_dump_all([copy.deepcopy(o) for o in objects], sort_keys=False)
