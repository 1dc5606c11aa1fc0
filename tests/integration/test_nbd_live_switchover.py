"""The live switch-over proof for `blkmirror mirror SRC DST --socket S`.

NBD clients keep writing while the mirror copies, while it is ready, across
the moment it completes and switches every connection to DST, and after.
Every acknowledged write, zero and trim is applied to an expected image (each
byte range has one owner, so "last acknowledged content" is well defined);
clients read their ranges back on the fly, and a prober keeps opening new
connections reading ranges nobody writes. After the switch, a connection
opened before the copy started reads the whole export; after blkmirror has
exited, DST is read directly. Both must equal the expected image: every
written byte its last acknowledged content, every other byte the source's.
"""

import json
import random
import signal
import struct
import subprocess
import threading
import time

import nbd
import pytest

from conftest import KiB, MiB
from nbd_helpers import connect, file_layout, run_tool

BLOCK = 4 * KiB
GROUP = 96 * KiB    # bytes owned together by one writer: groups straddle 64 KiB chunks
MAX_RUN = 32 * KiB  # bytes per write at most


class Shared:
    """State shared by the client threads: the expected image, errors."""

    def __init__(self, original):
        self.original = original
        self.expect = bytearray(original)  # writers update only the groups they own
        self.errors = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def error(self, msg):
        with self.lock:
            self.errors.append(msg)
        self.stop.set()


class Writer(threading.Thread):
    """One NBD connection writing into the groups it owns (g % nslots ==
    index). mode "sync": one request at a time, with read-backs; mode "aio":
    up to `depth` requests in flight on the connection, never two touching
    the same 4 KiB block."""

    def __init__(self, uri, seed, index, nslots, size, ops_per_sec, shared, mode="sync",
                 depth=8):
        super().__init__(daemon=True, name=f"writer{index}")
        self.h = connect(uri)
        self.seed, self.index = seed, index
        self.interval = 1.0 / ops_per_sec
        self.sh = shared
        self.mode = mode
        self.depth = depth
        self.rnd = random.Random(seed * 1000 + index)
        self.acks = []  # (start time, ack time)
        self.reads = 0
        self.seq = 0
        self.groups = [g for g in range(size // GROUP) if g % nslots == index]

    def pick(self, busy=frozenset()):
        """(offset, length) inside one owned group, avoiding busy blocks."""
        for _ in range(100):
            g = self.rnd.choice(self.groups)
            if self.rnd.random() < 0.7:  # whole blocks
                start = self.rnd.randrange(0, GROUP // BLOCK) * BLOCK
                length = self.rnd.randint(1, MAX_RUN // BLOCK) * BLOCK
            else:  # any bytes
                start = self.rnd.randrange(0, GROUP - 1)
                length = self.rnd.randint(1, MAX_RUN)
            length = min(length, GROUP - start)
            off = g * GROUP + start
            blocks = set(range(off // BLOCK, (off + length - 1) // BLOCK + 1))
            if not blocks & busy:
                return off, length, blocks
        return None

    def content(self, off, length):
        self.seq += 1
        head = struct.pack(">8sIIQQ", b"BLKMLIVE", self.seed, self.index, off, self.seq)
        return (head * (length // len(head) + 1))[:length]

    def choose_op(self):
        x = self.rnd.random()
        return "zero" if x < 0.05 else "trim" if x < 0.08 else "write"

    def apply(self, off, length, data):
        self.sh.expect[off:off + length] = data if data is not None else bytes(length)

    def verify_read(self):
        g = self.rnd.choice(self.groups)
        off = g * GROUP + self.rnd.randrange(0, GROUP - 8 * KiB)
        got = self.h.pread(8 * KiB, off)
        self.reads += 1
        if got != self.sh.expect[off:off + 8 * KiB]:
            raise AssertionError(f"read-back of 8 KiB at {off} at t={time.monotonic():.3f} "
                                 f"does not hold the last acknowledged data")

    def run(self):
        try:
            self.run_sync() if self.mode == "sync" else self.run_aio()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.sh.error(f"{self.name}: {type(e).__name__}: {e}")

    def pace(self, next_t):
        next_t += self.interval
        delay = next_t - time.monotonic()
        if delay > 0:
            self.sh.stop.wait(delay)
            return next_t
        return time.monotonic()

    def run_sync(self):
        next_t = time.monotonic()
        while not self.sh.stop.is_set():
            off, length, _ = self.pick()
            op = self.choose_op()
            t0 = time.monotonic()
            if op == "write":
                data = self.content(off, length)
                self.h.pwrite(data, off, nbd.CMD_FLAG_FUA if self.rnd.random() < 0.1 else 0)
            elif op == "zero":
                data = None
                self.h.zero(length, off, nbd.CMD_FLAG_NO_HOLE if self.rnd.random() < 0.5 else 0)
            else:
                # Trimmed bytes are unspecified by NBD; trim whole blocks only,
                # which a file-backed disk punches out (reads as zero).
                off = off // BLOCK * BLOCK
                length = max(BLOCK, length // BLOCK * BLOCK)
                length = min(length, (off // GROUP + 1) * GROUP - off)
                data = None
                self.h.trim(length, off)
            self.acks.append((t0, time.monotonic()))
            self.apply(off, length, data)
            if self.rnd.random() < 0.3:
                self.verify_read()
            next_t = self.pace(next_t)
        self.h.flush()

    def run_aio(self):
        inflight = {}  # cookie -> (start time, off, length, data, blocks, buffer)
        busy = set()
        next_t = time.monotonic()

        def reap():
            for ck in list(inflight):
                if self.h.aio_command_completed(ck):  # raises if the command failed
                    t0, off, length, data, blocks, _ = inflight.pop(ck)
                    self.acks.append((t0, time.monotonic()))
                    self.apply(off, length, data)
                    busy.difference_update(blocks)

        while not self.sh.stop.is_set():
            while len(inflight) < self.depth and time.monotonic() >= next_t:
                picked = self.pick(busy)
                if picked is None:
                    break
                off, length, blocks = picked
                t0 = time.monotonic()
                if self.choose_op() == "write":
                    data = self.content(off, length)
                    buf = nbd.Buffer.from_bytearray(bytearray(data))
                    ck = self.h.aio_pwrite(buf, off)
                else:
                    data, buf = None, None
                    ck = self.h.aio_zero(length, off)
                inflight[ck] = (t0, off, length, data, blocks, buf)
                busy |= blocks
                next_t += self.interval
            self.h.poll(10)
            reap()
            if time.monotonic() - next_t > 1:
                next_t = time.monotonic()
        deadline = time.monotonic() + 20
        while inflight and time.monotonic() < deadline:
            self.h.poll(100)
            reap()
        if inflight:
            raise AssertionError(f"{len(inflight)} requests never completed")
        self.h.flush()

    def close(self):
        try:
            self.h.shutdown()
        except nbd.Error:
            pass


class Prober(threading.Thread):
    """Keeps opening new connections (during copy, ready, switch and after),
    each reading a range of the groups nobody writes."""

    def __init__(self, uri, slot, nslots, size, shared):
        super().__init__(daemon=True, name="prober")
        self.uri = uri
        self.sh = shared
        self.groups = [g for g in range(size // GROUP) if g % nslots == slot]
        self.rnd = random.Random(slot)
        self.connections = 0

    def run(self):
        try:
            while not self.sh.stop.is_set():
                h = connect(self.uri)
                off = self.rnd.choice(self.groups) * GROUP
                got = h.pread(GROUP, off)
                h.shutdown()
                self.connections += 1
                if got != self.sh.original[off:off + GROUP]:
                    raise AssertionError(f"new connection read wrong data at {off}")
                self.sh.stop.wait(0.05)
        except Exception as e:  # noqa: BLE001
            self.sh.error(f"prober: {type(e).__name__}: {e}")


def assert_image(got, expect, what):
    assert len(got) == len(expect), f"{what} is {len(got)} bytes, expected {len(expect)}"
    if got == expect:
        return
    bad = []
    gv, ev = memoryview(got), memoryview(expect)
    for b in range(0, len(expect), BLOCK):
        if gv[b:b + BLOCK] != ev[b:b + BLOCK]:
            bad.append((b, bytes(ev[b:b + 24]), bytes(gv[b:b + 24])))
            if len(bad) >= 8:
                break
    pytest.fail(f"{what}: wrong content; first bad 4 KiB blocks (offset, expected, got): {bad}")


def make_source(path, size, seed, sparse):
    """Random data; when `sparse`, every other 1 MiB is left a hole."""
    rnd = random.Random(seed)
    original = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 1 * MiB):
            if sparse and (off // MiB) % 2:
                continue
            data = rnd.randbytes(1 * MiB)
            original[off:off + MiB] = data
            f.seek(off)
            f.write(data)
    return bytes(original)


CASES = [
    # seed, disk MiB, granularity, speed, total write ops/s, auto-complete, sparse source
    pytest.param(1, 64, "4K", "30M", 400, True, False, id="gran4K-auto"),
    # Each copy takes about 3 s (32 MiB of data at 10M, 48 at 16M, 16 at 6M), so that clients
    # slowed by a loaded machine still write before the mirror is ready.
    pytest.param(2, 64, "64K", "10M", 60, True, True, id="gran64K-auto-sparse"),
    pytest.param(3, 48, "1M", "16M", 10, False, False, id="gran1M-sigusr1"),
    pytest.param(4, 32, None, "6M", 80, False, True, id="default-gran-sigusr1-sparse"),
]


# write-blocking mirrors every client write to the target before its reply;
# adaptive (with a short window, so it may switch mid-run) starts as background.
COPY_MODES = ["background", "write-blocking", "adaptive"]


@pytest.mark.parametrize("copy_mode", COPY_MODES)
@pytest.mark.parametrize("seed,disk_mib,granularity,speed,ops,auto,sparse", CASES)
def test_writes_survive_live_switchover(mirror_server, tmp_path, seed, disk_mib, granularity,
                                        speed, ops, auto, sparse, copy_mode):
    size = disk_mib * MiB
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    original = make_source(src, size, seed, sparse)

    args = ["--create", "--speed", speed, "--no-progress", "--copy-mode", copy_mode]
    if copy_mode == "adaptive":
        args += ["--adaptive-window", "300"]
    if granularity:
        args += ["--granularity", granularity]
    if not auto:
        args.append("--no-auto-complete")
    m = mirror_server(src, dst, *args)

    sh = Shared(original)
    nslots = 4  # three writers; slot 3 is never written (the prober reads it)
    # Two synchronous connections with read-backs, one with requests in flight.
    writers = [Writer(m.uri, seed, i, nslots, size, max(1, ops / 3), sh,
                      mode="aio" if i == 2 else "sync") for i in range(3)]
    prober = Prober(m.uri, 3, nslots, size, sh)
    t_start = time.monotonic()
    for t in (*writers, prober):
        t.start()
    t_signal = None
    try:
        t_ready = m.wait_event("BLOCK_JOB_READY", 90)
        if not auto:
            sh.stop.wait(1.5)  # write in the ready state for a while
            assert m.event_time("BLOCK_JOB_COMPLETED") is None, \
                f"completed without SIGUSR1 under --no-auto-complete: {m.names()}"
            assert not sh.errors, sh.errors
            t_signal = time.monotonic()
            m.proc.send_signal(signal.SIGUSR1)
        t_done = m.wait_event("BLOCK_JOB_COMPLETED", 60)
        t_note = m.wait_event("NOTE", 10, message=f"serving {dst} now")
        sh.stop.wait(1.0)  # keep writing to the target through the same connections
    finally:
        sh.stop.set()
        for t in (*writers, prober):
            t.join(30)
    assert not any(t.is_alive() for t in (*writers, prober)), "a client thread hung"
    assert not sh.errors, f"client errors: {sh.errors}\n{m.log()}"

    # A connection opened before the copy started now reads the target.
    served = b"".join(writers[0].h.pread(min(16 * MiB, size - off), off)
                      for off in range(0, size, 16 * MiB))
    assert_image(served, sh.expect, "export read after the switch")
    for w in writers:
        w.close()
    m.stop()

    # The events and their order.
    names = m.names()
    assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED"), names
    completed = [ev for _, ev in m.events if ev["event"] == "BLOCK_JOB_COMPLETED"][0]["data"]
    assert "error" not in completed, completed
    # len counts re-copied dirty data too (QMP semantics); holes of a sparse
    # source need no work on a fresh (--create) target.
    assert completed.get("len") == completed.get("offset"), completed
    assert completed["len"] >= (size // 2 if sparse else size), completed
    assert t_note >= t_done

    # Requests were acknowledged in every phase.
    acks = [a for w in writers for a in w.acks]
    before_ready = sum(1 for t0, t1 in acks if t1 < t_ready)
    after_done = sum(1 for t0, t1 in acks if t0 > t_done)
    assert before_ready > 0, "no write acknowledged before the mirror was ready"
    assert after_done > 0, "no write acknowledged after the switch"
    if not auto:
        in_ready = sum(1 for t0, t1 in acks if t_ready < t0 and t1 < t_signal)
        assert in_ready > 0, "no write acknowledged in the ready state"
    assert sum(w.reads for w in writers) > 0
    assert prober.connections > 0

    assert_image(dst.read_bytes(), sh.expect, "dst.img")
    print(f"{len(acks)} requests ({before_ready} before ready, {after_done} after switch), "
          f"{prober.connections} probe connections, ready at +{t_ready - t_start:.2f}s, "
          f"completed at +{t_done - t_start:.2f}s")


def test_fio_verify_across_switchover(mirror_server, tmp_path):
    """fio writes every block of the export (crc32c-verifiable contents) while
    the mirror runs and switches; its verify pass reads the export, by then
    the target, and a second verify reads dst.img directly."""
    size = 32 * MiB
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(random.Random(21).randbytes(size))
    m = mirror_server(src, dst, "--create", "--speed", "20M", "--granularity", "4K",
                      "--no-progress")
    common = ["--name=live", "--bs=4k", f"--size={size}", "--verify=crc32c",
              "--randseed=99", "--rw=randwrite", "--verify_state_save=0"]
    out, err = tmp_path / "fio.json", tmp_path / "fio.stderr"
    t0 = time.monotonic()
    with open(err, "wb") as errf:
        # Writes at ~6 MB/s: about 5 s for the whole disk, so the switch (after
        # a 1.6 s copy plus what the writes dirty) lands in the middle of them.
        fio = subprocess.Popen(["fio", "--ioengine=nbd", f"--uri={m.uri}", "--iodepth=16",
                                "--do_verify=1", "--rate_iops=,1500", "--output-format=json",
                                f"--output={out}", *common],
                               stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                               cwd=tmp_path)
        try:
            t_done = m.wait_event("BLOCK_JOB_COMPLETED", 60)
            assert fio.poll() is None, "fio finished before the switch; nothing spanned it"
            rc = fio.wait(120)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
    t_fio = time.monotonic()
    text = out.read_text()
    assert "{" in text, f"fio rc={fio.returncode}: {text}{err.read_text()}"
    job = json.loads(text[text.index("{"):])["jobs"][0]
    assert rc == 0 and job["error"] == 0, (rc, job.get("error"), err.read_text())
    assert job["write"]["io_bytes"] == size
    assert job["read"]["io_bytes"] == size  # the verify pass read everything back
    # The switch happened while fio was still writing: fio's write phase
    # (runtime in ms from fio's start) ended after it.
    assert t_done - t0 < job["write"]["runtime"] / 1000.0, (t_done - t0, job["write"]["runtime"])
    assert t0 < t_done < t_fio
    m.stop()
    # Verify dst.img itself, without blkmirror.
    r = run_tool(["fio", "--ioengine=psync", f"--filename={dst}", "--verify_only",
                  "--output-format=json", *common], timeout=120, cwd=tmp_path)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == size, job
    print(f"switch at +{t_done - t0:.2f}s, fio done at +{t_fio - t0:.2f}s")


def test_after_switch_io_and_block_status_use_target_only(mirror_server, tmp_path):
    """Once switched, a connection opened before the switch writes, trims and
    queries block status on DST; SRC no longer changes."""
    size = 16 * MiB
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    rnd = random.Random(31)
    with open(src, "wb") as f:
        f.truncate(size)
        for off in (0, 5 * MiB, 9 * MiB):
            f.seek(off)
            f.write(rnd.randbytes(1 * MiB))
    m = mirror_server(src, dst, "--create", "--no-auto-complete", "--no-progress")
    h = connect(m.uri)
    before = rnd.randbytes(8 * KiB)
    h.pwrite(before, 12 * MiB)  # on the source, mirrored
    m.wait_event("BLOCK_JOB_READY", 60)
    m.proc.send_signal(signal.SIGUSR1)
    m.wait_event("BLOCK_JOB_COMPLETED", 60)
    m.wait_event("NOTE", 10, message=f"serving {dst} now")
    src_after_switch = src.read_bytes()

    after = rnd.randbytes(64 * KiB)
    h.pwrite(after, 2 * MiB)
    h.trim(1 * MiB, 5 * MiB)
    h.zero(64 * KiB, 9 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert h.pread(64 * KiB, 2 * MiB) == after
    assert h.pread(8 * KiB, 12 * MiB) == before
    assert h.pread(1 * MiB, 5 * MiB) == bytes(1 * MiB)
    assert src.read_bytes() == src_after_switch, "a write after the switch reached SRC"

    # Block status now describes DST's layout.
    ext = []
    h.block_status(size, 0, lambda ctx, off, entries, err: ext.append(list(entries)) or 0)
    pos, data = 0, []
    for length, flags in zip(ext[0][0::2], ext[0][1::2]):
        if not flags & nbd.STATE_HOLE:
            if data and sum(data[-1]) == pos:
                data[-1] = (data[-1][0], data[-1][1] + length)
            else:
                data.append((pos, length))
        pos += length
    assert pos == size
    layout = file_layout(dst)
    assert (2 * MiB, 64 * KiB) in layout and not any(s <= 5 * MiB < s + n for s, n in layout)
    # NO_HOLE-zeroed space may show as either; compare outside it.
    outside = lambda rs: [r for r in rs if not (r[0] <= 9 * MiB < r[0] + r[1])]  # noqa: E731
    assert outside(data) == outside(layout), (data, layout)
    h.shutdown()
    m.stop()

    expect = bytearray(src_after_switch)
    expect[2 * MiB:2 * MiB + 64 * KiB] = after
    expect[5 * MiB:6 * MiB] = bytes(1 * MiB)
    expect[9 * MiB:9 * MiB + 64 * KiB] = bytes(64 * KiB)
    assert_image(dst.read_bytes(), expect, "dst.img")
