"""The live switch-over proof for `blkmirror mirror SRC DST --socket S`.

NBD clients keep writing while the mirror copies, while it is ready, across
the moment it completes and switches every connection to DST, and after.
Every acknowledged write is recorded (the last content of each 4 KiB block);
clients also read blocks back on the fly. Once blkmirror has exited, DST is
read directly: each written block must hold its last acknowledged content and
every other block the original source content.
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

from nbd_helpers import KiB, MiB, connect, mirror_server, run_tool  # noqa: F401

BLOCK = 4 * KiB
GROUP = 24  # blocks owned together by one writer: 96 KiB, so groups straddle 64 KiB chunks
MAX_RUN = 8  # blocks per write


def block_content(seed, writer, block, seq):
    head = struct.pack(">8sIIQQ", b"BLKMLIVE", seed, writer, block, seq)
    return head * (BLOCK // len(head))


class Recorder:
    """Shared across writers: the mirror's event times, for classifying acks."""

    def __init__(self):
        self.errors = []
        self.lock = threading.Lock()


class Writer(threading.Thread):
    """One NBD connection writing runs of blocks it owns (block groups g with
    g % nwriters == index), so the last acknowledged content of each block
    is well defined. mode "sync": one request at a time, with read-backs;
    mode "aio": up to `depth` writes in flight on the connection (never two
    on the same block)."""

    def __init__(self, uri, seed, index, nwriters, nblocks, ops_per_sec, stop, rec, original,
                 mode="sync", depth=8):
        super().__init__(daemon=True, name=f"writer{index}")
        self.h = connect(uri)
        self.seed, self.index, self.nwriters = seed, index, nwriters
        self.nblocks = nblocks
        self.interval = 1.0 / ops_per_sec
        self.stop = stop
        self.rec = rec
        self.original = original
        self.mode = mode
        self.depth = depth
        self.rnd = random.Random(seed * 1000 + index)
        self.model = {}      # block -> last acknowledged content
        self.acks = []       # (start time, ack time) of every acknowledged write/zero
        self.reads = 0
        self.seq = 0
        ngroups = nblocks // GROUP
        self.groups = [g for g in range(ngroups) if g % nwriters == index]

    def pick_run(self, busy=()):
        for _ in range(100):
            g = self.rnd.choice(self.groups)
            start = self.rnd.randrange(0, GROUP)
            n = self.rnd.randint(1, min(MAX_RUN, GROUP - start))
            blocks = range(g * GROUP + start, g * GROUP + start + n)
            if not any(b in busy for b in blocks):
                return blocks
        return None

    def make_write(self, blocks):
        """(kind, payload, contents by block) for a run: mostly data, some zeroes."""
        if self.rnd.random() < 0.06:
            return "zero", None, {b: bytes(BLOCK) for b in blocks}
        contents = {}
        for b in blocks:
            self.seq += 1
            contents[b] = block_content(self.seed, self.index, b, self.seq)
        return "write", b"".join(contents[b] for b in blocks), contents

    def verify_read(self):
        own = self.rnd.choice(self.groups) * GROUP + self.rnd.randrange(0, GROUP)
        got = self.h.pread(BLOCK, own * BLOCK)
        want = self.model.get(own)
        if want is None:
            want = self.original[own * BLOCK:(own + 1) * BLOCK]
        self.reads += 1
        if got != want:
            raise AssertionError(f"writer {self.index}: read-back of block {own} at "
                                 f"{time.monotonic():.3f} returned stale/wrong data "
                                 f"(written={own in self.model})")

    def run(self):
        try:
            if self.mode == "sync":
                self.run_sync()
            else:
                self.run_aio()
        except Exception as e:  # noqa: BLE001 - reported by the test
            with self.rec.lock:
                self.rec.errors.append(f"{self.name}: {type(e).__name__}: {e}")

    def run_sync(self):
        next_t = time.monotonic()
        while not self.stop.is_set():
            blocks = self.pick_run()
            kind, payload, contents = self.make_write(blocks)
            off = blocks[0] * BLOCK
            t0 = time.monotonic()
            if kind == "zero":
                flags = nbd.CMD_FLAG_NO_HOLE if self.rnd.random() < 0.5 else 0
                self.h.zero(len(blocks) * BLOCK, off, flags)
            else:
                self.h.pwrite(payload, off, nbd.CMD_FLAG_FUA if self.rnd.random() < 0.1 else 0)
            self.acks.append((t0, time.monotonic()))
            self.model.update(contents)
            if self.rnd.random() < 0.3:
                self.verify_read()
            next_t += self.interval
            delay = next_t - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                next_t = time.monotonic()
        self.h.flush()

    def run_aio(self):
        inflight = {}  # cookie -> (start time, contents, buffer)
        busy = set()
        next_t = time.monotonic()

        def reap():
            for ck in list(inflight):
                if self.h.aio_command_completed(ck):  # raises if the command failed
                    t0, contents, _ = inflight.pop(ck)
                    self.acks.append((t0, time.monotonic()))
                    self.model.update(contents)
                    busy.difference_update(contents)

        while not self.stop.is_set():
            while len(inflight) < self.depth and time.monotonic() >= next_t:
                blocks = self.pick_run(busy)
                if blocks is None:
                    break
                kind, payload, contents = self.make_write(blocks)
                off = blocks[0] * BLOCK
                t0 = time.monotonic()
                if kind == "zero":
                    ck = self.h.aio_zero(len(blocks) * BLOCK, off)
                    buf = None
                else:
                    buf = nbd.Buffer.from_bytearray(bytearray(payload))
                    ck = self.h.aio_pwrite(buf, off)
                inflight[ck] = (t0, contents, buf)
                busy.update(contents)
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
            raise AssertionError(f"{len(inflight)} writes never completed")
        self.h.flush()

    def close(self):
        try:
            self.h.shutdown()
        except nbd.Error:
            pass


def merged_model(writers):
    model = {}
    for w in writers:
        model.update(w.model)
    return model


def expected_image(original, model):
    img = bytearray(original)
    for b, data in model.items():
        img[b * BLOCK:(b + 1) * BLOCK] = data
    return img


def check_target(got, original, model, size, what):
    assert len(got) == size, f"{what} is {len(got)} bytes, expected {size}"
    if got == expected_image(original, model):
        return
    bad = []
    gv, ov = memoryview(got), memoryview(original)
    for b in range(size // BLOCK):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        want = model.get(b)
        if want is not None:
            if gv[sl] != want:
                head = bytes(gv[sl][:32])
                bad.append((b, "written block lost", want[:32], head))
        elif gv[sl] != ov[sl]:
            bad.append((b, "unwritten block differs from source", bytes(ov[sl][:32]),
                        bytes(gv[sl][:32])))
        if len(bad) >= 10:
            break
    assert bad
    pytest.fail(f"{what}: content wrong (first {len(bad)} bad blocks): {bad}")


CASES = [
    # id, seed, disk MiB, granularity, speed, total ops/s, auto-complete
    pytest.param(1, 64, "4K", "30M", 450, True, id="gran4K-auto"),
    pytest.param(2, 64, "64K", "30M", 60, True, id="gran64K-auto"),
    pytest.param(3, 48, "1M", "40M", 15, False, id="gran1M-sigusr1"),
    pytest.param(4, 32, None, "20M", 150, False, id="default-gran-sigusr1"),
]


@pytest.mark.parametrize("seed,disk_mib,granularity,speed,ops,auto", CASES)
def test_writes_survive_live_switchover(mirror_server, tmp_path, seed, disk_mib, granularity,
                                        speed, ops, auto):
    size = disk_mib * MiB
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    original = random.Random(seed).randbytes(size)
    src.write_bytes(original)

    args = ["--create", "--speed", speed, "--no-progress"]
    if granularity:
        args += ["--granularity", granularity]
    if not auto:
        args.append("--no-auto-complete")
    m = mirror_server(src, dst, *args)

    stop = threading.Event()
    rec = Recorder()
    nblocks = size // BLOCK
    # Two synchronous connections with read-backs, one with writes in flight.
    writers = [Writer(m.uri, seed, i, 3, nblocks, max(1, ops / 3), stop, rec, original,
                      mode="aio" if i == 2 else "sync") for i in range(3)]
    t_start = time.monotonic()
    for w in writers:
        w.start()
    try:
        t_ready = m.wait_event("BLOCK_JOB_READY", 90)
        if not auto:
            time.sleep(1.5)  # write in the ready state for a while
            assert m.event_time("BLOCK_JOB_COMPLETED") is None, \
                f"completed without SIGUSR1 under --no-auto-complete: {m.names()}"
            assert not rec.errors, rec.errors
            t_signal = time.monotonic()
            m.proc.send_signal(signal.SIGUSR1)
        t_done = m.wait_event("BLOCK_JOB_COMPLETED", 60)
        t_note = m.wait_event("NOTE", 10, message=f"serving {dst} now")
        time.sleep(1.0)  # keep writing to the target through the same connections
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    assert not any(w.is_alive() for w in writers), "a writer hung"
    assert not rec.errors, f"client errors: {rec.errors}\n{m.log()}"
    model = merged_model(writers)
    # What a connection opened before the copy started now reads: the target,
    # holding every acknowledged write.
    served = b"".join(writers[0].h.pread(min(16 * MiB, size - off), off)
                      for off in range(0, size, 16 * MiB))
    check_target(served, original, model, size, "export read after the switch")
    for w in writers:
        w.close()
    m.stop()

    # The events and their order.
    names = m.names()
    assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED"), names
    completed = [ev for _, ev in m.events if ev["event"] == "BLOCK_JOB_COMPLETED"][0]["data"]
    assert "error" not in completed, completed
    # len counts re-copied dirty data too (QMP semantics): at least the disk.
    assert completed.get("len") == completed.get("offset") and completed["len"] >= size, completed
    assert t_note >= t_done

    # Writes were acknowledged in every phase.
    acks = [a for w in writers for a in w.acks]
    before_ready = sum(1 for t0, t1 in acks if t1 < t_ready)
    after_done = sum(1 for t0, t1 in acks if t0 > t_done)
    assert before_ready > 0, "no write acknowledged before the mirror was ready"
    assert after_done > 0, "no write acknowledged after the switch"
    if not auto:
        in_ready = sum(1 for t0, t1 in acks if t_ready < t0 and t1 < t_signal)
        assert in_ready > 0, "no write acknowledged in the ready state"
    assert sum(w.reads for w in writers) > 0

    check_target(dst.read_bytes(), original, model, size, "dst.img")
    written = len(model)
    assert written > 0
    print(f"{len(acks)} writes ({before_ready} before ready, {after_done} after switch), "
          f"{written} distinct blocks, ready at +{t_ready - t_start:.2f}s, "
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
    # The switch happened while fio was still writing: fio's write phase ended
    # after it (write runtime is in ms from fio's start).
    assert t_done - t0 < job["write"]["runtime"] / 1000.0, (t_done - t0, job["write"]["runtime"])
    assert t0 < t_done < t_fio
    m.stop()
    # Verify dst.img itself, without blkmirror.
    r = run_tool(["fio", "--ioengine=psync", f"--filename={dst}", "--verify_only",
                  "--output-format=json", *common], timeout=120, cwd=tmp_path)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == size, job
    print(f"switch at +{t_done - t0:.2f}s, fio done at +{t_fio - t0:.2f}s")
