"""A CA and a serving certificate for the webhook, made with ``cryptography``.

Idempotent: an existing CA is reused and the serving certificate is renewed
only when it is missing, no longer covers the requested names, does not
match its key or CA, or expires within the renewal window.  Files are
replaced atomically, key before certificate, so a server that reloads them
sees either the old pair or the new one; the server also refuses to load a
pair whose halves do not match.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook.defaults import DEFAULT_NAMESPACE, DEFAULT_SERVICE

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
PREVIOUS_CA = "ca-previous.crt"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class CertSpec:
    """What the serving certificate must cover and how keys are made."""

    service: str = DEFAULT_SERVICE
    namespace: str = DEFAULT_NAMESPACE
    extra_sans: tuple[str, ...] = ()
    key_type: str = "ecdsa"  # ecdsa (P-256) or rsa (2048)
    days: int = 365
    ca_days: int = 3650
    renew_before: dt.timedelta = dt.timedelta(days=30)

    @property
    def service_names(self) -> tuple[str, ...]:
        svc, ns = self.service, self.namespace
        return (svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local")

    def sans(self) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
        """(DNS names, IP addresses) the serving certificate must carry."""
        dns: list[str] = [*self.service_names, "localhost"]
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1"),
        ]
        for san in self.extra_sans:
            try:
                ip = ipaddress.ip_address(san)
            except ValueError:
                if san not in dns:
                    dns.append(san)
            else:
                if ip not in ips:
                    ips.append(ip)
        return dns, ips


@dataclass(frozen=True, slots=True)
class EnsureResult:
    """What :func:`ensure` did, in words an operator can read."""

    ca_created: bool
    serving_issued: bool
    reason: str
    actions: tuple[str, ...] = field(default=())


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type '{key_type}' (choose ecdsa or rsa)")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_NO_USAGE = {
    "digital_signature": False,
    "content_commitment": False,
    "key_encipherment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "key_cert_sign": False,
    "crl_sign": False,
    "encipher_only": False,
    "decipher_only": False,
}


def _builder(
    subject: x509.Name, issuer: x509.Name, key: PrivateKey, now: dt.datetime, not_after: dt.datetime, **usage: bool
) -> x509.CertificateBuilder:
    """What the CA and the serving certificate have in common: names, key, validity, key usage."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that run behind.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.KeyUsage(**{**_NO_USAGE, **usage}), critical=True)
    )


def _make_ca(spec: CertSpec, now: dt.datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key(spec.key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nix-flake-webhook CA {now:%Y-%m-%d %H:%M:%S}")])
    cert = (
        _builder(name, name, key, now, now + dt.timedelta(days=spec.ca_days), digital_signature=True,
                 key_cert_sign=True, crl_sign=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def _issue(
    spec: CertSpec, ca: x509.Certificate, ca_key: PrivateKey, now: dt.datetime
) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key(spec.key_type)
    dns, ips = spec.sans()
    general: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    general += [x509.IPAddress(ip) for ip in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.service_names[2])])
    not_after = min(now + dt.timedelta(days=spec.days), ca.not_valid_after_utc)
    cert = (
        _builder(subject, ca.subject, key, now, not_after, digital_signature=True,
                 key_encipherment=spec.key_type == "rsa")
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    """Load a certificate and its key; ValueError when either is unreadable."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{key_path}: unsupported key type {type(key).__name__}")
    return cert, key


def _same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def covered_names(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses as text) in the certificate's SAN extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _renewal_reason(spec: CertSpec, out: Path, ca: x509.Certificate, now: dt.datetime) -> str | None:
    cert_path, key_path = out / TLS_CERT, out / TLS_KEY
    if not cert_path.exists() or not key_path.exists():
        return "no serving certificate yet"
    try:
        cert, key = load_pair(cert_path, key_path)
    except (ValueError, OSError) as err:
        return f"the serving certificate or key is unreadable ({err})"
    if not _same_key(cert, key):
        return "the serving certificate does not match its key"
    if cert.issuer != ca.subject:
        return "the serving certificate was not issued by the current CA"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "the serving certificate does not verify against the current CA"
    dns, ips = spec.sans()
    have_dns, have_ips = covered_names(cert)
    missing = sorted(set(dns) - have_dns) + sorted({str(ip) for ip in ips} - have_ips)
    if missing:
        return f"the serving certificate does not cover {', '.join(missing)}"
    if cert.not_valid_after_utc - now < spec.renew_before:
        return f"the serving certificate expires {cert.not_valid_after_utc:%Y-%m-%d}, within the renewal window"
    return None


def ensure(out: Path, spec: CertSpec, now: dt.datetime | None = None) -> EnsureResult:
    """Create or renew what is needed in ``out`` so that the serving certificate fits ``spec``."""
    now = now or dt.datetime.now(dt.UTC)
    out.mkdir(parents=True, exist_ok=True)
    actions: list[str] = []
    ca_created = False
    ca: x509.Certificate | None = None
    ca_key: PrivateKey | None = None
    if (out / CA_CERT).exists() and (out / CA_KEY).exists():
        try:
            ca, ca_key = load_pair(out / CA_CERT, out / CA_KEY)
        except (ValueError, OSError) as err:
            raise ValueError(
                f"{out / CA_CERT} or {out / CA_KEY} is unreadable ({err}); move them away to make a new CA"
            ) from err
        if not _same_key(ca, ca_key):
            raise ValueError(f"{out / CA_CERT} does not match {out / CA_KEY}; move them away to make a new CA")
        if ca.not_valid_after_utc - now < spec.renew_before:
            _write_atomic(out / PREVIOUS_CA, _cert_pem(ca), 0o644)
            actions.append(f"CA expires {ca.not_valid_after_utc:%Y-%m-%d}: kept as {PREVIOUS_CA} for the rollover")
            ca = None
    if ca is None or ca_key is None:
        ca, ca_key = _make_ca(spec, now)
        _write_atomic(out / CA_KEY, _key_pem(ca_key), 0o600)
        _write_atomic(out / CA_CERT, _cert_pem(ca), 0o644)
        ca_created = True
        actions.append(f"created a new CA in {out / CA_CERT}")
    reason = "new CA" if ca_created else _renewal_reason(spec, out, ca, now)
    if reason is None:
        return EnsureResult(False, False, "the serving certificate is current; nothing to do", tuple(actions))
    cert, key = _issue(spec, ca, ca_key, now)
    _write_atomic(out / TLS_KEY, _key_pem(key), 0o600)
    _write_atomic(out / TLS_CERT, _cert_pem(cert), 0o644)
    actions.append(f"issued {out / TLS_CERT} ({reason}), valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return EnsureResult(ca_created, True, reason, tuple(actions))


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What ``certs check`` prints; ``problems`` empty means healthy."""

    subject: str
    issuer: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    days_left: int
    problems: tuple[str, ...]


def check(out: Path, renew_before: dt.timedelta, now: dt.datetime | None = None) -> CheckReport:
    """Inspect the pair in ``out``: matching key, chain to ca.crt, expiry beyond ``renew_before``."""
    now = now or dt.datetime.now(dt.UTC)
    cert, key = load_pair(out / TLS_CERT, out / TLS_KEY)
    problems: list[str] = []
    if not _same_key(cert, key):
        problems.append(f"{TLS_CERT} does not match {TLS_KEY}")
    try:
        ca = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature) as err:
        problems.append(f"{TLS_CERT} does not verify against {CA_CERT} ({err or type(err).__name__})")
    left = cert.not_valid_after_utc - now
    if left <= dt.timedelta(0):
        problems.append(f"{TLS_CERT} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif left < renew_before:
        problems.append(f"{TLS_CERT} expires in {left.days} days (under {renew_before.days})")
    dns, ips = covered_names(cert)
    return CheckReport(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        dns_names=tuple(sorted(dns)),
        ip_addresses=tuple(sorted(ips)),
        days_left=left.days,
        problems=tuple(problems),
    )


def ca_bundle(out: Path, now: dt.datetime | None = None) -> bytes:
    """PEM bundle for caBundle: the current CA, plus the previous one while it is still valid."""
    now = now or dt.datetime.now(dt.UTC)
    bundle = (out / CA_CERT).read_bytes()
    previous = out / PREVIOUS_CA
    if previous.exists():
        old = x509.load_pem_x509_certificate(previous.read_bytes())
        if old.not_valid_after_utc > now and old != x509.load_pem_x509_certificate(bundle):
            bundle = bundle.rstrip(b"\n") + b"\n" + _cert_pem(old)
    return bundle
