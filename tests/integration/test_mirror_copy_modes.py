"""`blkmirror mirror --copy-mode`: the CLI side of active mirroring. SIGHUP
switches a running mirror to write-blocking; adaptive announces its own
switch with a BLOCK_JOB_COPY_MODE_CHANGED event; bad values are refused before any I/O.
The data path itself is proven by test_nbd_live_switchover.py (parametrised over
the copy modes) and the unit tests (MirrorActive.*, MirrorRandom.*)."""
import signal
import subprocess
import threading

import pytest

from conftest import MiB
from nbd_helpers import connect


def make_random(path, size, seed):
    import random
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def events(m, name):
    with m._cond:
        return [ev for _, ev in m.events if ev.get("event") == name]


def test_sighup_switches_to_write_blocking(mirror_server, tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_random(src, 16 * MiB, 1)
    # Slow copy so the job is still running when the signal arrives.
    m = mirror_server(src, dst, "--create", "--speed", "4M", "--no-progress",
                      "--no-auto-complete", "--granularity", "64K")
    m.wait_event("JOB_STATUS_CHANGE", 30)
    m.proc.send_signal(signal.SIGHUP)
    m.wait_event("BLOCK_JOB_COPY_MODE_CHANGED", 30)
    ev = events(m, "BLOCK_JOB_COPY_MODE_CHANGED")[0]["data"]
    assert ev["copy-mode"] == "write-blocking", ev
    assert ev["reason"] == "SIGHUP", ev
    # A second SIGHUP is a no-op, not an error.
    m.proc.send_signal(signal.SIGHUP)
    h = connect(m.uri)
    h.pwrite(b"\x5a" * 4096, 8 * MiB)
    h.shutdown()
    m.wait_event("BLOCK_JOB_READY", 60)
    m.proc.send_signal(signal.SIGUSR1)
    m.wait_event("BLOCK_JOB_COMPLETED", 60)
    m.stop()
    assert len(events(m, "BLOCK_JOB_COPY_MODE_CHANGED")) == 1, m.log()
    progress = events(m, "PROGRESS")
    assert progress and all("actively-synced" in p["data"] for p in progress), progress
    assert dst.read_bytes() == src.read_bytes()


def test_adaptive_switches_itself_under_a_fast_writer(mirror_server, tmp_path):
    """The copy crawls at 1 MiB/s while a client keeps dirtying new chunks: the
    dirty count cannot fall, so adaptive must switch and say so."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_random(src, 32 * MiB, 2)
    m = mirror_server(src, dst, "--create", "--speed", "1M", "--no-progress",
                      "--copy-mode", "adaptive", "--adaptive-window", "200",
                      "--granularity", "4K", "--sync", "none", "--no-auto-complete")
    stop = threading.Event()
    errors = []

    def writer():
        try:
            h = connect(m.uri)
            off = 0
            while not stop.is_set():
                h.pwrite(b"\xa5" * 4096, off)
                off = (off + 64 * 1024) % (32 * MiB)
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        m.wait_event("BLOCK_JOB_COPY_MODE_CHANGED", 60)
        m.wait_event("BLOCK_JOB_READY", 120)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    ev = events(m, "BLOCK_JOB_COPY_MODE_CHANGED")[0]["data"]
    assert ev["copy-mode"] == "write-blocking", ev
    assert "fall" in ev["reason"] or "converge" in ev["reason"], ev
    m.proc.send_signal(signal.SIGUSR1)
    m.wait_event("BLOCK_JOB_COMPLETED", 60)
    m.stop()
    # sync=none: the target holds exactly what the client wrote, zeroes elsewhere.
    got, source = dst.read_bytes(), src.read_bytes()
    expect = bytearray(len(source))
    block = b"\xa5" * 4096
    for off in range(0, len(source), 64 * 1024):
        if source[off:off + 4096] == block:
            expect[off:off + 4096] = block
    assert got == bytes(expect)


@pytest.mark.parametrize("args,text", [
    (["--copy-mode", "sometimes"], "Parameter 'copy-mode' does not accept value 'sometimes'"),
    (["--copy-mode", "adaptive", "--adaptive-window", "0"], "adaptive-window"),
])
def test_bad_copy_mode_refused(blkmirror_bin, tmp_path, args, text):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_random(src, 1 * MiB, 3)
    r = subprocess.run([blkmirror_bin, "mirror", str(src), str(dst), "--create", *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert text in r.stderr, r.stderr
    assert not dst.exists()
