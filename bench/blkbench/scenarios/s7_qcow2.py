"""docs/measuring.md scenario 7 (layered, issue 10's benchmark): a qcow2 image
with 64 KiB clusters served over NBD by blkmirror and by the daemon peer, fio
4 KiB random write and read at queue depth 16 on an empty image and on a fully
allocated one; and idle mirrors raw -> new qcow2 and qcow2 -> raw with a cold
cache, blkmirror's against the daemon's."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..core import Contestant, Ctx, Measure, Table, Variant, failed_runs, fio_nbd_available, run_rotation, want_peer
from ..peers import QCOW2_CLUSTER as CLUSTER, check_qcow2, create_qcow2, export_fio, parse_blkmirror_stderr, qemu_img, qsd_mirror, verify_images
from ..procs import check_proc, run_timed
from ..report import div, fmt_iops, fmt_x, load_note, med, per_rep, speedup_notes, time_table
from ..util import GiB, MiB, allocated, fmt_size, fresh_sparse, log, make_dense, parse_size, remove


# --- export: fio over NBD to a served qcow2 image

def export_contestant(key: str, label: str, server: str, workloads: list[tuple[str, int]],
                      empty: bool) -> Contestant:
    """One server per workload. On the empty variant every workload starts
    from a new image (a random read after a random write would read data); the
    allocated image is shared (writes there overwrite in place)."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        info: dict = {}
        rss = []
        total = 0.0
        for rw, runtime in workloads:
            if empty:
                create_qcow2(v.src, v.size)
            m = export_fio(ctx, v, server, [(rw, runtime)], fmt="qcow2")
            info[rw] = m.info[rw]
            info["load1"] = m.info.get("load1")
            total += m.times[""]
            if m.rss_kib:
                rss.append(m.rss_kib)
        check_qcow2(v.src, label)
        return Measure({"": total}, rss_kib=max(rss) if rss else None, info=info)

    return Contestant(key, label, run, kind="export")


def export_table(ctx: Ctx, v: Variant, cs: list[Contestant], res: dict[str, list[Measure | None]],
                 workloads: list[tuple[str, int]], what: str) -> Table:
    header = ["contestant", "workload", "IOPS (median)", "runs IOPS", "blkmirror IOPS / this",
              "p99 ms (median)", "server cpu µs / I/O", "peak RSS"]
    rows = []
    meds: dict[tuple[str, str], dict] = {}
    for c in cs:
        ms = res[c.key]
        for rw, _ in workloads:
            ok = [m.info[rw] for m in ms if m and m.info.get(rw)]
            iops = med(r["iops"] for r in ok)
            cpu_io = med(r["server_cpu_s"] / r["ios"] * 1e6 for r in ok
                         if r.get("server_cpu_s") is not None and r["ios"])
            meds[(c.key, rw)] = {"iops": iops, "cpu_io": cpu_io}
            base = meds.get(("blkmirror", rw), {}).get("iops")
            ratio = "1.00x (base)" if c.key == "blkmirror" else fmt_x(div(base, iops))
            rss = [m.rss_kib for m in ms if m and m.rss_kib]
            rows.append([c.label + failed_runs(ms), rw, fmt_iops(iops),
                         " ".join(fmt_iops(m.info[rw]["iops"]) if m and m.info.get(rw) else "FAIL"
                                  for m in ms),
                         ratio, f"{med(r['p99_ms'] for r in ok):.3f}" if ok else "-",
                         f"{cpu_io:.1f}" if cpu_io is not None else "-",
                         f"{max(rss) / 1024:.0f} MiB" if rss else "-"])
    a = ctx.args
    t = Table(f"Scenario 7, qcow2 export ({what}): fio 4 KiB random I/O, queue depth 16, "
              f"{a.qcow2_runtime} s per workload, over NBD to a {fmt_size(v.size)} qcow2 image "
              f"({CLUSTER} clusters) on disk ({a.dir})", header, rows)
    for rw, _ in workloads:
        b, q = meds.get(("blkmirror", rw)), meds.get(("qsd", rw))
        if not b or not q:
            continue
        r = div(b["iops"], q["iops"])
        cpu = div(b["cpu_io"], q["cpu_io"])
        t.notes.append(
            f"{rw}: IOPS blkmirror / qemu-storage-daemon = **{fmt_x(r)}** (target >= 1.2"
            f"{'' if r is None else (': OK' if r >= 1.2 else ': BELOW TARGET')}"
            f"{per_rep(res['blkmirror'], res['qsd'], lambda m, k=rw: m.info[k]['iops'])}); "
            f"server cpu per I/O blkmirror / daemon = **{fmt_x(cpu)}** (target <= 1.0"
            f"{'' if cpu is None else (': OK' if cpu <= 1.0 else ': ABOVE TARGET')})")
    ln = load_note(res)
    if ln:
        t.notes.append(ln)
    t.notes.append("one server per workload, `sync` before each; the servers use buffered I/O; "
                   "`qemu-img check` of the image after every run. server cpu = the server "
                   "process's user + system CPU during the fio run / fio's I/O count")
    return t


def export_part(ctx: Ctx, workdir: str) -> list[Table]:
    a = ctx.args
    size = a.qcow2_size
    workloads = [("randwrite", a.qcow2_runtime), ("randread", a.qcow2_runtime)]
    tables = []
    for what in a.qcow2_images:
        img = os.path.join(workdir, f"export-{what}.qcow2")
        empty = what == "empty"
        if not empty:
            log(f"scenario 7: creating a fully allocated {fmt_size(size)} qcow2 image")
            create_qcow2(img, size, "full")
        v = Variant(f"export-{what}", workdir, False, img, size)
        cs = [export_contestant("blkmirror", "blkmirror serve", "blkmirror", workloads, empty)]
        if want_peer(ctx, "qsd") and ctx.have["qemu-storage-daemon"]:
            cs.append(export_contestant("qsd", "qemu-storage-daemon NBD export", "qsd", workloads,
                                        empty))
        res = run_rotation(ctx, "7", v, cs)
        tables.append(export_table(ctx, v, cs, res, workloads,
                                   "empty image" if empty else "fully allocated image"))
        remove(img)
    return tables


# --- idle mirrors between raw and qcow2

def mirror_contestant(key: str, src_fmt: str, dst_fmt: str) -> Contestant:
    """Mirrors v.src (src_fmt) into a new target: a sparse raw file or an
    empty qcow2 image made by qemu-img (not timed), the same for both."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        dst = os.path.join(v.workdir, f"dst-{key}")
        if dst_fmt == "qcow2":
            create_qcow2(dst, v.size)
        else:
            fresh_sparse(dst, v.size)
        if v.cold:
            ctx.drop_caches()
        try:
            if key == "blkmirror":
                cmd = [ctx.blkmirror, "mirror", v.src, dst, "--no-progress",
                       "--src-format", src_fmt, "--format", dst_fmt]
                p = run_timed(cmd)
                check_proc("blkmirror mirror", cmd, p)
                info = parse_blkmirror_stderr(p.err)
                info["cpu"] = p.utime + p.stime
                m = Measure({"": p.wall}, rss_kib=p.maxrss_kib, info=info)
            else:
                r = qsd_mirror(v.src, dst, v.workdir, src_fmt, dst_fmt)
                m = Measure({"": r["job"], "total": r["total"]}, rss_kib=r["maxrss_kib"],
                            info={"cpu": r["cpu"], "ready": r["ready"], "start": r["start"]})
            m.alloc = allocated(dst)
            verify_images(v.src, src_fmt, dst, dst_fmt, key)
            return m
        finally:
            remove(dst)

    label = "blkmirror mirror" if key == "blkmirror" else "qemu-storage-daemon"
    rows = {"": ""} if key == "blkmirror" else {"": " (job)", "total": " (total)"}
    return Contestant(key, label, run, rows=rows)


def mirror_part(ctx: Ctx, workdir: str) -> list[Table]:
    a = ctx.args
    size = a.qcow2_mirror_size
    raw = os.path.join(workdir, "src.raw")
    qcow = os.path.join(workdir, "src.qcow2")
    log(f"scenario 7: creating {fmt_size(size)} of random data and its qcow2 copy")
    make_dense(raw, size, a.seed + 7)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, qcow)
    tables = []
    for src, src_fmt, dst_fmt in ((raw, "raw", "qcow2"), (qcow, "qcow2", "raw")):
        name = f"{src_fmt}->{dst_fmt}"
        v = Variant(name, workdir, ctx.can_drop_caches, src, size)
        cs = [mirror_contestant("blkmirror", src_fmt, dst_fmt)]
        if want_peer(ctx, "qsd") and ctx.have["qemu-storage-daemon"]:
            cs.append(mirror_contestant("qsd", src_fmt, dst_fmt))
        res = run_rotation(ctx, "7", v, cs)
        cache = "page cache dropped before every run" if v.cold else "WARM cache (cannot drop)"
        t = time_table(ctx, f"Scenario 7, idle mirror {name}, {fmt_size(size)} of random data, "
                            f"{CLUSTER} clusters, on disk ({a.dir}), {cache}", v, cs, res,
                       show_alloc=True)
        t.notes += speedup_notes(res, [("qsd", "", "qemu-storage-daemon (job time; target >= 1.3)"),
                                       ("qsd", "total", "qemu-storage-daemon (total incl. daemon start)")])
        t.notes.append("the target (sparse raw file or empty qcow2 image from `qemu-img create`) "
                       "exists before the run; `qemu-img compare` (and `check` of the qcow2 side) "
                       "after every run")
        tables.append(t)
    remove(raw, qcow)
    return tables


def scenario_7(ctx: Ctx) -> list[Table]:
    a = ctx.args
    workdir = tempfile.mkdtemp(prefix="s7-", dir=a.dir)
    try:
        need = max(a.qcow2_size, 2 * a.qcow2_mirror_size) + 512 * MiB
        free = shutil.disk_usage(workdir).free
        if free < need:
            msg = f"scenario 7: skipped, {fmt_size(free)} free in {a.dir}, need {fmt_size(need)}"
            log(msg)
            ctx.notes.append(msg)
            return []
        if not ctx.have.get("qemu-img"):
            ctx.notes.append("scenario 7: skipped, qemu-img is not installed")
            return []
        tables = []
        if "export" in a.qcow2_parts and fio_nbd_available(ctx, "7"):
            tables += export_part(ctx, workdir)
        if "mirror" in a.qcow2_parts:
            tables += mirror_part(ctx, workdir)
        return tables
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


KEY = "7"
TITLE = "layered: qcow2 export and raw <-> qcow2 mirrors"
run = scenario_7


def add_arguments(g) -> None:
    g.add_argument("--qcow2-size", type=parse_size, default=None,
                   help="virtual size of the served qcow2 image (default 4G)")
    g.add_argument("--qcow2-runtime", type=int, default=None,
                   help="fio runtime per workload in seconds (default 10)")
    g.add_argument("--qcow2-images", default="empty,allocated",
                   help="which served images: empty, allocated (default both)")
    g.add_argument("--qcow2-mirror-size", type=parse_size, default=None,
                   help="data size of the raw <-> qcow2 mirrors (default 2G)")
    g.add_argument("--qcow2-parts", default="export,mirror",
                   help="export, mirror (default both)")


def resolve_arguments(a) -> str | None:
    a.qcow2_size = a.qcow2_size or (256 * MiB if a.quick else 4 * GiB)
    a.qcow2_runtime = a.qcow2_runtime or (3 if a.quick else 10)
    a.qcow2_mirror_size = a.qcow2_mirror_size or (256 * MiB if a.quick else 2 * GiB)
    a.qcow2_images = [x for x in a.qcow2_images.split(",") if x]
    a.qcow2_parts = [x for x in a.qcow2_parts.split(",") if x]
    for x in a.qcow2_images:
        if x not in ("empty", "allocated"):
            return f"--qcow2-images: unknown {x!r} (empty, allocated)"
    if a.qcow2_runtime < 1:
        return "--qcow2-runtime must be >= 1"
    return None
