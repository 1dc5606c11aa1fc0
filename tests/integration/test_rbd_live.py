"""Live mirrors into Ceph RBD on the session's real cluster (ceph_helpers.py):
a python-libnbd client writing through blkmirror's export while the mirror copies
a local file into an rbd image and switches it over; an OSD stopped mid-copy;
a large sparse disk whose rbd copy keeps only the data. Judges: `rbd export` and
QEMU's own rbd driver (`qemu-img compare`), `rbd du`."""

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import KiB, MiB
from nbd_helpers import connect, make_sparse


def qemu_compare(a, b, timeout=300):
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr


class Writer:
    """Writes random 4-64 KiB blocks at random 4 KiB-aligned offsets through an NBD
    handle, recording each acknowledged write in `expect`."""

    def __init__(self, uri, expect, seed):
        self.h = connect(uri)
        self.expect = expect
        self.rnd = random.Random(seed)
        self.acked = 0

    def write(self, n):
        for _ in range(n):
            length = self.rnd.choice((4, 8, 16, 64)) * KiB
            off = self.rnd.randrange(0, (len(self.expect) - length) // (4 * KiB)) * 4 * KiB
            data = self.rnd.randbytes(length)
            self.h.pwrite(data, off)
            self.expect[off:off + length] = data
            self.acked += 1


def test_live_writer_switches_over_onto_rbd(ceph, mirror_server, tmp_path):
    size = 32 * MiB
    rnd = random.Random(7)
    src = tmp_path / "src.img"
    make_sparse(src, size, [(0, 2 * MiB), (9 * MiB, 3 * MiB), (30 * MiB, MiB)], rnd)
    expect = bytearray(src.read_bytes())
    name = ceph.create(size)
    m = mirror_server(src, ceph.spec(name), "--no-auto-complete", "--no-progress",
                      "--copy-mode", "adaptive")
    w = Writer(m.uri, expect, 11)
    w.write(200)  # while the copy runs
    m.wait_event("BLOCK_JOB_READY", 120)
    w.write(200)  # ready: mirrored as they come
    m.proc.send_signal(signal.SIGUSR1)
    m.wait_event("BLOCK_JOB_COMPLETED", 120)
    m.wait_event("NOTE", 30, message="now")
    src_after = src.read_bytes()
    w.write(100)  # switched: these land in the rbd image only
    w.h.flush()
    assert src.read_bytes() == src_after, "a write after the switch reached SRC"
    w.h.shutdown()
    m.stop()
    out = ceph.export(name, tmp_path / "out.img")
    got = out.read_bytes()
    assert got == bytes(expect), "the rbd image lacks acknowledged writes"
    qemu_compare(out, ceph.spec(name))


def test_osd_stopped_mid_mirror_waits_and_completes(private_ceph, cli, check, images, workdir):
    ceph = private_ceph
    src = images.dense("src.img", 48 * MiB)
    name = ceph.create(48 * MiB)
    osd = ceph.osd_pid()
    run = cli.start_mirror(src, ceph.spec(name), "--no-progress", "--speed", "12M",
                           "--on-target-error", "report")
    time.sleep(1.0)
    stalled = time.monotonic()
    os.kill(osd, signal.SIGSTOP)
    try:
        time.sleep(4)
        assert run.popen.poll() is None, "the mirror ended while the OSD was stopped"
    finally:
        os.kill(osd, signal.SIGCONT)
    rc = run.popen.wait(timeout=120)
    out, err = run.popen.communicate()
    assert rc == 0, err
    assert time.monotonic() - stalled >= 4
    check.cmp(src, ceph.export(name, workdir / "out.img"))


def test_sparse_disk_keeps_only_its_data_in_rbd(ceph, cli, workdir):
    """8 GiB virtual, 64 extents of 1 MiB at 64 KiB-aligned offsets (64 MiB of data:
    the issue's 256 MiB took 23 s here, too much for the suite's budget): `rbd du` counts whole objects, so it may exceed the data by one
    object per extent (an extent may straddle two), no more."""
    size = 8 << 30
    rnd = random.Random(3)
    slot = size // 64  # one extent per slot: none overlap
    extents = [i * slot + rnd.randrange(0, (slot - MiB) // (64 * KiB)) * 64 * KiB
               for i in range(64)]
    src = workdir / "src.img"
    make_sparse(src, size, [(o, MiB) for o in extents], rnd)
    data = len(extents) * MiB
    name = ceph.image()
    res = cli.mirror(src, ceph.spec(name), "--create", "--no-progress", timeout=300)
    assert res.returncode == 0, res.stderr
    used = ceph.du(name)
    obj = ceph.info(name)["object_size"]
    assert used <= data * 1.01 + len(extents) * obj, (used, data)
    assert used >= data
    qemu_compare(src, ceph.spec(name))
    ceph.rbd("rm", "--no-progress", name)  # memstore keeps images in memory
