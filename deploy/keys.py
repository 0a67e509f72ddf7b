"""TLS certificates and SuperNode keys for a secure Flower deployment.

`fedlora certs` makes a private CA and a SuperLink certificate signed by it (the three
files `flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile` reads);
`fedlora keys` makes a SuperNode's ECDSA P-384 key pair in the OpenSSH formats that
`flwr supernode register` and `flower-supernode --auth-supernode-private-key` load.
Everything is done with `cryptography`, so no openssl or ssh-keygen is needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertFiles", "KeyFiles", "KeysError", "add_commands", "cert_expiry",
    "expiry_warning", "make_certs", "make_node_keys",
]

# The SuperLink starts its own SuperExec, which reaches the Runtime API over TLS at
# 127.0.0.1 / ::1 (flwr rewrites a 0.0.0.0 / :: bind address to loopback) and checks the
# certificate against ca.crt; without loopback SANs that internal hop fails the hostname
# check. Clients ignore the subject CN, so every name used to connect must be a SAN.
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
# DNS labels (letters, digits, inner hyphens), optionally behind one leading "*." wildcard.
_DNS_RE = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class KeysError(ValueError):
    """Bad input or a file that would be overwritten; nothing was written."""


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    not_after: dt.datetime  # UTC, same for the CA and the server certificate


@dataclass(frozen=True)
class KeyFiles:
    private_key: Path
    public_key: Path


def _san(host: str) -> x509.GeneralName:
    if not host or host != host.strip() or any(c.isspace() for c in host):
        raise KeysError(f"bad host {host!r}: expected a DNS name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    # An all-digit last label is a mistyped IP address ("10.0.0"), never a DNS name.
    if len(host) > 253 or not _DNS_RE.match(host) or host.rsplit(".", 1)[-1].isdigit():
        raise KeysError(f"bad host {host!r}: expected a DNS name or an IP address "
                        "(no scheme, port or path)")
    return x509.DNSName(host.lower())


@contextmanager
def _writer(paths: list[Path]) -> Iterator[Callable[[Path, bytes, int], None]]:
    """Refuse if any target exists, then write each file exactly once; undo on failure."""
    for path in paths:
        if path.exists() or path.is_symlink():
            raise KeysError(f"{path} already exists; refusing to overwrite it "
                            "(move it away or pick another folder)")
    written: list[Path] = []

    def write(path: Path, data: bytes, mode: int) -> None:
        # O_EXCL: never clobber a file that appeared meanwhile. The private keys get 0600
        # because anyone who can read them can impersonate the SuperLink or the SuperNode.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        written.append(path)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, mode)  # exact mode whatever the umask
            fh.write(data)

    try:
        yield write
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the SuperLink (uvicorn and gRPC) loads it without asking for a password.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out_dir: Path, hosts: list[str], *, days: int = 365,
               ca_name: str = "fedlora CA") -> CertFiles:
    """Write ca.crt, ca.key, server.pem and server.key for a TLS SuperLink into `out_dir`."""
    if isinstance(hosts, str):
        hosts = [hosts]
    if not hosts:
        raise KeysError("at least one host (the SuperLink's DNS name or IP) is needed")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise KeysError(f"days must be an integer >= 1, got {days!r}")
    sans: list[x509.GeneralName] = []
    for name in [*hosts, *_LOOPBACK]:
        san = _san(name)
        if san not in sans:
            sans.append(san)
    out_dir = Path(out_dir)
    files = CertFiles(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem",
                      out_dir / "server.key", dt.datetime.min)
    # P-384: accepted by Python's ssl (uvicorn) and gRPC's BoringSSL alike, and smaller
    # and faster than an RSA key of similar strength.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    server_key = ec.generate_private_key(ec.SECP384R1())
    # Backdate a little so a site whose clock runs a few minutes slow still accepts it.
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora SuperLink")]))
        .issuer_name(ca_subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    with _writer([files.ca_cert, files.ca_key, files.server_cert, files.server_key]) as write:
        write(files.ca_cert, ca_cert.public_bytes(pem), 0o644)
        write(files.ca_key, _key_pem(ca_key), 0o600)
        write(files.server_cert, server_cert.public_bytes(pem), 0o644)
        write(files.server_key, _key_pem(server_key), 0o600)
    return replace(files, not_after=server_cert.not_valid_after_utc)


def make_node_keys(out_dir: Path, name: str = "supernode") -> KeyFiles:
    """Write a SuperNode's ECDSA P-384 key pair as `out_dir/name` and `out_dir/name.pub`."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 200:
        raise KeysError(f"bad key name {name!r}: use a plain file name "
                        "(letters, digits, '.', '_', '-'; no path)")
    out_dir = Path(out_dir)
    files = KeyFiles(out_dir / name, out_dir / f"{name}.pub")
    # Flower's SuperNode authentication only takes EC keys on NIST curves.
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _writer([files.private_key, files.public_key]) as write:
        write(files.private_key, private, 0o600)
        write(files.public_key, public + f" fedlora-{name}\n".encode(), 0o644)
    return files


def cert_expiry(path: Path) -> dt.datetime:
    """The not-after time (UTC) of the PEM certificate at `path`."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read a PEM certificate from {path}: {exc}") from exc


def expiry_warning(path: Path, within_days: int = 30) -> str | None:
    """A warning if the certificate at `path` has expired or expires within `within_days`."""
    end = cert_expiry(path)
    left = end - dt.datetime.now(dt.timezone.utc)
    if left > dt.timedelta(days=within_days):
        return None
    if left <= dt.timedelta(0):
        return f"certificate {path} expired on {end:%Y-%m-%d}; TLS connections will fail"
    return (f"certificate {path} expires on {end:%Y-%m-%d} (in {left.days} days); "
            "make new ones with `fedlora certs` and redistribute ca.crt")


def _certs(args: argparse.Namespace) -> int:
    try:
        files = make_certs(Path(args.out_dir), args.host, days=args.days)
    except KeysError as exc:
        print(f"fedlora certs: error: {exc}", file=sys.stderr)
        return 2
    for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key):
        print(f"wrote {path}")
    print(f"next: copy {files.ca_cert.name} to every SuperNode site (flower-supernode "
          f"--root-certificates ca.crt) and to whoever submits runs (root-certificates in "
          "their flwr SuperLink connection)")
    print("next: server.pem and server.key stay on the SuperLink machine: flower-superlink "
          "--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key")
    print("next: keep ca.key private and off the sites; no one else needs it")
    print(f"expires: {files.not_after:%Y-%m-%d %H:%M} UTC (hosts: "
          f"{', '.join(args.host)}, plus loopback)")
    return 0


def _keys(args: argparse.Namespace) -> int:
    try:
        files = make_node_keys(Path(args.out_dir), args.name)
    except KeysError as exc:
        print(f"fedlora keys: error: {exc}", file=sys.stderr)
        return 2
    pub = files.public_key.name
    print(f"wrote {files.private_key} (private, mode 0600)")
    print(f"public key: {files.public_key}")
    print(f"send only {pub} to the federation's operator, who runs `flwr supernode register "
          f"{pub} <connection>`; the private key stays here (mode 0600) for "
          f"`flower-supernode --auth-supernode-private-key {files.private_key}`")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `certs` and `keys` to the fedlora CLI; handlers return the exit status."""
    certs = subparsers.add_parser(
        "certs", help="make a CA and a SuperLink TLS certificate",
        description="Write ca.crt, ca.key, server.pem and server.key for a TLS SuperLink.")
    certs.add_argument("out_dir", metavar="OUT_DIR")
    certs.add_argument("--host", action="append", required=True, metavar="H",
                       help="DNS name or IP the SuperLink is reached at (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    certs.set_defaults(handler=_certs)
    keys = subparsers.add_parser(
        "keys", help="make a SuperNode authentication key pair",
        description="Write an ECDSA P-384 key pair in OpenSSH format for SuperNode auth.")
    keys.add_argument("out_dir", metavar="OUT_DIR")
    keys.add_argument("--name", default="supernode", help="file name (default: supernode)")
    keys.set_defaults(handler=_keys)
