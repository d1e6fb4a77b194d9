"""Decide what a pod becomes: a pod in, a patch with warnings or a refusal out.

Pure: no I/O, no clocks, no framework.  The webhook, the dry run and
``explain`` all call :func:`mutate`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from webhook.dialects import Encoded, decode, encode, is_flake_image
from webhook.errors import ImageRefError, WebhookError
from webhook.flakeref import looks_like_flake_ref, parse
from webhook.imageref import parse_image

POD_ANNOTATION = "nix-snapshotter/flake"
CONTAINER_ANNOTATION_PREFIX = "nix-snapshotter/flake."
RECOVERY_ANNOTATION = "nix-snapshotter/recovery"
NIX_IMAGE_PREFIX = "nix:0/"
CONTAINER_LISTS = ("initContainers", "containers")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

JsonPatchOp = dict[str, Any]

# Matches (at least) every image, stripped or not, that is a flake-*:0 or nix:0 image or looks_like_flake_ref.
_MAYBE_FLAKE_IMAGE = re.compile(
    r"\s*(?:flake-|nix:0/|[A-Za-z][A-Za-z0-9.-]*\+|(?i:github|gitlab|sourcehut|path|flake|https?|file):|.*://)"
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Server-wide settings that shape every decision."""

    dialect: str = "seed"
    #: fnmatch globs over the flake ref (e.g. ``github:myorg/*``); empty allows every source.
    allow_sources: tuple[str, ...] = ()
    #: imagePullPolicy for rewritten containers; None keeps what the API server defaulted.
    image_pull_policy: str | None = None


@dataclass(frozen=True, slots=True)
class ContainerOutcome:
    """What happens to one container, and why (for explain, logs and metrics)."""

    path: str  # e.g. spec.containers[0]
    name: str
    action: str  # rewritten | recovery | kept | untouched | refused
    why: str
    ref: str | None = None
    image: str | None = None
    protocol: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the pod is denied: a machine reason for metrics, and the message for the user."""

    reason: str
    message: str
    code: int = 400


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`mutate`."""

    patch: tuple[JsonPatchOp, ...] = ()
    warnings: tuple[str, ...] = ()
    refusal: Refusal | None = None
    containers: tuple[ContainerOutcome, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return self.refusal is None

    @property
    def rewritten_protocols(self) -> tuple[str, ...]:
        """The flake protocol of each container whose image is rewritten (for metrics)."""
        return tuple(c.protocol or "" for c in self.containers if c.action == "rewritten")


NOTHING_TO_DO = Decision()


class _Refused(Exception):
    def __init__(self, reason: str, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.refusal = Refusal(reason, message, code)


def _escape_pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def may_concern(pod: Any) -> bool:
    """False only when ``pod`` certainly needs nothing from us: cheap, so that such pods cost next to nothing."""
    if not isinstance(pod, dict):
        return True
    metadata = pod.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            return True
        annotations = metadata.get("annotations")
        if annotations is not None:
            if not isinstance(annotations, dict):
                return True
            for key in annotations:
                if key.startswith("nix-snapshotter/flake"):
                    return True
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return spec is not None
    for list_name in CONTAINER_LISTS:
        containers = spec.get(list_name)
        if containers is None:
            continue
        if not isinstance(containers, list):
            return True
        for container in containers:
            if not isinstance(container, dict):
                return True
            image = container.get("image")
            if not isinstance(image, str) or _MAYBE_FLAKE_IMAGE.match(image):
                return True
    return False


def mutate(pod: Any, settings: Settings) -> Decision:
    """Decide what ``pod`` (a Pod object as JSON) becomes under ``settings``."""
    if not may_concern(pod):
        return NOTHING_TO_DO
    try:
        return _Mutation(pod, settings).run()
    except _Refused as refused:
        return Decision(refusal=refused.refusal)


def _is_flake_ref_image(image: str) -> bool:
    if not looks_like_flake_ref(image):
        return False
    try:
        parse_image(image)
    except ImageRefError:
        return True
    return False


class _Mutation:
    """One run of the decision over one pod; collects every problem before refusing."""

    def __init__(self, pod: Any, settings: Settings) -> None:
        self.settings = settings
        self.pod = _mapping(pod, "the object", "a Pod object")
        metadata = self.pod.get("metadata")
        self.metadata = {} if metadata is None else _mapping(metadata, "metadata", "a map")
        annotations = self.metadata.get("annotations")
        self.annotations = (
            {} if annotations is None else _mapping(annotations, "metadata.annotations", "a map of strings")
        )
        self.patch: list[JsonPatchOp] = []
        self.warnings: list[str] = []
        self.errors: list[Refusal] = []
        self.outcomes: list[ContainerOutcome] = []
        self.recovery: dict[str, dict[str, str]] = {}
        self.pod_ref_used = False
        self.current: tuple[str, str] | None = None  # the container being decided, for refusal records

    def run(self) -> Decision:
        pod_ref = self._annotation(POD_ANNOTATION)
        per_container = {
            key[len(CONTAINER_ANNOTATION_PREFIX) :]: self._annotation(key)
            for key in self.annotations
            if key.startswith(CONTAINER_ANNOTATION_PREFIX)
        }
        containers = self._containers()
        names = [name for _, _, name, _ in containers]
        for name in per_container:
            if name not in names:
                self._error(
                    "conflict",
                    f"annotation {CONTAINER_ANNOTATION_PREFIX}{name} names no container of this pod "
                    f"(containers: {', '.join(names) or 'none'}); fix the container name in the annotation key",
                )
        for path, pointer, name, container in containers:
            self.current = (path, name)
            self._container(path, pointer, name, container, per_container.get(name), pod_ref)
        self.current = None
        if pod_ref is not None and not self.pod_ref_used:
            self.warnings.append(
                f"annotation {POD_ANNOTATION}={pod_ref} reaches no container: each has its own image; "
                "give the target container an empty image, or remove the annotation"
            )
        if self.errors:
            first = self.errors[0]
            message = "; ".join(error.message for error in self.errors)
            code = max(error.code for error in self.errors)
            return Decision(refusal=Refusal(first.reason, message, code), containers=tuple(self.outcomes))
        self._patch_recovery()
        return Decision(tuple(self.patch), tuple(self.warnings), None, tuple(self.outcomes))

    # --- reading the pod -------------------------------------------------------------------

    def _annotation(self, key: str) -> str | None:
        value = self.annotations.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _Refused("malformed", f"annotation {key} must be a string, not {type(value).__name__}")
        return value.strip()

    def _containers(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        raw_spec = self.pod.get("spec")
        # No spec: no containers to decide about (the API server itself refuses such a pod).
        spec = {} if raw_spec is None else _mapping(raw_spec, "spec", "a PodSpec map")
        found = []
        for list_name in CONTAINER_LISTS:
            items = spec.get(list_name)
            if items is None:
                continue
            if not isinstance(items, list):
                raise _Refused("malformed", f"spec.{list_name} must be a list, not {type(items).__name__}")
            for index, container in enumerate(items):
                path = f"spec.{list_name}[{index}]"
                item = _mapping(container, path, "a container map")
                name = item.get("name")
                if not isinstance(name, str) or not name:
                    raise _Refused("malformed", f"{path} has no name; every container needs a name")
                found.append((path, f"/spec/{list_name}/{index}", name, item))
        return found

    # --- one container ----------------------------------------------------------------------

    def _container(
        self, path: str, pointer: str, name: str, container: dict[str, Any], own_ref: str | None, pod_ref: str | None
    ) -> None:
        image = container.get("image")
        if image is not None and not isinstance(image, str):
            raise _Refused(
                "malformed", f"container '{name}' ({path}): image must be a string, not {type(image).__name__}"
            )
        image = (image or "").strip()
        own_key = CONTAINER_ANNOTATION_PREFIX + name
        where = f"container '{name}' ({path})"

        if image and _is_flake_ref_image(image):
            if own_ref is not None and own_ref != image:
                self._error(
                    "conflict",
                    f"{where}: its image is the flake '{image}' but annotation {own_key} says '{own_ref}'; keep one",
                )
                return
            self._rewrite(path, pointer, name, container, image, "its image", where)
        elif not image:
            ref, source = (own_ref, own_key) if own_ref is not None else (pod_ref, POD_ANNOTATION)
            if ref is None:
                self.outcomes.append(ContainerOutcome(path, name, "untouched", "no image and no flake annotation"))
                return
            self.pod_ref_used |= source == POD_ANNOTATION
            self._rewrite(path, pointer, name, container, ref, f"annotation {source}", where)
        elif image.startswith(NIX_IMAGE_PREFIX):
            ref, source = (own_ref, own_key) if own_ref is not None else (pod_ref, POD_ANNOTATION)
            if ref is None:
                self.outcomes.append(
                    ContainerOutcome(path, name, "untouched", "nix:0 store path with no flake annotation")
                )
                return
            self.pod_ref_used |= source == POD_ANNOTATION
            self._record_recovery(path, name, image, ref, f"annotation {source}", where)
        elif is_flake_image(image):
            self._check_flake_image(path, name, image, own_ref, own_key, pod_ref, where)
        elif own_ref is not None:
            self._error(
                "conflict",
                f"{where}: annotation {own_key}={own_ref} targets a container that runs the registry image "
                f"'{image}'; set its image to \"\" (or the flake) to use the flake, or remove the annotation",
            )
        else:
            self.outcomes.append(ContainerOutcome(path, name, "untouched", "registry image"))

    def _encode(self, ref: str, source: str, where: str) -> Encoded | None:
        try:
            encoded = encode(ref, self.settings.dialect)
        except WebhookError as err:
            self._error(err.reason, f"{where}: flake from {source}: {err.message}")
            return None
        if not self._allowed(str(encoded.ref)):
            self._error(
                "not-allowed",
                f"{where}: flake '{ref}' from {source} is not an allowed source "
                f"(allowed: {', '.join(self.settings.allow_sources)}); use a flake from an allowed source "
                "or ask the cluster admin to allow it",
                403,
            )
            return None
        self.warnings.extend(f"{where}: {warning}" for warning in encoded.warnings)
        return encoded

    def _allowed(self, url: str) -> bool:
        sources = self.settings.allow_sources
        return not sources or any(fnmatchcase(url, pattern) for pattern in sources)

    def _rewrite(
        self, path: str, pointer: str, name: str, container: dict[str, Any], ref: str, source: str, where: str
    ) -> None:
        encoded = self._encode(ref, source, where)
        if encoded is None:
            return
        op = "replace" if "image" in container else "add"
        self.patch.append({"op": op, "path": f"{pointer}/image", "value": encoded.image})
        policy = self.settings.image_pull_policy
        if policy is not None and container.get("imagePullPolicy") != policy:
            op = "replace" if "imagePullPolicy" in container else "add"
            self.patch.append({"op": op, "path": f"{pointer}/imagePullPolicy", "value": policy})
        self.outcomes.append(
            ContainerOutcome(
                path, name, "rewritten", f"flake '{ref}' from {source}", ref, encoded.image, encoded.ref.scheme
            )
        )

    def _record_recovery(self, path: str, name: str, image: str, ref: str, source: str, where: str) -> None:
        encoded = self._encode(ref, source, where)
        if encoded is None:
            return
        store_path = "/" + image[len(NIX_IMAGE_PREFIX) :].removesuffix(":latest")
        self.recovery[name] = {"storePath": store_path, "flake": ref, "image": encoded.image}
        self.outcomes.append(
            ContainerOutcome(
                path,
                name,
                "recovery",
                f"nix:0 store path kept; flake '{ref}' from {source} recorded for recovery",
                ref,
                encoded.image,
                encoded.ref.scheme,
            )
        )

    def _check_flake_image(
        self, path: str, name: str, image: str, own_ref: str | None, own_key: str, pod_ref: str | None, where: str
    ) -> None:
        dialect = self.settings.dialect
        try:
            parsed = parse_image(image)
            if parsed.digest is not None or parsed.tag not in (None, "latest"):
                raise ImageRefError(f"a {dialect} node only strips ':latest'; remove the tag or digest from '{image}'")
            url = decode(image, dialect)
            parse(url.removesuffix("#default") if dialect == "hex" and url.endswith("#default") else url)
        except WebhookError as err:
            self._error(
                "undecodable-image",
                f"{where}: the node could not use the image '{image}': {err.message}; "
                "write the flake ref in the nix-snapshotter/flake annotation and let the webhook encode it",
            )
            return
        if not self._allowed(url) and not self._allowed(url.removesuffix("#default")):
            self._error(
                "not-allowed",
                f"{where}: the image '{image}' builds '{url}', which is not an allowed source "
                f"(allowed: {', '.join(self.settings.allow_sources)})",
                403,
            )
            return
        bare = image.removesuffix(":latest")
        for ref in (own_ref, pod_ref):
            if ref is None:
                continue
            try:
                matches = encode(ref, dialect).image == bare
            except WebhookError:
                matches = False
            if ref is own_ref and not matches:
                self._error(
                    "conflict",
                    f"{where}: its image '{image}' builds '{url}' but annotation {own_key} says '{own_ref}'; keep one",
                )
                return
            if ref is pod_ref and matches:
                self.pod_ref_used = True
        self.outcomes.append(ContainerOutcome(path, name, "kept", f"flake image decodes to {url}", url, image))

    # --- output -----------------------------------------------------------------------------

    def _error(self, reason: str, message: str, code: int = 400) -> None:
        self.errors.append(Refusal(reason, message, code))
        if self.current is not None:
            self.outcomes.append(ContainerOutcome(*self.current, "refused", message))

    def _patch_recovery(self) -> None:
        if not self.recovery:
            return
        value = json.dumps(self.recovery, sort_keys=True, separators=(",", ":"))
        existing = self.annotations.get(RECOVERY_ANNOTATION)
        if isinstance(existing, str):
            try:
                if json.loads(existing) == self.recovery:
                    return
            except ValueError:
                pass
        if self.pod.get("metadata") is None:
            self.patch.append(
                {"op": "add", "path": "/metadata", "value": {"annotations": {RECOVERY_ANNOTATION: value}}}
            )
        elif self.metadata.get("annotations") is None:
            self.patch.append({"op": "add", "path": "/metadata/annotations", "value": {RECOVERY_ANNOTATION: value}})
        else:
            op = "replace" if RECOVERY_ANNOTATION in self.annotations else "add"
            self.patch.append(
                {"op": op, "path": f"/metadata/annotations/{_escape_pointer(RECOVERY_ANNOTATION)}", "value": value}
            )


def _mapping(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        got = "nothing" if value is None else type(value).__name__
        raise _Refused("malformed", f"{where} must be {what}, not {got}")
    return value
