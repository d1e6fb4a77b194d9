"""`register` / `unregister` through the real kubernetes client against tests.fake_apiserver,
an HTTPS emulation of kube-apiserver's Secret and MutatingWebhookConfiguration endpoints."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.fake_apiserver import FakeApiServer, running_fake_apiserver
from webhook import certs
from webhook.cli import main
from webhook.register import webhook_configuration

MWC = ("MutatingWebhookConfiguration", "", "nix-flake-webhook")
SECRET = ("Secret", "nix-flake-webhook", "nix-flake-webhook-tls")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeApiServer, list[str]]]:
    with running_fake_apiserver(tmp_path) as (state, kubeconfig):
        yield state, ["--kubeconfig", str(kubeconfig), "--certs-dir", str(tmp_path / "certs")]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_first_install_then_no_op(
    cluster: tuple[FakeApiServer, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    state, args = cluster
    code, out, _ = run(capsys, "register", *args)
    assert code == 0
    assert "Secret nix-flake-webhook/nix-flake-webhook-tls created" in out
    assert "MutatingWebhookConfiguration nix-flake-webhook created" in out
    assert all(ct.startswith("application/apply-patch+yaml") for method, _, ct in state.requests if method == "PATCH")
    assert state.objects[MWC]["metadata"]["managedFields"][0]["manager"] == "nix-flake-webhook"
    ca = (tmp_path / "certs" / certs.CA_CERT).read_bytes()
    hook = state.objects[MWC]["webhooks"][0]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
    secret = state.objects[SECRET]
    assert base64.b64decode(secret["data"]["tls.crt"]) == (tmp_path / "certs" / certs.TLS_CERT).read_bytes()
    assert secret["type"] == "kubernetes.io/tls"

    patches_before = sum(1 for method, _, _ in state.requests if method == "PATCH")
    version = state.version
    code, out, _ = run(capsys, "register", *args)
    assert code == 0 and "unchanged" in out and "nothing to do" in out
    assert sum(1 for method, _, _ in state.requests if method == "PATCH") == patches_before
    assert state.version == version


def test_ca_rollover_bundle_carries_both(
    cluster: tuple[FakeApiServer, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    state, args = cluster
    # A CA that expires inside the renewal window: register rolls it over.
    certs.ensure(tmp_path / "certs", certs.CertSpec(ca_days=20))
    old_ca = x509.load_pem_x509_certificate((tmp_path / "certs" / certs.CA_CERT).read_bytes())
    code, out, _ = run(capsys, "register", *args)
    assert code == 0, out
    bundle = base64.b64decode(state.objects[MWC]["webhooks"][0]["clientConfig"]["caBundle"])
    cas = x509.load_pem_x509_certificates(bundle)
    assert len(cas) == 2 and old_ca in cas
    new_ca = x509.load_pem_x509_certificate((tmp_path / "certs" / certs.CA_CERT).read_bytes())
    assert new_ca != old_ca and new_ca in cas
    serving = x509.load_pem_x509_certificate(base64.b64decode(state.objects[SECRET]["data"]["tls.crt"]))
    serving.verify_directly_issued_by(new_ca)


@pytest.mark.parametrize(
    ("fault", "phrase"),
    [
        (("PATCH", "Secret", 403, "Forbidden", 'secrets is forbidden: User "dev" cannot patch'), "HTTP 403"),
        (("PATCH", "MutatingWebhookConfiguration", 409, "Conflict", "Apply failed with 1 conflict"), "HTTP 409"),
        (("GET", "Secret", 500, "InternalError", "etcd timeout"), "HTTP 500: etcd timeout"),
    ],
)
def test_api_errors_are_one_line_and_non_zero(
    cluster: tuple[FakeApiServer, list[str]],
    capsys: pytest.CaptureFixture[str],
    fault: tuple[str, str, int, str, str],
    phrase: str,
) -> None:
    state, args = cluster
    method, kind, code, reason, message = fault
    state.faults[(method, kind)] = (code, reason, message)
    status, _, err = run(capsys, "register", *args)
    assert status == 1
    assert len(err.strip().splitlines()) == 1 and phrase in err and message in err


def test_missing_namespace(cluster: tuple[FakeApiServer, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    state, args = cluster
    state.namespaces.discard("nix-flake-webhook")
    status, _, err = run(capsys, "register", *args)
    assert status == 1 and "HTTP 404" in err and "apply manifests/base first" in err


def test_unreachable_and_unauthorized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_fake_apiserver(tmp_path) as (_, kubeconfig):
        config = yaml.safe_load(kubeconfig.read_text())
    # The emulation has stopped: nothing listens on its port any more.
    status, _, err = run(capsys, "register", "--kubeconfig", str(kubeconfig), "--certs-dir", str(tmp_path / "c"))
    assert status == 1 and "unreachable" in err and len(err.strip().splitlines()) == 1
    with running_fake_apiserver(tmp_path / "again") as (_, kubeconfig2):
        config = yaml.safe_load(kubeconfig2.read_text())
        config["users"][0]["user"]["token"] = "wrong"
        kubeconfig2.write_text(yaml.safe_dump(config))
        status, _, err = run(capsys, "register", "--kubeconfig", str(kubeconfig2), "--certs-dir", str(tmp_path / "c"))
    assert status == 1 and "HTTP 401" in err


def test_dry_run_prints_and_touches_nothing(
    cluster: tuple[FakeApiServer, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    state, args = cluster
    code, out, _ = run(capsys, "register", "--dry-run", *args)
    assert code == 0 and state.requests == []
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out)]
    assert kinds == ["Secret", "MutatingWebhookConfiguration"]


def test_unregister_is_idempotent(cluster: tuple[FakeApiServer, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    state, args = cluster
    assert run(capsys, "register", *args)[0] == 0
    kube_args = args[:2]
    code, out, _ = run(capsys, "unregister", *kube_args)
    assert code == 0 and "deleted" in out and state.objects == {}
    code, out, _ = run(capsys, "unregister", *kube_args)
    assert code == 0 and out.count("already absent") == 2


def _kustomize(path: str) -> list[dict[str, Any]]:
    rendered = subprocess.run(["kubectl", "kustomize", path], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def test_register_applies_the_same_configuration_as_the_manifests() -> None:
    from_manifests = next(d for d in _kustomize("manifests/base") if d["kind"] == "MutatingWebhookConfiguration")
    from_register = webhook_configuration(b"", "nix-flake-webhook", "nix-flake-webhook")
    for hook in from_register["webhooks"]:
        hook["clientConfig"].pop("caBundle")
    assert from_register == from_manifests
