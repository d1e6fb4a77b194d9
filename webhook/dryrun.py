"""Dry run: documents in, the pods they create found, the webhook's own decision applied, documents out.

Offline the decision is :func:`webhook.mutate.mutate`; with ``--server`` it is
the live endpoint, called the way kube-apiserver calls it.  Either way a
:class:`Verdict` comes back and is applied here, so both paths give the same
documents, patches and messages.
"""

from __future__ import annotations

import base64
import copy
import difflib
import http.client
import json
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jsonpatch
import yaml

from webhook.admission import clean_warnings
from webhook.mutate import ContainerOutcome, Settings, mutate

#: Where each kind keeps the template of the pods it creates ("" = the document is the pod).
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}


class InputError(Exception):
    """Input that cannot be read at all (exit 2)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The webhook's answer for one pod, however it was obtained."""

    patch: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()
    refusal: str | None = None
    containers: tuple[ContainerOutcome, ...] = ()


Decide = Callable[[dict[str, Any]], Verdict]


def offline(settings: Settings) -> Decide:
    """Decide with the webhook's own function."""

    def decide(pod: dict[str, Any]) -> Verdict:
        decision = mutate(pod, settings)
        refusal = decision.refusal.message if decision.refusal is not None else None
        return Verdict(decision.patch, tuple(clean_warnings(decision.warnings)), refusal, decision.containers)

    return decide


@dataclass
class PodSite:
    """One pod (or pod template) inside a document, with the webhook's verdict on it."""

    pointer: str  # JSON pointer of the template in the document ("" for a Pod)
    label: str  # e.g. "spec.template"
    verdict: Verdict = field(default_factory=Verdict)


@dataclass
class Document:
    """One input document and what the webhook makes of it."""

    source: str
    index: int
    original: Any
    result: Any = None
    sites: list[PodSite] = field(default_factory=list)
    error: str | None = None

    @property
    def title(self) -> str:
        if not isinstance(self.original, dict):
            return f"{self.source}#{self.index}"
        kind = self.original.get("kind", "?")
        meta = self.original.get("metadata")
        name = meta.get("name") or meta.get("generateName") if isinstance(meta, dict) else None
        return f"{self.source}#{self.index} {kind}" + (f"/{name}" if name else "")

    @property
    def refused(self) -> bool:
        return any(site.verdict.refusal is not None for site in self.sites)


def load_documents(data: bytes, source: str) -> list[Document]:
    """Parse YAML or JSON (several documents allowed); InputError with file:line:column when broken."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{source}: not UTF-8 text (byte {err.start}); give a YAML or JSON file") from None
    if "\x00" in text:
        raise InputError(f"{source}: binary data (NUL byte); give a YAML or JSON file")
    try:
        loaded = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise InputError(f"{where}: invalid YAML: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{source}: invalid YAML: {err}") from None
    return [Document(source, index, doc) for index, doc in enumerate(loaded)]


def _sites(obj: Any, pointer: str = "", label: str = "") -> Iterator[tuple[str, str, Any, dict[str, Any]]]:
    """(pointer, label, template, owning object) for every pod template in ``obj``, descending into Lists."""
    if not isinstance(obj, dict):
        return
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list)):
        for i, item in enumerate(obj.get("items") or []):
            yield from _sites(item, f"{pointer}/items/{i}", f"{label}items[{i}].")
        return
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    yield pointer + "".join(f"/{key}" for key in path), label + (".".join(path) or "pod"), node, obj


def _pod_of(kind_is_pod: bool, template: Any, namespace: Any) -> Any:
    """The Pod the API server would hand the webhook for this template."""
    if kind_is_pod:
        return template
    if not isinstance(template, dict):
        return template
    metadata = copy.deepcopy(template.get("metadata")) if isinstance(template.get("metadata"), dict) else None
    if metadata is not None and isinstance(namespace, str):
        metadata.setdefault("namespace", namespace)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template.get("spec")}


def process(document: Document, decide: Decide) -> Document:
    """Run the webhook over every pod site of ``document`` and apply the patches."""
    obj = document.original
    if not isinstance(obj, dict):
        document.error = f"not a Kubernetes object (a {type(obj).__name__}, not a mapping)"
        document.result = obj
        return document
    result = copy.deepcopy(obj)
    for pointer, label, template, owner in _sites(obj):
        if not isinstance(template, dict):
            document.error = f"{label} is missing or not a map; no pods can be created from it"
            continue
        owner_meta = owner.get("metadata")
        namespace = owner_meta.get("namespace") if isinstance(owner_meta, dict) else None
        verdict = decide(_pod_of(owner.get("kind") == "Pod", template, namespace))
        document.sites.append(PodSite(pointer, label, verdict))
        if verdict.refusal is None and verdict.patch:
            ops = [dict(op, path=pointer + op["path"]) for op in verdict.patch]
            result = jsonpatch.apply_patch(result, ops, in_place=True)  # result is already our own copy
    document.result = result
    return document


# --- the live endpoint ---------------------------------------------------------------------------


class LiveWebhook:
    """Calls a running webhook exactly as kube-apiserver does: AdmissionReview v1 over verified TLS."""

    def __init__(self, server: str, ca_file: str | None, server_name: str | None, timeout: float = 10.0) -> None:
        parts = urlsplit(server)
        if parts.scheme != "https" or not parts.hostname:
            raise InputError(f"--server must be an https:// URL, not {server!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.path = parts.path if parts.path not in ("", "/") else "/mutate"
        self.server_name = server_name or self.host
        self.context = ssl.create_default_context(cafile=ca_file)
        self.context.set_alpn_protocols(["http/1.1"])
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None

    def _connect(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
            sock = socket.create_connection((self.host, self.port), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client's own connect does
            conn.sock = self.context.wrap_socket(sock, server_hostname=self.server_name)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __call__(self, pod: dict[str, Any]) -> Verdict:
        uid = str(uuid.uuid4())
        metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": (metadata or {}).get("namespace") or "default",
                "operation": "CREATE",
                "userInfo": {"username": "nix-flake-webhook-dry-run"},
                "object": pod,
                "oldObject": None,
                "dryRun": True,
                "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
            },
        }
        body = json.dumps(review, separators=(",", ":")).encode()
        headers = {
            "Host": f"{self.server_name}:{self.port}",
            "Content-Type": "application/json",
            "Accept": "application/json, */*",
            "User-Agent": "nix-flake-webhook-dry-run",
        }
        try:
            conn = self._connect()
            conn.request("POST", f"{self.path}?timeout={int(self.timeout)}s", body=body, headers=headers)
            response = conn.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise InputError(f"cannot call the webhook at {self.host}:{self.port}: {err}") from None
        return self._verdict(uid, status, data)

    @staticmethod
    def _verdict(uid: str, status: int, data: bytes) -> Verdict:
        if status != 200:
            raise InputError(f"the webhook answered HTTP {status}: {data[:200].decode(errors='replace')}")
        try:
            answer = json.loads(data)
            response = answer["response"]
            if answer.get("kind") != "AdmissionReview" or response.get("uid") != uid:
                raise ValueError("not an AdmissionReview for this request")
            patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"the webhook sent an invalid AdmissionReview: {err}") from None
        warnings = tuple(response.get("warnings") or ())
        if not response.get("allowed"):
            return Verdict(warnings=warnings, refusal=(response.get("status") or {}).get("message", "denied"))
        return Verdict(tuple(patch), warnings)


# --- output ----------------------------------------------------------------------------------------


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)


def render(documents: list[Document], output: str) -> str:
    """The documents in the requested form: yaml, json, patch or diff."""
    if output == "yaml":
        return yaml.safe_dump_all([d.result for d in documents], sort_keys=False, allow_unicode=True)
    if output == "json":
        results = [d.result for d in documents]
        value = results[0] if len(results) == 1 else {"apiVersion": "v1", "kind": "List", "items": results}
        return json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    if output == "patch":
        patches = [
            {"document": d.title, "pod": site.label, "patch": list(site.verdict.patch)}
            for d in documents
            for site in d.sites
            if site.verdict.refusal is None
        ]
        return json.dumps(patches, indent=2, ensure_ascii=False) + "\n"
    if output == "diff":
        chunks: list[str] = []
        for d in documents:
            before, after = to_yaml(d.original).splitlines(True), to_yaml(d.result).splitlines(True)
            chunks.extend(difflib.unified_diff(before, after, f"a/{d.title}", f"b/{d.title}"))
        return "".join(chunks)
    raise ValueError(f"unknown output {output!r}")


def messages(documents: list[Document]) -> Iterator[str]:
    """stderr lines: errors, refusals and warnings, each naming its document and pod."""
    for d in documents:
        if d.error is not None:
            yield f"error: {d.title}: {d.error}"
        for site in d.sites:
            if site.verdict.refusal is not None:
                yield f"refused: {d.title} ({site.label}): {site.verdict.refusal}"
            for warning in site.verdict.warnings:
                yield f"warning: {d.title} ({site.label}): {warning}"


def explain(documents: list[Document]) -> Iterator[str]:
    """Per container: rewritten, kept with recovery, left alone or refused, and why."""
    words = {
        "rewritten": "will be rewritten",
        "recovery": "keeps its nix:0 image, recovery recorded",
        "kept": "left alone (already a node image)",
        "untouched": "left alone",
        "refused": "REFUSED",
    }
    for d in documents:
        if d.error is not None:
            yield f"{d.title}: error: {d.error}"
        if not d.sites and d.error is None:
            yield f"{d.title}: no pods; passes through unchanged"
        for site in d.sites:
            yield f"{d.title} ({site.label}):"
            for c in site.verdict.containers:
                target = f" -> {c.image}" if c.image and c.action in ("rewritten", "recovery") else ""
                yield f"  {c.path} '{c.name}': {words.get(c.action, c.action)}{target}"
                yield f"      why: {c.why}"
            if site.verdict.refusal is not None and not any(c.action == "refused" for c in site.verdict.containers):
                yield f"  REFUSED: {site.verdict.refusal}"
            if not site.verdict.containers and site.verdict.refusal is None:
                yield "  nothing for the webhook to do"
