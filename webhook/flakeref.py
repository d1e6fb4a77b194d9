"""Parse flake references into structured values, refusing what Nix refuses.

Only the six forms a nix-snapshotter node can build are accepted; Nix's other
forms are recognised so that the error can say what to write instead.  The
parsed value keeps the text exactly as written (``str(ref)`` gives it back),
because the node must rebuild the very URL the user meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from webhook.errors import FlakeRefError, UnsupportedSchemeError

#: The flake URL schemes a node decodes, in the order the docs list them.
SUPPORTED_SCHEMES = (
    "github",
    "tarball+https",
    "tarball+http",
    "git+https",
    "git+http",
    "git+ssh",
)
SUPPORTED_HINT = "supported: github:, tarball+https://, tarball+http://, git+https://, git+http://, git+ssh://"

# Nix flake forms that exist but have no node protocol.
_OTHER_SCHEMES = {
    "gitlab": "GitLab flakes have no node protocol; use git+https://gitlab.com/OWNER/REPO",
    "sourcehut": "sourcehut flakes have no node protocol; use git+https://git.sr.ht/~OWNER/REPO",
    "path": "a path on the API server's machine means nothing on a node; push the flake to a git host",
    "git+file": "a local git checkout means nothing on a node; use git+https:// or git+ssh://",
    "flake": "indirect flake ids resolve through each node's registry; write the full URL (e.g. github:NixOS/nixpkgs)",
    "http": "plain http:// tarballs need the explicit scheme: write tarball+http://",
    "https": "plain https:// tarballs need the explicit scheme: write tarball+https://",
    "file": "local files mean nothing on a node; use tarball+https://",
    "hg+https": "Mercurial flakes have no node protocol",
    "hg+http": "Mercurial flakes have no node protocol",
    "hg+ssh": "Mercurial flakes have no node protocol",
    "hg+file": "Mercurial flakes have no node protocol",
    "tarball+file": "local files mean nothing on a node; use tarball+https://",
}

_COMMON_PARAMS = frozenset({"dir"})
_PARAMS = {
    "github": frozenset({"ref", "rev", "host", "narHash"}) | _COMMON_PARAMS,
    "git": frozenset(
        {
            "ref",
            "rev",
            "shallow",
            "submodules",
            "lfs",
            "allRefs",
            "exportIgnore",
            "verifyCommit",
            "keytype",
            "publicKey",
            "publicKeys",
            "narHash",
            "lastModified",
            "revCount",
        }
    )
    | _COMMON_PARAMS,
    "tarball": frozenset({"narHash", "rev", "revCount", "lastModified"}) | _COMMON_PARAMS,
}
_BOOL_PARAMS = frozenset({"shallow", "submodules", "lfs", "allRefs", "exportIgnore", "verifyCommit"})
_INT_PARAMS = frozenset({"revCount", "lastModified"})

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_REV_RE = re.compile(r"[0-9a-fA-F]{40}")
# Nix's refRegexS plus the rules of git-check-ref-format that Nix also enforces.
_REF_RE = re.compile(r"[a-zA-Z0-9@][a-zA-Z0-9_./@+-]*")
_BAD_REF_RE = re.compile(r"//|^/|/\.|\.\.|\.lock$|\.lock/|/$|\.$|@\{")
_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}")
_REPO_RE = re.compile(r"[A-Za-z0-9._-]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\]")
_PARAM_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_NARHASH_RE = re.compile(r"(?:sha1|sha256|sha512|md5)[-:][A-Za-z0-9+/=]+")
_USER_RE = re.compile(r"[A-Za-z0-9._~!$'()*+,;=-]+")
# RFC 3986 characters per part; '%' is checked separately as an escape.
_PCHAR = r"A-Za-z0-9\-._~!$&'()*+,;=:@%"
_NOT_PATH_RE = re.compile(rf"[^{_PCHAR}/]")
_NOT_QUERY_RE = re.compile(rf"[^{_PCHAR}/?]")
_NOT_VISIBLE_ASCII_RE = re.compile(r"[^\x21-\x7e]")
_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class Span(NamedTuple):
    """Where one named part of a reference sits in its text (0-based, end exclusive)."""

    start: int
    end: int
    label: str
    caseless: bool = False


@dataclass(frozen=True, slots=True)
class FlakeRef:
    """A parsed flake reference of one of the six node protocols.

    ``str(ref)`` is the reference exactly as written.  ``prefix`` is what the
    node re-adds (``github:`` or ``git+ssh://``) and ``body`` what follows it.
    """

    scheme: str
    body: str
    owner: str = ""
    repo: str = ""
    ref: str | None = None
    rev: str | None = None
    user: str = ""
    host: str = ""
    port: str = ""
    path: str = ""
    query: tuple[tuple[str, str], ...] = ()
    fragment: str | None = None

    @property
    def prefix(self) -> str:
        return url_prefix(self.scheme)

    @property
    def kind(self) -> str:
        """The fetcher type: ``github``, ``git`` or ``tarball``."""
        return self.scheme.split("+", 1)[0]

    def __str__(self) -> str:
        return self.prefix + self.body

    @property
    def spans(self) -> tuple[Span, ...]:
        """The named parts of ``str(self)``, derived from the fields (only errors and folding need them)."""
        spans: list[Span] = []
        pos = len(self.prefix)

        def add(length: int, label: str, caseless: bool = False, skip: int = 0) -> None:
            nonlocal pos
            spans.append(Span(pos, pos + length, label, caseless))
            pos += length + skip

        if self.scheme == "github":
            add(len(self.owner), "GitHub owner", True, 1)
            add(len(self.repo), "GitHub repository", True)
            if self.ref is not None or self.rev is not None:
                pos += 1
                add(len(self.ref or self.rev or ""), "branch or tag" if self.ref is not None else "revision")
        else:
            if self.user:
                add(len(self.user), "user", skip=1)
            add(len(self.host), "host name", not self.host.startswith("["))
            if self.port:
                pos += 1
                add(len(self.port), "port")
            add(len(self.path), "path")
        if self.query:
            pos += 1
            for key, value in self.query:
                add(len(key), "query parameter name", skip=1)
                add(len(value), f"value of query parameter '{key}'", skip=1)
            pos -= 1
        if self.fragment is not None:
            pos += 1
            add(len(self.fragment), "attribute path")
        return tuple(spans)

    def part_at(self, index: int) -> str:
        """Name the part of the reference that holds 0-based ``index`` of ``str(self)``."""
        for span in self.spans:
            if span.start <= index < span.end:
                return span.label
        return "reference"

    def fold_case(self) -> tuple[FlakeRef, tuple[str, ...]]:
        """Lowercase the parts whose source ignores case, saying what changed.

        GitHub owner and repository names and DNS host names are matched
        without regard to case; nothing else is ever changed.
        """
        if self.owner == self.owner.lower() and self.repo == self.repo.lower() and self.host == self.host.lower():
            return self, ()
        # The caseless parts lead the body: OWNER/REPO for github, [USER@]HOST[:PORT] otherwise.
        parts: tuple[tuple[str, str], ...]
        if self.scheme == "github":
            parts = (("GitHub owner", self.owner), ("GitHub repository", self.repo))
            head = len(self.owner) + 1 + len(self.repo)
            body = f"{self.owner.lower()}/{self.repo.lower()}{self.body[head:]}"
        else:
            parts = (("host name", self.host),)
            start = len(self.user) + 1 if self.user else 0
            body = self.body[:start] + self.host.lower() + self.body[start + len(self.host) :]
        warnings = tuple(
            f"{label} '{value}' lowercased to '{value.lower()}' (it is case-insensitive; images must be lowercase)"
            for label, value in parts
            if value != value.lower()
        )
        folded = replace(self, body=body, owner=self.owner.lower(), repo=self.repo.lower(), host=self.host.lower())
        return folded, warnings


def url_prefix(scheme: str) -> str:
    """What a flake URL of ``scheme`` starts with: ``github:`` or ``SCHEME://``."""
    return "github:" if scheme == "github" else scheme + "://"


def looks_like_flake_ref(text: str) -> bool:
    """True when ``text`` starts like a flake URL rather than a registry image."""
    match = _SCHEME_RE.match(text)
    if match is None:
        return False
    scheme = match.group(1).lower()
    return scheme in SUPPORTED_SCHEMES or scheme in _OTHER_SCHEMES or "+" in scheme or "://" in text


@lru_cache(maxsize=4096)
def parse(text: str) -> FlakeRef:
    """Parse ``text`` as a flake reference; raise FlakeRefError pointing at the bad part."""
    if not isinstance(text, str):
        raise FlakeRefError(f"a flake reference must be a string, not {type(text).__name__}")
    if not text:
        raise FlakeRefError("the flake reference is empty; write one such as github:OWNER/REPO")
    _check_characters(text)

    scheme_match = _SCHEME_RE.match(text)
    if scheme_match is None:
        if text.startswith(("/", ".", "~")):
            raise UnsupportedSchemeError(
                f"'{text}' is a path; a path on the API server's machine means nothing on a node ({SUPPORTED_HINT})"
            )
        raise UnsupportedSchemeError(
            f"'{text}' is an indirect flake id, resolved through each node's own registry; "
            f"write the full URL such as github:OWNER/REPO ({SUPPORTED_HINT})"
        )
    scheme = scheme_match.group(1)
    if scheme not in SUPPORTED_SCHEMES:
        lowered = scheme.lower()
        if lowered in SUPPORTED_SCHEMES:
            raise FlakeRefError(
                f"'{scheme}:' is not a scheme: schemes are case-sensitive, write '{lowered}:' in '{text}'",
                position=1,
            )
        hint = _OTHER_SCHEMES.get(lowered)
        if hint is None and lowered.startswith("file+"):
            hint = "local files mean nothing on a node; use tarball+https://"
        if hint is not None:
            raise UnsupportedSchemeError(f"'{scheme}:' in '{text}' is not supported: {hint} ({SUPPORTED_HINT})")
        raise UnsupportedSchemeError(f"unknown flake scheme '{scheme}:' in '{text}' ({SUPPORTED_HINT})", position=1)

    before_fragment, has_fragment, fragment = text.partition("#")
    base, has_query, query_text = before_fragment.partition("?")
    fields: dict[str, object] = {}
    if scheme == "github":
        _parse_github(text, base, fields)
    else:
        _parse_url(text, scheme, base, fields)

    query = _parse_query(text, query_text, len(base) + 1) if has_query else ()
    if has_query and not query:
        raise FlakeRefError(f"'{text}' ends its query with nothing after '?'; remove the '?'", position=len(base) + 1)
    if has_fragment:
        if not fragment:
            raise FlakeRefError(
                f"'{text}' has an empty attribute path after '#'; remove the '#' or name an output",
                position=len(before_fragment) + 1,
            )
        start = len(before_fragment) + 1
        _check_allowed(text, fragment, start, _NOT_QUERY_RE, "attribute path")
    ref = FlakeRef(
        scheme=scheme,
        body=text[scheme_match.end() + (0 if scheme == "github" else 2) :],
        query=query,
        fragment=fragment if has_fragment else None,
        **fields,  # type: ignore[arg-type]
    )
    _check_params(text, ref)
    return ref


def _check_characters(text: str) -> None:
    bad_char = _NOT_VISIBLE_ASCII_RE.search(text)
    if bad_char is not None:
        index, char = bad_char.start(), bad_char.group()
        if ord(char) > 0x7F and char.isprintable():
            encoded = "".join(f"%{byte:02X}" for byte in char.encode())
            raise FlakeRefError(
                f"'{text}' has the non-ASCII character '{char}' at position {index + 1}; "
                f"Nix requires URLs to percent-encode it: write '{encoded}'",
                position=index + 1,
            )
        raise FlakeRefError(
            f"{text[:200]!r} has a space or control character {char!r} at position {index + 1}; "
            "remove it (percent-encode a space as %20)",
            position=index + 1,
        )
    bad = _PCT_RE.search(text)
    if bad is not None:
        raise FlakeRefError(
            f"'{text}' has a '%' at position {bad.start() + 1} that does not start a %XX escape; "
            "write a literal '%' as %25",
            position=bad.start() + 1,
        )


def _check_allowed(text: str, part: str, start: int, disallowed: re.Pattern[str], label: str) -> None:
    bad = disallowed.search(part)
    if bad is not None:
        char = bad.group()
        raise FlakeRefError(
            f"'{text}' has '{char}' at position {start + bad.start() + 1}, which is not allowed in the "
            f"{label}; percent-encode it as %{ord(char):02X}",
            position=start + bad.start() + 1,
        )


def _parse_github(text: str, base: str, fields: dict[str, object]) -> None:
    rest = base[len("github:") :]
    if rest.startswith("/"):
        raise FlakeRefError(f"'{text}': write github:OWNER/REPO, without slashes after 'github:'", position=8)
    parts = rest.split("/")
    if len(parts) < 2 or not parts[1]:
        raise FlakeRefError(
            f"'{text}' has no repository: write github:OWNER/REPO (for example github:{parts[0] or 'OWNER'}/REPO)",
            position=len(base) + 1,
        )
    owner, repo = parts[0], parts[1]
    pos = len("github:")
    if not _OWNER_RE.fullmatch(owner):
        raise FlakeRefError(
            f"'{text}' has the GitHub owner '{owner}': owners are 1-39 letters, digits or '-', "
            "starting with a letter or digit",
            position=pos + 1,
        )
    pos += len(owner) + 1
    if not _REPO_RE.fullmatch(repo) or repo in (".", ".."):
        raise FlakeRefError(
            f"'{text}' has the GitHub repository '{repo}': repositories are letters, digits, '.', '_' or '-'",
            position=pos + 1,
        )
    pos += len(repo) + 1
    fields.update(owner=owner, repo=repo)
    if len(parts) > 2:
        extra = "/".join(parts[2:])
        if _REV_RE.fullmatch(extra):
            fields["rev"] = extra
        else:
            _check_ref(text, extra, pos)
            fields["ref"] = extra


def _check_ref(text: str, ref: str, pos: int) -> None:
    if not ref:
        raise FlakeRefError(f"'{text}' has an empty branch or tag name; name one or remove it", position=pos + 1)
    bad = _BAD_REF_RE.search(ref)
    if not _REF_RE.fullmatch(ref) or bad is not None:
        raise FlakeRefError(
            f"'{text}' has the branch or tag name '{ref}', which git and Nix refuse "
            "(letters, digits and '_./@+-' only; no '..', '//', '@{', leading '/', or trailing '/', '.' or '.lock')",
            position=pos + 1 + (bad.start() if bad is not None else 0),
        )


def _parse_url(text: str, scheme: str, base: str, fields: dict[str, object]) -> None:
    prefix = scheme + ":"
    if not base.startswith(prefix + "//"):
        hint = f"{scheme}://HOST/PATH"
        raise FlakeRefError(f"'{text}' needs '//' after '{prefix}': write {hint}", position=len(prefix) + 1)
    start = len(prefix) + 2
    authority, slash, path = base[start:].partition("/")
    path = slash + path
    user = ""
    if "@" in authority:
        user, _, hostport = authority.rpartition("@")
        if not user or not _USER_RE.fullmatch(user):
            if ":" in user:
                raise FlakeRefError(
                    f"'{text}' carries a password in its URL; credentials don't belong in pod specs: "
                    "give the node an SSH key or a netrc instead",
                    position=start + user.index(":") + 1,
                )
            raise FlakeRefError(f"'{text}' has an invalid user name '{user}' before '@'", position=start + 1)
    else:
        hostport = authority
    host_start = start + len(user) + (1 if user else 0)
    host, port = hostport, ""
    colon = hostport.rfind(":")
    if colon != -1 and "]" not in hostport[colon:]:
        host, port = hostport[:colon], hostport[colon + 1 :]
        if not port.isdigit() or not 0 < int(port) < 65536:
            hint = ""
            if scheme == "git+ssh" and not port.isdigit():
                hint = f"; scp-style 'host:path' is not a URL, write {scheme}://{user + '@' if user else ''}{host}/{port}{path}"
            raise FlakeRefError(
                f"'{text}' has the port '{port}', which is not a number from 1 to 65535{hint}",
                position=host_start + colon + 2,
            )
    if not host:
        raise FlakeRefError(f"'{text}' has no host name after '{prefix}//'", position=host_start + 1)
    if not _HOST_RE.fullmatch(host):
        raise FlakeRefError(
            f"'{text}' has the host name '{host}', which is not a DNS name or an IP address",
            position=host_start + 1,
        )
    path_start = start + len(authority)
    if path in ("", "/"):
        raise FlakeRefError(
            f"'{text}' has no path after the host; name the repository or archive", position=len(base) + 1
        )
    _check_allowed(text, path, path_start, _NOT_PATH_RE, "path")
    fields.update(user=user, host=host, port=port, path=path)


def _parse_query(text: str, query: str, start: int) -> tuple[tuple[str, str], ...]:
    if not query:
        return ()
    _check_allowed(text, query, start, _NOT_QUERY_RE, "query")
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    pos = start
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not item:
            raise FlakeRefError(f"'{text}' has an empty query parameter ('&&' or a stray '&')", position=pos + 1)
        if not eq:
            raise FlakeRefError(
                f"'{text}' has the query parameter '{key}' without '=VALUE'; Nix would ignore it, write {key}=VALUE",
                position=pos + 1,
            )
        if not _PARAM_KEY_RE.fullmatch(key):
            raise FlakeRefError(f"'{text}' has the malformed query parameter name '{key}'", position=pos + 1)
        if key in seen:
            raise FlakeRefError(
                f"'{text}' gives the query parameter '{key}' twice; Nix would silently keep only one",
                position=pos + 1,
            )
        seen.add(key)
        params.append((key, value))
        pos += len(item) + 1
    return tuple(params)


def _check_params(text: str, ref: FlakeRef) -> None:
    allowed = _PARAMS[ref.kind]
    position = text.find("?") + 2
    for key, raw in ref.query:
        if key not in allowed:
            raise FlakeRefError(
                f"'{text}' has the query parameter '{key}', which {ref.kind} flakes do not take "
                f"(allowed: {', '.join(sorted(allowed))})",
                position=position,
            )
        value = unquote_to_bytes(raw).decode("utf-8", "replace") if "%" in raw else raw
        if key == "rev":
            if not _REV_RE.fullmatch(value):
                raise FlakeRefError(
                    f"'{text}' has rev={raw}: a rev must be a full 40-character hex commit hash "
                    "(use ref= for branch or tag names)",
                    position=position,
                )
            if ref.rev is not None:
                raise FlakeRefError(f"'{text}' gives a commit hash both in the path and as rev=", position=position)
        elif key == "ref":
            if ref.ref is not None or ref.rev is not None:
                raise FlakeRefError(
                    f"'{text}' gives a branch/tag or commit in the path and ref= as well; keep one of them",
                    position=position,
                )
            _check_ref(text, value, position - 1 + len("ref="))
        elif key in _BOOL_PARAMS and value not in ("0", "1"):
            raise FlakeRefError(f"'{text}' has {key}={raw}: write {key}=1 or {key}=0", position=position)
        elif key in _INT_PARAMS and not value.isdigit():
            raise FlakeRefError(f"'{text}' has {key}={raw}: it must be a whole number", position=position)
        elif key == "narHash" and not _NARHASH_RE.fullmatch(value):
            raise FlakeRefError(
                f"'{text}' has narHash={raw}: write an SRI hash such as sha256-<base64>", position=position
            )
        elif key == "host" and not _HOST_RE.fullmatch(value):
            raise FlakeRefError(f"'{text}' has host={raw}, which is not a host name", position=position)
        elif not value and key == "dir":
            raise FlakeRefError(f"'{text}' has an empty dir=; remove it or name the subdirectory", position=position)
        position += len(key) + len(raw) + 2
    if ref.kind == "github":
        keys = {key for key, _ in ref.query}
        has_ref = ref.ref is not None or "ref" in keys
        has_rev = ref.rev is not None or "rev" in keys
        if has_ref and has_rev:
            raise FlakeRefError(
                f"'{text}' gives both a commit hash and a branch/tag name; GitHub flakes take one of them"
            )
