"""AdmissionReview in, AdmissionReview out (admission.k8s.io/v1 and v1beta1).

Pure: bytes in, an HTTP status and bytes out, plus the facts the shell logs
and counts.  The wire rules are those of shared/reference/admission-contract.md.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, TypedDict

import msgspec

from webhook.mutate import NOTHING_TO_DO, Decision, Refusal, Settings, may_concern, mutate

MAX_BODY_BYTES = 3 * 1024 * 1024
API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
MAX_WARNING_CHARS = 255
MAX_WARNINGS_TOTAL = 4000
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_STATUS_REASONS = {400: "BadRequest", 403: "Forbidden", 422: "Invalid"}


@dataclass(slots=True)  # not frozen: built on every request, and frozen init costs a microsecond more
class ReviewResult:
    """The HTTP answer, and what happened (for the log line and the metrics)."""

    status: int
    body: bytes
    outcome: str  # patched | allowed | denied | skipped | bad-request
    uid: str = ""
    namespace: str = ""
    name: str = ""
    operation: str = ""
    dry_run: bool = False
    reason: str = ""
    protocols: tuple[str, ...] = ()

    def log_fields(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "pod": self.name,
            "operation": self.operation,
            "dryRun": self.dry_run,
            "outcome": self.outcome,
            "reason": self.reason,
            "rewritten": len(self.protocols),
        }


_dumps = msgspec.json.encode


# The few fields a decision can depend on.  Decoding into these skips everything
# else (managedFields, volumes, ...) without building it, so a pod that does not
# concern us costs a third of a full parse; one that does is then parsed whole.
class _SkimContainer(TypedDict, total=False):
    name: Any
    image: Any


class _SkimSpec(TypedDict, total=False):
    containers: list[_SkimContainer] | None
    initContainers: list[_SkimContainer] | None


class _SkimMetadata(TypedDict, total=False):
    name: Any
    generateName: Any
    annotations: dict[str, Any] | None


class _SkimObject(TypedDict, total=False):
    metadata: _SkimMetadata | None
    spec: _SkimSpec | None


class _SkimRequest(TypedDict, total=False):
    uid: Any
    kind: Any
    name: Any
    namespace: Any
    operation: Any
    subResource: Any
    dryRun: Any
    object: _SkimObject | None


class _SkimReview(TypedDict, total=False):
    apiVersion: Any
    kind: Any
    request: _SkimRequest


_skim = msgspec.json.Decoder(_SkimReview).decode
_FLAKE_ANNOTATION = b'"nix-snapshotter/flake'


def _parse(body: bytes) -> tuple[Any, bool]:
    """(review, whether it is complete): skimmed when that is all the decision needs.

    Raises msgspec.DecodeError (or RecursionError) for bodies that are not JSON.
    """
    if _FLAKE_ANNOTATION in body:
        # Behind matchConditions nearly every review is one of these: skimming first would only add to it.
        return msgspec.json.decode(body), True
    try:
        document: Any = _skim(body)
    except msgspec.ValidationError:
        # Valid JSON of unexpected shape: parse it all and let the checks below say what is wrong.
        return msgspec.json.decode(body), True
    request = document.get("request")
    if _is_pod_create(request) and may_concern(request.get("object")):
        return msgspec.json.decode(body), True
    return document, False


def bad_request(message: str, status: int = 400) -> ReviewResult:
    """A plain JSON error for bodies that are not AdmissionReviews at all."""
    return ReviewResult(status, _dumps({"error": message, "code": status}), "bad-request", reason="bad-request")


def clean_warnings(warnings: tuple[str, ...]) -> list[str]:
    """Warnings the API server will pass on: no control characters, each and all within its limits."""
    out: list[str] = []
    total = 0
    for warning in warnings:
        text = _CONTROL_RE.sub(" ", warning)
        if len(text) > MAX_WARNING_CHARS:
            text = text[: MAX_WARNING_CHARS - 3] + "..."
        if total + len(text) > MAX_WARNINGS_TOTAL:
            break
        total += len(text)
        out.append(text)
    return out


def response_for(uid: str, decision: Decision) -> dict[str, Any]:
    """The ``response`` stanza of an AdmissionReview for ``decision``."""
    response: dict[str, Any] = {"uid": uid, "allowed": decision.allowed}
    if decision.refusal is not None:
        code = max(decision.refusal.code, 400)
        response["status"] = {
            "code": code,
            "status": "Failure",
            "reason": _STATUS_REASONS.get(code, "BadRequest"),
            "message": decision.refusal.message,
        }
    elif decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(_dumps(list(decision.patch))).decode()
    if decision.warnings:
        response["warnings"] = clean_warnings(decision.warnings)
    return response


def review(body: bytes, settings: Settings) -> ReviewResult:
    """Answer one AdmissionReview request body."""
    if len(body) > MAX_BODY_BYTES:
        return bad_request(f"request body is over {MAX_BODY_BYTES} bytes", 413)
    try:
        document, complete = _parse(body)
    except (msgspec.DecodeError, RecursionError) as err:
        return bad_request(f"request body is not JSON: {str(err)[:200]}")
    if not isinstance(document, dict):
        return bad_request("request body is not an AdmissionReview object")
    request = document.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        return bad_request("AdmissionReview has no request.uid")
    uid: str = request["uid"]
    api_version = document.get("apiVersion")
    obj = request.get("object")

    if api_version not in API_VERSIONS or document.get("kind") != "AdmissionReview":
        decision = Decision(refusal=_unsupported(api_version, document.get("kind")))
        outcome = "denied"
    elif not _is_pod_create(request):
        decision, outcome = NOTHING_TO_DO, "skipped"
    elif not complete:
        decision, outcome = NOTHING_TO_DO, "allowed"
    else:
        try:
            decision = mutate(obj, settings)
        except Exception as err:  # a bug must deny with a reason, never break the wire contract
            message = f"nix-flake-webhook internal error ({type(err).__name__}); please report it"
            decision = Decision(refusal=Refusal("internal", message))
        outcome = "denied" if decision.refusal is not None else "patched" if decision.patch else "allowed"

    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    version = api_version if api_version in API_VERSIONS else API_VERSIONS[0]
    return ReviewResult(
        200,
        _allowed_bytes(version, uid)
        if decision is NOTHING_TO_DO
        else _review_bytes(version, response_for(uid, decision)),
        outcome,
        uid=uid,
        namespace=_text(request.get("namespace")),
        name=_text(request.get("name") or metadata.get("name") or metadata.get("generateName")),
        operation=_text(request.get("operation")),
        dry_run=request.get("dryRun") is True,
        reason=decision.refusal.reason if decision.refusal else "",
        protocols=decision.rewritten_protocols,
    )


def _unsupported(api_version: Any, kind: Any) -> Refusal:
    return Refusal(
        "bad-review",
        f"unsupported review {api_version!r}/{kind!r}: this webhook speaks AdmissionReview "
        f"{' and '.join(API_VERSIONS)}; set admissionReviewVersions accordingly",
    )


def _is_pod_create(request: Any) -> bool:
    if not isinstance(request, dict):
        return False
    kind = request.get("kind")
    return (
        isinstance(kind, dict)
        and kind.get("group", "") == ""
        and kind.get("kind") == "Pod"
        and request.get("operation") == "CREATE"
        and not request.get("subResource")
    )


def _review_bytes(version: str, response: dict[str, Any]) -> bytes:
    return _dumps({"apiVersion": version, "kind": "AdmissionReview", "response": response})


def _allowed_bytes(version: str, uid: str) -> bytes:
    # The common answer, without building the response dictionary.
    return b'{"apiVersion":"%s","kind":"AdmissionReview","response":{"uid":%s,"allowed":true}}' % (
        version.encode(),
        msgspec.json.encode(uid),
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
