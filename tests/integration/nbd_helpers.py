"""Helpers and fixtures for the NBD integration tests (test_nbd_*.py).

Everything here talks to a real `blkmirror serve` / `blkmirror mirror
--socket` process through a UNIX socket in the test's temporary directory:

  NbdServer        one running `blkmirror serve` (started by the `nbd_server`
                   fixture factory; killed at teardown if a test left it running)
  MirrorServer     one running `blkmirror mirror ... --socket` with its --json
                   events collected by a reader thread
  RawNbd           a tiny NBD client on a raw socket, for malformed input
  connect()        a libnbd handle (the `nbd` Python module); servers are
                   waited for (greeting received) before a fixture returns them
  file_layout()    the data ranges of a file by SEEK_DATA / SEEK_HOLE
  tool_env()       an environment in which `nbdsh` runs this Python (which has
                   the `nbd` module) instead of the first python3 on PATH

conftest.py registers the fixtures for every test module.
"""

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbd
import pytest

from conftest import KiB, stop_process, wait_for

START_TIMEOUT = 15   # seconds for a server to accept connections
STOP_TIMEOUT = 20    # seconds for a server to exit after SIGTERM
IO_TIMEOUT = 10      # seconds for one raw-socket receive

# --------------------------------------------------------------------------
# Protocol constants (NBD protocol document, "newstyle" negotiation)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_REQ_ONE = 8
CMD_FLAG_FAST_ZERO = 16

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

STATE_HOLE = 1
STATE_ZERO = 2


def uri_for(sock, name=""):
    return f"nbd+unix:///{name}?socket={sock}"


# --------------------------------------------------------------------------
# Files


def file_layout(path):
    """[(start, length)] of the data ranges of `path`, by SEEK_DATA/SEEK_HOLE
    (merged; everything else is a hole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
            pos = end
        return out
    finally:
        os.close(fd)


def read_file(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def make_sparse(path, size, extents, rnd):
    """A file of `size` bytes: random data over each (offset, length), holes
    elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            data = rnd.randbytes(length)
            f.seek(off)
            f.write(data)
    return Path(path)


# --------------------------------------------------------------------------
# Processes


def _greets(sock_path):
    """Whether an NBD server greets on the UNIX socket (a real greeting proves
    the server is behind it)."""
    if not os.path.exists(sock_path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(sock_path))
        hdr = b""
        while len(hdr) < 18:
            chunk = s.recv(18 - len(hdr))
            if not chunk:
                break
            hdr += chunk
        return len(hdr) == 18 and struct.unpack(">QQH", hdr)[:2] == (NBDMAGIC, IHAVEOPT)
    except OSError:
        return False
    finally:
        s.close()


def _wait_connectable(sock_path, proc, what, log):
    wait_for(lambda: _greets(sock_path), START_TIMEOUT,
             f"{what} accepting NBD connections on {sock_path}", proc, log)


class NbdServer:
    """A running `blkmirror serve IMAGE --socket SOCK`."""

    def __init__(self, binary, image, sock, args, logdir, preexec_fn=None):
        self.image = Path(image)
        self.sock = str(sock)
        self.name = ""
        if "--name" in args:
            self.name = args[args.index("--name") + 1]
        self.uri = uri_for(self.sock, self.name)
        self.stderr_path = Path(logdir) / f"serve-{os.path.basename(self.sock)}.stderr"
        self._err = open(self.stderr_path, "w+b")
        self.cmd = [binary, "serve", str(image), "--socket", self.sock, *map(str, args)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=self._err, preexec_fn=preexec_fn)
        _wait_connectable(self.sock, self.proc, "blkmirror serve", self.log)

    def log(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def assert_alive(self):
        assert self.alive(), f"blkmirror serve died (rc={self.proc.returncode}): {self.log()}"

    def stop(self, sig=signal.SIGTERM):
        """Signals the server and asserts it exits 0 in time; returns stderr."""
        self.assert_alive()
        rc = stop_process(self.proc, sig, STOP_TIMEOUT)
        if rc is None:
            self.kill()
            pytest.fail(f"blkmirror serve did not exit within {STOP_TIMEOUT}s of {sig!r}: "
                        f"{self.log()}")
        assert rc == 0, f"blkmirror serve exited {rc} after {sig!r}: {self.log()}"
        return self.log()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._err.close()


@pytest.fixture
def nbd_server(blkmirror_bin, tmp_path):
    """Factory: nbd_server(image, *args, sock=None, preexec_fn=None) -> NbdServer
    (preexec_fn runs in the child before exec: lower a resource limit, say)."""
    started = []
    count = [0]

    def start(image, *args, sock=None, preexec_fn=None):
        count[0] += 1
        if sock is None:
            sock = tmp_path / f"nbd{count[0]}.sock"
        srv = NbdServer(blkmirror_bin, image, sock, list(args), tmp_path, preexec_fn)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()


class MirrorServer:
    """A running `blkmirror mirror SRC DST ... --socket SOCK --json`; a thread
    collects stdout events with their arrival time (time.monotonic())."""

    def __init__(self, binary, src, dst, sock, args, logdir):
        self.sock = str(sock)
        self.uri = uri_for(self.sock)
        self.stderr_path = Path(logdir) / "mirror.stderr"
        self._err = open(self.stderr_path, "w+b")
        self.cmd = [binary, "mirror", str(src), str(dst), "--socket", self.sock, "--json",
                    *map(str, args)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True)
        self.events = []  # (monotonic time, event dict)
        self.bad_lines = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        _wait_connectable(self.sock, self.proc, "blkmirror mirror", self.log)

    def _pump(self):
        for line in self.proc.stdout:
            t = time.monotonic()
            with self._cond:
                if line.strip():
                    try:
                        ev = json.loads(line)
                    except json.JSONDecodeError:
                        self.bad_lines.append(line)
                    else:
                        self.events.append((t, ev))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log(self):
        try:
            err = self.stderr_path.read_text(errors="replace")
        except OSError:
            err = ""
        with self._cond:
            evs = [e for _, e in self.events]
        return f"events={evs!r} bad_lines={self.bad_lines!r} stderr={err!r}"

    def event_time(self, name):
        with self._cond:
            for t, ev in self.events:
                if ev.get("event") == name:
                    return t
        return None

    def wait_event(self, name, timeout, message=None):
        """Waits for the first event named `name` (whose data.message contains
        `message`, if given); returns its arrival time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, ev in self.events:
                    if ev.get("event") == name and (
                            message is None or message in str(ev.get("data", {}).get("message"))):
                        return t
                if self._eof:
                    pytest.fail(f"blkmirror mirror ended stdout (rc={self.proc.poll()}) "
                                f"without {name}: {self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {name} event ({message!r}) within {timeout}s: {self.log()}")
                self._cond.wait(min(left, 0.1))

    def names(self):
        with self._cond:
            return [ev.get("event") for _, ev in self.events]

    def stop(self, sig=signal.SIGTERM):
        assert self.proc.poll() is None, \
            f"blkmirror mirror died early (rc={self.proc.returncode}): {self.log()}"
        rc = stop_process(self.proc, sig, STOP_TIMEOUT)
        if rc is None:
            self.kill()
            pytest.fail(f"blkmirror mirror did not exit within {STOP_TIMEOUT}s: {self.log()}")
        self._reader.join(10)
        assert rc == 0, f"blkmirror mirror exited {rc}: {self.log()}"
        assert not self.bad_lines, f"non-JSON stdout lines: {self.bad_lines!r}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._err.close()


@pytest.fixture
def mirror_server(blkmirror_bin, tmp_path):
    """Factory: mirror_server(src, dst, *args) -> MirrorServer (socket in tmp_path)."""
    started = []

    def start(src, dst, *args):
        m = MirrorServer(blkmirror_bin, src, dst, tmp_path / "mirror.sock", list(args), tmp_path)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill()


# --------------------------------------------------------------------------
# libnbd


def connect(uri, structured=True, strict=True):
    """A connected libnbd handle (with base:allocation requested)."""
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def assert_serves(srv, offset=0, length=64 * KiB):
    """The server process is alive and a fresh connection reads what the
    image file holds."""
    srv.assert_alive()
    h = connect(srv.uri)
    try:
        got = h.pread(length, offset)
    finally:
        h.shutdown()
    assert got == read_file(srv.image, offset, length), "fresh connection read wrong data"
    srv.assert_alive()


@pytest.fixture(scope="session")
def tool_env(tmp_path_factory):
    """Environment for running nbdsh: `python3` on PATH is this interpreter
    (nbdsh runs `python3 -m nbd`)."""
    d = tmp_path_factory.mktemp("pybin")
    os.symlink(sys.executable, d / "python3")
    env = dict(os.environ)
    env["PATH"] = f"{d}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def run_tool(cmd, timeout=60, env=None, check=True, cwd=None):
    """Runs an external client; fails the test with its output on error.
    Give `cwd` (a temporary directory) for tools that drop files there (fio)."""
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {timeout}s: "
                    f"stdout={e.stdout!r} stderr={e.stderr!r}")
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed rc={r.returncode}\n"
                    f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


# --------------------------------------------------------------------------
# A raw NBD client


class Closed(Exception):
    """The server closed the connection."""


class Reply:
    def __init__(self, cookie, error, data=b"", chunks=(), structured=False):
        self.cookie = cookie
        self.error = error
        self.data = data
        self.chunks = list(chunks)  # structured: [(type, flags, payload)]
        self.structured = structured

    def __repr__(self):
        return (f"Reply(cookie={self.cookie}, error={self.error}, len={len(self.data)}, "
                f"chunks={[(t, f, len(p)) for t, f, p in self.chunks]})")


class RawNbd:
    """NBD client on a plain socket: every byte is under the test's control."""

    def __init__(self, sock_path, timeout=IO_TIMEOUT):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(str(sock_path))
        self.pending = {}  # cookie -> (type, offset, length)
        self.structured = False
        self.next_cookie = 1
        self.size = None
        self.tflags = None

    # --- bytes
    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.s.recv(n - len(buf))
            except ConnectionResetError:
                raise Closed(f"connection reset after {len(buf)}/{n} bytes") from None
            if not chunk:
                raise Closed(f"EOF after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self, timeout=IO_TIMEOUT):
        """True when the server closes the connection within `timeout`
        (anything it still sends first is discarded); False if it stays open."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    # --- handshake
    def read_greeting(self):
        magic, opts, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opts == IHAVEOPT, hex(opts)
        return flags

    def send_client_flags(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.send(struct.pack(">I", flags))

    def start(self):
        """Greeting + client flags; returns the server's handshake flags."""
        flags = self.read_greeting()
        assert flags & FLAG_FIXED_NEWSTYLE, f"server flags {flags:#x} lack FIXED_NEWSTYLE"
        self.send_client_flags()
        return flags

    def send_option(self, opt, data=b"", magic=IHAVEOPT, length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def read_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return opt, rtype, self.recv_exact(length)

    def option(self, opt, data=b""):
        """Sends an option and collects replies up to the final one (ACK or an
        error): returns (final_type, [(type, data) of every reply])."""
        self.send_option(opt, data)
        replies = []
        while True:
            ropt, rtype, rdata = self.read_option_reply()
            assert ropt == opt, f"reply for option {ropt}, expected {opt}"
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & (1 << 31):
                return rtype, replies

    @staticmethod
    def go_data(name="", infos=()):
        nb = name.encode()
        return struct.pack(">I", len(nb)) + nb + struct.pack(">H", len(infos)) + \
            b"".join(struct.pack(">H", i) for i in infos)

    def go(self, name="", infos=(), opt=OPT_GO):
        """NBD_OPT_GO (or INFO); returns (final_type, replies) and on success
        remembers the export size and transmission flags."""
        final, replies = self.option(opt, self.go_data(name, infos))
        if final == REP_ACK:
            for rtype, rdata in replies:
                if rtype == REP_INFO and struct.unpack(">H", rdata[:2])[0] == INFO_EXPORT:
                    _, self.size, self.tflags = struct.unpack(">HQH", rdata)
        return final, replies

    def handshake(self, name="", structured=False):
        self.start()
        if structured:
            final, _ = self.option(OPT_STRUCTURED_REPLY)
            assert final == REP_ACK, final
            self.structured = True
        final, replies = self.go(name)
        assert final == REP_ACK, f"NBD_OPT_GO failed: {final:#x} {replies!r}"
        assert self.size is not None, "no NBD_INFO_EXPORT in NBD_OPT_GO replies"
        return self

    # --- transmission
    def request(self, cmd, offset=0, length=0, flags=0, payload=b"", cookie=None,
                magic=REQUEST_MAGIC):
        if cookie is None:
            cookie = self.next_cookie
            self.next_cookie += 1
        self.pending[cookie] = (cmd, offset, length)
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def read_reply(self):
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            assert cookie in self.pending, f"reply for unknown cookie {cookie}"
            cmd, _, length = self.pending.pop(cookie)
            data = b""
            if cmd == CMD_READ and error == 0:
                data = self.recv_exact(length)
            return Reply(cookie, error, data)
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert self.structured, "structured reply without NBD_OPT_STRUCTURED_REPLY"
        chunks = []
        error = 0
        cookie = None
        buf = None
        while True:
            if chunks:
                m = struct.unpack(">I", self.recv_exact(4))[0]
                assert m == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {m:#x}"
            flags, rtype, ck, length = struct.unpack(">HHQI", self.recv_exact(16))
            if cookie is None:
                cookie = ck
                assert cookie in self.pending, f"reply for unknown cookie {cookie}"
                cmd, req_off, req_len = self.pending[cookie]
                if cmd == CMD_READ:
                    buf = bytearray(req_len)
            assert ck == cookie, "chunks of two replies interleaved (test client reads one)"
            payload = self.recv_exact(length)
            chunks.append((rtype, flags, payload))
            if rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
                error = struct.unpack(">I", payload[:4])[0]
            elif rtype == REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", payload[:8])[0]
                rel = off - req_off
                assert 0 <= rel and rel + length - 8 <= req_len, \
                    f"data chunk at {off}+{length - 8} outside read {req_off}+{req_len}"
                buf[rel:rel + length - 8] = payload[8:]
            elif rtype == REPLY_TYPE_OFFSET_HOLE:
                off, hl = struct.unpack(">QI", payload)
                assert req_off <= off and off + hl <= req_off + req_len, \
                    f"hole chunk at {off}+{hl} outside read {req_off}+{req_len}"
            if flags & REPLY_FLAG_DONE:
                break
        self.pending.pop(cookie)
        data = bytes(buf) if (buf is not None and error == 0) else b""
        return Reply(cookie, error, data, chunks, structured=True)

    def cmd(self, cmd, offset=0, length=0, flags=0, payload=b""):
        """One request and its reply (nothing else outstanding)."""
        cookie = self.request(cmd, offset, length, flags, payload)
        r = self.read_reply()
        assert r.cookie == cookie, f"reply cookie {r.cookie} for request {cookie}"
        return r

    def read(self, offset, length, flags=0):
        return self.cmd(CMD_READ, offset, length, flags)

    def write(self, offset, data, flags=0, length=None):
        return self.cmd(CMD_WRITE, offset, len(data) if length is None else length, flags, data)

    def disconnect(self):
        self.request(CMD_DISC)
        self.pending.clear()
