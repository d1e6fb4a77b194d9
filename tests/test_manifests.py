"""The kustomize manifests: real `kubectl kustomize`, Kubernetes 1.30 schemas (strict), real CEL."""

from __future__ import annotations

import subprocess
from functools import cache
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml

from tests.pods import container, replicaset_pod

KUBERNETES_VERSION = "1.30.0"
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == kind)


@pytest.mark.parametrize("path", ["manifests/base", "manifests/overlays/cert-manager"])
def test_every_object_validates_strictly(path: str) -> None:
    docs = render(path)
    kinds = {doc["kind"] for doc in docs}
    assert {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    } <= kinds
    for doc in docs:
        if doc["kind"] in CERT_MANAGER_KINDS:
            assert doc["apiVersion"] == "cert-manager.io/v1"  # CRDs: not in the core schemas
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_can_fail() -> None:
    deployment = dict(by_kind(render("manifests/base"), "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_webhook_configuration_choices() -> None:
    hook = by_kind(render("manifests/base"), "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    excluded = hook["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn"
    assert set(excluded["values"]) == {"kube-system", "kube-public", "kube-node-lease", "nix-flake-webhook"}


def test_deployment_hardening() -> None:
    docs = render("manifests/base")
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert app["securityContext"]["readOnlyRootFilesystem"] and app["securityContext"]["capabilities"]["drop"] == [
        "ALL"
    ]
    assert (
        app["livenessProbe"]["httpGet"]["scheme"] == "HTTPS" and app["readinessProbe"]["httpGet"]["path"] == "/readyz"
    )
    assert app["resources"]["requests"] and app["resources"]["limits"]
    assert {"name": "tls", "mountPath": "/etc/nix-flake-webhook/tls", "readOnly": True} in app["volumeMounts"]
    service = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 443 and service["spec"]["ports"][0]["targetPort"] == "https"


def test_cert_manager_overlay_injects_the_ca() -> None:
    docs = render("manifests/overlays/cert-manager")
    config = by_kind(docs, "MutatingWebhookConfiguration")
    assert (
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == "nix-flake-webhook/nix-flake-webhook-serving"
    )
    serving = next(
        d for d in docs if d["kind"] == "Certificate" and d["metadata"]["name"] == "nix-flake-webhook-serving"
    )
    assert serving["spec"]["secretName"] == "nix-flake-webhook-tls"
    assert "nix-flake-webhook.nix-flake-webhook.svc" in serving["spec"]["dnsNames"]


STORE = "nix:0/nix/store/0123456789abcdfghijklmnpqrsvwxyz-redis.tar"
# (pod, whether the API server should call the webhook)
POD_TABLE = [
    (replicaset_pod([container("a", "nginx:1.27")]), False),
    (replicaset_pod([container("a", "docker.io/library/redis:7")], {"other/annotation": "x"}), False),
    (replicaset_pod([container("a", "localhost:5000/app")]), False),
    (replicaset_pod([container("a", "registry.example.com:443/github/app:v1")]), False),
    (replicaset_pod([container("a", None)], {"nix-snapshotter/flake": "github:user/app"}), True),
    (replicaset_pod([container("a", "nginx")], {"nix-snapshotter/flake.b": "github:user/app"}), True),
    (replicaset_pod([container("a", "github:user/app")]), True),
    (replicaset_pod([container("a", "git+ssh://git@github.com/user/app")]), True),
    (replicaset_pod([container("a", "tarball+https://example.com/x.tar.gz")]), True),
    (replicaset_pod([container("a", "gitlab:user/app")]), True),
    (replicaset_pod([container("a", "https://example.com/x.tar.gz")]), True),
    (replicaset_pod([container("a", "flake-github:0/user/app")]), True),
    (replicaset_pod([container("a", STORE)]), True),
    (replicaset_pod([container("a", "nginx")], init_containers=[container("i", "github:user/init")]), True),
    (replicaset_pod([container("a", "nginx")], init_containers=[container("i", "busybox")]), False),
]


@pytest.mark.parametrize(("pod", "expected"), POD_TABLE)
def test_match_conditions_select_exactly_flake_pods(pod: dict[str, Any], expected: bool) -> None:
    hook = by_kind(render("manifests/base"), "MutatingWebhookConfiguration")["webhooks"][0]
    environment = celpy.Environment()
    activation = {"object": celpy.json_to_cel(pod), "oldObject": None}  # type: ignore[attr-defined]
    results = [
        bool(environment.program(environment.compile(condition["expression"])).evaluate(activation))
        for condition in hook["matchConditions"]
    ]
    assert all(results) == expected
