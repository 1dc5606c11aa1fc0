"""A small QMP client written for the tests (not QEMU's), plus a fixture-style
helper that starts `blkmirror daemon --qmp PATH` and stops it.

QmpClient speaks the wire directly: it reads the greeting, negotiates, sends
one JSON object per line, and keeps events that arrive between replies so a
test can wait for them.
"""

import json
import os
import socket
import subprocess
import time


class QmpError(Exception):
    def __init__(self, cls, desc):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QmpClient:
    def __init__(self, path, negotiate=True, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.events = []   # events not yet consumed by wait_event
        self.history = []  # every event, in order
        self.next_id = 1
        self.greeting = self.read()
        if negotiate:
            self.cmd("qmp_capabilities")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def read(self):
        """The next message (reply or event) as a dict."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "event" in msg:
            self.history.append(msg)
        return msg

    def reply(self):
        """The next reply; events met on the way are kept."""
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def request(self, name, args=None, id=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        if id is not None:
            req["id"] = id
        self.send_raw((json.dumps(req) + "\n").encode())
        return self.reply()

    def cmd(self, name, **args):
        """Runs a command; returns its value or raises QmpError."""
        args = {k.replace("_", "-"): v for k, v in args.items()}
        rid = self.next_id
        self.next_id += 1
        r = self.request(name, args or None, id=rid)
        assert r.get("id") == rid, r
        if "error" in r:
            raise QmpError(r["error"]["class"], r["error"]["desc"])
        return r["return"]

    def error(self, name, **args):
        """Runs a command that must fail; returns (class, desc)."""
        try:
            self.cmd(name, **args)
        except QmpError as e:
            return e.cls, e.desc
        raise AssertionError(f"{name} {args} succeeded but should have failed")

    def wait_event(self, name, timeout=60, match=None):
        """Waits for an event named `name` (optionally whose data matches the
        dict `match`); returns it. Events before it stay in self.events."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e["event"] == name and all(e["data"].get(k) == v for k, v in (match or {}).items()):
                    self.events.remove(e)
                    return e
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} {match or ''} within {timeout}s; saw {[e['event'] for e in self.events]}")
            self.sock.settimeout(left)
            try:
                msg = self.read()
            finally:
                self.sock.settimeout(30)
            if "event" in msg:
                self.events.append(msg)

    def statuses(self, job_id):
        """The JOB_STATUS_CHANGE statuses seen so far for a job, in order."""
        return [e["data"]["status"] for e in self.history
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]

    def job(self, job_id):
        for j in self.cmd("query-block-jobs"):
            if j["device"] == job_id:
                return j
        return None


class Daemon:
    """A `blkmirror daemon` process with its QMP socket in `workdir`."""

    def __init__(self, binary, workdir, *extra, env=None):
        self.path = os.path.join(str(workdir), "qmp.sock")
        self.log = open(os.path.join(str(workdir), "daemon.log"), "w+")
        self.proc = subprocess.Popen([binary, "daemon", "--qmp", self.path, *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        # The socket file appears at bind(), a moment before listen(): wait until a
        # connection is accepted, not just for the file (a loaded machine widens
        # that moment enough for ECONNREFUSED).
        deadline = time.monotonic() + 30
        while not self._accepting():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError("daemon did not accept connections on its QMP socket")
            time.sleep(0.02)

    def _accepting(self):
        if not os.path.exists(self.path):
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw):
        return QmpClient(self.path, **kw)

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Under the ASan+UBSan build (scripts/test runs these suites with it), a
        # report in the daemon's output fails the test that drove it there.
        out = self.output()
        assert "Sanitizer" not in out and "runtime error" not in out, out
        return self.proc.returncode
