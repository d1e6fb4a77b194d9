"""Serving certificates: what webhook.certs makes, and how the running server picks up a renewal."""

from __future__ import annotations

import datetime as dt
import socket
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
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
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
