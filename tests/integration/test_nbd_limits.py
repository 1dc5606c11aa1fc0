"""What a hostile client or a careless operator can make `blkmirror serve` (and
the daemon's NBD server) hold: descriptors, CPU, memory, a socket path, an
export being deleted. Each test is named after what broke (issue 15's single
listener and HOST:PORT parser, issue 17 items 3, 8, 9 and 12)."""

import os
import resource
import select
import socket
import struct
import subprocess
import time

import pytest

from conftest import KiB, MiB  # noqa: F401
from nbd_helpers import (  # noqa: F401
    CMD_WRITE, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_DESCRIPTION,
    OPT_GO, OPT_INFO, REP_ACK, REP_INFO, RawNbd, assert_serves, connect, nbd_server)
from qmp_client import Daemon, QmpClient

SIZE = 64 * MiB


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(MiB))
    return p


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def must_exit(cmd, what):
    """Runs a command that must refuse to start: its CompletedProcess, or a
    test failure if it is still running (serving) after 10 s."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what}: it started serving instead: {e.stderr!r}")


def nofile(n):
    """preexec_fn: RLIMIT_NOFILE of the child set to n (soft and hard)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


def raise_own_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def greeted(sock_path, timeout):
    """A raw client that connected; .greeted says whether the greeting came."""
    c = RawNbd(sock_path, timeout=timeout)
    try:
        c.read_greeting()
        c.greeted = True
    except (socket.timeout, OSError, Exception):
        c.greeted = False
    c.s.settimeout(10)
    return c


# --------------------------------------------------------------------------
# The listener (issue 15: one listener; issue 17 items 9 and 12)


def test_accept_loop_does_not_spin_when_out_of_descriptors(nbd_server, image):
    """Regression: the NBD accept loop retried at once on EMFILE and spun at
    100% CPU. With RLIMIT_NOFILE lowered, clients are connected until the
    server cannot accept any more; its CPU time must stay low while it is out
    of descriptors, and once clients hang up new ones are served again."""
    srv = nbd_server(image, "--handshake-limit", "0", preexec_fn=nofile(48))
    clients = []
    try:
        for _ in range(60):
            c = greeted(srv.sock, 0.5)
            clients.append(c)
            if not c.greeted:
                break  # the server is out of descriptors: this one waits in the backlog
        assert not clients[-1].greeted, "the lowered RLIMIT_NOFILE was never reached"
        for _ in range(4):  # more waiting in the backlog
            c = RawNbd(srv.sock)
            c.greeted = False
            clients.append(c)
        time.sleep(0.3)
        cpu0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
        time.sleep(3)
        used, wall = cpu_seconds(srv.proc.pid) - cpu0, time.monotonic() - t0
        print(f"out of descriptors with {sum(c.greeted for c in clients)} clients: "
              f"{used:.3f} s CPU in {wall:.1f} s")
        assert used < 0.15, f"accept loop used {used:.2f} s of CPU in {wall:.1f} s while out of descriptors"
        srv.assert_alive()
        assert "Too many open files" in srv.log()
    finally:
        for c in clients:
            c.close()
    # Descriptors are free again: the ones left in the backlog were dropped by
    # their clients, and a new client is served.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert_serves(srv)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    srv.stop()


def test_second_server_on_a_live_socket_is_refused(nbd_server, image, tmp_path, blkmirror_bin):
    """Regression: a second `serve --socket X` unlinked the first one's live
    socket and both served the image writable."""
    srv = nbd_server(image)
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * MiB)
    r = must_exit([blkmirror_bin, "serve", str(other), "--socket", srv.sock],
                  "a second server on a live socket")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{srv.sock} is in use by another process" in lines[0], r.stderr
    assert os.path.exists(srv.sock)
    assert_serves(srv)
    srv.stop()


def test_stale_socket_is_replaced(nbd_server, image, tmp_path):
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()  # the file stays; nobody listens: stale
    srv = nbd_server(image, sock=sock)
    assert_serves(srv)
    srv.stop()
    assert not sock.exists(), "the socket file outlived the server"


def test_non_socket_at_socket_path_is_refused(image, tmp_path, blkmirror_bin):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    r = subprocess.run([blkmirror_bin, "serve", str(image), "--socket", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "exists and is not a socket" in r.stderr, r
    assert path.read_text() == "keep me"


def test_qmp_socket_of_a_live_daemon_is_refused(blkmirror_bin, tmp_path):
    d = Daemon(blkmirror_bin, tmp_path)
    try:
        r = must_exit([blkmirror_bin, "daemon", "--qmp", d.path], "a second daemon on a live QMP socket")
        assert r.returncode == 2, r
        assert f"{d.path} is in use by another process" in r.stderr, r.stderr
        with d.client() as c:
            assert "qemu" in c.cmd("query-version")
    finally:
        assert d.stop() == 0


# --------------------------------------------------------------------------
# HOST:PORT (issue 15: one parser)


@pytest.mark.parametrize("listen,bad", [("127.0.0.1:1K", "bad port '1K'"), ("127.0.0.1:65536", "bad port"),
                                        ("::1:0", "needs brackets"), ("[::1:0", "unterminated '['"),
                                        ("127.0.0.1", "expected HOST:PORT")])
def test_listen_port_with_size_suffix_is_refused(image, blkmirror_bin, listen, bad):
    """Regression: --listen parsed its port with the size parser, so
    127.0.0.1:1K listened on port 1024."""
    r = must_exit([blkmirror_bin, "serve", str(image), "--listen", listen], f"--listen {listen}")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--listen '{listen}'" in lines[0] and bad in lines[0], r.stderr


def ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def test_listen_on_ipv6_literal(image, blkmirror_bin, tmp_path):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    p = subprocess.Popen([blkmirror_bin, "serve", str(image), "--listen", "[::1]:0"],
                         stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert "nbd://[::1]:" in line, line
        uri = line[line.index("nbd://[::1]:"):].split()[0]
        h = connect(uri)
        assert h.get_size() == SIZE
        h.shutdown()
    finally:
        p.terminate()
        p.wait(20)


# --------------------------------------------------------------------------
# Memory a client can make the server commit (issue 17 items 8 and 9)


def test_stalled_write_payloads_do_not_commit_memory(nbd_server, image):
    """Regression: a WRITE header announcing 32 MiB (or 64 MiB, over the
    limit) followed by 100 bytes made the server allocate and zero-fill the
    whole payload: 20 such clients took RSS from 9 to 1294 MiB."""
    srv = nbd_server(image)
    assert_serves(srv)
    base = rss_mib(srv.proc.pid)
    clients = []
    try:
        for i in range(20):
            c = RawNbd(srv.sock).handshake()
            length = 32 * MiB if i % 2 else 64 * MiB
            c.send(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, length) + os.urandom(100))
            clients.append(c)
        time.sleep(1)
        peak = rss_mib(srv.proc.pid)
        print(f"20 stalled write payloads: RSS {base:.1f} -> {peak:.1f} MiB")
        assert peak - base < 100, f"RSS grew from {base:.0f} to {peak:.0f} MiB for 2 KB of payload data"
        assert_serves(srv, 8 * MiB)  # others are still served
    finally:
        for c in clients:
            c.close()
    srv.stop()


def test_idle_connections_cost_little_memory(nbd_server, image):
    """Regression: each connection that never starts the handshake held a
    256 KiB buffer (1000 of them: 262 MiB). Before the handshake completes a
    connection may hold at most 16 KiB of buffers."""
    raise_own_nofile(1200)
    srv = nbd_server(image, "--max-connections", "2000", preexec_fn=nofile(1200))
    assert_serves(srv)
    base = rss_mib(srv.proc.pid)
    socks = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(srv.sock)
            socks.append(s)
        # Wait until the server has accepted (greeted) every one of them.
        poller = select.poll()
        waiting = {s.fileno() for s in socks}
        for s in socks:
            poller.register(s, select.POLLIN)
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(500):
                waiting.discard(fd)
                poller.unregister(fd)
        time.sleep(0.2)
        peak = rss_mib(srv.proc.pid)
        print(f"1000 idle connections: RSS {base:.1f} -> {peak:.1f} MiB")
        assert not waiting, f"{len(waiting)} of 1000 connections were never greeted"
        assert peak - base < 40, f"1000 idle connections took RSS from {base:.0f} to {peak:.0f} MiB"
        assert_serves(srv)
    finally:
        for s in socks:
            s.close()
    srv.stop()


# --------------------------------------------------------------------------
# Handshake limit and max-connections (issue 17 item 9)


def test_handshake_limit_closes_clients_that_never_negotiate(nbd_server, image):
    srv = nbd_server(image, "--handshake-limit", "1")
    idle = RawNbd(srv.sock)
    idle.read_greeting()
    negotiated = RawNbd(srv.sock).handshake()
    t0 = time.monotonic()
    assert idle.closed_by_server(8), "a client that never negotiated was kept past --handshake-limit"
    took = time.monotonic() - t0
    assert 0.5 < took < 8, took
    time.sleep(max(0, 1.5 - took))
    r = negotiated.read(0, 4096)  # past the handshake: no limit
    assert r.error == 0
    negotiated.close()
    idle.close()
    srv.stop()


def test_max_connections_refuses_extra_clients(nbd_server, image):
    srv = nbd_server(image, "--max-connections", "2")
    a = RawNbd(srv.sock).handshake()
    b = RawNbd(srv.sock)
    b.read_greeting()
    c = RawNbd(srv.sock)
    assert c.closed_by_server(5), "a third client was served with --max-connections 2"
    c.close()
    b.close()
    deadline = time.monotonic() + 10
    while True:  # b's slot is free once the server noticed the hang-up
        d = greeted(srv.sock, 2)
        if d.greeted:
            break
        d.close()
        assert time.monotonic() < deadline, "a freed slot was never given to a new client"
        time.sleep(0.1)
    d.close()
    assert a.read(0, 4096).error == 0
    a.close()
    srv.stop()


# --------------------------------------------------------------------------
# The daemon: nbd-server-start arguments, exports that outlive the handshake


def export_add(q, **args):
    """block-export-add (QmpClient.cmd cannot take a member called `name`)."""
    r = q.request("block-export-add", {"type": "nbd", **{k.replace("_", "-"): v for k, v in args.items()}})
    assert "error" not in r, r


@pytest.fixture
def daemon(blkmirror_bin, tmp_path):
    d = Daemon(blkmirror_bin, tmp_path)
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize("args,desc", [
    ({"max-connections": -1}, "Parameter 'max-connections' expects uint32_t"),
    ({"max-connections": 1 << 32}, "Parameter 'max-connections' expects uint32_t"),
    ({"max-connections": "2"}, "Invalid parameter type for 'max-connections', expected: integer"),
    ({"handshake-max-seconds": -5}, "Parameter 'handshake-max-seconds' expects uint32_t"),
    ({"handshake-max-seconds": True}, "Invalid parameter type for 'handshake-max-seconds', expected: integer"),
])
def test_nbd_server_start_refuses_bad_limits(daemon, tmp_path, args, desc):
    with daemon.client() as q:
        addr = {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}
        cls, d = q.error("nbd-server-start", addr=addr, **{k.replace("-", "_"): v for k, v in args.items()})
        assert (cls, d) == ("GenericError", desc)
        assert not (tmp_path / "nbd.sock").exists()
        q.cmd("nbd-server-start", addr=addr)  # nothing was left half-started


@pytest.mark.parametrize("port", ["1K", "65536", "-1", ""])
def test_nbd_server_start_refuses_bad_port(daemon, port):
    with daemon.client() as q:
        cls, d = q.error("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": port}})
        assert d == f"Parameter 'addr.data.port' does not accept value '{port}'"


def test_nbd_server_start_on_ipv6_literal(daemon, image):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    with daemon.client() as q:
        q.cmd("blockdev-add", driver="file", node_name="disk", filename=str(image))
        q.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "[::1]", "port": str(port)}})
        export_add(q, id="e", node_name="disk", name="disk")
        h = connect(f"nbd://[::1]:{port}/disk")
        assert h.get_size() == SIZE
        h.shutdown()
        # The client side takes the same forms.
        q.cmd("blockdev-add", driver="nbd", node_name="remote", read_only=True,
              server={"type": "inet", "host": "::1", "port": str(port)}, export="disk")


def test_nbd_server_start_limits_apply(daemon, tmp_path, image):
    sock = str(tmp_path / "nbd.sock")
    with daemon.client() as q:
        q.cmd("blockdev-add", driver="file", node_name="disk", filename=str(image))
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, max_connections=1,
              handshake_max_seconds=1)
        export_add(q, id="e", node_name="disk", name="")
        a = RawNbd(sock)
        a.read_greeting()
        b = RawNbd(sock)
        assert b.closed_by_server(5), "max-connections=1 let a second client in"
        t0 = time.monotonic()
        assert a.closed_by_server(8), "handshake-max-seconds=1 kept a client that never negotiated"
        assert time.monotonic() - t0 < 8
        a.close()
        b.close()


def test_nbd_server_limits_from_the_command_line(blkmirror_bin, tmp_path, image):
    sock = tmp_path / "nbd.sock"
    d = Daemon(blkmirror_bin, tmp_path, "--blockdev", f"driver=file,node-name=disk,filename={image}",
               "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=1,handshake-max-seconds=0",
               "--export", "type=nbd,id=e,node-name=disk,name=")
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        a = RawNbd(sock)
        a.read_greeting()
        b = RawNbd(sock)
        assert b.closed_by_server(5)
        assert not a.closed_by_server(1.5), "handshake-max-seconds=0 means no limit"
        a.close()
        b.close()
    finally:
        assert d.stop() == 0


def test_export_del_while_handshake_replies_wait_on_a_slow_reader(daemon, tmp_path, image):
    """Regression (issue 17 item 3): a client pipelined NBD_OPT_INFO options
    asking for the description thousands of times and read slowly; meanwhile
    `block-export-del` (safe) succeeded because clients in the handshake did
    not count, and the handshake went on reading the freed export (ASan:
    heap-use-after-free in reply_info). The export must count such a client
    (safe delete refused), a hard delete must close it, and the daemon lives."""
    sock = str(tmp_path / "nbd.sock")
    with daemon.client() as q:
        q.cmd("blockdev-add", driver="file", node_name="disk", filename=str(image))
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        export_add(q, id="e", node_name="disk", name="", description="d" * 4000)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.settimeout(10)
        c.connect(sock)
        c.recv(18)
        infos = struct.pack(">I", 0) + struct.pack(">H", 3000) + struct.pack(">H", INFO_DESCRIPTION) * 3000
        opt = struct.pack(">QII", IHAVEOPT, OPT_INFO, len(infos)) + infos
        c.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        try:
            c.settimeout(2)
            for _ in range(500):
                c.sendall(opt)  # replies are not read: the server blocks mid-reply
        except socket.timeout:
            pass
        time.sleep(0.3)
        cls, desc = q.error("block-export-del", id="e")
        assert "still in use" in desc, desc
        c.recv(4096)  # read a little: the server goes on replying about the export
        time.sleep(0.1)
        q.cmd("block-export-del", id="e", mode="hard")
        q.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"}, timeout=10)
        c.settimeout(10)
        closed = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not c.recv(65536):
                    closed = True
                    break
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        assert closed, "the hard delete left the export's handshaking client connected"
        c.close()
        assert q.cmd("query-block-exports") == []
        # Bounded replies: one DESCRIPTION however often it is asked for.
        export_add(q, id="e2", node_name="disk", name="", description="hello")
        r = RawNbd(sock)
        r.start()
        final, replies = r.option(OPT_GO, struct.pack(">IH", 0, 5000) + struct.pack(">H", INFO_DESCRIPTION) * 5000)
        assert final == REP_ACK
        descs = [d for t, d in replies if t == REP_INFO and struct.unpack(">H", d[:2])[0] == INFO_DESCRIPTION]
        assert descs == [struct.pack(">H", INFO_DESCRIPTION) + b"hello"], replies
        r.close()
