"""TLS on blkmirror's own NBD server (issue 16): `blkmirror serve --tls-creds /
--tls-psk` against real TLS clients (nbdinfo, nbdcopy and python-libnbd from
libnbd; qemu-img), FORCEDTLS behaviour (a plain client learns nothing and gets
no data), refusals (a client trusting another CA, a missing or foreign or
expired client certificate under --tls-verify-peer, a client outside
--tls-authz, a wrong PSK), each while the server goes on serving the others,
and the --insecure rule for plain TCP beyond loopback."""

import datetime
import shutil
import socket
import struct
import subprocess

import pytest

from conftest import MiB
from nbd_peers import make_psk, make_x509

SIZE = 8 * MiB


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_x509(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_x509(tmp_path_factory.mktemp("pki-other"), " (other)")


@pytest.fixture
def disk(workdir):
    img = workdir / "disk.img"
    img.write_bytes(bytes(range(256)) * (SIZE // 256))
    return img


def serve(cli, disk, workdir, *tls):
    sock = workdir / "nbd.sock"
    run = cli.start("serve", disk, "--socket", sock, *tls)
    run.wait_for_line("serving", 30)
    return run, sock


def nbdinfo(uri):
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)


def x509_uri(sock, client_dir):
    return f"nbds+unix:///?socket={sock}&tls-certificates={client_dir}"


def connect(uri):
    import nbd
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # the certificates and keys named in the URI
    h.connect_uri(uri)
    return h


def read_all(uri):
    h = connect(uri)
    try:
        return b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
    finally:
        h.shutdown()


def test_x509_clients_read_and_write_over_tls(cli, workdir, disk, certs):
    server_dir, client_dir = certs
    run, sock = serve(cli, disk, workdir, "--tls-creds", server_dir)
    assert "nbds+unix://" in "".join(run.stderr_lines)
    uri = x509_uri(sock, client_dir)
    r = nbdinfo(uri)
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr
    assert read_all(uri) == disk.read_bytes()
    h = connect(uri)
    assert h.get_tls_negotiated()
    h.pwrite(b"\xab" * 65536, 3 * MiB)
    h.flush()
    h.shutdown()
    out = workdir / "copy.img"
    r = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[3 * MiB:3 * MiB + 65536] == b"\xab" * 65536


def test_qemu_img_reads_over_tls_tcp(cli, workdir, disk, certs):
    server_dir, client_dir = certs
    run, port = tcp_serve(cli, disk, "--tls-creds", server_dir)
    out = workdir / "q.raw"
    r = subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                        f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
                        "--image-opts",
                        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                        "tls-creds=tls0", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == disk.read_bytes()


def option(sock, opt, data=b""):
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)


def option_reply(sock):
    head = recv_exact(sock, 20)
    magic, opt, rtype, length = struct.unpack(">QIII", head)
    assert magic == 0x3E889045565A9
    return opt, rtype, recv_exact(sock, length)


def recv_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "the server closed the connection"
        out += chunk
    return out


TLS_REQD = 0x80000005


def test_plain_client_gets_nothing_and_others_go_on(cli, workdir, disk, certs):
    # FORCEDTLS, byte by byte: every option but STARTTLS is refused with
    # TLS_REQD (LIST included: no export names leak), GO too, and EXPORT_NAME
    # (which cannot be refused) ends the connection.
    server_dir, client_dir = certs
    run, path = serve(cli, disk, workdir, "--tls-creds", server_dir)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    recv_exact(s, 18)  # greeting
    s.sendall(struct.pack(">I", 1))  # fixed newstyle
    for opt, data in ((3, b""), (8, b""), (7, struct.pack(">I", 0) + struct.pack(">H", 0)),
                      (6, struct.pack(">I", 0) + struct.pack(">H", 0)), (10, b"\0" * 8)):
        option(s, opt, data)
        got_opt, rtype, payload = option_reply(s)
        assert (got_opt, rtype) == (opt, TLS_REQD), (opt, hex(rtype), payload)
    option(s, 1, b"")
    assert s.recv(1) == b""  # EXPORT_NAME: hung up
    s.close()
    # A client without fixed newstyle is not served at all.
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 0))
    assert s.recv(1) == b""
    s.close()
    # libnbd without TLS fails as a whole; nbdinfo says so.
    r = nbdinfo(f"nbd+unix:///?socket={path}")
    assert r.returncode != 0
    # The TLS clients are served all the while.
    assert nbdinfo(x509_uri(path, client_dir)).returncode == 0
    assert run.popen.poll() is None


def tcp_serve(cli, disk, *tls):
    run = cli.start("serve", disk, "--listen", "127.0.0.1:0", *tls)
    line = run.wait_for_line("serving", 30)
    return run, int(line.rsplit(":", 1)[1].split("/")[0])


def test_client_trusting_another_ca_is_refused(cli, workdir, disk, certs, other_ca):
    # Over TCP: libnbd 1.14 checks the server's certificate only there.
    server_dir, client_dir = certs
    run, port = tcp_serve(cli, disk, "--tls-creds", server_dir)
    r = nbdinfo(f"nbds://127.0.0.1:{port}/?tls-certificates={other_ca[1]}")
    assert r.returncode != 0
    assert nbdinfo(f"nbds://127.0.0.1:{port}/?tls-certificates={client_dir}").returncode == 0


def expired_client_dir(base, certs_root):
    """A client certificate from the right CA that expired yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    ca_key = serialization.load_pem_private_key((certs_root / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs_root / "ca-cert.pem").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=3))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    d = base / "expired"
    d.mkdir()
    shutil.copy(certs_root / "ca-cert.pem", d / "ca-cert.pem")
    (d / "client-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "client-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (d / "client-key.pem").chmod(0o600)
    return d


def test_verify_peer_refuses_missing_foreign_and_expired_client_certificates(
        cli, workdir, disk, certs, other_ca):
    server_dir, client_dir = certs
    run, sock = serve(cli, disk, workdir, "--tls-creds", server_dir, "--tls-verify-peer")
    no_cert = workdir / "no-cert"
    no_cert.mkdir()
    shutil.copy(client_dir / "ca-cert.pem", no_cert / "ca-cert.pem")
    foreign = workdir / "foreign"
    foreign.mkdir()
    shutil.copy(client_dir / "ca-cert.pem", foreign / "ca-cert.pem")
    shutil.copy(other_ca[1] / "client-cert.pem", foreign / "client-cert.pem")
    shutil.copy(other_ca[1] / "client-key.pem", foreign / "client-key.pem")
    expired = expired_client_dir(workdir, client_dir.parent)
    for d, why in ((no_cert, "no client certificate"), (foreign, "another CA"),
                   (expired, "expired")):
        r = nbdinfo(x509_uri(sock, d))
        assert r.returncode != 0, why
    run.wait_for_line("expired", 10, stream="stdout")
    run.wait_for_line("NBD client refused", 10, stream="stdout")
    assert nbdinfo(x509_uri(sock, client_dir)).returncode == 0


def test_authz_lets_in_only_the_listed_clients(cli, workdir, disk, certs):
    server_dir, client_dir = certs
    run, sock = serve(cli, disk, workdir, "--tls-creds", server_dir, "--tls-verify-peer",
                      "--tls-authz", "CN=client")
    assert nbdinfo(x509_uri(sock, client_dir)).returncode == 0
    run.send_signal(2)
    run.finish(30)
    run, sock = serve(cli, disk, workdir, "--tls-creds", server_dir, "--tls-verify-peer",
                      "--tls-authz", "CN=somebody else")
    assert nbdinfo(x509_uri(sock, client_dir)).returncode != 0
    run.wait_for_line("'CN=client' is not authorized", 10, stream="stdout")


def test_psk_clients_and_a_wrong_key(cli, workdir, disk):
    keys = make_psk(workdir / "keys.psk")
    run, sock = serve(cli, disk, workdir, "--tls-psk", keys)
    uri = f"nbds+unix://alice@/?socket={sock}&tls-psk-file={keys}"
    assert read_all(uri) == disk.read_bytes()
    wrong = make_psk(workdir / "wrong.psk")
    r = nbdinfo(f"nbds+unix://alice@/?socket={sock}&tls-psk-file={wrong}")
    assert r.returncode != 0
    out = workdir / "q.raw"
    r = subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                        f"tls-creds-psk,id=tls0,dir={workdir},username=alice,endpoint=client",
                        "--image-opts",
                        f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == disk.read_bytes()


def test_plain_tcp_beyond_loopback_needs_insecure(cli, workdir, disk):
    r = cli.run("serve", disk, "--listen", "0.0.0.0:0")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "--insecure" in r.stderr, r.stderr
    run = cli.start("serve", disk, "--listen", "0.0.0.0:0", "--insecure")
    run.wait_for_line("without TLS", 30)
    run.wait_for_line("serving", 30)
    # Loopback stays as it was: no flag needed, no warning.
    other = workdir / "other.img"
    shutil.copy(disk, other)
    run2 = cli.start("serve", other, "--listen", "127.0.0.1:0")
    run2.wait_for_line("serving", 30)
    assert not any("without TLS" in l for l in run2.stderr_lines)


def test_bad_tls_files_are_refused_with_one_line(cli, workdir, disk, certs):
    server_dir, _ = certs
    for args, needle in ((["--tls-creds", workdir / "nowhere"], "server-cert.pem"),
                         (["--tls-psk", workdir / "none.psk"], "none.psk"),
                         (["--tls-authz", "CN=x"], "--tls-authz needs")):
        r = cli.run("serve", disk, "--socket", workdir / "s.sock", *args)
        assert r.returncode != 0 and needle in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad = workdir / "bad"
    bad.mkdir()
    shutil.copy(server_dir / "server-cert.pem", bad / "server-cert.pem")
    (bad / "server-key.pem").write_text("not a key\n")
    r = cli.run("serve", disk, "--socket", workdir / "s.sock", "--tls-creds", bad)
    assert r.returncode != 0 and "server-key.pem" in r.stderr, r.stderr


def qmp_export(qmp, workdir, disk, **start):
    qmp.cmd("blockdev-add", driver="file", node_name="disk", filename=str(disk))
    sock = workdir / "qmp-nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}, **start)
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="disk", writable=True)
    return sock


def test_daemon_serves_x509_with_authz_list(qmp, workdir, disk, certs):
    # As qemu-storage-daemon is driven: tls-creds-x509 endpoint=server (verify-peer
    # on by default), an authz-list, nbd-server-start {tls-creds, tls-authz}.
    server_dir, client_dir = certs
    qmp.cmd("object-add", qom_type="tls-creds-x509", id="tls0", dir=str(server_dir),
            endpoint="server")
    qmp.cmd("object-add", qom_type="authz-list", id="auth0", policy="deny",
            rules=[{"match": "CN=cl*", "policy": "allow", "format": "glob"}])
    sock = qmp_export(qmp, workdir, disk, tls_creds="tls0", tls_authz="auth0")
    uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={client_dir}"
    assert read_all(uri) == disk.read_bytes()
    # verify-peer by default: a client without a certificate is refused.
    no_cert = workdir / "no-cert"
    no_cert.mkdir()
    shutil.copy(client_dir / "ca-cert.pem", no_cert / "ca-cert.pem")
    assert nbdinfo(f"nbds+unix:///disk?socket={sock}&tls-certificates={no_cert}").returncode != 0
    assert qmp.error("object-del", id="tls0") == (
        "GenericError", "object 'tls0' is in use, can not be deleted")
    assert nbdinfo(uri).returncode == 0


def test_daemon_authz_simple_refuses_others(qmp, workdir, disk, certs):
    server_dir, client_dir = certs
    qmp.cmd("object-add", qom_type="tls-creds-x509", id="tls0", dir=str(server_dir),
            endpoint="server")
    qmp.cmd("object-add", qom_type="authz-simple", id="auth0", identity="CN=someone else")
    sock = qmp_export(qmp, workdir, disk, tls_creds="tls0", tls_authz="auth0")
    assert nbdinfo(f"nbds+unix:///disk?socket={sock}&tls-certificates={client_dir}").returncode != 0


def test_daemon_serves_psk(qmp, workdir, disk):
    keydir = workdir / "keys"
    keydir.mkdir()
    make_psk(keydir / "keys.psk")
    qmp.cmd("object-add", qom_type="tls-creds-psk", id="k", dir=str(keydir), endpoint="server")
    sock = qmp_export(qmp, workdir, disk, tls_creds="k")
    assert read_all(f"nbds+unix://alice@/disk?socket={sock}&tls-psk-file={keydir}/keys.psk") == \
        disk.read_bytes()


def test_daemon_tls_refusals_match_qemu_storage_daemon(qmp, workdir, certs):
    from qcow2_helpers import Qsd
    server_dir, client_dir = certs
    qsd = Qsd(workdir)
    addr = {"type": "unix", "data": {"path": str(workdir / "x.sock")}}
    try:
        for target in (qmp, qsd):
            target.cmd("object-add", qom_type="tls-creds-x509", id="cli", dir=str(client_dir),
                       endpoint="client")
        cases = [
            ({"tls_creds": "none"}, "No TLS credentials with id 'none'"),
            ({"tls_creds": "cli"}, "Expected TLS credentials for a server endpoint"),
        ]
        for args, text in cases:
            assert qmp.error("nbd-server-start", addr=addr, **args) == ("GenericError", text)
            assert qsd.error("nbd-server-start", addr=addr, **args)[1] == text, args
        # Ours only: QEMU 7.2 starts a plain server and ignores the authz
        # object, which lets in everyone the operator meant to filter.
        assert qmp.error("nbd-server-start", addr=addr, tls_authz="a") == (
            "GenericError", "'tls-authz' is only supported with 'tls-creds'")
        bad = [{"qom_type": "authz-list", "id": "z", "rules": [{"match": "x"}]},
               {"qom_type": "authz-list", "id": "z", "policy": "maybe"},
               {"qom_type": "authz-simple", "id": "z"}]
        for args in bad:
            ours, theirs = qmp.error("object-add", **args), qsd.error("object-add", **args)
            assert ours[0] == theirs[0] == "GenericError", (args, ours, theirs)
    finally:
        qsd.stop()
