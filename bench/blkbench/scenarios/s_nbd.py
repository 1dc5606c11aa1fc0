"""A remote NBD target: nbdkit's memory plugin, and the same behind a 5 ms
delay filter (how many requests in flight the latency needs)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from typing import Callable

from ..core import Contestant, Ctx, Measure, Table, Variant, failed_runs, median_of, run_rotation
from ..peers import blkmirror_argv, parse_blkmirror_stderr
from ..procs import RunFailed, check_proc, run_timed
from ..util import MiB, fmt_ratio, fmt_s, fmt_size, make_dense, parse_size, remove


class NbdkitTarget:
    """A fresh nbdkit memory export per run (empty, sparse), on a UNIX socket."""

    def __init__(self, workdir: str, size: int, filters: list[str]):
        self.sock = os.path.join(workdir, "nbdkit.sock")
        remove(self.sock)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", self.sock,
                                      *filters], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"nbdkit {' '.join(filters)} did not start")
            time.sleep(0.01)

    def verify(self, src: str, who: str) -> None:
        # Another client reads the export back; cmp against the source.
        r = subprocess.run(f"nbdcopy {shlex.quote(self.uri)} - | cmp - {shlex.quote(src)}",
                           shell=True, capture_output=True, text=True)
        if r.returncode != 0:
            raise RunFailed(f"VERIFY MISMATCH after {who}: {(r.stdout + r.stderr).strip()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        remove(self.sock)


def nbd_target_contestant(key: str, label: str, filters: Callable[[int], list[str]],
                          argv: Callable[[Ctx, str, str], list[str]]) -> Contestant:
    def run(ctx: Ctx, v: Variant) -> Measure:
        t = NbdkitTarget(v.workdir, v.size, filters(v.size))
        try:
            cmd = argv(ctx, v.src, t.uri)
            p = run_timed(cmd)
            check_proc(label, cmd, p)
            info = parse_blkmirror_stderr(p.err) if key.startswith("blkmirror") else {}
            info["cpu"] = p.utime + p.stime
            t.verify(v.src, label)
            return Measure({"": p.wall}, rss_kib=p.maxrss_kib, info=info)
        finally:
            t.close()

    return Contestant(key, label, run)


def scenario_nbd(ctx: Ctx) -> list[Table]:
    a = ctx.args
    if not shutil.which("nbdkit") or not ctx.have.get("nbdcopy"):
        ctx.notes.append("scenario nbd: skipped (needs nbdkit and nbdcopy)")
        return []
    base = "/dev/shm" if os.path.isdir("/dev/shm") else a.dir
    workdir = tempfile.mkdtemp(prefix="snbd-", dir=base)
    tables = []
    try:
        size = a.nbd_size
        src = os.path.join(workdir, "src.img")
        make_dense(src, size, a.seed)
        mem = lambda n: ["memory", str(n)]  # noqa: E731
        bm = lambda ctx, s, d: blkmirror_argv(ctx, s, d)  # noqa: E731
        nc = lambda ctx, s, d: ["nbdcopy", s, d]  # noqa: E731
        v = Variant("memory", workdir, False, src, size)
        res = run_rotation(ctx, "nbd", v, [
            nbd_target_contestant("blkmirror", "blkmirror mirror", mem, bm),
            nbd_target_contestant("nbdcopy", "nbdcopy", mem, nc)])
        tb, tn = median_of(res["blkmirror"]), median_of(res["nbdcopy"])
        rows = [["blkmirror mirror" + failed_runs(res["blkmirror"]), fmt_s(tb),
                 fmt_size(size / tb) + "/s" if tb else "-", "1.00x"],
                ["nbdcopy" + failed_runs(res["nbdcopy"]), fmt_s(tn),
                 fmt_size(size / tn) + "/s" if tn else "-",
                 fmt_ratio(tn / tb if tn and tb else None)]]
        tables.append(Table(f"nbd: {fmt_size(size)} dense (/dev/shm) to an nbdkit memory export "
                            "over a UNIX socket", ["contestant", "median s", "throughput",
                                                   "peer / blkmirror"], rows,
                            ["target: nbdkit memory (multi-conn), fresh per run; verified by "
                             "reading it back with nbdcopy and cmp"]))

        # Pipelining over a slow link: every write waits 5 ms in the server.
        # With Q requests of R bytes in flight the link carries at most Q*R/5ms.
        dsize = a.nbd_delay_size
        dsrc = os.path.join(workdir, "dsrc.img")
        make_dense(dsrc, dsize, a.seed + 1)
        rows = []
        for buf_mib in (2, 8):
            q = buf_mib  # 1 MiB operations: buf-size / 1 MiB in flight
            link = q * MiB / 0.005
            dv = Variant(f"delay-q{q}", workdir, False, dsrc, dsize)
            delayed = lambda n: ["--filter=delay", "memory", str(n), "delay-write=5ms"]  # noqa: E731
            argv = (lambda b: lambda ctx, s, d: blkmirror_argv(ctx, s, d) + ["--buf-size", f"{b}M"])(buf_mib)
            ncargv = (lambda q: lambda ctx, s, d: [
                "nbdcopy", "--connections=1", f"--requests={q}", "--request-size=1048576", s, d])(q)
            r = run_rotation(ctx, "nbd", dv, [
                nbd_target_contestant("blkmirror", f"blkmirror --buf-size {buf_mib}M", delayed, argv),
                nbd_target_contestant("nbdcopy", f"nbdcopy --requests={q}", delayed, ncargv)])
            for key, label in (("blkmirror", f"blkmirror --buf-size {buf_mib}M"),
                               ("nbdcopy", f"nbdcopy --connections=1 --requests={q} --request-size=1M")):
                t = median_of(r[key])
                rate = dsize / t if t else None
                rows.append([f"{label} (queue depth {q} x 1 MiB)" + failed_runs(r[key]), fmt_s(t),
                             fmt_size(rate) + "/s" if rate else "-", fmt_size(link) + "/s",
                             f"{rate / link:.2f}x" if rate else "-"])
        tables.append(Table(f"nbd: {fmt_size(dsize)} to nbdkit memory behind the delay filter "
                            "(5 ms per write)", ["contestant", "median s", "throughput",
                                                 "link limit (Q x R / 5 ms)", "of the limit"], rows,
                            ["target >= 0.8x of the limit: pipelining keeps Q requests in flight"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return tables


KEY = "nbd"
TITLE = "remote target: nbdkit memory, and behind a 5 ms delay filter"
run = scenario_nbd


def add_arguments(g) -> None:
    g.add_argument("--nbd-size", type=parse_size, default=1 << 30,
                   help="data size for the memory target (default 1G)")
    g.add_argument("--nbd-delay-size", type=parse_size, default=256 << 20,
                   help="data size behind the delay filter (default 256M)")


def resolve_arguments(a) -> str | None:
    return None
