"""Encode flake references into node-decodable images, and decode them as a node does.

Two node implementations exist (shared/reference/node-decoders.md):

* ``seed``: the flake-protocol fork of nix-snapshotter.  ``@ ? = &`` become
  ``--at-- --q-- --eq-- --amp--``; nothing else can be carried.
* ``hex``: nix-storage-plugin.  Every byte outside ``[a-z0-9._/]`` becomes
  ``--xHH--``; a missing fragment means ``#default``.

Every encode is checked, not trusted: the image must pass the kubelet's
grammar and decode, under the node's own rules, back to the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from webhook.errors import EncodeError, ImageDecodeError
from webhook.flakeref import FlakeRef, parse, url_prefix
from webhook.imageref import MAX_NAME_LENGTH, path_problem

#: Image domain (registry host with port 0) for each flake URL scheme.
DOMAINS = {
    "github": "flake-github:0",
    "tarball+https": "flake-tarball-https:0",
    "tarball+http": "flake-tarball-http:0",
    "git+https": "flake-git-https:0",
    "git+http": "flake-git-http:0",
    "git+ssh": "flake-git-ssh:0",
}
_SCHEME_OF_DOMAIN = {domain: scheme for scheme, domain in DOMAINS.items()}
_LATEST = ":latest"

_SEED_ESCAPES = (("@", "--at--"), ("?", "--q--"), ("=", "--eq--"), ("&", "--amp--"))
_SEED_TABLE = dict(_SEED_ESCAPES)
_SEED_CHARS = {token: char for char, token in _SEED_ESCAPES}
_SEED_TOKEN_RE = re.compile("|".join(token for _, token in _SEED_ESCAPES))
_SEED_UNCARRIED_RE = re.compile(r"[^a-z0-9._/@?=&-]")
_HEX_ESCAPED_RE = re.compile(r"[^a-z0-9._/]")
_HEX_TOKEN_RE = re.compile(rb"--x([0-9a-f]{2})--")
# Flake refs are ASCII (the parser makes sure), so both directions are table look-ups.
_HEX_TOKENS = {chr(i): f"--x{i:02x}--" for i in range(128)}
_HEX_BYTES = {f"{i:02x}".encode(): bytes((i,)) for i in range(256)}


@dataclass(frozen=True, slots=True)
class Encoded:
    """An image a node will decode back to ``ref``, and what was adjusted on the way."""

    image: str
    ref: FlakeRef
    dialect: str
    warnings: tuple[str, ...] = ()


def is_flake_image(image: str) -> bool:
    """True when ``image`` uses one of the six ``flake-*:0/`` node protocols."""
    domain, slash, _ = image.partition("/")
    return bool(slash) and domain in _SCHEME_OF_DOMAIN


def seed_escape(body: str) -> str:
    """The original ``encode-flake-ref`` text substitution, with no checks."""
    for char, token in _SEED_ESCAPES:
        body = body.replace(char, token)
    return body


def _split_image(image: str) -> tuple[str, str]:
    """Return (scheme, escaped path) of a flake image, without the kubelet's ``:latest``."""
    domain, _, path = image.partition("/")
    scheme = _SCHEME_OF_DOMAIN.get(domain)
    if scheme is not None:
        return scheme, path.removesuffix(_LATEST)
    raise ImageDecodeError(
        f"'{image}' does not start with one of the node protocols ({', '.join(d + '/' for d in DOMAINS.values())})"
    )


def _decode_seed(image: str) -> str:
    scheme, path = _split_image(image)
    if scheme == "git+ssh" and "--at--" not in path:
        raise ImageDecodeError(
            f"a seed node refuses '{image}': flake-git-ssh images must name a user (--at--), "
            "as in git+ssh://git@HOST/PATH"
        )
    for char, token in _SEED_ESCAPES:
        path = path.replace(token, char)
    return url_prefix(scheme) + path


def _decode_hex(image: str) -> str:
    scheme, path = _split_image(image)
    if not path:
        raise ImageDecodeError(f"a hex node refuses '{image}': the path after the protocol is empty")
    raw = _HEX_TOKEN_RE.sub(lambda match: _HEX_BYTES[match.group(1)], path.encode())
    try:
        url = url_prefix(scheme) + raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ImageDecodeError(
            f"a hex node refuses '{image}': its --xHH-- escapes are not valid UTF-8 ({err.reason})"
        ) from None
    return url if "#" in url else url + "#default"


def decode(image: str, dialect: str = "seed") -> str:
    """The flake URL a node of ``dialect`` builds for ``image``; ImageDecodeError if it refuses."""
    if dialect == "seed":
        return _decode_seed(image)
    if dialect == "hex":
        return _decode_hex(image)
    raise ValueError(f"unknown dialect '{dialect}' (choose seed or hex)")


def _escape_seed(ref: FlakeRef) -> str:
    body = ref.body
    offset = len(ref.prefix)
    literal = _SEED_TOKEN_RE.search(body)
    if literal is not None:
        token, found = literal.group(), literal.start()
        raise EncodeError(
            f"'{ref}' contains '{token}' in its {ref.part_at(offset + found)} at position "
            f"{offset + found + 1}, which a seed node would decode as '{_SEED_CHARS[token]}'; use the hex dialect",
            position=offset + found + 1,
        )
    bad = _SEED_UNCARRIED_RE.search(body)
    if bad is not None:
        raise _seed_refusal(ref, offset + bad.start())
    return seed_escape(body)


def _seed_refusal(ref: FlakeRef, index: int) -> EncodeError:
    text = str(ref)
    char = text[index]
    part = ref.part_at(index)
    where = f"at position {index + 1}"
    if char == "#":
        return EncodeError(
            f"the seed dialect cannot carry the attribute path '#{ref.fragment}' of '{text}' ({where}): "
            "a seed node always builds packages.<system>.default; remove the fragment or use the hex dialect",
            position=index + 1,
        )
    if char.isupper() and part == "query parameter name":
        return EncodeError(
            f"the seed dialect cannot carry uppercase in a ref: the parameter name at position {index + 1} of "
            f"'{text}' is case-sensitive; use the hex dialect or drop the parameter",
            position=index + 1,
        )
    if char.isupper():
        return EncodeError(
            f"the seed dialect cannot carry uppercase in a ref: '{char}' in the {part} of '{text}' {where}; "
            f"use the hex dialect or lowercase the {part}",
            position=index + 1,
        )
    return EncodeError(
        f"the seed dialect has no escape for '{char}' in the {part} of '{text}' {where}; use the hex dialect",
        position=index + 1,
    )


def _hex_token(char: str) -> str:
    return _HEX_TOKENS.get(char) or "".join(f"--x{byte:02x}--" for byte in char.encode())


def _escape_hex(ref: FlakeRef) -> str:
    return _HEX_ESCAPED_RE.sub(lambda match: _hex_token(match.group()), ref.body)


def _source_index(ref: FlakeRef, dialect: str, out_index: int) -> int:
    """Map an index in the escaped path back to the reference text (only needed for errors)."""
    written = 0
    for index, char in enumerate(ref.body):
        if dialect == "hex":
            width = len(_hex_token(char)) if _HEX_ESCAPED_RE.match(char) else 1
        else:
            width = len(_SEED_TABLE.get(char, char))
        written += width
        if written > out_index:
            return len(ref.prefix) + index
    return len(str(ref)) - 1


def expected_url(ref: FlakeRef, dialect: str) -> str:
    """The URL a node of ``dialect`` must rebuild for ``ref`` (hex implies ``#default``)."""
    text = str(ref)
    return text + "#default" if dialect == "hex" and ref.fragment is None else text


_ESCAPERS = {"seed": _escape_seed, "hex": _escape_hex}
DIALECTS = tuple(_ESCAPERS)


@lru_cache(maxsize=4096)
def encode(ref: str | FlakeRef, dialect: str = "seed") -> Encoded:
    """Encode a flake reference into a ``flake-*:0/...`` image for ``dialect``.

    Raises a WebhookError (FlakeRefError or EncodeError) naming the part that
    cannot make the trip and how to fix it.
    """
    escaper = _ESCAPERS.get(dialect)
    if escaper is None:
        raise ValueError(f"unknown dialect '{dialect}' (choose {' or '.join(DIALECTS)})")
    parsed = parse(ref) if isinstance(ref, str) else ref
    parsed, warnings = parsed.fold_case()
    path = escaper(parsed)
    domain = DOMAINS[parsed.scheme]
    image = f"{domain}/{path}"
    problem = path_problem(path)
    if problem is not None:
        index, reason = problem
        source = _source_index(parsed, dialect, index)
        char = str(parsed)[source]
        raise EncodeError(
            f"'{parsed}' cannot become a valid image in the {dialect} dialect: '{char}' in the "
            f"{parsed.part_at(source)} at position {source + 1} gives '{image}', and {reason}; "
            f"{_grammar_fix(dialect)}",
            position=source + 1,
        )
    if len(image) > MAX_NAME_LENGTH:
        raise EncodeError(
            f"'{parsed}' encodes to a {len(image)}-character image in the {dialect} dialect; the kubelet's limit "
            f"is {MAX_NAME_LENGTH}: shorten the reference (drop narHash, use a shorter branch name)"
            + (" or use the seed dialect, whose escapes are shorter" if dialect == "hex" else "")
        )
    try:
        decoded = decode(image, dialect)
    except ImageDecodeError as err:
        raise EncodeError(f"'{parsed}' cannot be encoded in the {dialect} dialect: {err.message}") from None
    expected = expected_url(parsed, dialect)
    if decoded != expected:
        raise EncodeError(
            f"'{parsed}' would come back from a {dialect} node as '{decoded}', a different flake; "
            + (
                "a '-' next to an escaped character forms an escape sequence; use the hex dialect"
                if dialect == "seed"
                else "report this as a bug"
            )
        )
    return Encoded(image=image, ref=parsed, dialect=dialect, warnings=warnings)


def _grammar_fix(dialect: str) -> str:
    if dialect == "seed":
        return "each '/'-separated part must start and end with a lowercase letter or digit; change the reference or use the hex dialect"
    return "each '/'-separated part must start and end with a lowercase letter or digit, and the hex dialect escapes every other character; change the reference"
