"""An emulation of kube-apiserver's mutating-webhook client, for tests.

No real API server runs on these machines, so this module does, point by
point, what shared/reference/admission-contract.md says kube-apiserver does
when it calls a webhook: TLS with SNI ``<svc>.<ns>.svc`` verified against the
caBundle, ALPN http/1.1, a kept-alive connection, ``?timeout=Ns``, a compact
AdmissionReview with a fresh uid, the response checks (version, kind, uid,
patch/patchType pairing), denial handling (codes below 400 become 400),
RFC 6902 patch application with evanphx/json-patch v4 strictness, decoding
into the typed Pod, re-defaulting, post-admission validation, and
reinvocation.  Failures that the real API server would turn into a 500 or
hand to failurePolicy raise :class:`WebhookCallFailed`.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import re
import socket
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
from kubernetes import client as k8s

from tests.pods import default_pull_policy

ANNOTATION_KEY = re.compile(
    r"(?:[a-z0-9]([-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)


class WebhookCallFailed(Exception):
    """The call failed in a way the API server hands to failurePolicy, or turns into a 500."""

    def __init__(self, message: str, *, always_500: bool = False) -> None:
        super().__init__(message)
        self.always_500 = always_500


@dataclass
class Admission:
    """What the API server ends up with after one webhook call."""

    allowed: bool
    pod: dict[str, Any]
    patched: bool
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    code: int = 0
    typed: Any = None


class _SNIConnection(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but presents and verifies the service's DNS name, as the API server does."""

    def __init__(self, host: str, port: int, sni: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self.sni = sni
        self.tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.sni)


class ApiServerWebhookClient:
    """kube-apiserver's side of the webhook contract, for one webhook configuration."""

    def __init__(
        self,
        port: int,
        ca_bundle: bytes,
        *,
        service: str = "nix-flake-webhook",
        namespace: str = "nix-flake-webhook",
        path: str = "/mutate",
        timeout_seconds: int = 10,
        host: str = "127.0.0.1",
    ) -> None:
        self.sni = f"{service}.{namespace}.svc"
        self.port = port
        self.path = path
        self.timeout_seconds = timeout_seconds
        context = ssl.create_default_context(cadata=ca_bundle.decode())
        context.set_alpn_protocols(["http/1.1"])
        self.context = context
        self.host = host
        self._conn: _SNIConnection | None = None

    # --- transport ------------------------------------------------------------------------------

    def _connection(self) -> _SNIConnection:
        if self._conn is None:
            self._conn = _SNIConnection(self.host, self.port, self.sni, self.context, self.timeout_seconds)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        """POST to the webhook on the kept-alive connection; a connection the server closed while idle is redialled."""
        headers = {
            "Host": f"{self.sni}:{self.port}",
            "Content-Type": content_type,
            "Accept": "application/json, */*",
            "User-Agent": "kube-apiserver-admission",
        }
        url = f"{self.path}?timeout={self.timeout_seconds}s"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", url, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
                # Go's transport redials only when the pooled connection died before the request was written.
                self.close()
                if attempt == 2:
                    raise WebhookCallFailed(f"failed calling webhook: {err}") from err
            except (OSError, http.client.HTTPException) as err:
                self.close()
                raise WebhookCallFailed(f"failed calling webhook: {err}") from err
        raise AssertionError("unreachable")

    # --- the admission call -----------------------------------------------------------------------

    @staticmethod
    def review_for(
        pod: dict[str, Any], *, dry_run: bool = False, version: str = "admission.k8s.io/v1", operation: str = "CREATE"
    ) -> dict[str, Any]:
        """The AdmissionReview the API server sends for a pod CREATE (fresh uid every call)."""
        request: dict[str, Any] = {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod.get("metadata", {}).get("namespace", "default"),
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a1b2c3",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        }
        name = pod.get("metadata", {}).get("name")
        if name:
            request["name"] = name
        return {"kind": "AdmissionReview", "apiVersion": version, "request": request}

    def admit(self, pod: dict[str, Any], *, dry_run: bool = False, version: str = "admission.k8s.io/v1") -> Admission:
        """One webhook call and everything the API server does with its answer."""
        review = self.review_for(pod, dry_run=dry_run, version=version)
        status, body = self.post(json.dumps(review, separators=(",", ":")).encode())
        if not 200 <= status < 300:
            raise WebhookCallFailed(f"failed calling webhook: expected 2xx, got {status}: {body[:200]!r}")
        try:
            answer = json.loads(body)
        except ValueError as err:
            raise WebhookCallFailed(f"received invalid webhook response: {err}") from err
        uid = review["request"]["uid"]
        response = answer.get("response") if isinstance(answer, dict) else None
        if (
            not isinstance(response, dict)
            or answer.get("apiVersion") != version
            or answer.get("kind") != "AdmissionReview"
            or response.get("uid") != uid
        ):
            raise WebhookCallFailed(f"received invalid webhook response: {body[:300]!r}")
        patch_b64, patch_type = response.get("patch"), response.get("patchType")
        if (patch_b64 is None) != (patch_type is None):
            raise WebhookCallFailed("received invalid webhook response: patch and patchType must come together")
        if patch_type is not None and patch_type != "JSONPatch":
            raise WebhookCallFailed(f"received invalid webhook response: patchType {patch_type!r}")
        warnings = response.get("warnings") or []
        for warning in warnings:
            if not isinstance(warning, str) or len(warning) >= 256 or re.search(r"[\x00-\x1f\x7f]", warning):
                raise AssertionError(f"the API server would drop this warning: {warning!r}")
        if response.get("allowed") is not True:
            status_obj = response.get("status") or {}
            code = status_obj.get("code") or 400
            return Admission(False, pod, False, warnings, status_obj.get("message", ""), max(code, 400))
        patched = pod
        if patch_b64 is not None:
            patched = self._apply(pod, patch_b64)
        typed = self._decode_and_default(patched)
        return Admission(True, patched, patch_b64 is not None, warnings, typed=typed)

    def admit_converged(self, pod: dict[str, Any], **kwargs: Any) -> Admission:
        """Admit, then reinvoke (reinvocationPolicy IfNeeded) on the result: the second pass must not patch."""
        first = self.admit(pod, **kwargs)
        if first.allowed:
            again = self.admit(first.pod, **kwargs)
            if not again.allowed or again.patched:
                raise AssertionError(f"reinvocation did not converge: {again}")
        return first

    # --- what happens to the patch ------------------------------------------------------------------

    @staticmethod
    def _apply(pod: dict[str, Any], patch_b64: str) -> dict[str, Any]:
        try:
            ops = json.loads(base64.b64decode(patch_b64, validate=True))
        except ValueError as err:
            raise WebhookCallFailed(f"malformed JSON patch: {err}", always_500=True) from err
        if not isinstance(ops, list):
            raise WebhookCallFailed("malformed JSON patch: not an array", always_500=True)
        for op in ops:
            if not isinstance(op, dict) or op.get("op") not in ("add", "remove", "replace", "move", "copy", "test"):
                raise WebhookCallFailed(f"malformed JSON patch operation {op!r}", always_500=True)
        try:
            # python-jsonpatch is as strict as evanphx v4 here: add needs the parent, remove/replace need the key.
            return jsonpatch.apply_patch(copy.deepcopy(pod), ops)  # type: ignore[no-any-return]
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, IndexError, TypeError) as err:
            raise WebhookCallFailed(f"JSON patch does not apply: {err}", always_500=True) from err

    @staticmethod
    def _decode_and_default(pod: dict[str, Any]) -> Any:
        metadata = pod.get("metadata") or {}
        for key in ("annotations", "labels"):
            values = metadata.get(key) or {}
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                raise WebhookCallFailed(f"patched object does not decode into a Pod: metadata.{key}", always_500=True)
        annotations = metadata.get("annotations") or {}
        for key in annotations:
            if not ANNOTATION_KEY.fullmatch(key) or len(key.rpartition("/")[2]) > 63:
                raise WebhookCallFailed(f"Pod is invalid: metadata.annotations: invalid key {key!r}")
        if sum(len(k) + len(v) for k, v in annotations.items()) > 256 * 1024:
            raise WebhookCallFailed("Pod is invalid: metadata.annotations: too long")
        spec = pod.get("spec") or {}
        for list_name in ("initContainers", "containers"):
            for item in spec.get(list_name) or []:
                image = item.get("image")
                if not isinstance(image, str) or not image:
                    raise WebhookCallFailed(f"Pod is invalid: spec.{list_name}.image: Required value")
                if image != image.strip():
                    raise WebhookCallFailed(f"Pod is invalid: spec.{list_name}.image: leading or trailing whitespace")
                item.setdefault("imagePullPolicy", default_pull_policy(image))
        return k8s.ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")
