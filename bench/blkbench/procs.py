"""Child processes: one-shot commands timed with their CPU and peak RSS
(run_timed), and long-running servers in their own session (Child)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .util import RUN_TIMEOUT, remove


@dataclass
class Proc:
    wall: float
    rc: int
    maxrss_kib: int
    utime: float
    stime: float
    out: str
    err: str
    timed_out: bool = False


TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


class Spawned:
    """A child process whose peak RSS is measured right. wait4()'s ru_maxrss
    is no good when the child is forked from this (fat) Python process: Linux
    keeps the pre-exec high-water mark. So the command runs under GNU time
    (`-f %M`), itself small; without it, a thread polls /proc/PID/status VmHWM
    every 20 ms."""

    def __init__(self, cmd: list[str], stdout, stderr):
        self.rss_file = None
        if TIME_BIN:
            fd, self.rss_file = tempfile.mkstemp(prefix="bench-rss-")
            os.close(fd)
            cmd = [TIME_BIN, "-f", "%M", "-o", self.rss_file] + cmd
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                  start_new_session=True)
        self.hwm_kib = 0
        self.reaped = False
        self.timed_out = False
        if not TIME_BIN:
            threading.Thread(target=self._poll_hwm, daemon=True).start()

    def _poll_hwm(self) -> None:
        path = f"/proc/{self.p.pid}/status"
        while not self.reaped:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.hwm_kib = max(self.hwm_kib, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    def poll(self) -> bool:
        """True while running (does not reap)."""
        try:
            return os.waitid(os.P_PID, self.p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, timeout: float) -> tuple[int, float, float, int]:
        """Waits (killing the process group after timeout). Returns exit code,
        user and system CPU seconds, peak RSS in KiB."""
        def on_timeout():
            self.timed_out = True
            self.kill()

        watchdog = threading.Timer(timeout, on_timeout)
        watchdog.start()
        try:
            _, status, ru = os.wait4(self.p.pid, 0)
        finally:
            watchdog.cancel()
        self.reaped = True
        self.p.returncode = rc = os.waitstatus_to_exitcode(status)
        rss = self.hwm_kib
        if self.rss_file:
            try:
                with open(self.rss_file) as f:
                    lines = [x for x in f.read().split() if x.isdigit()]
                rss = int(lines[-1]) if lines else 0
            finally:
                os.unlink(self.rss_file)
        return rc, ru.ru_utime, ru.ru_stime, rss

    def abandon(self) -> None:
        if not self.reaped:
            self.kill()
            try:
                os.waitpid(self.p.pid, 0)
            except ChildProcessError:
                pass
            self.reaped = True
            if self.rss_file:
                remove(self.rss_file)


def run_timed(cmd: list[str], timeout: float = RUN_TIMEOUT) -> Proc:
    """Runs cmd; wall time from just before spawn to reaping."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        sp = Spawned(cmd, fo, fe)
        try:
            rc, ut, st, rss = sp.reap(timeout)
        finally:
            sp.abandon()
        wall = time.monotonic() - sp.t0
        fo.seek(0)
        fe.seek(0)
        return Proc(wall, rc, rss, ut, st, fo.read().decode(errors="replace"),
                    fe.read().decode(errors="replace"), sp.timed_out)


class RunFailed(Exception):
    pass


def check_proc(name: str, cmd: list[str], p: Proc) -> None:
    if p.timed_out:
        raise RunFailed(f"{name}: timed out after {RUN_TIMEOUT:.0f}s: {shlex.join(cmd)}")
    if p.rc != 0:
        tail = (p.err.strip() or p.out.strip())[-800:]
        raise RunFailed(f"{name}: exit {p.rc}: {shlex.join(cmd)}\n{tail}")


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILLs a still-running child's process group and reaps it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()


def file_tail(f, n: int = 800) -> str:
    """The last n bytes of a file a child may still write to (pread: the
    shared file offset stays where the child's writes expect it)."""
    size = os.fstat(f.fileno()).st_size
    return os.pread(f.fileno(), n, max(0, size - n)).decode(errors="replace").strip()


class Child:
    """A server child (blkmirror serve / mirror, qemu-storage-daemon) in its own
    session, signalled by pid: not under GNU time, which would die of SIGUSR1
    and leave the server running. stderr goes to a file; with json_stdout a
    thread reads stdout and stamps each JSON line with its arrival time
    (blkmirror's events carry no time of their own)."""

    def __init__(self, name: str, cmd: list[str], cwd: str, json_stdout: bool = False):
        self.name = name
        self.cmd = cmd
        self.errf = tempfile.TemporaryFile()
        self.events: list[tuple[float, dict]] = []
        self.cv = threading.Condition()
        self.eof = not json_stdout
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE if json_stdout else self.errf,
                                  stderr=self.errf, cwd=cwd, start_new_session=True)
        self.reader = None
        if json_stdout:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self) -> None:
        try:
            for raw in self.p.stdout:
                t = time.monotonic()
                try:
                    ev = json.loads(raw)
                except ValueError:
                    ev = {"event": "TEXT", "data": {"message": raw.decode(errors="replace").rstrip()}}
                with self.cv:
                    self.events.append((t, ev))
                    self.cv.notify_all()
        finally:
            with self.cv:
                self.eof = True
                self.cv.notify_all()

    def tail(self) -> str:
        return file_tail(self.errf)

    def alive(self) -> bool:
        return self.p.poll() is None

    def exited(self, what: str) -> RunFailed:
        try:
            rc = self.p.wait(10)
        except subprocess.TimeoutExpired:
            rc = "?"
        return RunFailed(f"{self.name} exited ({rc}) before {what}: {shlex.join(self.cmd)}\n"
                         f"{self.tail()}")

    def wait_event(self, pred: Callable[[dict], bool], timeout: float,
                   what: str) -> tuple[float, dict]:
        """The first stdout event (ever) matching pred, with its arrival time."""
        deadline = time.monotonic() + timeout
        with self.cv:
            i = 0
            while True:
                while i < len(self.events):
                    t, ev = self.events[i]
                    i += 1
                    if pred(ev):
                        return t, ev
                if self.eof:
                    raise self.exited(what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunFailed(f"{self.name}: no {what} after {timeout:.0f} s")
                self.cv.wait(min(left, 0.5))

    def wait_stderr(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in os.pread(self.errf.fileno(), 1 << 16, 0).decode(errors="replace"):
            if not self.alive():
                raise self.exited(f"printing {text!r}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{self.name}: no {text!r} on stderr after {timeout:.0f} s")
            time.sleep(0.005)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def stop(self, sig: int, timeout: float) -> int:
        """Sends sig, waits for the exit; returns the exit code."""
        self.signal(sig)
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RunFailed(f"{self.name} still running {timeout:.0f} s after "
                            f"{signal.Signals(sig).name}: {self.tail()}")
        if self.reader:
            self.reader.join(5)
        return rc

    def kill(self) -> None:
        kill_group(self.p)

    def close(self) -> None:
        self.kill()
        if self.reader:
            self.reader.join(5)
        if self.p.stdout:
            self.p.stdout.close()
        self.errf.close()
