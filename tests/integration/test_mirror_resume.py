"""Crash-safe mirrors (issue 12): `blkmirror mirror --socket --state` killed with
SIGKILL at a random moment (copying, ready, completing) while a python-libnbd
client writes through its export with flushes; the same command run again
resumes, copies only what the state file says may differ, and the target ends
holding every acknowledged write. Plus the refusals: a completed, foreign,
changed, truncated or corrupted state file, each one line, nothing written."""

import json
import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import MiB

SIZE = 32 * MiB
HOT = 8 * MiB  # the client writes the first 8 MiB only: the rest can be checkpointed


class Writer:
    """Writes random blocks through the export from a thread, a flush every
    few writes; `model` holds every acknowledged write. The write in flight
    when the server dies may or may not have landed: `uncertain` keeps it."""

    def __init__(self, uri, model, seed):
        import nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.uncertain = []
        self.acked = 0
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        try:
            while not self.stop.is_set():
                length = self.rnd.choice([512, 4096, 65536, 200000])
                off = self.rnd.randrange(0, HOT - length)
                data = self.rnd.randbytes(length)
                self.uncertain = [(off, data)]
                self.h.pwrite(data, off)
                self.model[off:off + length] = data
                self.uncertain = []
                self.acked += 1
                if self.acked % 8 == 0:
                    self.h.flush()
                time.sleep(0.001)
        except Exception:
            pass  # the server was killed: the last write is uncertain

    def finish(self):
        self.stop.set()
        self.t.join(10)


def matches_model(data, model, uncertain):
    """data equals model, except that an uncertain write may have landed."""
    if data == bytes(model):
        return True
    for off, new in uncertain:
        m = bytearray(model)
        m[off:off + len(new)] = new
        if data == bytes(m):
            return True
    return False


def note(stdout, prefix):
    for ln in stdout.splitlines():
        if ln.startswith("{"):
            ev = json.loads(ln)
            if ev["event"] == "NOTE" and ev["data"]["message"].startswith(prefix):
                return ev["data"]["message"]
    return None


def completed_event(stdout):
    for ln in stdout.splitlines():
        if ln.startswith("{"):
            ev = json.loads(ln)
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                return ev["data"]
    return None


def resume(cli, *args):
    """The mirror run again. The kernel lets go of a killed process's image
    locks a moment after it is reaped (its io_uring is torn down in the
    background): a restart that meets them tries again."""
    for _ in range(50):
        r = cli.run(*args)
        if r.returncode != 2 or '"write" lock' not in r.stderr:
            return r
        time.sleep(0.1)
    return r


@pytest.mark.parametrize("seed,moment", [(1, "copying"), (2, "copying"), (3, "ready"),
                                         (4, "ready"), (5, "completing"), (6, "copying")])
def test_kill9_then_resume(cli, images, workdir, seed, moment):
    rnd = random.Random(seed)
    src = images.dense("src.img", SIZE)
    dst = images.zeros("dst.img", SIZE)
    state = workdir / "mirror.state"
    sock = workdir / "s.sock"
    model = bytearray(open(src, "rb").read())
    speed = "16M" if moment == "copying" else "0"
    run = cli.start_mirror(src, dst, "--socket", sock, "--state", state, "--no-auto-complete",
                           "--speed", speed, "--copy-mode", "adaptive", "--no-progress")
    run.wait_for_line("serving", 30)
    w = Writer(f"nbd+unix:///?socket={sock}", model, seed)
    if moment == "copying":
        time.sleep(rnd.uniform(0.3, 1.2))
    else:
        run.wait_for_line("ready:", 60)
        time.sleep(rnd.uniform(0.6, 1.2))  # a few checkpoints while ready
        if moment == "completing":
            run.send_signal(signal.SIGUSR1)
            time.sleep(rnd.uniform(0.0, 0.05))
    run.popen.send_signal(signal.SIGKILL)
    run.popen.wait()
    w.finish()
    assert w.acked > 0
    assert state.exists()

    r = resume(cli, "mirror", src, dst, "--state", state, "--json")
    if r.returncode == 2 and "this mirror completed" in r.stderr:
        # Killed after the switch-over: the target is the disk now, with every
        # write the clients made to either.
        assert matches_model(open(dst, "rb").read(), model, w.uncertain)
        return
    assert r.returncode == 0, r.stderr
    resumed = note(r.stdout, "resuming from")
    assert resumed, r.stdout
    owed_extents, extents = map(int, re.search(r"(\d+) of (\d+) extents", resumed).groups())
    done = completed_event(r.stdout)
    assert done and "error" not in done, r.stdout
    # The resume copied what the state named, not the whole disk again.
    print(f"\n{moment}: state owed {owed_extents} of {extents} MiB extents; resume copied "
          f"{done['offset'] / MiB:.1f} MiB of {SIZE / MiB:.0f} MiB")
    assert done["offset"] <= owed_extents * MiB
    if moment == "ready":
        # Converged: only the extents the client kept writing stay marked.
        assert owed_extents <= HOT // MiB + 2, resumed
    assert done["len"] <= owed_extents * MiB
    data = open(dst, "rb").read()
    assert data == open(src, "rb").read(), "the resumed target differs from the source"
    assert matches_model(data, model, w.uncertain), "an acknowledged write is missing"
    # Now completed: a third run refuses to copy over the target.
    r = cli.mirror(src, dst, "--state", state)
    assert r.returncode == 2 and "this mirror completed" in r.stderr, r.stderr


def killed_state(cli, images, workdir, size=8 * MiB):
    """A state file left by a mirror killed while copying."""
    src = images.dense("src.img", size)
    dst = images.zeros("dst.img", size)
    state = workdir / "st"
    run = cli.start_mirror(src, dst, "--state", state, "--speed", "2M", "--no-progress",
                           "--no-copy-offload")
    run.wait_for_line("crash-safe state in", 30)
    time.sleep(1.5)  # 3 MiB copied and checkpointed
    run.popen.send_signal(signal.SIGKILL)
    run.popen.wait()
    resume(cli, "verify", src, dst, "--no-progress")  # until its image locks are gone
    return src, dst, state


def test_refusals_are_one_line_and_write_nothing(cli, images, workdir):
    src, dst, state = killed_state(cli, images, workdir)
    before = open(dst, "rb").read()
    other = images.dense("other.img", 8 * MiB)
    cases = []
    # Another target than the state was made for.
    cases.append(((src, other, "--state", state), "made for another target than"))
    # Granularity differing from the state's.
    cases.append(((src, dst, "--state", state, "--granularity", "128K"),
                  "made with granularity 4096"))
    # --verify-resume without a state to resume.
    cases.append(((src, dst, "--state", workdir / "none", "--verify-resume"), "no state to resume"))
    for args, text in cases:
        r = cli.mirror(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Truncated, corrupted, from another program: refused.
    raw = open(state, "rb").read()
    for name, content, text in [("trunc", raw[:5000], "truncated"),
                                ("junk", b"x" * 12288, "not a blkmirror state file"),
                                ("flip", raw[:100] + bytes([raw[100] ^ 1]) + raw[101:4096]
                                 + raw[4096:4196] + bytes([raw[4196] ^ 1]) + raw[4197:],
                                 "checksum mismatch")]:
        p = workdir / name
        p.write_bytes(content)
        r = cli.mirror(src, dst, "--state", p)
        assert r.returncode == 2 and text in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(dst, "rb").read() == before


def test_changed_source_refused_then_verify_resume_copies_what_differs(cli, images, workdir):
    src, dst, state = killed_state(cli, images, workdir)
    # Someone writes the source behind the state's back, also where the copy
    # was done: a resume would miss it. Refused; --verify-resume copies it.
    with open(src, "r+b") as f:
        for off in range(0, 8 * MiB, MiB):
            f.seek(off)
            f.write(b"\xee" * 512)
    r = resume(cli, "mirror", src, dst, "--state", state)
    assert r.returncode == 2 and "changed since the state was written" in r.stderr, r.stderr
    r = cli.mirror(src, dst, "--state", state, "--verify-resume", "--json")
    assert r.returncode == 0, r.stderr
    assert "--verify-resume compared every chunk" in note(r.stdout, "resuming from")
    subprocess.run(["cmp", str(src), str(dst)], check=True)


def test_qmp_persistent_state_resumes_after_the_daemon_is_killed(blkmirror_bin, images, workdir):
    from qmp_client import Daemon
    src = images.dense("src.img", SIZE)
    dst = images.zeros("dst.img", SIZE)
    state = workdir / "m.state"

    def start(dirname):
        d = workdir / dirname
        d.mkdir()
        daemon = Daemon(blkmirror_bin, d)
        q = daemon.client()
        q.cmd("blockdev-add", driver="file", node_name="src", filename=str(src))
        q.cmd("blockdev-add", driver="file", node_name="dst", filename=str(dst))
        return daemon, q

    daemon, q = start("d1")
    q.cmd("blockdev-mirror", job_id="m", device="src", target="dst", sync="full",
          speed=8 * MiB, x_persistent_state=str(state))
    time.sleep(1.2)  # about 10 MiB copied and checkpointed
    daemon.proc.kill()
    daemon.proc.wait()
    q.close()

    daemon, q = start("d2")
    try:
        for _ in range(50):  # the killed daemon's image locks go a moment after it
            try:
                q.cmd("blockdev-mirror", job_id="m", device="src", target="dst", sync="full",
                      x_persistent_state=str(state))
                break
            except Exception as e:
                if '"write" lock' not in str(e):
                    raise
                time.sleep(0.1)
        ready = q.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=60)
        # Only what the state said may differ was copied.
        assert 0 < ready["data"]["len"] < SIZE - 4 * MiB, ready
        q.cmd("block-job-complete", device="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", match={"device": "m"}, timeout=60)
        assert "error" not in ev["data"], ev
        subprocess.run(["cmp", str(src), str(dst)], check=True)
        # Completed: the state refuses another copy over the target.
        _, desc = q.error("blockdev-mirror", job_id="m2", device="src", target="dst",
                          sync="full", x_persistent_state=str(state))
        assert "this mirror completed" in desc, desc
    finally:
        q.close()
        daemon.stop()
