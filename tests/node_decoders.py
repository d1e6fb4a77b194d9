"""Independent re-implementations of the two node-side decoders.

Written from shared/reference/node-decoders.md alone, without importing the
webhook's codec, so that the tests compare the encoder against what a node
computes rather than against itself.
"""

from __future__ import annotations

import re

PROTOCOLS = {
    "flake-github:0/": "github:",
    "flake-tarball-https:0/": "tarball+https://",
    "flake-tarball-http:0/": "tarball+http://",
    "flake-git-https:0/": "git+https://",
    "flake-git-http:0/": "git+http://",
    "flake-git-ssh:0/": "git+ssh://",
}


class NodeRefused(Exception):
    """The node would refuse to pull this image."""


def _match(image: str) -> tuple[str, str]:
    for prefix, scheme in PROTOCOLS.items():
        if image.startswith(prefix):
            rest = image[len(prefix) :]
            return scheme, rest.removesuffix(":latest")
    raise NodeRefused(f"no flake protocol: {image}")


def seed_node(image: str) -> str:
    """Steps 1-5 of the seed node's PullImage."""
    scheme, rest = _match(image)
    if prefix_is_ssh(image) and "--at--" not in rest:
        raise NodeRefused("git-ssh without --at--")
    rest = rest.replace("--at--", "@").replace("--q--", "?").replace("--eq--", "=").replace("--amp--", "&")
    return scheme + rest


def prefix_is_ssh(image: str) -> bool:
    return image.startswith("flake-git-ssh:0/")


def hex_node(image: str) -> str:
    """nix-storage-plugin: --xHH-- bytes, UTF-8 required, empty refused, #default implied."""
    scheme, rest = _match(image)
    if not rest:
        raise NodeRefused("empty path")
    raw = re.sub(rb"--x([0-9a-f]{2})--", lambda m: bytes([int(m.group(1), 16)]), rest.encode())
    try:
        url = scheme + raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NodeRefused("invalid utf-8") from err
    return url if "#" in url else url + "#default"


NODES = {"seed": seed_node, "hex": hex_node}

# The kubelet's grammar for the image path, written out once more on its own.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
KUBELET_NAME = re.compile(rf"(?P<domain>flake-[a-z-]+:0)/(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)")


def kubelet_accepts(image: str) -> bool:
    """True when the kubelet's reference grammar and length limit accept ``image``."""
    return KUBELET_NAME.fullmatch(image) is not None and len(image) <= 255
