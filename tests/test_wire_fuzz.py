"""Garbage in, well-formed answers out: hypothesis against review() and against the live server."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.apiserver import ApiServerWebhookClient
from tests.conftest import RunningServer, read_response
from tests.pods import container, replicaset_pod
from webhook.admission import review
from webhook.mutate import Settings

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
interesting_strings = st.sampled_from(
    [
        "",
        "github:user/redis",
        "github:User/Redis/Main",
        "flake-github:0/user/redis",
        "flake-github:0/User",
        "nix:0/nix/store/abc-redis.tar",
        "git+ssh://git@github.com/u/r",
        "gitlab:a/b",
        "nginx:1.27",
        "\x00\n",
        "github:o/r#" + "x" * 300,
    ]
)


def base_review() -> dict[str, Any]:
    pod = replicaset_pod(
        [container("app", ""), container("side", "nginx:1.27")],
        {"nix-snapshotter/flake": "github:user/app", "nix-snapshotter/flake.init": "github:user/init"},
        init_containers=[container("init", "nix:0/nix/store/abc-init.tar")],
    )
    return ApiServerWebhookClient.review_for(pod)


@st.composite
def mutated_reviews(draw: st.DrawFn) -> dict[str, Any]:
    """A valid review with a few subtrees replaced by random JSON or interesting strings."""
    document = base_review()
    for _ in range(draw(st.integers(1, 4))):
        node: Any = document
        while draw(st.integers(0, 5)) > 0:
            keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
            inner = [k for k in keys if isinstance(node[k], dict | list) and node[k]]
            if not inner:
                break
            node = node[draw(st.sampled_from(inner))]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            node[key] = draw(st.one_of(json_values, interesting_strings))
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(st.one_of(json_values, interesting_strings))
    return document


bodies = st.one_of(
    mutated_reviews().map(lambda d: json.dumps(d).encode()),
    mutated_reviews()
    .map(lambda d: json.dumps(d).encode())
    .flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
    st.binary(max_size=300),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 5000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
)


def check_answer(body: bytes, status: int, answer: bytes) -> None:
    """What the API server needs from any answer: JSON, 200/400/413, and a usable review on 200."""
    assert status in (200, 400, 413), status
    parsed = json.loads(answer)
    if status != 200:
        assert isinstance(parsed["error"], str)
        return
    request = json.loads(body)["request"]
    response = parsed["response"]
    assert parsed["kind"] == "AdmissionReview"
    assert response["uid"] == request["uid"]
    assert ("patch" in response) == ("patchType" in response)
    if "patch" in response:
        ops = json.loads(base64.b64decode(response["patch"]))
        patched = jsonpatch.apply_patch(copy.deepcopy(request["object"]), ops)
        assert isinstance(patched, dict)
    if not response["allowed"]:
        assert response["status"]["code"] >= 400 and response["status"]["message"]
    for warning in response.get("warnings", []):
        assert len(warning) < 256 and "\n" not in warning


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies, st.sampled_from([Settings(), Settings(dialect="hex", allow_sources=("github:user/*",))]))
def test_review_never_breaks(body: bytes, config: Settings) -> None:
    result = review(body, config)
    check_answer(body, result.status, result.body)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_live_server_never_breaks(server: RunningServer, body: bytes) -> None:
    client = server.client()
    try:
        status, answer = client.post(body)
    finally:
        client.close()
    check_answer(body, status, answer)
    assert server.proc.poll() is None


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """Complete, well-framed HTTP/1.x requests of every shape the worker may meet."""
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"post", b"OPTIONS"]))
    path = draw(st.sampled_from([b"/mutate", b"/mutate?timeout=10s", b"/healthz", b"/metrics", b"/nope", b"/mutate/x"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    body = draw(st.one_of(st.just(json.dumps(base_review()).encode()), st.binary(max_size=64)))
    headers = [b"Host: x", b"Content-Type: " + draw(st.sampled_from([b"application/json", b"text/plain"]))]
    extra = draw(
        st.lists(
            st.sampled_from([b"Expect: 100-continue", b"Connection: keep-alive", b"X-A: b", b"Content-Length: 1"]),
            max_size=2,
            unique=True,
        )
    )
    if b"Content-Length: 1" in extra:
        return (
            b" ".join([method, path, version])
            + b"\r\n"
            + b"\r\n".join([*headers, b"Content-Length: 1", b"Content-Length: 2"])
            + b"\r\n\r\nab"
        )
    headers += [h for h in extra if not h.startswith(b"Content-Length")]
    if draw(st.booleans()) and version == b"HTTP/1.1":
        headers.append(b"Transfer-Encoding: chunked")
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        headers.append(b"Content-Length: %d" % len(body))
        framed = body
    return b" ".join([method, path, version]) + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + framed


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(http_requests(), min_size=1, max_size=3))
def test_any_well_framed_request_gets_a_non_5xx_answer(server: RunningServer, requests: list[bytes]) -> None:
    """Through the worker's lean path and its hand-over to gunicorn, on one connection."""
    with server.connect() as tls, tls.makefile("rb") as reader:
        for request in requests:
            tls.sendall(request)
            head, _ = read_response(reader)
            if not head:
                break  # the server closed (a framing error it answered before, or Connection: close)
            status = head.split(b" ", 2)[1]
            assert status.isdigit() and not status.startswith(b"5"), head
            if b"connection: close" in head.lower():
                break
    assert server.proc.poll() is None
