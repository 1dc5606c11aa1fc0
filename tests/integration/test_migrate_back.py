"""The migrate-back workflow (issue 13), as docs/qmp.md documents it:

  1. mirror A -> B (sync=full) while clients write through an NBD export;
  2. once ready, add a bitmap on B, then complete: clients now write on B, and
     the bitmap records every change B gets from then on;
  3. mirror B -> A with sync=bitmap: only what the bitmap marks is copied;
     complete: clients are back on A.

A python-libnbd writer runs during the whole sequence; at the end both disks
must equal a model of every acknowledged write, and the second mirror must have
copied at most the data written after the bitmap was added, each write rounded
out to the granularity."""

import random
import threading
import time

import nbd
import pytest

from conftest import KiB, MiB

SIZE = 64 * MiB
GRAN = 64 * KiB


class Writer(threading.Thread):
    def __init__(self, uri, seed):
        super().__init__(daemon=True)
        self.uri, self.rnd = uri, random.Random(seed)
        self.model = bytearray(SIZE)
        self.log = []  # (offset, length) of every acknowledged write, in order
        self.stop = threading.Event()
        self.hold = threading.Event()  # set: pause between writes
        self.held = threading.Event()  # set by the writer while it pauses
        self.error = None

    def run(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            while not self.stop.is_set():
                if self.hold.is_set():
                    self.held.set()
                    self.stop.wait(0.005)
                    continue
                self.held.clear()
                length = self.rnd.choice([512, 4096, 65536, 3 * 4096])
                off = self.rnd.randrange(0, SIZE - length) // 512 * 512
                data = self.rnd.randbytes(length)
                h.pwrite(data, off)
                self.model[off:off + length] = data
                self.log.append((off, length))
                self.stop.wait(0.002)
            h.flush()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            h.shutdown()

    def mark(self):
        return len(self.log)


def complete(qmp, job):
    qmp.wait_event("BLOCK_JOB_READY", match={"device": job}, timeout=120)
    return job


def finish(qmp, job):
    qmp.cmd("block-job-complete", device=job)
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": job}, timeout=120)
    assert "error" not in ev["data"], ev
    return ev["data"]


def wait_synced(qmp, job, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = [j for j in qmp.cmd("query-block-jobs") if j["device"] == job][0]
        if j["offset"] == j["len"] and j["ready"]:
            return
        time.sleep(0.01)
    raise AssertionError(f"{job} never caught up")


def aligned_bytes(writes):
    return sum((o + n + GRAN - 1) // GRAN * GRAN - o // GRAN * GRAN for o, n in writes)


def test_migrate_back_copies_only_what_changed(qmp, images, workdir):
    rnd = random.Random(13)
    a = images.dense("a.img", SIZE)
    b = images.zeros("b.img", SIZE)
    for name, path in (("a", a), ("b", b)):
        qmp.cmd("blockdev-add", driver="file", node_name="f" + name, filename=str(path))
        qmp.cmd("blockdev-add", driver="raw", node_name=name, file="f" + name)
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.request("block-export-add", {"type": "nbd", "id": "e", "node-name": "a",
                                     "name": "disk", "writable": True})
    w = Writer(f"nbd+unix:///disk?socket={sock}", rnd.random())
    w.model[:] = a.read_bytes()
    w.start()
    try:
        # 1. A -> B, then the bitmap on B, then the switch.
        qmp.cmd("blockdev-mirror", job_id="out", device="a", target="b", sync="full")
        complete(qmp, "out")
        # A quiet moment for the bitmap's start: the job's copies of earlier
        # writes (which B's bitmap would record, as QEMU's does) are done, so
        # the bound below counts only writes after it.
        w.hold.set()
        assert w.held.wait(30)
        wait_synced(qmp, "out")
        r = qmp.request("block-dirty-bitmap-add", {"node": "b", "name": "since-switch"})
        assert "return" in r, r
        since = w.mark()
        w.hold.clear()
        full = finish(qmp, "out")
        assert [e["node-name"] for e in qmp.cmd("query-block-exports")] == ["b"]
        # 2. Clients write on B for a while.
        while w.mark() < since + 200:
            assert w.is_alive(), w.error
            w.stop.wait(0.01)
        # 3. B -> A, only what changed.
        qmp.cmd("blockdev-mirror", job_id="back", device="b", target="a", sync="bitmap",
                bitmap="since-switch", bitmap_mode="on-success")
        complete(qmp, "back")
        back = finish(qmp, "back")
    finally:
        w.stop.set()
        w.join(60)
    assert w.error is None, w.error
    assert [e["node-name"] for e in qmp.cmd("query-block-exports")] == ["a"]
    # on-success: the bitmap was cleared at the switch back, and nothing has
    # written B since.
    bm = [n for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == "b"][0]
    assert bm["dirty-bitmaps"] == [{"name": "since-switch", "recording": True, "persistent": False,
                                    "busy": False, "granularity": GRAN, "count": 0}]
    # Every acknowledged write is on A (the switch back drained B first).
    qmp.cmd("blockdev-del", node_name="b")
    qmp.cmd("blockdev-del", node_name="fb")
    assert a.read_bytes() == bytes(w.model)
    changed = w.log[since:]
    bound = aligned_bytes(changed)
    assert 0 < back["offset"] <= bound, (back, bound, len(changed))
    assert full["offset"] >= SIZE  # the full copy moved every byte
    print(f"full mirror copied {full['offset']} bytes; incremental {back['offset']} bytes "
          f"(bound {bound}, {len(changed)} writes)")
