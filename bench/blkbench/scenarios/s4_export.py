"""docs/measuring.md scenario 4: fio 4 KiB random write and read over NBD against
blkmirror's export and the daemon peer's, no job running."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..core import Contestant, Ctx, Measure, Table, Variant, failed_runs, fio_nbd_available, run_rotation, want_peer
from ..peers import export_fio
from ..report import div, fmt_iops, fmt_ms, fmt_x, load_note, med, per_rep
from ..util import GiB, MiB, fmt_size, log, make_dense, parse_size


def scenario_4(ctx: Ctx) -> list[Table]:
    a = ctx.args
    size = a.export_size
    if not fio_nbd_available(ctx, "4"):
        return []
    workdir = tempfile.mkdtemp(prefix="s4-", dir=a.dir)
    try:
        need = size + 256 * MiB
        free = shutil.disk_usage(workdir).free
        if free < need:
            msg = f"scenario 4: skipped, {fmt_size(free)} free in {a.dir}, need {fmt_size(need)}"
            log(msg)
            ctx.notes.append(msg)
            return []
        src = os.path.join(workdir, "src")
        log(f"scenario 4: creating {fmt_size(size)} of random data in {src}")
        make_dense(src, size, a.seed + 4)
        v = Variant("export", workdir, False, src, size, {})
        workloads = [("randwrite", a.export_runtime), ("randread", a.export_runtime)]

        def contestant(key: str, label: str, server: str) -> Contestant:
            return Contestant(key, label, lambda c, vv: export_fio(c, vv, server, workloads),
                              kind="export")

        cs = [contestant("blkmirror", "blkmirror serve", "blkmirror")]
        if want_peer(ctx, "qsd") and ctx.have["qemu-storage-daemon"]:
            cs.append(contestant("qsd", "qemu-storage-daemon NBD export", "qsd"))
        res = run_rotation(ctx, "4", v, cs)
        return [export_table(ctx, v, cs, res, workloads)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fmt_cpu_io(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def export_table(ctx: Ctx, v: Variant, cs: list[Contestant], res: dict[str, list[Measure | None]],
                 workloads: list[tuple[str, int]]) -> Table:
    a = ctx.args
    header = ["contestant", "workload", "IOPS (median)", "runs IOPS", "blkmirror IOPS / this",
              "worst rep ratio", "p99 ms (median)", "mean latency ms", "server cpu µs / I/O",
              "worst cpu µs / I/O", "fio cpu µs / I/O", "peak RSS"]
    rows = []
    meds: dict[tuple[str, str], dict] = {}
    for c in cs:
        ms = res[c.key]
        for rw, _ in workloads:
            rs = [m.info.get(rw) if m else None for m in ms]
            ok = [r for r in rs if r]
            iops = med(r["iops"] for r in ok)
            p99 = med(r["p99_ms"] for r in ok)
            cpu_io = med(r["server_cpu_s"] / r["ios"] * 1e6 for r in ok
                         if r.get("server_cpu_s") is not None and r["ios"])
            meds[(c.key, rw)] = {"iops": iops, "p99": p99, "cpu_io": cpu_io}
            base = meds.get(("blkmirror", rw), {}).get("iops")
            ratio = "1.00x (base)" if c.key == "blkmirror" else fmt_x(div(base, iops))
            rss = [m.rss_kib for m in ms if m and m.rss_kib]
            cpu_ios = [r["server_cpu_s"] / r["ios"] * 1e6 for r in ok
                       if r.get("server_cpu_s") is not None and r["ios"]]
            # The repetition least favourable to blkmirror: smallest blkmirror / this.
            pairs = [bm.info[rw]["iops"] / m.info[rw]["iops"]
                     for bm, m in zip(res.get("blkmirror", []), ms)
                     if bm and m and bm.info.get(rw) and m.info.get(rw) and m.info[rw]["iops"]]
            worst = "-" if c.key == "blkmirror" or not pairs else fmt_x(min(pairs))
            rows.append([c.label + failed_runs(ms), rw, fmt_iops(iops),
                         " ".join(fmt_iops(r["iops"]) if r else "FAIL" for r in rs), ratio, worst,
                         fmt_ms(p99), f"{med(r['mean_ms'] for r in ok):.3f}" if ok else "-",
                         f"{cpu_io:.1f}" if cpu_io is not None else "-",
                         f"{max(cpu_ios):.1f}" if cpu_ios else "-",
                         fmt_cpu_io(med(r["client_cpu_s"] / r["ios"] * 1e6 for r in ok
                                        if r.get("client_cpu_s") is not None and r["ios"])),
                         f"{max(rss) / 1024:.0f} MiB" if rss else "-"])
    t = Table(f"Scenario 4, export: fio 4 KiB random I/O, queue depth 16, "
              f"{a.export_runtime} s per workload, over NBD to a {fmt_size(v.size)} file of "
              f"random data, on disk ({a.dir}; writes on a cold page cache, reads on a warm one), "
              f"no job running", header, rows)
    for rw, _ in workloads:
        b, q = meds.get(("blkmirror", rw)), meds.get(("qsd", rw))
        if not b or not q:
            continue
        r = div(b["iops"], q["iops"])
        want = 2.0 if rw == "randwrite" else 2.5  # issue 18's targets
        verdict = "" if r is None else (": OK" if r >= want else ": BELOW TARGET")
        key = rw
        cpu = div(b["cpu_io"], q["cpu_io"])
        cpu_verdict = "" if cpu is None else (": OK" if cpu <= 0.4 else ": ABOVE TARGET")
        t.notes.append(f"{rw}: IOPS blkmirror / qemu-storage-daemon = **{fmt_x(r)}** (target >= "
                       f"{want}{verdict}"
                       f"{per_rep(res['blkmirror'], res['qsd'], lambda m, k=key: m.info[k]['iops'])})"
                       f"; server cpu per I/O blkmirror / daemon = **{fmt_x(cpu)}** (target <= 0.4"
                       f"{cpu_verdict}); p99 blkmirror / daemon = {fmt_x(div(b['p99'], q['p99']))} "
                       f"(< 1: blkmirror's is lower)")
    ln = load_note(res)
    if ln:
        t.notes.append(ln)
    t.notes.append("one server per run, both workloads in order against it; before randwrite "
                   "`sync` and the page cache dropped (every written page lands in a fresh 4 KiB "
                   "folio: the kernel's part of a write is then small and the same for both), "
                   "before randread the file is read into the page cache; the servers use "
                   "buffered I/O. server cpu = the server process's user + system CPU (its "
                   "threads, io_uring workers included) during the fio run / fio's I/O count; "
                   "fio cpu the same for the client: on 2 CPUs fio and the server share the "
                   "machine, so a server that needs less CPU also leaves fio more")
    return t


KEY = "4"
TITLE = "export, fio over NBD, no job"
run = scenario_4


def add_arguments(g) -> None:
    g.add_argument("--export-size", type=parse_size, default=None, help="file size (default 2G)")
    g.add_argument("--export-runtime", type=int, default=None,
                   help="fio runtime per workload in seconds (default 10)")


def resolve_arguments(a) -> str | None:
    a.export_size = a.export_size or (256 * MiB if a.quick else 2 * GiB)
    a.export_runtime = a.export_runtime or (3 if a.quick else 10)
    if a.export_runtime < 1:
        return "--export-runtime must be >= 1"
    return None
