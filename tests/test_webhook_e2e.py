"""End to end: the real `nix-flake-webhook serve` (gunicorn, gevent, TLS with our own certificates),
called by tests.apiserver, an emulation of kube-apiserver's webhook client (see its docstring)."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import ssl
import time
from typing import Any

import pytest

from tests.apiserver import ApiServerWebhookClient, WebhookCallFailed
from tests.conftest import RunningServer, read_response
from tests.node_decoders import NODES, kubelet_accepts
from tests.pods import container, replicaset_pod
from webhook.imageref import parse_image
from webhook.mutate import RECOVERY_ANNOTATION

STORE = "nix:0/nix/store/0123456789abcdfghijklmnpqrsvwxyz-redis-image.tar"


def node_view(pod: dict[str, Any], dialect: str = "seed") -> dict[str, str]:
    """What each node does: the kubelet parses the image and adds ':latest'; the node decodes flake images."""
    built: dict[str, str] = {}
    for list_name in ("initContainers", "containers"):
        for item in pod["spec"].get(list_name) or []:
            image = item["image"]
            ref = parse_image(image)  # the kubelet's grammar: InvalidImageName otherwise
            pulled = image if ref.tag or ref.digest else image + ":latest"
            if image.startswith("flake-"):
                assert kubelet_accepts(image)
                built[item["name"]] = NODES[dialect](pulled)
    return built


def test_replicaset_pod_is_rewritten_and_runs_on_the_node(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod(
        [container("redis", ""), container("metrics", "quay.io/prometheus/redis-exporter:v1.62.0")],
        {
            "nix-snapshotter/flake": "github:user/redis?ref=main",
            "nix-snapshotter/flake.migrate": "git+ssh://git@github.com/user/redis?dir=migrate",
        },
        init_containers=[container("migrate", "")],
    )
    result = apiserver.admit_converged(pod)
    assert result.allowed and result.patched
    assert result.typed.spec.containers[0].image == "flake-github:0/user/redis--q--ref--eq--main"
    assert result.typed.spec.containers[0].image_pull_policy == "IfNotPresent"
    assert result.typed.metadata.generate_name == "redis-6d4cf56db6-"
    assert node_view(result.pod) == {
        "migrate": "git+ssh://git@github.com/user/redis?dir=migrate",
        "redis": "github:user/redis?ref=main",
    }
    assert result.pod["spec"]["containers"][1]["image"] == "quay.io/prometheus/redis-exporter:v1.62.0"


def test_deployment_style_flake_image(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("app", "tarball+https://github.com/user/app/archive/v1.2.tar.gz")])
    result = apiserver.admit_converged(pod)
    assert node_view(result.pod) == {"app": "tarball+https://github.com/user/app/archive/v1.2.tar.gz"}


def test_nix_store_image_keeps_path_and_records_recovery(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("redis", STORE)], {"nix-snapshotter/flake.redis": "github:user/redis"})
    result = apiserver.admit_converged(pod)
    assert result.pod["spec"]["containers"][0]["image"] == STORE
    recovery = json.loads(result.typed.metadata.annotations[RECOVERY_ANNOTATION])
    assert recovery["redis"]["image"] == "flake-github:0/user/redis"
    assert NODES["seed"](recovery["redis"]["image"]) == recovery["redis"]["flake"]


def test_case_folding_comes_back_as_warning(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("nix", "")], {"nix-snapshotter/flake": "github:NixOS/nixpkgs/nixos-24.05"})
    result = apiserver.admit_converged(pod)
    assert result.pod["spec"]["containers"][0]["image"] == "flake-github:0/nixos/nixpkgs/nixos-24.05"
    assert len(result.warnings) == 1 and "'NixOS' lowercased" in result.warnings[0]


@pytest.mark.parametrize(
    ("annotations", "image", "phrase"),
    [
        ({"nix-snapshotter/flake": "github:user/redis#shell"}, "", "attribute path"),
        ({"nix-snapshotter/flake": "gitlab:user/redis"}, "", "supported: github:"),
        ({"nix-snapshotter/flake.redis": "github:user/redis"}, "redis:7", "registry image"),
        ({}, "flake-github:0/user/Redis", "could not use the image"),
    ],
)
def test_denials_reach_the_user(
    apiserver: ApiServerWebhookClient, annotations: dict[str, str], image: str, phrase: str
) -> None:
    result = apiserver.admit(replicaset_pod([container("redis", image)], annotations))
    assert not result.allowed
    assert result.code == 400
    assert phrase in result.message and "container 'redis'" in result.message


def test_v1beta1_is_answered_in_v1beta1(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake": "github:user/redis"})
    result = apiserver.admit(pod, version="admission.k8s.io/v1beta1")
    assert result.patched and result.pod["spec"]["containers"][0]["image"] == "flake-github:0/user/redis"


def test_dry_run_is_answered_identically(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake": "github:user/redis"})
    assert apiserver.admit(pod, dry_run=True).pod == apiserver.admit(pod, dry_run=False).pod


def test_nothing_to_do_means_no_patch(apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("web", "nginx:1.27")])
    result = apiserver.admit(pod)
    assert result.allowed and not result.patched and result.pod == pod


def test_strict_server_settings(strict_server: RunningServer) -> None:
    client = strict_server.client()
    try:
        pod = replicaset_pod([container("app", "")], {"nix-snapshotter/flake": "github:myorg/app#redisWithShell"})
        result = client.admit_converged(pod)
        assert node_view(result.pod, "hex") == {"app": "github:myorg/app#redisWithShell"}
        assert result.typed.spec.containers[0].image_pull_policy == "Always"
        denied = client.admit(replicaset_pod([container("app", "")], {"nix-snapshotter/flake": "github:other/app"}))
        assert not denied.allowed and denied.code == 403 and "github:myorg/*" in denied.message
    finally:
        client.close()


# --- the wire ----------------------------------------------------------------------------------------


def test_not_json_is_400_with_json_error(apiserver: ApiServerWebhookClient) -> None:
    status, body = apiserver.post(b"\x00\xffnot json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]


def test_missing_uid_is_400(apiserver: ApiServerWebhookClient) -> None:
    review = apiserver.review_for(replicaset_pod([container("a", "")]))
    del review["request"]["uid"]
    status, body = apiserver.post(json.dumps(review).encode())
    assert status == 400 and "uid" in json.loads(body)["error"]


def test_oversized_body_is_413(apiserver: ApiServerWebhookClient) -> None:
    status, body = apiserver.post(b" " * (3 * 1024 * 1024 + 1))
    assert status == 413 and json.loads(body)["code"] == 413
    small_enough, _ = apiserver.post(b"{}" + b" " * (3 * 1024 * 1024 - 2))
    assert small_enough == 400  # within the limit, read, then refused as not an AdmissionReview


def test_wrong_content_type_still_answers(apiserver: ApiServerWebhookClient) -> None:
    review = apiserver.review_for(replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:u/a"}))
    status, body = apiserver.post(json.dumps(review).encode(), content_type="text/plain")
    assert status == 200 and json.loads(body)["response"]["uid"] == review["request"]["uid"]


def test_get_on_mutate_is_a_json_405(server: RunningServer) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=server.tls_context(check_hostname=False))
    conn.request("GET", "/mutate")
    response = conn.getresponse()
    assert response.status == 405 and json.loads(response.read())["code"] == 405


def test_tls_names_and_versions(server: RunningServer) -> None:
    with server.connect("nix-flake-webhook.nix-flake-webhook.svc") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        server.connect("evil.example.com")
    tls12 = server.tls_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with server.connect(context=tls12) as tls:
        assert tls.version() == "TLSv1.2"


def test_metrics_count_across_workers(server: RunningServer) -> None:
    def total() -> float:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=server.tls_context(check_hostname=False))
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return sum(float(v) for v in re.findall(r"^nix_flake_webhook_admissions_total\{[^}]*\} (\S+)$", text, re.M))

    before = total()
    # Separate connections, so that both workers take some of them.
    for _ in range(20):
        client = server.client()
        client.admit(replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:user/a"}))
        client.close()
    assert total() - before == 20


def test_review_log_line(server: RunningServer, apiserver: ApiServerWebhookClient) -> None:
    pod = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:user/logged"})
    review = apiserver.review_for(pod)
    apiserver.post(json.dumps(review).encode())
    uid = review["request"]["uid"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log().splitlines() if uid in line]
        if lines:
            break
        time.sleep(0.05)
    assert lines[0]["outcome"] == "patched" and lines[0]["pod"] == "redis-6d4cf56db6-"
    assert lines[0]["namespace"] == "default" and lines[0]["rewritten"] == 1 and lines[0]["latencyMs"] > 0


def test_failed_call_is_reported_as_such(server: RunningServer) -> None:
    client = ApiServerWebhookClient(server.port, server.ca_bundle, service="other")
    with pytest.raises(WebhookCallFailed, match="failed calling webhook"):
        client.admit(replicaset_pod([container("a", "")]))


# --- the worker's lean path for POST /mutate, and its hand-over to gunicorn ----------------------------


def _raw_exchange(server: RunningServer, payload: bytes, responses: int) -> list[bytes]:
    """Write ``payload`` on one TLS connection and read ``responses`` HTTP responses back."""
    with server.connect() as tls, tls.makefile("rb") as reader:
        tls.sendall(payload)
        return [b"".join(read_response(reader)) for _ in range(responses)]


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _review_body(apiserver: ApiServerWebhookClient) -> tuple[bytes, str]:
    review = apiserver.review_for(replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:u/a"}))
    return json.dumps(review).encode(), review["request"]["uid"]


def test_pipelined_and_mixed_requests_on_one_connection(
    server: RunningServer, apiserver: ApiServerWebhookClient
) -> None:
    body, uid = _review_body(apiserver)
    healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = _raw_exchange(server, _post(body) + _post(body) + healthz + _post(body), 4)
    assert [a.split(b"\r\n")[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 4
    for index in (0, 1, 3):  # the last one after gunicorn took the connection over
        assert uid.encode() in answers[index] and b'"patch"' in answers[index]
    assert b'"ok"' in answers[2]


def test_chunked_and_http10_requests_are_answered(server: RunningServer, apiserver: ApiServerWebhookClient) -> None:
    body, uid = _review_body(apiserver)
    chunked = (
        b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )
    (answer,) = _raw_exchange(server, chunked, 1)
    assert answer.startswith(b"HTTP/1.1 200") and uid.encode() in answer
    old = b"POST /mutate HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    (answer,) = _raw_exchange(server, old, 1)
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0] and uid.encode() in answer


def test_connection_close_is_honoured(server: RunningServer, apiserver: ApiServerWebhookClient) -> None:
    body, uid = _review_body(apiserver)
    with server.connect() as tls:
        tls.sendall(_post(body, b"Connection: close\r\n"))
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data and uid.encode() in data


def test_idle_connections_stay_open_for_the_next_request(
    server: RunningServer, apiserver: ApiServerWebhookClient
) -> None:
    """kube-apiserver keeps pooled connections 90 s; gunicorn's default keep-alive (2 s) would close them.

    Two connections idle together: one still on the worker's lean path, one that a first GET handed to gunicorn.
    """
    body, uid = _review_body(apiserver)
    with contextlib.ExitStack() as stack:
        readers = []
        for _ in range(2):
            tls = stack.enter_context(server.connect(timeout=10))
            readers.append((tls, stack.enter_context(tls.makefile("rb"))))
        handed_over, handed_reader = readers[1]
        handed_over.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(handed_reader)
        time.sleep(3)
        for tls, reader in readers:
            tls.sendall(_post(body))
            status, answer = read_response(reader)
            assert status.startswith(b"HTTP/1.1 200") and uid.encode() in answer
