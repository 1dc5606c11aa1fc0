"""A remote NBD target: nbdkit's memory plugin, and the same behind the delay
filter (how many requests in flight the latency needs, and whether blkmirror
finds that depth itself)."""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable

from ..core import Contestant, Ctx, Measure, Table, Variant, failed_runs, median_of, run_rotation
from ..peers import blkmirror_argv, parse_blkmirror_stderr
from ..procs import RunFailed, check_proc, run_timed
from ..util import KiB, MiB, fmt_ratio, fmt_s, fmt_size, make_dense, parse_size, remove


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


# nbdkit's memory plugin with its default sparse allocator serializes every
# request on one lock and spent 5.6 ms of CPU per MiB written here (1.4-1.5 s
# for 256 MiB, nbdcopy --requests=16), capping any client near 180 MiB/s on one
# core whatever the queue depth or delay; allocator=malloc (one flat array,
# parallel) spent 0.19 s for the same copy. The sparse allocator made the
# server the limit, so neither "Q x R / latency" nor a client comparison meant
# anything.
def memory_target(n: int) -> list[str]:
    return ["memory", str(n), "allocator=malloc"]


def delayed_target(ms: int) -> Callable[[int], list[str]]:
    return lambda n: ["--filter=delay", *memory_target(n), f"delay-write={ms}ms"]


# nbdkit serves at most --threads (default 16) requests per connection at once;
# more wait unread in the socket, so they add nothing against the delay.
NBDKIT_THREADS = 16


def served(in_flight: int, request: int, connections: int) -> int:
    """Bytes in flight the server actually works on."""
    return min(in_flight, connections * NBDKIT_THREADS * request)


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
        bm = lambda ctx, s, d: blkmirror_argv(ctx, s, d)  # noqa: E731
        nc = lambda ctx, s, d: ["nbdcopy", s, d]  # noqa: E731
        v = Variant("memory", workdir, False, src, size)
        res = run_rotation(ctx, "nbd", v, [
            nbd_target_contestant("blkmirror", "blkmirror mirror", memory_target, bm),
            nbd_target_contestant("nbdcopy", "nbdcopy", memory_target, nc)])
        tb, tn = median_of(res["blkmirror"]), median_of(res["nbdcopy"])
        rows = [["blkmirror mirror" + failed_runs(res["blkmirror"]), fmt_s(tb),
                 fmt_size(size / tb) + "/s" if tb else "-", "1.00x"],
                ["nbdcopy" + failed_runs(res["nbdcopy"]), fmt_s(tn),
                 fmt_size(size / tn) + "/s" if tn else "-",
                 fmt_ratio(tn / tb if tn and tb else None)]]
        tables.append(Table(f"nbd: {fmt_size(size)} dense (/dev/shm) to an nbdkit memory export "
                            "over a UNIX socket", ["contestant", "median s", "throughput",
                                                   "peer / blkmirror"], rows,
                            ["target: nbdkit memory allocator=malloc (multi-conn), fresh per run; "
                             "verified by reading it back with nbdcopy and cmp"]))
        # What this server and machine carry with nothing in the way: the
        # ceiling of every row below, however many requests are in flight.
        server = max((size / t for t in (tb, tn) if t), default=None)
        tables.append(delay_table(ctx, workdir, server))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return tables


def delay_table(ctx: Ctx, workdir: str, server: float | None) -> Table:
    """Pipelining over a slow link: every write waits in the server. With Q
    requests of R bytes in flight the link carries at most Q x R / latency, and
    never more than the server does without the delay."""
    a = ctx.args
    dsize = a.nbd_delay_size
    dsrc = os.path.join(workdir, "dsrc.img")
    make_dense(dsrc, dsize, a.seed + 1)
    rows = []
    for ms in a.nbd_delays:
        lat = ms / 1000
        target = delayed_target(ms)
        # (key, label, argv, bytes in flight or None: the job's own choice).
        # blkmirror: 1 MiB operations over 4 connections (multi-conn); nbdcopy's
        # defaults (libnbd 1.14): 4 connections x 64 requests x 256 KiB.
        entries = []
        if ms <= 5:  # small fixed depths: seconds each at longer latencies
            for q in (2, 8):
                entries.append((f"bm{q}", f"blkmirror --buf-size {q}M",
                                (lambda b: lambda ctx, s, d: blkmirror_argv(ctx, s, d)
                                 + ["--buf-size", f"{b}M"])(q), q * MiB))
                entries.append((f"nc{q}", f"nbdcopy --connections=1 --requests={q} "
                                "--request-size=1M",
                                (lambda q: lambda ctx, s, d: [
                                    "nbdcopy", "--connections=1", f"--requests={q}",
                                    "--request-size=1048576", s, d])(q), served(q * MiB, MiB, 1)))
        entries.append(("bm16", "blkmirror --buf-size 16M (the fixed default before)",
                        lambda ctx, s, d: blkmirror_argv(ctx, s, d) + ["--buf-size", "16M"],
                        16 * MiB))
        entries.append(("bmauto", "blkmirror (default: chooses its own depth)",
                        lambda ctx, s, d: blkmirror_argv(ctx, s, d), None))
        entries.append(("ncdef", "nbdcopy (defaults: 4 x 64 x 256 KiB)",
                        lambda ctx, s, d: ["nbdcopy", s, d], served(4 * 64 * 256 * KiB, 256 * KiB, 4)))
        dv = Variant(f"delay-{ms}ms", workdir, False, dsrc, dsize)
        r = run_rotation(ctx, "nbd", dv, [nbd_target_contestant(
            k if k.startswith("nc") else "blkmirror-" + k, label, target, argv)
            for k, label, argv, _ in entries])
        for k, label, _, fixed in entries:
            ms_runs = r[k if k.startswith("nc") else "blkmirror-" + k]
            t = median_of(ms_runs)
            worst = max((m.times[""] for m in ms_runs if m), default=None)
            peaks = [m.info["in_flight_peak"] for m in ms_runs if m and "in_flight_peak" in m.info]
            in_flight = fixed if fixed else served(
                int(statistics.median(peaks)) if peaks else 16 * MiB, MiB, 4)
            link = in_flight / lat
            limit = min(link, server) if server else link
            rate = dsize / t if t else None
            of = rate / limit if rate else None
            worst_of = dsize / worst / limit if worst else None
            chosen = "" if fixed else (f" (chose {fmt_size(statistics.median(peaks))})"
                                       if peaks else "")
            rows.append([f"{ms} ms", label + chosen + failed_runs(ms_runs), fmt_s(t),
                         fmt_size(rate) + "/s" if rate else "-",
                         fmt_size(in_flight), fmt_size(link) + "/s",
                         fmt_size(limit) + "/s",
                         fmt_ratio(of), fmt_ratio(worst_of),
                         "-" if of is None else ("met" if of >= 0.8 else "missed")])
    notes = ["limit = min(bytes in flight / latency, the server's own rate without the delay: "
             f"{fmt_size(server) + '/s' if server else 'unmeasured'}, the previous table's best); "
             "target >= 0.8x of it; worst = the slowest run",
             "blkmirror's 1 MiB operations: --buf-size Q MiB keeps Q requests in flight; the "
             "default starts at 16 MiB and grows while its writes show the round trip, not a "
             "queue (docs/design/data-path.md); 'chose' is the median of its runs' peaks",
             "in flight = what the server works on: nbdkit serves at most 16 requests per "
             "connection (--threads), so 4 connections take 64 MiB of blkmirror's 1 MiB requests "
             "and 16 MiB of nbdcopy's default 256 KiB ones; the rest waits unread"]
    return Table(f"nbd: {fmt_size(dsize)} to nbdkit memory behind the delay filter "
                 f"(every write waits {', '.join(str(m) for m in a.nbd_delays)} ms)",
                 ["latency", "contestant", "median s", "throughput", "in flight",
                  "in flight / latency", "limit", "of the limit", "worst", "0.8x"], rows, notes)


KEY = "nbd"
TITLE = "remote target: nbdkit memory, and behind a 5 ms delay filter"
run = scenario_nbd


def add_arguments(g) -> None:
    g.add_argument("--nbd-size", type=parse_size, default=1 << 30,
                   help="data size for the memory target (default 1G)")
    # 1 GiB, not less: every contestant pays ~0.05-0.1 s that does not move data
    # (process start, four connections, the final flush), 20-30% of a 256 MiB
    # copy at this server's ~1 GiB/s, and the target is about the steady state.
    g.add_argument("--nbd-delay-size", type=parse_size, default=1 << 30,
                   help="data size behind the delay filter (default 1G)")
    g.add_argument("--nbd-delays", type=lambda v: [int(x) for x in v.split(",")],
                   default=[5, 50, 200],
                   help="write delays of the delay filter, ms, comma-separated (default 5,50,200)")


def resolve_arguments(a) -> str | None:
    return None
