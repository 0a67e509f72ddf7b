"""fedlora.deploy.keys: the CA/SuperLink certificates and SuperNode key pairs.

Beyond checking the files, the formats are proven against the consumers: a real TLS handshake
through Python's ssl (what uvicorn serves the SuperLink's HTTPS API with), a real gRPC call
through Flower's own server/channel helpers, and Flower's own loaders for the SuperNode keys.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.deploy.keys import (
    CertFiles, KeyFiles, KeysError, add_commands, cert_expiry, expiry_warning, make_certs,
    make_node_keys,
)

HOSTS = ["superlink.example.org", "10.1.2.3", "localhost"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs") / "tls", HOSTS, days=90)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedlora")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


# ---------------------------------------------------------------- certificates


def test_certs_files_modes_and_chain(certs):
    for path in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key):
        assert path.is_file()
    assert [p.name for p in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key)] \
        == ["ca.crt", "ca.key", "server.pem", "server.key"]
    assert _mode(certs.ca_key) == _mode(certs.server_key) == 0o600
    ca, server = _cert(certs.ca_cert), _cert(certs.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    # keys load without a password (the SuperLink reads them unattended) and match the certs
    for key_path, cert in ((certs.ca_key, ca), (certs.server_key, server)):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key() == cert.public_key()


def test_certs_sans_and_expiry(certs):
    san = _cert(certs.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    dns, ips = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)
    assert {"superlink.example.org", "localhost"} <= set(dns)
    assert {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1")} <= set(ips)
    assert dns.count("localhost") == 1  # given and implied loopback are not duplicated
    expected = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=90)
    assert abs(certs.not_after - expected) < dt.timedelta(minutes=5)
    assert cert_expiry(certs.server_cert) == certs.not_after
    assert expiry_warning(certs.server_cert) is None
    assert "expires on" in expiry_warning(certs.server_cert, within_days=100)


def test_certs_refuse_to_overwrite(tmp_path):
    first = make_certs(tmp_path, ["localhost"], days=1)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeysError, match="ca.crt"):
        make_certs(tmp_path, ["localhost"])
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    # one existing target is enough, and the missing ones are then not written either
    other = tmp_path / "other"
    other.mkdir()
    (other / "server.key").write_text("mine")
    with pytest.raises(KeysError, match="server.key"):
        make_certs(other, ["localhost"])
    assert sorted(p.name for p in other.iterdir()) == ["server.key"]
    assert (other / "server.key").read_text() == "mine"
    assert expiry_warning(first.server_cert, within_days=30).startswith("certificate")


def test_certs_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import fedlora.deploy.keys as keys

    def broken(key):
        raise OSError("disk full")

    monkeypatch.setattr(keys, "_key_pem", broken)  # fails after ca.crt is on disk
    with pytest.raises(OSError, match="disk full"):
        make_certs(tmp_path, ["localhost"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("hosts", [[], [""], ["bad host"], [" localhost"], ["https://x.org"],
                                   ["x.org:9092"], ["10.0.0"], ["-x.org"]])
def test_certs_bad_hosts(tmp_path, hosts):
    with pytest.raises(KeysError) as err:
        make_certs(tmp_path / "c", hosts)
    if hosts:
        assert repr(hosts[0]) in str(err.value)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("days", [0, -3, 1.5])
def test_certs_bad_days(tmp_path, days):
    with pytest.raises(KeysError, match="days"):
        make_certs(tmp_path, ["localhost"], days=days)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------- real handshakes


def _tls_server(certs: CertFiles, connections: int) -> int:
    """Serve `connections` TLS handshakes on 127.0.0.1 in a thread, as uvicorn would."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            for _ in range(connections):
                try:
                    conn, _ = listener.accept()
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (OSError, ssl.SSLError):
                    pass  # a client refusing our certificate is an expected outcome

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def _connect(port: int, ctx: ssl.SSLContext, name: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return tls.recv(2)


def test_tls_handshake(certs, tmp_path):
    port = _tls_server(certs, connections=5)
    good = ssl.create_default_context(cafile=str(certs.ca_cert))
    good.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; holds already
    for name in ("localhost", "127.0.0.1", "superlink.example.org"):
        assert _connect(port, good, name) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError, match="(?i)hostname|match"):
        _connect(port, good, "elsewhere.example.org")
    other = make_certs(tmp_path / "other-ca", ["localhost"])
    stranger = ssl.create_default_context(cafile=str(other.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(port, stranger, "localhost")


def test_grpc_through_flower_helpers(certs):
    """Flower's own gRPC server (SuperLink APIs) and channel (SuperNode, CLI) accept the files."""
    grpc = pytest.importorskip("grpc")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    flwr_grpc = pytest.importorskip("flwr.supercore.grpc")
    servicer = pytest.importorskip(
        "flwr.supercore.grpc_health.simple_health_servicer").SimpleHealthServicer
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = flwr_grpc.generic_create_grpc_server(
        (servicer(), health_grpc.add_HealthServicer_to_server), f"127.0.0.1:{port}",
        certificates=tuple(p.read_bytes() for p in (certs.ca_cert, certs.server_cert,
                                                     certs.server_key)))
    server.start()
    try:
        ca = certs.ca_cert.read_bytes()
        channel = flwr_grpc.create_channel(f"127.0.0.1:{port}", insecure=False,
                                           root_certificates=ca)
        reply = health_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        # the system trust store does not know our CA: the handshake must fail
        channel = flwr_grpc.create_channel(f"127.0.0.1:{port}", insecure=False)
        with pytest.raises(grpc.RpcError) as err:
            health_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)
        channel.close()
    finally:
        server.stop(None)


# ------------------------------------------------------------------ node keys


def test_node_keys(tmp_path):
    files = make_node_keys(tmp_path / "keys", "site-a")
    assert files == KeyFiles(tmp_path / "keys" / "site-a", tmp_path / "keys" / "site-a.pub")
    assert _mode(files.private_key) == 0o600
    private = serialization.load_ssh_private_key(files.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    text = files.public_key.read_text()
    assert text.startswith("ecdsa-sha2-nistp384 AAAA") and text.endswith(" fedlora-site-a\n")
    public = serialization.load_ssh_public_key(files.public_key.read_bytes())
    assert public == private.public_key()
    with pytest.raises(KeysError, match="site-a"):
        make_node_keys(tmp_path / "keys", "site-a")
    assert serialization.load_ssh_public_key(files.public_key.read_bytes()) == public


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "x y", "-flag"])
def test_node_keys_bad_name(tmp_path, name):
    with pytest.raises(KeysError, match="name"):
        make_node_keys(tmp_path, name)
    assert not list(tmp_path.iterdir())


def test_node_keys_accepted_by_flower(tmp_path):
    """The exact loaders of `flwr supernode register` and `flower-supernode`."""
    register = pytest.importorskip("flwr.cli.supernode.register")
    supernode = pytest.importorskip("flwr.supernode.cli.flower_supernode")
    asymmetric = pytest.importorskip("flwr.supercore.primitives.asymmetric")
    files = make_node_keys(tmp_path)
    registered = register.try_load_public_key(files.public_key)
    args = argparse.Namespace(auth_supernode_private_key=str(files.private_key),
                              auth_supernode_public_key=None)
    private, public = supernode._try_setup_client_authentication(args)
    # what the SuperNode will sign with is what the operator registered
    assert asymmetric.public_key_to_bytes(public) == registered
    assert private.curve.name == "secp384r1"


# ------------------------------------------------------------------------ CLI


def test_cli_certs(tmp_path, capsys):
    out_dir = tmp_path / "tls"
    assert _cli(["certs", str(out_dir), "--host", "link.example.org", "--host", "10.0.0.5",
                 "--days", "30"]) == 0
    out = capsys.readouterr().out
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        assert f"wrote {out_dir / name}" in out
    assert "--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key" in out
    assert "ca.crt to every SuperNode site" in out
    expiry = cert_expiry(out_dir / "server.pem")
    assert f"expires: {expiry:%Y-%m-%d}" in out
    assert _cli(["certs", str(out_dir), "--host", "link.example.org"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedlora certs: error: ") and "already exists" in captured.err
    assert _cli(["certs", str(tmp_path / "x"), "--host", "a b"]) == 2
    assert "'a b'" in capsys.readouterr().err
    assert _cli(["certs", str(tmp_path / "y"), "--host", "h.org", "--days", "0"]) == 2
    with pytest.raises(SystemExit):
        _cli(["certs", str(tmp_path / "z")])  # --host is required


def test_cli_keys(tmp_path, capsys):
    assert _cli(["keys", str(tmp_path), "--name", "site-b"]) == 0
    out = capsys.readouterr().out
    assert f"public key: {tmp_path / 'site-b.pub'}" in out
    assert "send only site-b.pub to the federation's operator" in out
    assert "`flwr supernode register site-b.pub <connection>`" in out
    assert f"--auth-supernode-private-key {tmp_path / 'site-b'}" in out
    assert _cli(["keys", str(tmp_path), "--name", "site-b"]) == 2
    assert capsys.readouterr().err.startswith("fedlora keys: error: ")
    assert _cli(["keys", str(tmp_path), "--name", "../up"]) == 2
    assert _cli(["keys", str(tmp_path)]) == 0
    assert (tmp_path / "supernode.pub").is_file()
