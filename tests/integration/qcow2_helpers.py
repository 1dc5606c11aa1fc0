"""Helpers for the qcow2 and backing-chain tests: images made and written by
QEMU's own tools (the judges), qemu-nbd as the reference server, and
qemu-storage-daemon for comparing QMP replies."""

import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nbd_helpers import run_tool, uri_for
from qmp_client import QmpClient

KiB = 1 << 10
MiB = 1 << 20


def qemu_img(*args, check=True, timeout=60):
    return run_tool(["qemu-img", *args], timeout=timeout, check=check)


def create(path, size, fmt="qcow2", backing=None, backing_fmt=None, **opts):
    """qemu-img create; opts become -o key=value (underscores: dashes kept as given)."""
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    qemu_img(*args, str(path), str(size))
    return Path(path)


def in_dir(d, fn):
    """Runs fn() with d as the working directory (relative backing links)."""
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return fn()
    finally:
        os.chdir(cwd)


def read_raw(path, out):
    """The guest view of an image (its chain read through), via qemu-img convert."""
    qemu_img("convert", "-U", "-O", "raw", str(path), str(out))
    return bytearray(Path(out).read_bytes())


def qemu_io(path, *cmds, fmt="qcow2", image_opts=None):
    """Runs qemu-io commands ("write -P 0x11 0 64k") on an image."""
    args = ["qemu-io"]
    if image_opts:
        args += ["--image-opts", image_opts]
    else:
        args += ["-f", fmt, str(path)]
    for c in cmds:
        args += ["-c", c]
    r = run_tool(args)
    assert "error" not in r.stdout.lower() and "failed" not in r.stdout.lower(), r.stdout
    return r


def check_image(path, leaks_ok=False):
    """qemu-img check: no corruption (and no leaks unless leaks_ok)."""
    r = qemu_img("check", "-U", "--output=json", str(path), check=False)
    info = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    assert r.returncode in ((0, 3) if leaks_ok else (0,)), f"qemu-img check rc={r.returncode}: {r.stdout}{r.stderr}"
    assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, info
    if not leaks_ok:
        assert info.get("leaks", 0) == 0, info
    return info


def compare_with_export(image, uri, image_fmt="qcow2"):
    """qemu-img compare -s (strict: allocation too? no: contents) of an image
    read by qemu-img against our NBD export."""
    r = run_tool(["qemu-img", "compare", "-f", image_fmt, "-F", "raw", str(image), uri], check=False)
    assert r.returncode == 0, f"qemu-img compare {image} {uri}: rc={r.returncode} {r.stdout}{r.stderr}"


def depth_map(uri):
    """nbdinfo --map=qemu:allocation-depth as [(offset, length, depth)]."""
    r = run_tool(["nbdinfo", "--json", "--map=qemu:allocation-depth", uri])
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]


def alloc_map(uri):
    """nbdinfo --map (base:allocation) as [(offset, length, type)]."""
    r = run_tool(["nbdinfo", "--json", "--map", uri])
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]


def mirror_to_completion(qmp, timeout=60, **args):
    """blockdev-mirror job 'm', block-job-complete at ready; fails on a job error."""
    qmp.cmd("blockdev-mirror", job_id="m", **args)
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=timeout)
    qmp.cmd("block-job-complete", device="m")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "m"}, timeout=timeout)
    assert "error" not in ev["data"], ev


def wait_for_socket(proc, path, what):
    """Waits (20 s at most) for a peer process to create a file (its socket, its pid file)."""
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start: {proc.stderr.read()}")
        time.sleep(0.02)


class QemuNbd:
    """qemu-nbd serving an image read-only, persistent, with allocation-depth."""

    def __init__(self, image, sock, fmt="qcow2"):
        self.sock = str(sock)
        self.proc = subprocess.Popen(["qemu-nbd", "-r", "-A", "-t", "-f", fmt, "-k", self.sock, str(image)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_socket(self.proc, self.sock, "qemu-nbd")
        self.uri = uri_for(self.sock)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def sha(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Qsd:
    """qemu-storage-daemon 7.2 with a QMP monitor, for comparing replies. The
    wire is QmpClient's, so both daemons are spoken to by the same code."""

    def __init__(self, workdir):
        self.path = str(Path(workdir) / "qsd.sock")
        pidfile = Path(workdir) / "qsd.pid"
        self.proc = subprocess.Popen(["qemu-storage-daemon", "--chardev",
                                      f"socket,id=c,path={self.path},server=on,wait=off",
                                      "--monitor", "chardev=c", "--pidfile", str(pidfile)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The pid file is written once the monitor exists (qemu-storage-daemon's
        # manual); the socket file already from the chardev's bind(), and a
        # client that connected in between was greeted twice and could lose
        # the first bytes of its first command.
        wait_for_socket(self.proc, str(pidfile), "qemu-storage-daemon")
        self.client = QmpClient(self.path)

    def cmd(self, name, **args):
        return self.client.cmd(name, **args)

    def error(self, name, **args):
        """Runs a command that must fail; returns (class, desc)."""
        return self.client.error(name, **args)

    def stop(self):
        try:
            self.client.cmd("quit")
        except Exception:
            pass
        self.client.close()
        self.proc.wait(10)


def have(tool):
    return shutil.which(tool) is not None


# --------------------------------------------------------------------------
# Bad images: each maker returns (path, a word the one-line error must hold).

BAD_SIZE = 4 * MiB


def truncated(d):
    p = d / "trunc.qcow2"
    create(p, BAD_SIZE)
    with open(p, "r+b") as f:
        f.truncate(40)
    return p, "qcow2"


def self_loop(d):
    p = d / "self.qcow2"
    create(d / "other.qcow2", BAD_SIZE)
    create(p, BAD_SIZE, backing="other.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", str(p))
    return p, "loops"


def overlay_loop(d):
    create(d / "a.qcow2", BAD_SIZE)
    create(d / "b.qcow2", BAD_SIZE, backing="a.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(d / "a.qcow2"))
    return d / "b.qcow2", "loops"


def missing_backing(d):
    create(d / "gone.qcow2", BAD_SIZE)
    create(d / "m.qcow2", BAD_SIZE, backing="gone.qcow2", backing_fmt="qcow2")
    os.unlink(d / "gone.qcow2")
    return d / "m.qcow2", "No such file or directory"


def encrypted(d):
    p = d / "enc.qcow2"
    r = qemu_img("create", "-q", "--object", "secret,id=s0,data=pw", "-f", "qcow2",
                 "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(p), str(BAD_SIZE),
                 check=False)
    if r.returncode != 0:  # LUKS's PBKDF benchmark fails on a loaded machine
        pytest.skip(f"qemu-img could not make a LUKS image here: {r.stderr.strip()}")
    return p, "encrypt"


def not_qcow2(d):
    p = d / "plain.raw"
    p.write_bytes(os.urandom(64 * KiB))
    return p, "qcow2"


BAD = [truncated, self_loop, overlay_loop, missing_backing, encrypted, not_qcow2]


class ModelWriter:
    """A python-libnbd client writing random blocks through an export from a
    thread, recording every acknowledged write in `model` (a bytearray)."""

    def __init__(self, uri, model, seed, size, pace=0.0):
        import nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.size = size
        self.rnd = random.Random(seed)
        self.pace = pace
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held by pause(): no write in progress
        self.errors = []
        self.writes = 0
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        try:
            while not self.stop.is_set():
                length = self.rnd.choice([512, 4096, 6000, 65536])
                off = self.rnd.randrange(0, self.size - length)
                data = self.rnd.randbytes(length)
                with self.lock:
                    self.h.pwrite(data, off)
                    self.model[off:off + length] = data
                self.writes += 1
                if self.pace:
                    time.sleep(self.pace)
        except Exception as e:  # reported by finish()
            self.errors.append(e)

    def finish(self):
        self.stop.set()
        self.t.join(30)
        assert not self.errors, self.errors

    def read_all(self):
        return b"".join(self.h.pread(min(MiB, self.size - o), o) for o in range(0, self.size, MiB))

    def pause(self):
        """Returns once no write is in progress; none starts until resume()."""
        self.lock.acquire()

    def resume(self):
        self.lock.release()
