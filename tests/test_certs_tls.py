"""Serving certificates: what webhook.certs makes, and how the running server picks up a renewal."""

from __future__ import annotations

import datetime as dt
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import RunningServer, start_server, stop_server
from tests.pods import container, replicaset_pod
from webhook import certs
from webhook.server import CertificateReloader


def test_server_context_refuses_old_tls(tmp_path: Path) -> None:
    certs.ensure(tmp_path, certs.CertSpec())
    context = CertificateReloader(tmp_path / certs.TLS_CERT, tmp_path / certs.TLS_KEY).build()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_server_issues_no_session_tickets(server: RunningServer) -> None:
    """The API server never resumes, so the server spends nothing on tickets (TLS 1.3 and 1.2)."""
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        context = server.tls_context()
        context.minimum_version = context.maximum_version = version
        with server.connect(context=context) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert tls.recv(64).startswith(b"HTTP/1.1 200")  # TLS 1.3 tickets arrive before the answer
            assert tls.version() == version.name.replace("v1_", "v1.")
            assert tls.session is not None and not tls.session.has_ticket


def test_first_request_from_a_nagle_client_is_not_held_for_a_delayed_ack(server: RunningServer) -> None:
    """A client with Nagle on (a plain Python socket) holds its first request until the server acknowledges
    the handshake's last message; without a session ticket to carry that ACK it came 40 ms late."""
    body = b'{"kind":"AdmissionReview"}'
    request = b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    latencies = []
    for _ in range(5):
        with server.connect() as tls:
            start = time.perf_counter()
            tls.sendall(request)
            assert tls.recv(64).startswith(b"HTTP/1.1 400")
            latencies.append(time.perf_counter() - start)
    assert sorted(latencies)[2] < 0.02, [f"{x * 1000:.1f} ms" for x in latencies]


def test_reloader_keeps_last_good_pair_during_a_torn_rotation(tmp_path: Path) -> None:
    certs.ensure(tmp_path, certs.CertSpec())
    reloader = CertificateReloader(tmp_path / certs.TLS_CERT, tmp_path / certs.TLS_KEY, check_interval=0)
    first = reloader.context()
    assert first is not None
    other = tmp_path / "other"
    certs.ensure(other, certs.CertSpec())
    # Half a rotation: the new key is in place, the certificate is still the old one.
    (tmp_path / certs.TLS_KEY).write_bytes((other / certs.TLS_KEY).read_bytes())
    assert reloader.context() is first
    (tmp_path / certs.TLS_CERT).write_bytes((other / certs.TLS_CERT).read_bytes())
    assert reloader.context() is not first


def _served_certificate(server: RunningServer) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with server.connect(context=context) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path, "--workers", "1")
    yield running
    stop_server(running)


def test_renewed_certificate_is_served_without_restart_or_failures(own_server: RunningServer) -> None:
    before = _served_certificate(own_server)
    client = own_server.client()
    pod = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:user/a"})
    client.admit(pod)
    # Renew with an extra name: webhook.certs reissues, keeping the CA.
    ca_before = (own_server.certs_dir / certs.CA_CERT).read_bytes()
    result = certs.ensure(own_server.certs_dir, certs.CertSpec(extra_sans=("webhook.example.com",)))
    assert result.serving_issued and not result.ca_created
    assert (own_server.certs_dir / certs.CA_CERT).read_bytes() == ca_before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # The kept-alive connection keeps working throughout.
        assert client.admit(pod).allowed
        after = _served_certificate(own_server)
        if after.serial_number != before.serial_number:
            break
        time.sleep(0.2)
    assert after.serial_number != before.serial_number
    assert "webhook.example.com" in certs.covered_names(after)[0]
    assert own_server.proc.poll() is None
    client.close()


def test_ensure_is_idempotent_and_renews_near_expiry(tmp_path: Path) -> None:
    first = certs.ensure(tmp_path, certs.CertSpec())
    assert first.ca_created and first.serving_issued
    second = certs.ensure(tmp_path, certs.CertSpec())
    assert not second.ca_created and not second.serving_issued
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    third = certs.ensure(tmp_path, certs.CertSpec(), now=later)
    assert third.serving_issued and not third.ca_created and "renewal window" in third.reason


def test_every_san_verifies_with_ssl_in_a_real_handshake(server: RunningServer) -> None:
    dns, ips = certs.CertSpec().sans()
    for name in [*dns, *map(str, ips)]:
        with server.connect(name) as tls:
            assert tls.version() is not None


def test_certificate_properties(tmp_path: Path) -> None:
    certs.ensure(
        tmp_path, certs.CertSpec(service="hook", namespace="infra", extra_sans=("hook.example.com", "10.0.0.7"))
    )
    serving = x509.load_pem_x509_certificate((tmp_path / certs.TLS_CERT).read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / certs.CA_CERT).read_bytes())
    dns, ips = certs.covered_names(serving)
    assert {
        "hook",
        "hook.infra",
        "hook.infra.svc",
        "hook.infra.svc.cluster.local",
        "localhost",
        "hook.example.com",
    } == dns
    assert {"127.0.0.1", "::1", "10.0.0.7"} == ips
    usage = serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not serving.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (tmp_path / certs.TLS_KEY).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / certs.CA_KEY).stat().st_mode & 0o777 == 0o600
    serving.verify_directly_issued_by(ca)


def test_names_change_triggers_reissue_with_same_ca(tmp_path: Path) -> None:
    certs.ensure(tmp_path, certs.CertSpec())
    ca = (tmp_path / certs.CA_CERT).read_bytes()
    result = certs.ensure(tmp_path, certs.CertSpec(service="renamed"))
    assert result.serving_issued and "does not cover" in result.reason
    assert (tmp_path / certs.CA_CERT).read_bytes() == ca


def _check(capsys: pytest.CaptureFixture[str], out: Path, *extra: str) -> tuple[int, str, str]:
    from webhook.cli import main

    code = main(["certs", "check", "--out", str(out), *extra])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_certs_check_reports_health_and_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs.ensure(tmp_path, certs.CertSpec())
    code, out, err = _check(capsys, tmp_path)
    assert code == 0 and "nix-flake-webhook.nix-flake-webhook.svc" in out and "expires:   in 3" in out and not err
    # Expiry inside the window.
    code, _, err = _check(capsys, tmp_path, "--renew-before", "400")
    assert code == 1 and "expires in" in err
    # A key that does not belong to the certificate.
    other = tmp_path / "other"
    certs.ensure(other, certs.CertSpec())
    (tmp_path / certs.TLS_KEY).write_bytes((other / certs.TLS_KEY).read_bytes())
    code, _, err = _check(capsys, tmp_path)
    assert code == 1 and "does not match" in err
    # A chain that does not verify.
    (tmp_path / certs.TLS_KEY).write_bytes((other / certs.TLS_KEY).read_bytes())
    (tmp_path / certs.TLS_CERT).write_bytes((other / certs.TLS_CERT).read_bytes())
    code, _, err = _check(capsys, tmp_path)
    assert code == 1 and "does not verify" in err


def test_certs_check_catches_an_expired_pair(tmp_path: Path) -> None:
    certs.ensure(tmp_path, certs.CertSpec())
    report = certs.check(tmp_path, dt.timedelta(days=30), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400))
    assert any("expired" in problem for problem in report.problems)


def test_certs_command_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from webhook.cli import main

    assert main(["certs", "--out", str(tmp_path)]) == 0
    assert "created a new CA" in capsys.readouterr().out
    assert main(["certs", "--out", str(tmp_path)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_metrics_directory_is_created_and_emptied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from webhook.server import prepare_metrics_dir

    target = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(target))
    assert prepare_metrics_dir() == target and target.is_dir()  # as in the Deployment: /tmp/metrics on an emptyDir
    (target / "counter_123.db").write_bytes(b"stale")
    prepare_metrics_dir()
    assert list(target.iterdir()) == []
