"""Issue 17 item 11: a signal the tool documents somewhere (SIGHUP, SIGUSR1,
SIGUSR2) never kills a serving process; SIGTERM still ends it cleanly and the
socket file goes."""

import os
import signal
import subprocess
import time

import pytest


def wait_for(pred, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_serve_survives_stray_signal_and_stops_cleanly(blkmirror_bin, tmp_path, sig):
    img, sock = tmp_path / "a.img", tmp_path / "a.sock"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    p = subprocess.Popen([blkmirror_bin, "serve", str(img), "--socket", str(sock)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(sock.exists), p.communicate(timeout=5)
        p.send_signal(sig)
        p.send_signal(sig)
        time.sleep(0.5)
        assert p.poll() is None, f"killed by {sig!r}: {p.stdout.read()}"
        subprocess.run(["nbdinfo", f"nbd+unix:///?socket={sock}"], check=True,
                       capture_output=True, timeout=30)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_serving_mirror_survives_sigusr1_and_sighup_after_switch(blkmirror_bin, tmp_path):
    src, dst, sock = tmp_path / "s.img", tmp_path / "d.img", tmp_path / "m.sock"
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20))
    p = subprocess.Popen([blkmirror_bin, "mirror", str(src), str(dst), "--create", "--socket", str(sock),
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(sock.exists), p.communicate(timeout=5)
        # SIGUSR1 without --no-auto-complete, during and after the job.
        p.send_signal(signal.SIGUSR1)
        time.sleep(2)  # 1 MiB: the job completed and switched by now
        for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2):
            p.send_signal(sig)
        time.sleep(0.5)
        assert p.poll() is None, p.stdout.read()
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=30)[0]
        assert p.returncode == 0, out
        assert "serving" in out and not sock.exists(), out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_failed_serving_mirror_keeps_serving_the_source(blkmirror_bin, tmp_path):
    # Issue 17 item 10: the target fills up (injected ENOSPC, policy report):
    # the job fails, but clients keep reading and writing the source through
    # the socket until SIGTERM; then exit 1.
    nbd = pytest.importorskip("nbd")
    src, dst, sock = tmp_path / "s.img", tmp_path / "d.img", tmp_path / "m.sock"
    data = os.urandom(4 << 20)
    with open(src, "wb") as f:
        f.write(data)
    env = dict(os.environ, BLKMIRROR_INJECT_FAULTS="dst:write:1048576:65536:ENOSPC")
    p = subprocess.Popen([blkmirror_bin, "mirror", str(src), str(dst), "--create", "--socket", str(sock),
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        assert wait_for(sock.exists), p.communicate(timeout=5)
        for line in p.stdout:
            lines.append(line)
            if "still serving" in line:
                break
        assert any("still serving" in l for l in lines), lines
        assert p.poll() is None, lines
        h = nbd.NBD()
        h.connect_unix(str(sock))
        assert h.pread(4096, 0) == data[:4096]
        h.pwrite(b"\x5a" * 4096, 8192)
        h.flush()
        assert h.pread(4096, 8192) == b"\x5a" * 4096
        h.shutdown()
        with open(src, "rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"\x5a" * 4096  # the client wrote the source
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
        assert p.returncode == 1
        assert not sock.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_json_with_non_utf8_file_name(blkmirror_bin, tmp_path):
    # Issue 17 item 7: --json aborted (exit 134) on a non-UTF-8 file name.
    src = os.path.join(os.fsencode(tmp_path), b"src\xff.img")
    dst = os.path.join(os.fsencode(tmp_path), b"dst\xfe.img")
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20))
    r = subprocess.run([blkmirror_bin.encode(), b"mirror", src, dst, b"--create", b"--json"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r
    import json
    events = [json.loads(l) for l in r.stdout.decode("utf-8").splitlines()]
    notes = " ".join(e["data"].get("message", "") for e in events if e["event"] == "NOTE")
    assert "src\\xff.img" in notes and "dst\\xfe.img" in notes, notes
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
