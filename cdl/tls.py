"""Certificates of a private CA (PEM): the CA, made once in a folder and kept; server
certificates for a broker or an object store (Kafka's PEM keystore layout: key, certificate,
the CA's); client certificates for mTLS (subject ``CN=<user>``). Used by the local stack (under
``<state_dir>/keys/tls``) and by compose's broker set-up job (services/provision). Private keys
are 0600."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

__all__ = ["ensure_ca", "ensure_client_cert", "ensure_key_and_chain", "ensure_server_cert", "write_private"]

_DAYS = 3650


def write_private(path: Path, data: bytes) -> None:
    """``data`` to ``path``, readable by its owner only (0600), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_ca(folder: Path) -> tuple[Path, Path]:
    """The stack's CA (``ca.pem``, ``ca-key.pem``) in ``folder``, made when missing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = folder / "ca.pem", folder / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdl local stack CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(key_path, pem_key)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def ensure_server_cert(folder: Path, name: str, hosts: list[str], into: Path | None = None) -> Path:
    """``<name>.pem`` in ``folder`` (or in ``into``: the CA's key stays where it is): a PKCS#8
    private key followed by its certificate (for ``hosts``, names or IP addresses) and the
    CA's, as Kafka's PEM keystore reads it. Made when missing or when it does not cover
    ``hosts``."""
    return _issue(folder, (into or folder) / f"{name}.pem", name, hosts)


def ensure_key_and_chain(folder: Path, name: str, hosts: list[str], certs_dir: Path) -> tuple[Path, Path]:
    """``private.key`` (0600) and ``public.crt`` in ``certs_dir`` (MinIO's ``--certs-dir``
    layout, and a gRPC server's key and chain): a key and a certificate for ``hosts`` from the
    CA in ``folder``, then the CA's certificate."""
    import re

    pem = ensure_server_cert(folder, name, hosts)
    blocks = list(re.finditer(r"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----\n?", pem.read_text(), re.S))
    key = "".join(b.group(0) for b in blocks if b.group(1).endswith("PRIVATE KEY"))
    write_private(certs_dir / "private.key", key.encode())
    public = certs_dir / "public.crt"
    public.write_text("".join(b.group(0) for b in blocks if b.group(1) == "CERTIFICATE"))
    return certs_dir / "private.key", public


def ensure_client_cert(folder: Path, user: str) -> Path:
    """``clients/<user>.pem`` under ``folder``: a private key, a client certificate whose
    subject is ``CN=<user>`` and the CA's, signed by the stack's CA (the one PEM is both
    librdkafka's ``ssl.certificate.location`` and ``ssl.key.location``). A broker's mTLS
    listener maps that subject to the principal ``User:<user>``: the ACLs of the SCRAM user of
    the same name apply. Made when missing."""
    return _issue(folder, folder / "clients" / f"{user}.pem", user, [])


def _issue(folder: Path, path: Path, name: str, hosts: list[str]) -> Path:
    """``path``: a key and a certificate for ``CN=name`` (and ``hosts``, when given, as its
    subject alternative names) signed by the CA in ``folder``, then the CA's certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert_path, ca_key_path = ensure_ca(folder)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if path.exists():
        if not sans:
            return path
        current = x509.load_pem_x509_certificates(path.read_bytes())[0]
        have = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if all(s in have for s in sans):
            return path
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]  # (never a client's identity on an mTLS listener)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(ca_key, hashes.SHA256())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem += cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    write_private(path, pem)
    return path
