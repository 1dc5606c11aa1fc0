"""Fixtures and helpers shared by every integration test module (one place:
a test module imports constants and helpers from here, and gets the fixtures
without importing them).

The tests run the real `blkmirror` binary (BLKMIRROR_BIN, default
build/release/blkmirror) on real files in a per-test temporary directory and
judge the result with independent tools: `qemu-img compare`, `cmp`,
`qemu-img map` and st_blocks.

Fixtures:
  blkmirror_bin   absolute path of the binary under test
  workdir         a fresh directory for this test's images (pytest tmp_path)
  images          Images: makes dense / sparse / filled images in workdir
  cli             Cli: runs the binary with a timeout (run, mirror, start_mirror)
  check           Check: judges images (assert_identical, data_extents, allocated,
                  digest, snapshot, json_events, describe)
  is_root         whether the tests run as root (permission tests skip then)
  sparse_files_supported   skips a test when the temp file system keeps no holes
  daemon          a `blkmirror daemon` (qmp_client.Daemon) with its QMP socket in workdir
  qmp             a negotiated QmpClient connected to that daemon
  nbd_server, mirror_server, tool_env   from nbd_helpers.py (blkmirror serve / mirror)
  peers           from nbd_peers.py (nbdkit, qemu-nbd)
  ceph            from ceph_helpers.py (a real one-OSD Ceph cluster per session)
  private_ceph    a Ceph cluster of the test's own (for tests that stop its OSD)

Helpers: KiB, MiB; free_port() (a loopback TCP port free right now); wait_for()
(polls a condition, failing early when the process it waits on exits) and
stop_process() (signal, wait, kill on timeout).

xdist: `scripts/test` runs this suite with `pytest -n`. Every test keeps its files in
its own tmp_path, listens on UNIX sockets there or on port 0 / free_port(), and
depends on no other test.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

KiB = 1 << 10
MiB = 1 << 20

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 60  # seconds for one CLI run; every test run is far shorter


# --------------------------------------------------------------------------
# Processes and ports


def free_port():
    """A loopback TCP port that was free a moment ago. Another process (an xdist
    worker) may take it before the caller binds it: callers that start a server on
    it retry with a new port when the bind fails (nbd_peers.Peers does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ready, timeout, what, proc=None, log=lambda: ""):
    """Polls ready() every 20 ms until it returns true. Fails the test after
    `timeout` seconds, or at once when `proc` (a Popen) exits first; `what` names
    the wait and log() adds the process's output to the failure."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with rc={proc.returncode} first: {log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s: {log()}")
        time.sleep(0.02)


def stop_process(proc, sig=signal.SIGTERM, timeout=20):
    """Sends sig to a running process and waits for it; SIGKILLs it when it has not
    exited after `timeout` seconds. Returns its exit status, or None when it had to
    be killed (the caller decides whether that fails the test)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# --------------------------------------------------------------------------
# Binary and tools


@pytest.fixture(scope="session")
def blkmirror_bin():
    path = os.environ.get("BLKMIRROR_BIN") or str(REPO / "build" / "release" / "blkmirror")
    path = os.path.abspath(path)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"blkmirror binary not found or not executable: {path} "
                    "(build it with scripts/build release or set BLKMIRROR_BIN)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _required_tools():
    missing = [t for t in ("qemu-img", "cmp") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"integration tests need these tools on PATH: {', '.join(missing)}")


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


# --------------------------------------------------------------------------
# Images


def _write_random(fd, offset, length):
    chunk = 4 * MiB
    pos = offset
    while pos < offset + length:
        n = min(chunk, offset + length - pos)
        os.pwrite(fd, os.urandom(n), pos)
        pos += n


class Images:
    """Creates test images in one directory. Random data never contains an
    all-zero block, so every written range is "data" for the tools judging."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name) -> Path:
        return self.root / name

    def sparse(self, name, size, extents=()):
        """A file of `size` bytes that is one hole except random data over each
        (offset, length) in `extents`."""
        p = self.path(name)
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            os.ftruncate(fd, size)
            for off, length in extents:
                assert off + length <= size, (off, length, size)
                _write_random(fd, off, length)
        finally:
            os.close(fd)
        return p

    def dense(self, name, size):
        """A file of `size` bytes of random data (fully allocated)."""
        return self.sparse(name, size, [(0, size)] if size else [])

    def zeros(self, name, size):
        """A file of `size` bytes of written (allocated) zeroes."""
        p = self.path(name)
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            buf = bytes(min(size, 4 * MiB))
            pos = 0
            while pos < size:
                n = min(len(buf), size - pos)
                os.pwrite(fd, buf[:n], pos)
                pos += n
        finally:
            os.close(fd)
        return p


@pytest.fixture
def images(workdir):
    return Images(workdir)


@pytest.fixture(scope="session")
def sparse_files_supported(tmp_path_factory):
    """Skips the test unless the temporary directory's file system keeps holes
    and reports them through SEEK_DATA/SEEK_HOLE."""
    p = tmp_path_factory.mktemp("probe") / "sparse"
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(8 * MiB)
        f.write(b"x" * 4096)
    st = os.stat(p)
    fd = os.open(p, os.O_RDONLY)
    try:
        first_data = os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        first_data = 0
    finally:
        os.close(fd)
    if st.st_blocks * 512 > 1 * MiB or first_data == 0:
        pytest.skip("temporary directory does not keep sparse files")


# --------------------------------------------------------------------------
# Running the CLI


class BackgroundRun:
    """A running CLI process whose stdout and stderr lines are collected by
    reader threads, so the test can wait for a line without blocking."""

    def __init__(self, popen):
        self.popen = popen
        self.pid = popen.pid
        self.stdout_lines = []
        self.stderr_lines = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(popen.stdout, self.stdout_lines), daemon=True),
            threading.Thread(target=self._pump, args=(popen.stderr, self.stderr_lines), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink):
        for line in stream:
            with self._cond:
                sink.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, needle, timeout, stream="stderr"):
        """Waits until a line of `stream` contains `needle`; fails the test
        after `timeout` seconds or when the process exits first."""
        sink = self.stderr_lines if stream == "stderr" else self.stdout_lines
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in sink:
                    if needle in line:
                        return line
                if self.popen.poll() is not None and not any(t.is_alive() for t in self._threads):
                    pytest.fail(f"blkmirror exited (rc={self.popen.returncode}) before printing "
                                f"{needle!r} on {stream}: stdout={self.stdout_lines!r} "
                                f"stderr={self.stderr_lines!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {stream} line containing {needle!r} within {timeout}s: "
                                f"{sink!r}")
                self._cond.wait(min(left, 0.05))

    def send_signal(self, sig):
        self.popen.send_signal(sig)

    def finish(self, timeout):
        """Waits for exit; returns a CompletedProcess with the collected output."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"blkmirror (pid {self.pid}) did not exit within {timeout}s; "
                        f"stderr: {''.join(self.stderr_lines)!r}")
        for t in self._threads:
            t.join(10)
        return subprocess.CompletedProcess(self.popen.args, rc, "".join(self.stdout_lines),
                                           "".join(self.stderr_lines))

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class Cli:
    def __init__(self, binary, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self._procs = []

    def _env(self, env):
        e = dict(os.environ)
        e.pop("BLKMIRROR_INJECT_FAULTS", None)
        if env:
            e.update(env)
        return e

    def run(self, *args, env=None, timeout=DEFAULT_TIMEOUT):
        """Runs `blkmirror ARGS...`; returns the CompletedProcess (text mode)."""
        cmd = [self.binary, *map(str, args)]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=self._env(env), cwd=self.workdir, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{' '.join(cmd)} did not finish within {timeout}s; "
                        f"stderr so far: {e.stderr!r}")

    def mirror(self, src, dst, *opts, env=None, timeout=DEFAULT_TIMEOUT):
        return self.run("mirror", src, dst, *opts, env=env, timeout=timeout)

    def start_mirror(self, src, dst, *opts, env=None):
        """Starts `blkmirror mirror` in the background and returns a
        BackgroundRun; it is killed at the end of the test if still running."""
        return self.start("mirror", src, dst, *opts, env=env)

    def start(self, *args, env=None):
        """Starts `blkmirror ARGS...` in the background (see start_mirror)."""
        cmd = [self.binary, *map(str, args)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self._env(env), cwd=self.workdir, stdin=subprocess.DEVNULL)
        run = BackgroundRun(p)
        self._procs.append(run)
        return run

    def cleanup(self):
        for run in self._procs:
            run.kill()


@pytest.fixture
def cli(blkmirror_bin, workdir):
    c = Cli(blkmirror_bin, workdir)
    yield c
    c.cleanup()


# --------------------------------------------------------------------------
# Judging images


class Check:
    @staticmethod
    def describe(res):
        """Text for assertion messages about one CLI run."""
        return f"rc={res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"

    @staticmethod
    def qemu_img_compare(a, b):
        """`qemu-img compare -U -f raw -F raw A B` -> (returncode, output).
        -U (force-share): a judge reads images a live blkmirror still holds
        (and image-locks, as QEMU does)."""
        r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(a), str(b)],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, (r.stdout + r.stderr).strip()

    @staticmethod
    def cmp(a, b):
        """`cmp A B` -> (returncode, output); 0 means byte-for-byte equal."""
        r = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True, timeout=120)
        return r.returncode, (r.stdout + r.stderr).strip()

    @classmethod
    def assert_identical(cls, a, b):
        """Asserts A and B have the same size and contents, by both tools."""
        assert os.path.getsize(a) == os.path.getsize(b), \
            f"sizes differ: {a}={os.path.getsize(a)} {b}={os.path.getsize(b)}"
        rc, out = cls.qemu_img_compare(a, b)
        assert rc == 0 and "Images are identical" in out, f"qemu-img compare: rc={rc} {out}"
        rc, out = cls.cmp(a, b)
        assert rc == 0, f"cmp: rc={rc} {out}"

    @staticmethod
    def data_extents(path):
        """Ranges reported as data by `qemu-img map`, adjacent ones merged:
        [(start, length), ...]."""
        out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "raw", str(path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        merged = []
        for e in json.loads(out):
            if not e.get("data"):
                continue
            if merged and merged[-1][0] + merged[-1][1] == e["start"]:
                merged[-1] = (merged[-1][0], merged[-1][1] + e["length"])
            else:
                merged.append((e["start"], e["length"]))
        return merged

    @staticmethod
    def allocated(path):
        """Bytes allocated on disk (du): st_blocks * 512."""
        return os.stat(path).st_blocks * 512

    @staticmethod
    def digest(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        return h.hexdigest()

    @staticmethod
    def is_all_zero(path):
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                if chunk.count(0) != len(chunk):
                    return False
        return True

    @staticmethod
    def snapshot(path):
        """What "unchanged" means for a path: its kind, size and content hash
        (or its listing for a directory); None when it does not exist."""
        p = Path(path)
        if not os.path.lexists(p):
            return None
        if p.is_symlink():
            return ("symlink", os.readlink(p))
        if p.is_dir():
            return ("dir", sorted(os.listdir(p)))
        st = p.stat()
        return ("file", st.st_size, Check.digest(p))

    @staticmethod
    def json_events(stdout):
        """Parses --json output: every non-empty line must be one JSON object
        with "event" and "data"."""
        events = []
        for n, line in enumerate(stdout.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AssertionError(f"stdout line {n} is not JSON ({e}): {line!r}") from None
            assert isinstance(obj, dict) and set(obj) >= {"event", "data"}, \
                f"stdout line {n} lacks event/data: {line!r}"
            assert isinstance(obj["event"], str) and isinstance(obj["data"], dict), line
            events.append(obj)
        return events


@pytest.fixture
def check():
    return Check


# --------------------------------------------------------------------------
# Misc


@pytest.fixture(scope="session")
def is_root():
    return os.geteuid() == 0


# --------------------------------------------------------------------------
# The daemon and its QMP socket


@pytest.fixture
def daemon(blkmirror_bin, workdir):
    """`blkmirror daemon --qmp workdir/qmp.sock`, stopped after the test."""
    d = Daemon(blkmirror_bin, workdir)
    yield d
    d.stop()


@pytest.fixture
def qmp(daemon):
    """A client of the daemon fixture, past qmp_capabilities."""
    with daemon.client() as c:
        yield c


# Fixtures defined beside their helpers, registered here for every module. (Imported
# last: those modules import KiB/MiB and the helpers above from this one.)
from qmp_client import Daemon  # noqa: E402
from nbd_helpers import mirror_server, nbd_server, tool_env  # noqa: E402,F401
from nbd_peers import peers  # noqa: E402,F401
from ceph_helpers import ceph, private_ceph  # noqa: E402,F401
