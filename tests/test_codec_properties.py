"""Property tests: every accepted ref makes the round trip, every refused ref says why."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.node_decoders import NODES, NodeRefused, kubelet_accepts
from webhook.dialects import encode
from webhook.errors import WebhookError
from webhook.flakeref import parse

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

lower = string.ascii_lowercase + string.digits
mixed = string.ascii_letters + string.digits
# Characters a URL path may hold, plus a few Nix refuses and some non-ASCII.
path_chars = mixed + "-._~!$&'()*+,;=:@" + "é ü<>"


def _word(alphabet: str, min_size: int = 1, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(alphabet, min_size=min_size, max_size=max_size)


pct = st.sampled_from(["%20", "%2F", "%c3%a9", "%zz", "%"])
noisy_segment = st.lists(st.one_of(_word(path_chars, 1, 3), pct), min_size=1, max_size=5).map("".join)
clean_segment = st.builds(
    lambda a, sep, b: a + sep + b, _word(lower), st.sampled_from(["", "-", ".", "_", "--"]), _word(lower)
)
# Mostly well-formed parts, so that many examples make the whole trip.
segment = st.one_of(clean_segment, clean_segment, _word(mixed, 1, 8), noisy_segment)
hosts = st.lists(_word(mixed + "-", 1, 8), min_size=1, max_size=3).map(".".join)
param_keys = st.sampled_from(["ref", "rev", "dir", "host", "narHash", "shallow", "submodules", "foo", "revCount"])
param_values = st.one_of(
    _word(lower + "-._/", 1, 10),
    _word(mixed + "-._/%+=", 0, 10),
    st.just("0123456789abcdef0123456789abcdef01234567"),
    st.just("1"),
)
random_query = st.lists(st.tuples(param_keys, param_values), max_size=3).map(
    lambda items: "?" + "&".join(f"{k}={v}" for k, v in items) if items else ""
)
valid_query = st.sampled_from(
    ["", "", "?ref=main", "?dir=nix/sub", "?ref=release-1.2&dir=x", "?rev=0123456789abcdef0123456789abcdef01234567"]
)
query = st.one_of(valid_query, valid_query, random_query)
fragment = st.one_of(st.just(""), _word(mixed + "-._", 0, 10).map(lambda f: "#" + f))


@st.composite
def github_refs(draw: st.DrawFn) -> str:
    owner = draw(st.one_of(_word(lower, 1, 10), _word(mixed + "-", 1, 10)))
    repo = draw(st.one_of(clean_segment, _word(mixed + "-._", 1, 10)))
    extra = draw(st.one_of(st.just(""), segment.map(lambda s: "/" + s)))
    return f"github:{owner}/{repo}{extra}{draw(query)}{draw(fragment)}"


@st.composite
def url_refs(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["git+https", "git+http", "git+ssh", "tarball+https", "tarball+http"]))
    user = draw(st.one_of(st.just(""), _word(lower + "-._", 1, 6).map(lambda u: u + "@")))
    port = draw(st.one_of(st.just(""), st.integers(0, 70000).map(lambda p: f":{p}")))
    path = "/" + "/".join(draw(st.lists(segment, min_size=1, max_size=4)))
    return f"{scheme}://{user}{draw(hosts)}{port}{path}{draw(query)}{draw(fragment)}"


refs = st.one_of(github_refs(), url_refs())


def _outside_caseless(ref_text: str, folded_text: str) -> bool:
    parsed = parse(ref_text)
    caseless = {i for span in parsed.spans if span.caseless for i in range(span.start, span.end)}
    return all(
        a == b or (i in caseless and a.lower() == b) for i, (a, b) in enumerate(zip(ref_text, folded_text, strict=True))
    )


def _check(text: str, dialect: str) -> None:
    try:
        first = encode(text, dialect)
    except WebhookError as err:
        assert err.message.strip(), "a refusal must explain itself"
        assert err.reason
        return
    # Guarantee 1: the kubelet accepts the image.
    assert kubelet_accepts(first.image), first.image
    # Guarantee 2: the node gives back the ref (folded only where the source ignores case).
    decoded = NODES[dialect](first.image)
    folded = str(first.ref)
    expected = folded if dialect == "seed" or first.ref.fragment is not None else folded + "#default"
    assert decoded == expected
    assert decoded == NODES[dialect](first.image + ":latest")
    assert _outside_caseless(text, folded)
    assert bool(first.warnings) == (folded != text)
    # Deterministic, also when the cache is bypassed.
    encode.cache_clear()
    assert encode(text, dialect) == first


@SETTINGS
@given(refs, st.sampled_from(["seed", "hex"]))
def test_round_trip_or_reasoned_refusal(text: str, dialect: str) -> None:
    _check(text, dialect)


@SETTINGS
@given(st.text(max_size=60), st.sampled_from(["seed", "hex"]))
def test_arbitrary_text_never_crashes(text: str, dialect: str) -> None:
    _check(text, dialect)


@SETTINGS
@given(refs)
def test_parse_keeps_the_text(text: str) -> None:
    try:
        parsed = parse(text)
    except WebhookError:
        return
    assert str(parsed) == text


@SETTINGS
@given(_word(lower, 1, 8), _word(lower, 1, 8), _word(lower + "-./", 1, 16))
def test_plain_lowercase_refs_always_encode_in_hex(owner: str, repo: str, ref: str) -> None:
    text = f"github:{owner}/{repo}?dir=x"
    encoded = encode(text, "hex")
    assert NODES["hex"](encoded.image) == text + "#default"
    seeded = encode(text, "seed")
    assert NODES["seed"](seeded.image) == text


def test_node_decoder_reimplementation_refuses_what_the_doc_says() -> None:
    for image in ("flake-git-ssh:0/github.com/u/r", "docker.io/library/redis"):
        try:
            NODES["seed"](image)
        except NodeRefused:
            continue
        raise AssertionError(f"seed node accepted {image}")
