"""TLS to remote NBD servers: X.509 certificates made by the test (openssl) and
PSK, with nbdkit and qemu-nbd; a wrong CA, client key or PSK is refused with
one clear line and exit 2, nothing written."""

import signal
import subprocess

import pytest

from conftest import MiB
from nbd_peers import make_psk, make_x509

SIZE = 16 * MiB
LAYOUT = [(0, 2 * MiB), (8 * MiB, 2 * MiB)]


@pytest.fixture
def src(images):
    return images.sparse("src.img", SIZE, LAYOUT)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_x509(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_x509(tmp_path_factory.mktemp("pki-other"), " (other)")


def tls_uri(srv, **params):
    base = srv.uri.replace("nbd+unix://", "nbds+unix://").replace("nbd://", "nbds://")
    sep = "&" if "?" in base else "?"
    return base + sep + "&".join(f"{k}={v}" for k, v in params.items())


def test_x509_to_nbdkit(cli, check, workdir, peers, src, certs):
    server_dir, client_dir = certs
    srv = peers.nbdkit("memory", SIZE, tls_args=["--tls=require", f"--tls-certificates={server_dir}",
                                                  "--tls-verify-peer"])
    res = cli.mirror(src, tls_uri(srv, **{"tls-certificates": client_dir}), "--no-progress")
    assert res.returncode == 0, check.describe(res)
    out = workdir / "out.img"
    r = subprocess.run(["nbdcopy", tls_uri(srv, **{"tls-certificates": client_dir}), str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    check.assert_identical(src, out)


def test_plain_client_is_refused_by_tls_server(cli, check, peers, src, certs):
    server_dir, _ = certs
    srv = peers.nbdkit("memory", SIZE, tls_args=["--tls=require", f"--tls-certificates={server_dir}"])
    res = cli.mirror(src, srv.uri, "--no-progress")
    assert res.returncode == 2, check.describe(res)
    assert "cannot connect" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_x509_wrong_ca_is_refused(cli, check, peers, src, certs, other_ca):
    # Over TCP: libnbd 1.14 checks the server's certificate only when it has a
    # host name to check it against (see the UNIX socket test below).
    server_dir, _ = certs
    _, wrong_client = other_ca
    srv = peers.nbdkit("memory", SIZE, tcp=True,
                       tls_args=["--tls=require", f"--tls-certificates={server_dir}"])
    res = cli.mirror(src, tls_uri(srv, **{"tls-certificates": wrong_client}), "--no-progress")
    assert res.returncode == 2, check.describe(res)
    assert "cannot connect" in res.stderr and "certificate" in res.stderr.lower(), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    # Without verification the same client connects (verification is what refused it).
    res = cli.mirror(src, tls_uri(srv, **{"tls-certificates": wrong_client,
                                           "tls-verify-peer": "false"}), "--no-progress")
    assert res.returncode == 0, check.describe(res)


def test_x509_client_cert_from_wrong_ca_is_refused_by_verifying_server(cli, check, peers, src, certs,
                                                                      other_ca, tmp_path):
    server_dir, client_dir = certs
    # Trusts the right CA, but presents a client key signed by another CA.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    for f in ("client-cert.pem", "client-key.pem"):
        (mixed / f).write_bytes((other_ca[1] / f).read_bytes())
    srv = peers.nbdkit("memory", SIZE, tcp=True,
                       tls_args=["--tls=require", f"--tls-certificates={server_dir}",
                                 "--tls-verify-peer"])
    res = cli.mirror(src, tls_uri(srv, **{"tls-certificates": mixed}), "--no-progress")
    assert res.returncode == 2, check.describe(res)
    assert "cannot connect" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_x509_to_qemu_nbd_over_tcp(cli, check, images, peers, src, certs):
    server_dir, client_dir = certs
    dst = images.sparse("dst.img", SIZE)
    srv = peers.qemu_nbd(dst, "raw", "--object",
                         f"tls-creds-x509,id=tls0,dir={server_dir},endpoint=server,verify-peer=on",
                         "--tls-creds", "tls0", tcp=True)
    # Over TCP libnbd also checks that the certificate names the host (localhost).
    res = cli.mirror(src, tls_uri(srv, **{"tls-certificates": client_dir}), "--no-progress")
    assert res.returncode == 0, check.describe(res)
    srv.stop(signal.SIGTERM)
    check.assert_identical(src, dst)


def test_psk_to_nbdkit_and_wrong_key_refused(cli, check, workdir, peers, src):
    keys = make_psk(workdir / "keys.psk", "alice")
    srv = peers.nbdkit("memory", SIZE, tls_args=["--tls=require", f"--tls-psk={keys}"])
    good = tls_uri(srv, **{"tls-psk-file": keys}).replace(":///", "://alice@/")
    res = cli.mirror(src, good, "--no-progress")
    assert res.returncode == 0, check.describe(res)
    r = subprocess.run(["nbdcopy", good, str(workdir / "out.img")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    check.assert_identical(src, workdir / "out.img")
    wrong = make_psk(workdir / "wrong.psk", "alice")
    bad = tls_uri(srv, **{"tls-psk-file": wrong}).replace(":///", "://alice@/")
    res = cli.mirror(src, bad, "--no-progress")
    assert res.returncode == 2, check.describe(res)
    assert "cannot connect" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_x509_over_unix_socket_warns_that_the_server_is_not_verified(cli, check, peers, src, certs):
    server_dir, client_dir = certs
    srv = peers.nbdkit("memory", SIZE, tls_args=["--tls=require", f"--tls-certificates={server_dir}"])
    res = cli.mirror(src, tls_uri(srv, **{"tls-certificates": client_dir}), "--no-progress")
    assert res.returncode == 0, check.describe(res)
    assert "server certificate is not verified over a UNIX socket" in res.stderr, res.stderr
