"""The stack's certificates: a CA per component that needs one (the control plane's, Kafka's
SASL_SSL listener's) and leaf certificates it signs.

EC P-256 keys: generated in milliseconds, unlike RSA, and every component here accepts them
(kube-apiserver, the kubelet, Kafka's PEM keystore, librdkafka, Python's ssl). Keys are PKCS#8
PEM without a password, mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

VALID_DAYS = 365


def _now() -> datetime.datetime:
    # Five minutes back: a certificate made now must already be valid on a clock a little behind.
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_pair(prefix: Path, cert, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    crt, key_path = prefix.with_name(prefix.name + ".crt"), prefix.with_name(prefix.name + ".key")
    _write(crt, cert.public_bytes(serialization.Encoding.PEM))
    _write(key_path, _key_pem(key))
    return crt, key_path


def _certificate(subject, issuer, public_key):
    """A CertificateBuilder with what every certificate here has: serial and validity."""
    from cryptography import x509

    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def make_ca(prefix: Path, cn: str) -> tuple[Path, Path]:
    """A self-signed CA at prefix.crt and prefix.key; returns both paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    prefix.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        _certificate(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(prefix, cert, key)


def issue_cert(
    prefix: Path,
    ca_crt: Path,
    ca_key: Path,
    cn: str,
    *,
    org: str | None = None,
    server: bool = False,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """A key and a certificate signed by the CA at ca_crt/ca_key, at prefix.key and prefix.crt:
    a server certificate for `ips` and `dns` names, or a client one for `cn` (and `org`, which
    Kubernetes reads as the group)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(Path(ca_crt).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    sans = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName(n) for n in dns]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _certificate(x509.Name(attrs), ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _write_pair(prefix, builder.sign(signer, hashes.SHA256()), key)
