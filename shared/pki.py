"""Keys and certificates of a medfed federation, made with the ``cryptography`` library.

* the federation CA: ECDSA P-384, self-signed, ``CA:TRUE, pathlen 0``, 10 years;
* the SuperLink's TLS certificate: ECDSA P-384, signed by the CA, SANs for
  every name given, ``serverAuth``, 825 days (PEM certificate, PKCS#8 PEM key:
  what ``flower-superlink --ssl-certfile/--ssl-keyfile`` loads);
* a site's node-authentication key: ECDSA P-384 in OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` loads with
  ``load_ssh_private_key``; ``flwr supernode register`` takes the OpenSSH
  public key).

Framework-free; no shelling out to openssl or ssh-keygen.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from typing import Any

__all__ = ["CA_DAYS", "SERVER_DAYS", "cert_fingerprint", "ec_key", "make_ca", "make_server_cert", "node_key_pair",
           "pem_private_key"]

CA_DAYS = 3650
SERVER_DAYS = 825




def ec_key() -> Any:
    """A new ECDSA P-384 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def pem_private_key(key: Any) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (write it with mode 0600)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_fingerprint(cert: Any) -> str:
    """``SHA256:AA:BB:...`` of a certificate's DER encoding (as ``openssl x509 -fingerprint -sha256``)."""
    from cryptography.hazmat.primitives import hashes

    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def make_ca(name: str, now: dt.datetime) -> tuple[Any, Any]:
    """(key, self-signed CA certificate) of federation ``name``, valid from ``now`` for CA_DAYS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"medfed {name} CA"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: Any, ca_cert: Any, names: Sequence[str], now: dt.datetime) -> tuple[Any, Any]:
    """(key, certificate) for a TLS server known as ``names`` (DNS names or IPs; the first is the CN)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec_key()
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def node_key_pair(site: str) -> tuple[bytes, str]:
    """A P-384 node-authentication key: (OpenSSH private key bytes, OpenSSH public key line)."""
    from cryptography.hazmat.primitives import serialization

    key = ec_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode('ascii')} medfed-site-{site}"
