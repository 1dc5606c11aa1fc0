"""Running blkmirror as a service (issue 16): the daemon's --config file (the
same keys as its options, every bad line reported), READY=1 over NOTIFY_SOCKET
only once QMP, the NBD server and the exports listen (Type=notify), and the
unit in contrib/systemd/ checked by systemd-analyze (verify, and security
with its exposure score)."""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MiB
from qmp_client import QmpClient

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "blkmirror@.service"


def notify_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(20)
    return s


def test_daemon_from_a_config_file_notifies_ready_when_everything_listens(blkmirror_bin, workdir):
    disk = workdir / "disk.img"
    disk.write_bytes(b"\x42" * MiB)
    qmp_sock, nbd_sock = workdir / "qmp.sock", workdir / "nbd.sock"
    conf = workdir / "vm1.conf"
    conf.write_text(f"""# as /etc/blkmirror/vm1.conf
qmp = {qmp_sock}
blockdev = driver=file,node-name=disk,filename={disk}

nbd-server = addr.type=unix,addr.path={nbd_sock}
export = type=nbd,id=e0,node-name=disk,writable=on
""")
    ns = notify_socket(workdir / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(workdir / "notify.sock"))
    p = subprocess.Popen([blkmirror_bin, "daemon", "--config", str(conf)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg and str(qmp_sock) in msg, msg
        # Ready means ready: both sockets answer now, the export is there.
        r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///disk?socket={nbd_sock}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == str(MiB), r.stderr
        with QmpClient(str(qmp_sock)) as c:
            assert [e["id"] for e in c.cmd("query-block-exports")] == ["e0"]
        p.terminate()
        assert "STOPPING=1" in ns.recv(4096).decode()
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()


def test_command_line_adds_to_and_overrides_the_config(blkmirror_bin, workdir):
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(MiB))
    conf = workdir / "c.conf"
    conf.write_text(f"qmp = {workdir / 'ignored.sock'}\n"
                    f"blockdev = driver=file,node-name=a,filename={disk},read-only=on\n")
    qmp_sock = workdir / "q.sock"
    p = subprocess.Popen([blkmirror_bin, "daemon", "--config", str(conf), "--qmp", str(qmp_sock),
                          "--blockdev", "driver=raw,node-name=b,file=a,read-only=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not qmp_sock.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        with QmpClient(str(qmp_sock)) as c:
            names = {n["node-name"] for n in c.cmd("query-named-block-nodes")}
        assert names == {"a", "b"}
        assert not (workdir / "ignored.sock").exists()
    finally:
        p.terminate()
        p.wait(30)


def test_every_bad_line_of_a_config_is_reported(blkmirror_bin, workdir):
    conf = workdir / "bad.conf"
    conf.write_text("qmp = /tmp/x.sock\nqmp = /tmp/y.sock\nblockdevs = driver=file\n"
                    "just words\nexport =\n")
    r = subprocess.run([blkmirror_bin, "daemon", "--config", str(conf)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"{conf}:2: 'qmp' given twice",
                     f"{conf}:3: unknown key 'blockdevs' (known: qmp, qmp-tcp, file-root, "
                     "blockdev, nbd-server, export)",
                     f"{conf}:4: expected KEY = VALUE, got 'just words'",
                     f"{conf}:5: 'export' has no value"], r.stderr
    assert not Path("/tmp/x.sock").exists()
    r = subprocess.run([blkmirror_bin, "daemon", "--config", str(workdir / "none.conf")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "none.conf" in r.stderr and len(r.stderr.splitlines()) == 1
    # A bad startup value names its key, as on the command line.
    conf.write_text(f"qmp = {workdir / 'q.sock'}\nblockdev = driver=nope,node-name=x\n")
    r = subprocess.run([blkmirror_bin, "daemon", "--config", str(conf)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "--blockdev driver=nope" in r.stderr, r.stderr


def installed_unit(workdir, blkmirror_bin):
    """The unit as installed, pointing at the binary under test."""
    text = UNIT.read_text().replace("/usr/bin/blkmirror", str(blkmirror_bin))
    dst = workdir / "blkmirror@vm1.service"
    dst.write_text(text)
    return dst


def test_unit_passes_systemd_analyze(blkmirror_bin, workdir):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = installed_unit(workdir, blkmirror_bin)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        str(unit)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"systemd-analyze security exposure: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= 2.0, r.stdout  # "OK" in systemd's scale
