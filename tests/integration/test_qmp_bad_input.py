"""Bad input on the QMP socket: each gets the right error class, nothing
happens as a side effect, the daemon stays up and other clients keep working."""

import json
import os
import socket
import stat
import threading
import time

import pytest

from conftest import MiB
from qmp_client import Daemon


@pytest.fixture
def daemon(daemon):
    """conftest's daemon, checked after the test: bad input never takes it down."""
    yield daemon
    assert daemon.proc.poll() is None, f"daemon died: {daemon.output()}"


def raw_line(qmp, text):
    qmp.send_raw(text.encode() + b"\n")
    return qmp.reply()


def nodes(qmp):
    return [n["node-name"] for n in qmp.cmd("query-named-block-nodes")]


def test_socket_is_private_and_greeting_is_qmp(daemon):
    assert stat.S_IMODE(os.stat(daemon.path).st_mode) == 0o600
    with daemon.client(negotiate=False) as c:
        g = c.greeting["QMP"]
        assert g["capabilities"] == []
        assert g["version"]["qemu"]["major"] == 7
        assert g["version"]["package"].startswith("blkmirror")


def test_commands_before_capabilities_are_refused_and_no_events(daemon, images):
    with daemon.client() as other, daemon.client(negotiate=False) as c:
        r = c.request("query-version")
        assert r["error"] == {"class": "CommandNotFound",
                              "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
        r = c.request("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1024})
        assert r["error"]["class"] == "CommandNotFound"
        assert nodes(other) == []
        # An event happens (a job): the unnegotiated client must not see it.
        other.cmd("blockdev-add", driver="null-co", node_name="a", size=MiB)
        other.cmd("blockdev-add", driver="null-co", node_name="b", size=MiB)
        other.cmd("blockdev-mirror", job_id="j", device="a", target="b", sync="full")
        other.wait_event("BLOCK_JOB_READY")
        r = c.request("qmp_capabilities", id="x")
        assert r == {"return": {}, "id": "x"}
        assert c.history == []
        r = c.request("qmp_capabilities", id="y")
        assert r["error"]["class"] == "CommandNotFound" and r["id"] == "y"
        other.cmd("block-job-cancel", device="j", force=True)
        other.wait_event("BLOCK_JOB_CANCELLED")


@pytest.mark.parametrize("line,desc_start", [
    ('{bad json}', "JSON parse error"),
    ('[1, 2]', "QMP input must be a JSON object"),
    ('"hello"', "QMP input must be a JSON object"),
    ('{"arguments": {}}', "QMP input lacks member 'execute'"),
    ('{"execute": 5}', "QMP input member 'execute' must be a string"),
    ('{"execute": "query-version", "arguments": [1]}', "QMP input member 'arguments' must be an object"),
    ('{"execute": "query-version", "extra": 1}', "QMP input member 'extra' is unexpected"),
    ('{"execute": "query-version"', "JSON parse error"),
    ('\xff\xfe', "JSON parse error"),
])
def test_malformed_requests_get_generic_error_and_connection_survives(qmp, line, desc_start):
    r = raw_line(qmp, line)
    assert r["error"]["class"] == "GenericError", r
    assert r["error"]["desc"].startswith(desc_start), r
    assert "\n" not in r["error"]["desc"]
    assert qmp.cmd("query-version")["qemu"]["major"] == 7


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_deep_nesting_before_negotiation_is_refused_not_a_crash(daemon):
    # Issue 17 item 4: 60,000 nested arrays (a 120 KB line) overflowed the stack.
    deep = "[" * 60000 + "]" * 60000
    with daemon.client(negotiate=False) as c:
        for line in ('{"execute": "query-version", "id": %s}' % deep,
                     '{"execute": "query-version", "arguments": {"x": %s}}' % deep,
                     '{"execute": %s}' % deep, deep):
            r = raw_line(c, line)
            assert r["error"] == {"class": "GenericError",
                                  "desc": "JSON parse error, nesting deeper than 1024 levels"}, r
        # The connection is still usable, and so is the daemon.
        assert raw_line(c, '{"execute": "qmp_capabilities", "id": 1}') == {"return": {}, "id": 1}
        assert c.cmd("query-version")["qemu"]["major"] == 7


def test_number_beyond_double_range_gets_an_error_and_no_fd_leak(daemon):
    # Issue 17 item 5: 1e400 hung the session (no reply to it or anything
    # after) and leaked its fd.
    with daemon.client() as c:
        for line in ('{"execute": "query-version", "arguments": {"x": 1e400}}',
                     '{"execute": "query-version", "arguments": {"x": [1e400]}}',
                     '{"execute": "query-version", "id": 1e400}'):
            r = raw_line(c, line)
            assert r["error"]["class"] == "GenericError", r
            assert r["error"]["desc"].startswith("JSON parse error, number overflow"), r
        assert c.cmd("query-version")["qemu"]["major"] == 7
    before = open_fds(daemon.proc.pid)
    for _ in range(50):
        with daemon.client() as c:
            c.send_raw(b'{"execute": "query-version", "id": 1e400}\n')
    with daemon.client() as c:
        assert c.cmd("query-version")["qemu"]["major"] == 7
    deadline = time.monotonic() + 10
    while open_fds(daemon.proc.pid) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(daemon.proc.pid) <= before + 2


def test_replies_are_sent_whole_when_the_client_stops_sending(daemon):
    # Found by the QMP fuzz target: a client that writes its requests and shuts
    # down its sending side got its last reply cut short when that reply was
    # large (a parse error quoting a long line): the session closed the socket
    # while the reply was still being written.
    big = b'{"execute": "' + b"a" * 400_000 + b'\x04"}'  # a control character: refused
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.path)
    s.sendall(b'{"execute": "qmp_capabilities"}\n' + big + b"\n")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(30)
    data = b""
    while chunk := s.recv(1 << 20):
        data += chunk
    s.close()
    lines = data.split(b"\n")
    assert lines[-1] == b"", "the output ends in a cut line"
    replies = [json.loads(l) for l in lines[1:-1]]  # after the greeting; each must parse
    assert replies[0] == {"return": {}}
    assert replies[1]["error"]["class"] == "GenericError" and len(replies) == 2, [str(r)[:200] for r in replies]


def test_id_is_echoed_on_errors(qmp):
    r = qmp.request("nosuch", id={"any": ["json", 1]})
    assert r == {"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"},
                 "id": {"any": ["json", 1]}}
    r = raw_line(qmp, '{"execute": 7, "id": 42}')
    assert r["id"] == 42


def test_over_long_line_is_refused_and_connection_survives(qmp):
    big = '{"execute": "query-version", "arguments": {"x": "' + "a" * (2 * MiB) + '"}}'
    r = raw_line(qmp, big)
    assert r["error"]["class"] == "GenericError"
    assert "longer than" in r["error"]["desc"]
    assert qmp.cmd("query-version")["qemu"]["major"] == 7


@pytest.mark.parametrize("cmd,args,cls,desc", [
    ("nosuch", None, "CommandNotFound", "The command nosuch has not been found"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1024, "bogus": 1},
     "GenericError", "Parameter 'bogus' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": "big"},
     "GenericError", "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n"}, "GenericError", "Parameter 'size' is missing"),
    ("blockdev-add", {"driver": "file", "node-name": "n", "filename": "/x", "cache": {"direct": "yes"}},
     "GenericError", "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"node-name": "n"}, "GenericError", "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "qcow9", "node-name": "n"}, "GenericError",
     "Parameter 'driver' does not accept value 'qcow9'"),
    ("blockdev-add", {"driver": "null-co", "node-name": "9n", "size": 1}, "GenericError", "Invalid node-name: '9n'"),
    ("blockdev-mirror", {"device": "a", "target": "b"}, "GenericError", "Parameter 'sync' is missing"),
    ("blockdev-mirror", {"device": "a", "target": "b", "sync": "fast"}, "GenericError",
     "Parameter 'sync' does not accept value 'fast'"),
    ("block-job-set-speed", {"device": "j"}, "GenericError", "Parameter 'speed' is missing"),
    ("block-job-cancel", {"device": "j", "force": 1}, "GenericError",
     "Invalid parameter type for 'force', expected: boolean"),
    ("query-version", {"verbose": True}, "GenericError", "Parameter 'verbose' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {}}}, "GenericError",
     "Parameter 'addr.data.path' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 3}}}, "GenericError",
     "Invalid parameter type for 'addr.data.path', expected: string"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n"}, "GenericError", "NBD server not running"),
    ("block-export-del", {"id": "e"}, "GenericError", "Export 'e' is not found"),
    ("blockdev-del", {"node-name": "n"}, "GenericError", "Failed to find node with node-name='n'"),
    ("blockdev-create", {"job-id": "c", "options": {"driver": "file", "filename": "/tmp/x"}},
     "GenericError", "Parameter 'options.size' is missing"),
    ("nbd-server-stop", None, "GenericError", "NBD server not running"),
])
def test_bad_arguments_have_no_side_effect(qmp, cmd, args, cls, desc):
    r = qmp.request(cmd, args, id=1)
    assert r["error"] == {"class": cls, "desc": desc}, r
    assert nodes(qmp) == []
    assert qmp.cmd("query-jobs") == []
    assert qmp.cmd("query-block-exports") == []


def test_blockdev_create_refuses_existing_file(qmp, images):
    p = images.dense("keep.img", MiB)
    before = open(p, "rb").read()
    qmp.cmd("blockdev-create", job_id="c", options={"driver": "file", "filename": str(p), "size": 4096})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c", "status": "concluded"})
    assert open(p, "rb").read() == before


def test_fifty_clients_dropping_mid_command(daemon):
    with daemon.client() as steady:
        steady.cmd("blockdev-add", driver="null-co", node_name="keep", size=MiB)

        def hit(i):
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon.path)
            s.recv(4096)  # greeting
            if i % 3 == 0:
                s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "blockdev-add", "argum')
            elif i % 3 == 1:
                s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-named-block-nodes"}\n')
            else:
                s.sendall(b'{"exec')
            s.close()

        threads = [threading.Thread(target=hit, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # The steady client still works and nothing changed.
        assert nodes(steady) == ["keep"]
        time.sleep(0.2)
        assert nodes(steady) == ["keep"]
    with daemon.client() as late:
        assert late.cmd("query-version")["qemu"]["major"] == 7


def test_client_that_never_reads_is_dropped_not_buffered(daemon, images):
    with daemon.client() as c:
        c.cmd("blockdev-add", driver="null-co", node_name="n", size=MiB)
        greedy = socket.socket(socket.AF_UNIX)
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.connect(daemon.path)
        req = b'{"execute": "query-named-block-nodes"}\n'
        greedy.sendall(b'{"execute": "qmp_capabilities"}\n')
        greedy.settimeout(10)
        sent = 0
        try:
            for _ in range(200000):
                greedy.sendall(req * 64)
                sent += 64
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        assert sent < 200000 * 64, "daemon kept accepting requests from a client that reads nothing"
        greedy.close()
        assert c.cmd("query-version")["qemu"]["major"] == 7


def test_tcp_qmp_is_loopback_only(blkmirror_bin, workdir):
    import subprocess
    r = subprocess.run([blkmirror_bin, "daemon", "--qmp", str(workdir / "q.sock"), "--qmp-tcp", "0.0.0.0:0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "loopback only" in r.stderr


def test_file_root_confines_paths(blkmirror_bin, workdir, images):
    root = workdir / "root"
    root.mkdir()
    inside = root / "in.img"
    inside.write_bytes(b"\0" * 4096)
    outside = images.dense("out.img", 4096)
    d = Daemon(blkmirror_bin, workdir, "--file-root", str(root))
    try:
        with d.client() as c:
            c.cmd("blockdev-add", driver="file", node_name="a", filename=str(inside))
            cls, desc = c.error("blockdev-add", driver="file", node_name="b", filename=str(outside))
            assert "outside the daemon's file root" in desc
            cls, desc = c.error("blockdev-add", driver="file", node_name="b", filename=str(root / ".." / "out.img"))
            assert "outside the daemon's file root" in desc
    finally:
        d.stop()
