"""Real NBD servers that are not ours (nbdkit, qemu-nbd), started by a test on a
UNIX socket or a loopback TCP port in its temporary directory, for the NBD
client tests (test_nbd_client*.py).

  peers            fixture: Peers, a factory of servers, all killed at teardown
  Peers.nbdkit(*args, tls=None)        -> Server (args: plugin, filters, params)
  Peers.qemu_nbd(image, fmt, *args)    -> Server
  Server.uri       nbd+unix:///?socket=... (or nbd://localhost:PORT/ for tcp=True)
  make_x509(dir)   a CA, a server and a client certificate (openssl), laid out
                   as nbdkit / qemu-nbd (server) and libnbd (client) expect
  make_psk(path, user)  a PSK key file "user:hexkey"
  read_export(uri, path)  copies an export into a file with nbdcopy
"""

import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, stop_process, wait_for

START_TIMEOUT = 15
PORT_TRIES = 5  # a free_port() taken by another process before the peer binds it


def _greets(s):
    """Whether the server on connected socket s sends the NBD greeting. A
    connect alone is not enough: qemu-nbd listens before it opens (and locks)
    its image, and the kernel accepts connections into the backlog meanwhile;
    it greets only from its main loop, after the image is open."""
    s.settimeout(0.5)
    got = b""
    try:
        while len(got) < 8:
            chunk = s.recv(8 - len(got))
            if not chunk:
                return False
            got += chunk
    except OSError:
        return False
    return got == b"NBDMAGIC"


class Server:
    def __init__(self, cmd, uri, ready, log):
        self.cmd = cmd
        self.uri = uri
        self._ready = ready
        self.log = log
        self.proc = None

    def _launch(self):
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def _lost_port_race(self):
        """Whether the server exited at once because its TCP port was taken."""
        try:
            self.proc.wait(0.05)
        except subprocess.TimeoutExpired:
            return False
        self._logf.close()
        return "Address already in use" in Path(self.log).read_text(errors="replace")

    def start(self):
        self._launch()
        wait_for(self._ready, START_TIMEOUT, f"{self.cmd[0]} accepting connections", self.proc,
                 lambda: Path(self.log).read_text(errors="replace"))
        return self

    def stop(self, sig=None):
        """Kills the server (SIGKILL: a crash, unless sig given) and waits."""
        if self.proc and self.proc.poll() is None:
            if sig is None:
                self.proc.kill()
                self.proc.wait()
            else:
                stop_process(self.proc, sig, 20)
        if self.proc:
            self._logf.close()


class Peers:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.servers = []
        self.n = 0

    def _endpoint(self, tcp):
        self.n += 1
        if tcp:
            port = free_port()

            def ready():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                        return _greets(s)
                except OSError:
                    return False
            return port, f"nbd://localhost:{port}/", ready
        sock = self.tmp / f"peer{self.n}.sock"

        def ready():
            if not sock.exists():
                return False
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(sock))
                return _greets(s)
            except OSError:
                return False
            finally:
                s.close()
        return sock, f"nbd+unix:///?socket={sock}", ready

    def _start(self, tcp, command):
        """Starts the server command(where) makes; on TCP, a port another process
        took between free_port() and the bind is retried with a new one."""
        for _ in range(PORT_TRIES if tcp else 1):
            where, uri, ready = self._endpoint(tcp)
            s = Server(command(where), uri, ready, self.tmp / f"peer{self.n}.log")
            self.servers.append(s)
            s._launch()
            if tcp and s._lost_port_race():
                continue
            wait_for(ready, START_TIMEOUT, f"{s.cmd[0]} accepting connections", s.proc,
                     lambda: Path(s.log).read_text(errors="replace"))
            return s
        pytest.fail(f"no free TCP port for {s.cmd[0]} after {PORT_TRIES} tries")

    def nbdkit(self, *args, tcp=False, tls_args=()):
        if shutil.which("nbdkit") is None:
            pytest.skip("nbdkit not installed")

        def command(where):
            listen = ["-i", "127.0.0.1", "-p", str(where)] if tcp else ["-U", str(where)]
            return ["nbdkit", "-f", "--exit-with-parent", *listen, *tls_args, *map(str, args)]
        return self._start(tcp, command)

    def qemu_nbd(self, image, fmt, *args, tcp=False):
        if shutil.which("qemu-nbd") is None:
            pytest.skip("qemu-nbd not installed")

        def command(where):
            listen = ["-b", "127.0.0.1", "-p", str(where)] if tcp else ["--socket", str(where)]
            # Persistent, several clients, writeback cache off so a kill loses
            # nothing that was acknowledged after a flush.
            return ["qemu-nbd", *listen, "-f", fmt, "-t", "-e", "4", "--cache=none",
                    "--aio=threads", *map(str, args), str(image)]
        return self._start(tcp, command)

    def restart(self, server):
        server.stop()
        if server.uri.startswith("nbd+unix"):
            Path(server.uri.split("socket=")[1]).unlink(missing_ok=True)
        return server.start()

    def cleanup(self):
        for s in self.servers:
            s.stop()


@pytest.fixture
def peers(tmp_path):
    p = Peers(tmp_path)
    yield p
    p.cleanup()


def read_export(uri, path):
    """Copies the export at uri into a new file (nbdcopy, another client)."""
    r = subprocess.run(["nbdcopy", uri, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"nbdcopy {uri}: {r.stderr}"
    return path


def export_map(uri):
    """[(start, length, description)] from nbdinfo --map (base:allocation)."""
    out = subprocess.run(["nbdinfo", "--map", uri], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        rows.append((int(parts[0]), int(parts[1]), parts[3].strip()))
    return rows


def _openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def make_x509(d: Path, cn_suffix=""):
    """Writes a CA and server + client certificates into d/server and d/client:
    server: ca-cert.pem server-cert.pem server-key.pem (nbdkit, qemu-nbd);
    client: ca-cert.pem client-cert.pem client-key.pem (libnbd)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d.mkdir(parents=True, exist_ok=True)
    ext = d / "ext.cnf"
    ext.write_text(
        "[srv]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "[cli]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", f"/CN=blkmirror test CA{cn_suffix}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for role, ext_name in (("server", "srv"), ("client", "cli")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem",
                 "-out", f"{role}.csr", "-subj", f"/CN={'localhost' if role == 'server' else 'client'}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", "2", "-extfile", str(ext),
                 "-extensions", ext_name, cwd=d)
    for role in ("server", "client"):
        (d / role).mkdir(exist_ok=True)
        shutil.copy(d / "ca-cert.pem", d / role / "ca-cert.pem")
        shutil.copy(d / f"{role}-cert.pem", d / role / f"{role}-cert.pem")
        shutil.copy(d / f"{role}-key.pem", d / role / f"{role}-key.pem")
        os.chmod(d / role / f"{role}-key.pem", 0o600)
    return d / "server", d / "client"


def make_psk(path: Path, user="alice"):
    path.write_text(f"{user}:{secrets.token_hex(32)}\n")
    os.chmod(path, 0o600)
    return path
