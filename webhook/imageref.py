"""The image-reference grammar the kubelet applies before it asks for a pull.

Mirrors distribution/reference (``ParseNormalizedNamed``) as described in
shared/reference/image-references.md, but reports *where* a reference breaks
the grammar so that callers can point at the character the user wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from webhook.errors import ImageRefError

#: Strict limit: older parsers count the domain too, so we always do.
MAX_NAME_LENGTH = 255

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_PATH_RE = re.compile(rf"{_COMPONENT_RE.pattern}(?:/{_COMPONENT_RE.pattern})*")
_SEPARATOR_RE = re.compile(r"[._]|__|-+")
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image reference split the way the kubelet splits it."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}" if self.domain else self.path


def path_problem(path: str) -> tuple[int, str] | None:
    """Return (0-based index in ``path``, reason) of the first grammar violation, or None."""
    if _PATH_RE.fullmatch(path):
        return None
    start = 0
    for component in path.split("/"):
        problem = _component_problem(component)
        if problem is not None:
            return start + problem[0], problem[1]
        start += len(component) + 1
    return None


def _component_problem(component: str) -> tuple[int, str] | None:
    if _COMPONENT_RE.fullmatch(component):
        return None
    if not component:
        return 0, "an image path may not have an empty component (a leading, trailing or doubled '/')"
    for index, char in enumerate(component):
        if char not in _ALNUM and char not in "._-":
            what = "uppercase letters" if char.isupper() else f"'{char}'"
            return index, f"an image path may not contain {what} (repository name must be lowercase, [a-z0-9._-])"
    if component[0] not in _ALNUM:
        return (
            0,
            f"image path component '{component}' must start with a lowercase letter or digit, not '{component[0]}'",
        )
    if component[-1] not in _ALNUM:
        return len(component) - 1, (
            f"image path component '{component}' must end with a lowercase letter or digit, not '{component[-1]}'"
        )
    for match in re.finditer(r"[._-]+", component):
        if not _SEPARATOR_RE.fullmatch(match.group()):
            return match.start(), (
                f"image path component '{component}' has the separator '{match.group()}'; "
                "only '.', '_', '__' or a run of '-' may stand between letters and digits"
            )
    return 0, f"image path component '{component}' is not valid"  # pragma: no cover - exhaustive above


def split_domain(name: str) -> tuple[str, str]:
    """Split a name into (domain, path) as ParseNormalizedNamed decides it."""
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return first, rest
    return "", name


def parse_image(image: str) -> ImageRef:
    """Parse ``image`` with the kubelet's grammar; raise ImageRefError saying what breaks it."""
    if not isinstance(image, str) or not image:
        raise ImageRefError("the image is empty")
    if image != image.strip():
        raise ImageRefError(f"image '{image}' has leading or trailing whitespace")
    rest, at, digest = image.partition("@")
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag: str | None = None
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    domain, path = split_domain(rest)
    if domain and not _DOMAIN_RE.fullmatch(domain):
        raise ImageRefError(f"image '{image}' has the invalid registry host '{domain}'")
    if not path:
        raise ImageRefError(f"image '{image}' has no repository path")
    problem = path_problem(path)
    if problem is not None:
        raise ImageRefError(
            f"invalid image '{image}': {problem[1]}", position=(len(domain) + 1 if domain else 0) + problem[0] + 1
        )
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise ImageRefError(f"image '{image}' has the invalid tag '{tag}'")
    if at and (not _DIGEST_RE.fullmatch(digest) or (digest.startswith("sha256:") and not _SHA256_RE.fullmatch(digest))):
        raise ImageRefError(f"image '{image}' has the invalid digest '{digest}'")
    ref = ImageRef(domain, path, tag, digest if at else None)
    if len(ref.name) > MAX_NAME_LENGTH:
        raise ImageRefError(
            f"image '{image[:60]}...' has a {len(ref.name)}-character name; the limit is {MAX_NAME_LENGTH}"
        )
    return ref
