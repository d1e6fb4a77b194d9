"""Table tests: the design-doc examples for both dialects, and refused references."""

from __future__ import annotations

import pytest

from tests.node_decoders import NODES, kubelet_accepts
from webhook.dialects import decode, encode, seed_escape
from webhook.errors import EncodeError, FlakeRefError, UnsupportedSchemeError, WebhookError
from webhook.flakeref import parse
from webhook.imageref import parse_image

REV = "0123456789abcdef0123456789abcdef01234567"

# (ref, seed image, hex image) — seed images from node-decoders.md's design notes.
EXAMPLES = [
    ("github:user/repo", "flake-github:0/user/repo", "flake-github:0/user/repo"),
    (
        "github:user/repo?ref=main",
        "flake-github:0/user/repo--q--ref--eq--main",
        "flake-github:0/user/repo--x3f--ref--x3d--main",
    ),
    (
        f"git+ssh://git@github.com/user/repo?ref=main&rev={REV}",
        f"flake-git-ssh:0/git--at--github.com/user/repo--q--ref--eq--main--amp--rev--eq--{REV}",
        f"flake-git-ssh:0/git--x40--github.com/user/repo--x3f--ref--x3d--main--x26--rev--x3d--{REV}",
    ),
    (
        "tarball+https://github.com/user/repo/archive/main.tar.gz",
        "flake-tarball-https:0/github.com/user/repo/archive/main.tar.gz",
        "flake-tarball-https:0/github.com/user/repo/archive/main.tar.gz",
    ),
    (
        "git+https://example.com/group/project.git?dir=sub/flake",
        "flake-git-https:0/example.com/group/project.git--q--dir--eq--sub/flake",
        "flake-git-https:0/example.com/group/project.git--x3f--dir--x3d--sub/flake",
    ),
    (
        "tarball+http://mirror.local:8080/x/flake.tar.gz",
        None,  # ':' has no seed escape
        "flake-tarball-http:0/mirror.local--x3a--8080/x/flake.tar.gz",
    ),
]


@pytest.mark.parametrize(("ref", "seed", "hex_image"), EXAMPLES)
def test_design_examples(ref: str, seed: str | None, hex_image: str) -> None:
    if seed is None:
        with pytest.raises(EncodeError, match="no escape for ':'"):
            encode(ref, "seed")
    else:
        assert encode(ref, "seed").image == seed
        assert decode(seed, "seed") == ref
    assert encode(ref, "hex").image == hex_image
    assert decode(hex_image, "hex") == ref + "#default"


def test_seed_escape_matches_the_original_helper_verbatim() -> None:
    # The design doc's own example, with its short rev (a text substitution, no checks).
    body = "git@github.com/user/repo?ref=main&rev=abc123"
    assert seed_escape(body) == "git--at--github.com/user/repo--q--ref--eq--main--amp--rev--eq--abc123"


def test_hex_design_example_with_fragment() -> None:
    ref = "github:pdtpartners/nix-snapshotter#image-redisWithShell"
    image = "flake-github:0/pdtpartners/nix--x2d--snapshotter--x23--image--x2d--redis--x57--ith--x53--hell"
    assert encode(ref, "hex").image == image
    assert NODES["hex"](image) == ref


@pytest.mark.parametrize("dialect", ["seed", "hex"])
def test_decode_strips_kubelet_latest(dialect: str) -> None:
    image = encode("github:user/redis", dialect).image
    assert decode(image + ":latest", dialect) == decode(image, dialect)


def test_seed_node_refuses_git_ssh_without_user() -> None:
    with pytest.raises(WebhookError, match="--at--"):
        decode("flake-git-ssh:0/github.com/user/repo", "seed")
    with pytest.raises(EncodeError, match="must name a user"):
        encode("git+ssh://github.com/user/repo", "seed")
    assert encode("git+ssh://github.com/user/repo", "hex").image == "flake-git-ssh:0/github.com/user/repo"


def test_hex_node_refuses_bad_utf8_and_empty_path() -> None:
    with pytest.raises(WebhookError, match="UTF-8"):
        decode("flake-github:0/a/b--xff--c", "hex")
    with pytest.raises(WebhookError, match="empty"):
        decode("flake-github:0/", "hex")


def test_case_folding_is_reported_and_limited_to_caseless_parts() -> None:
    encoded = encode("github:NixOS/Nixpkgs/nixos-24.05", "seed")
    assert encoded.image == "flake-github:0/nixos/nixpkgs/nixos-24.05"
    assert len(encoded.warnings) == 2
    assert "'NixOS' lowercased to 'nixos'" in encoded.warnings[0]
    host = encode("git+https://GitHub.com/user/repo", "seed")
    assert host.image == "flake-git-https:0/github.com/user/repo"
    assert "host name 'GitHub.com'" in host.warnings[0]
    # The branch keeps its case, so seed must refuse rather than fold it.
    with pytest.raises(EncodeError, match="lowercase the branch or tag"):
        encode("github:nixos/nixpkgs/Main", "seed")


def test_every_encoded_image_parses_with_the_kubelet_grammar() -> None:
    for ref, _, _ in EXAMPLES:
        for dialect in ("seed", "hex"):
            try:
                image = encode(ref, dialect).image
            except EncodeError:
                continue
            assert kubelet_accepts(image)
            assert parse_image(image).domain.startswith("flake-")


def test_parsed_structure() -> None:
    ref = parse(f"git+ssh://git@example.com:2222/group/repo.git?ref=v1.2&rev={REV}#pkgs.x")
    assert (ref.scheme, ref.user, ref.host, ref.port, ref.path) == (
        "git+ssh",
        "git",
        "example.com",
        "2222",
        "/group/repo.git",
    )
    assert ref.query == (("ref", "v1.2"), ("rev", REV))
    assert ref.fragment == "pkgs.x"
    gh = parse("github:owner/repo/feature/x?dir=nix")
    assert (gh.owner, gh.repo, gh.ref, gh.rev, gh.query) == ("owner", "repo", "feature/x", None, (("dir", "nix"),))
    assert parse(f"github:o/r/{REV}").rev == REV


LONG = "a" * 250

# (ref, dialect, error class, a phrase the message must contain)
REFUSED: list[tuple[str, str, type[WebhookError], str]] = [
    ("", "seed", FlakeRefError, "empty"),
    ("github:owner", "seed", FlakeRefError, "no repository"),
    ("github:owner/", "seed", FlakeRefError, "no repository"),
    ("GitHub:owner/repo", "seed", FlakeRefError, "write 'github:'"),
    ("GIT+HTTPS://example.com/r", "seed", FlakeRefError, "case-sensitive"),
    ("github:o/r?ref=%zz", "seed", FlakeRefError, "%XX escape"),
    ("github:o/r%2", "seed", FlakeRefError, "%XX escape"),
    ("github:o/r?foo=1", "seed", FlakeRefError, "'foo'"),
    ("git+https://h.com/r?narhash=x", "seed", FlakeRefError, "'narhash'"),
    ("tarball+https://h.com/a.tar.gz?ref=main", "seed", FlakeRefError, "'ref'"),
    ("github:o/r?rev=abc123", "seed", FlakeRefError, "40-character"),
    (f"github:o/r?rev={REV}0", "seed", FlakeRefError, "40-character"),
    ("github:o/r/main?ref=dev", "seed", FlakeRefError, "ref= as well"),
    (f"github:o/r/{REV}?ref=dev", "seed", FlakeRefError, "ref= as well"),
    (f"github:o/r?ref=dev&rev={REV}", "seed", FlakeRefError, "both a commit hash"),
    (f"github:o/r/{REV}?rev={REV}", "seed", FlakeRefError, "both in the path"),
    ("github:o/r?ref=a..b", "seed", FlakeRefError, "branch or tag name"),
    ("github:o/r/feat..x", "seed", FlakeRefError, "branch or tag name"),
    ("github:o/r?ref=main&ref=dev", "seed", FlakeRefError, "twice"),
    ("github:o/r?ref", "seed", FlakeRefError, "without '=VALUE'"),
    ("github:o/r?a=1&&ref=x", "seed", FlakeRefError, "empty query parameter"),
    ("github:o/r?", "seed", FlakeRefError, "nothing after '?'"),
    ("github:o/r#", "hex", FlakeRefError, "empty attribute path"),
    ("github:-o/r", "seed", FlakeRefError, "GitHub owner"),
    ("github:o/r!x", "seed", FlakeRefError, "GitHub repository"),
    ("github://o/r", "seed", FlakeRefError, "without slashes"),
    ("git+https:example.com/r", "seed", FlakeRefError, "needs '//'"),
    ("git+https:///r", "seed", FlakeRefError, "no host"),
    ("git+https://example.com", "seed", FlakeRefError, "no path"),
    ("git+https://example.com/", "seed", FlakeRefError, "no path"),
    ("git+ssh://git@github.com:user/repo", "seed", FlakeRefError, "scp-style"),
    ("git+https://h.com:99999/r", "seed", FlakeRefError, "port"),
    ("git+https://user:secret@h.com/r", "seed", FlakeRefError, "password"),
    ("git+https://ex_ample.com/r", "seed", FlakeRefError, "host name"),
    ("git+https://h.com/r?shallow=yes", "seed", FlakeRefError, "shallow=1"),
    ("git+https://h.com/r?revCount=x", "seed", FlakeRefError, "whole number"),
    ("github:o/r?narHash=md6-xx", "seed", FlakeRefError, "SRI"),
    ("github:o/r?dir=", "seed", FlakeRefError, "empty dir"),
    ("github:o/r\u00e9", "seed", FlakeRefError, "%C3%A9"),
    ("github:o/r x", "seed", FlakeRefError, "space"),
    ("github:o/r\n", "seed", FlakeRefError, "control character"),
    ("git+https://h.com/a b", "seed", FlakeRefError, "space"),
    ("git+https://h.com/a<b", "seed", FlakeRefError, "not allowed in the path"),
    ("nixpkgs", "seed", UnsupportedSchemeError, "indirect"),
    ("nixpkgs/nixos-24.05", "seed", UnsupportedSchemeError, "indirect"),
    ("flake:nixpkgs", "seed", UnsupportedSchemeError, "indirect flake ids"),
    ("gitlab:o/r", "seed", UnsupportedSchemeError, "git+https://gitlab.com"),
    ("sourcehut:~o/r", "seed", UnsupportedSchemeError, "git.sr.ht"),
    ("path:/srv/flake", "seed", UnsupportedSchemeError, "supported: github:"),
    ("/srv/flake", "seed", UnsupportedSchemeError, "is a path"),
    ("./flake", "seed", UnsupportedSchemeError, "is a path"),
    ("git+file:///srv/repo", "seed", UnsupportedSchemeError, "local git checkout"),
    ("file+https://h.com/f", "seed", UnsupportedSchemeError, "local files"),
    ("https://h.com/f.tar.gz", "seed", UnsupportedSchemeError, "tarball+https://"),
    ("hg+https://h.com/r", "seed", UnsupportedSchemeError, "Mercurial"),
    ("s3://bucket/f.tar.gz", "seed", UnsupportedSchemeError, "unknown flake scheme"),
    # Valid for Nix, impossible for the node in the chosen dialect.
    ("github:o/r/Main", "seed", EncodeError, "cannot carry uppercase"),
    ("github:o/r#default", "seed", EncodeError, "attribute path"),
    ("github:o/r?dir=a%20b", "seed", EncodeError, "no escape for '%'"),
    ("github:o/r?narHash=sha256-AAAA%2Bbb=", "seed", EncodeError, "parameter name at position 15"),
    ("git+https://h.com/~user/r", "seed", EncodeError, "no escape for '~'"),
    ("github:o/r/v1+build", "seed", EncodeError, "no escape for '+'"),
    ("git+https://h.com:8443/r", "seed", EncodeError, "no escape for ':'"),
    ("github:o/r--q--x", "seed", EncodeError, "'--q--'"),
    ("github:o/x--q?ref=a", "seed", EncodeError, "different flake"),
    ("github:o/r_", "seed", EncodeError, "must end with a lowercase letter or digit"),
    ("github:o/r?ref=", "seed", FlakeRefError, "empty branch"),
    ("git+https://h.com/a/.b", "seed", EncodeError, "must start with a lowercase letter or digit"),
    ("git+https://h.com/a..b/r", "seed", EncodeError, "separator '..'"),
    ("git+https://h.com/a___b", "seed", EncodeError, "separator '___'"),
    ("git+https://h.com/a//b", "seed", EncodeError, "empty component"),
    ("git+https://h.com/r/", "seed", EncodeError, "empty component"),
    (f"git+https://h.com/{LONG}", "seed", EncodeError, "limit is 255"),
    ("github:o/r#X", "hex", EncodeError, "must end with a lowercase letter or digit"),
    ("github:o/Repo", "hex", FlakeRefError, ""),  # placeholder replaced below
    ("git+https://h.com/Foo/bar", "hex", EncodeError, "must start with a lowercase letter or digit"),
    ("git+https://h.com/-foo", "hex", EncodeError, "must start"),
    (f"git+https://h.com/{'A' * 40}x", "hex", EncodeError, "must start"),
    (f"git+https://h.com/x{'-' * 40}y", "hex", EncodeError, "limit is 255"),
]
# A folded repository is fine in hex; keep the row count honest by swapping in a real refusal.
REFUSED[REFUSED.index(("github:o/Repo", "hex", FlakeRefError, ""))] = (
    "github:o/r?ref=x~y",
    "hex",
    FlakeRefError,
    "branch or tag name",
)


def test_refusal_table_is_large() -> None:
    assert len(REFUSED) >= 40


@pytest.mark.parametrize(("ref", "dialect", "error", "phrase"), REFUSED)
def test_refused(ref: str, dialect: str, error: type[WebhookError], phrase: str) -> None:
    with pytest.raises(error) as info:
        encode(ref, dialect)
    assert phrase in info.value.message
    assert info.value.message == str(info.value)


def test_refusal_points_at_the_character() -> None:
    with pytest.raises(EncodeError) as info:
        encode("github:o/r/Main", "seed")
    assert info.value.position == 12
    assert "github:o/r/Main"[info.value.position - 1] == "M"
    assert "position 12" in info.value.message
