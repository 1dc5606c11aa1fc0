"""docs/measuring.md scenario 8 (backing chains, issue 11's benchmark): a qcow2
top layer over a qcow2 base, driven over QMP the same way in `blkmirror daemon`
and in qemu-storage-daemon: an idle active commit of the top into the base
(cold cache), the same commit while fio writes 4 KiB random blocks through an
NBD export of the top, and an idle `blockdev-mirror` sync=top of the top onto a
new qcow2 whose backing file is the base."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from ..core import Contestant, Ctx, Measure, Table, Variant, failed_runs, fio_nbd_available, run_rotation, want_peer, warm_cache
from ..measure import proc_cpu, proc_hwm_kib
from ..peers import QCOW2_CLUSTER, QMP, FioNbd, check_qcow2, create_qcow2, qemu_img, qsd_quit, start_qmp_daemon, verify_images
from ..procs import RunFailed
from ..report import div, fmt_iops, fmt_ms, fmt_x, load_note, med, pct_or_dash, per_rep, speedup_notes, time_table
from ..util import GiB, KiB, MiB, allocated, fmt_size, log, make_dense, parse_size, remove, write_extents


# --- the chain: pristine files made once, fresh copies for every run that changes them

class Chain:
    """pristine/base.qcow2 (dense random data) and pristine/top.qcow2 (backing
    file base.qcow2, holding `data` bytes that differ from the base in the
    first half of the disk), and the run/ directory a run copies them into."""

    def __init__(self, workdir: str):
        self.pdir = os.path.join(workdir, "pristine")
        self.rdir = os.path.join(workdir, "run")
        os.makedirs(self.pdir, exist_ok=True)
        os.makedirs(self.rdir, exist_ok=True)
        self.base = os.path.join(self.pdir, "base.qcow2")
        self.top = os.path.join(self.pdir, "top.qcow2")
        self.run_base = os.path.join(self.rdir, "base.qcow2")
        self.run_top = os.path.join(self.rdir, "top.qcow2")
        self.top_data = 0

    def make(self, size: int, data: int, extent: int, seed: int) -> None:
        """The full view is written as a raw file first: the base is its qcow2
        copy; then extents of the first half are overwritten with other random
        data, and `qemu-img rebase` of an empty top over that raw file onto the
        base stores exactly the clusters that differ."""
        full = os.path.join(self.pdir, "full.raw")
        try:
            log(f"scenario 8: {fmt_size(size)} base of random data")
            make_dense(full, size, seed)
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER}",
                     full, self.base)
            n = write_extents(full, size // 2, data, seed + 1, extent)
            log(f"scenario 8: top layer, {n} extents of {fmt_size(extent)} in the first "
                f"{fmt_size(size // 2)}")
            create_qcow2(self.top, size, backing=full, backing_fmt="raw")
            qemu_img("rebase", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", self.top)
        finally:
            remove(full)
        self.top_data = n * extent

    def fresh(self, base: bool = True) -> None:
        """Copies of the pristine files in run/ (the top's backing file name,
        base.qcow2, is relative, so the copy's names the base copy); without
        base, the top's copy alone, over the pristine base."""
        remove(self.run_base, self.run_top)
        shutil.copyfile(self.top, self.run_top)
        if base:
            shutil.copyfile(self.base, self.run_base)
        else:  # the copy's header names the pristine base (for qemu-img check)
            qemu_img("rebase", "-u", "-f", "qcow2", "-b", self.base, "-F", "qcow2", self.run_top)

    def clean(self) -> None:
        remove(self.run_base, self.run_top)


def add_qcow2(qmp: QMP, node: str, path: str, backing: str | None = None,
              read_only: bool = False) -> None:
    """blockdev-add of a qcow2 node over a file node, as libvirt adds each layer."""
    args = {"driver": "qcow2", "node-name": node, "read-only": read_only,
            "file": {"driver": "file", "filename": path, "aio": "threads"}}
    if backing:
        args["backing"] = backing
    qmp.cmd("blockdev-add", args)


def add_chain(qmp: QMP, base: str, top: str, base_ro: bool = False) -> None:
    """Every layer a named node; the base writable, as libvirt leaves it after
    its blockdev-reopen (so neither daemon's commit reopens it in the timed part)."""
    add_qcow2(qmp, "base", base, read_only=base_ro)
    add_qcow2(qmp, "top", top, backing="base")


def ev_wall(ev: dict) -> float:
    ts = ev.get("timestamp", {})
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6


def complete_at_ready(qmp: QMP, job: str) -> tuple[dict, dict]:
    """BLOCK_JOB_READY, then job-complete; a job that is no longer ready when
    job-complete arrives (ready comes and goes while clients write) gets it at
    its next READY. Returns the READY event that was acted on and the
    BLOCK_JOB_COMPLETED event; query-jobs and job-dismiss after it, as libvirt."""
    while True:
        ev_ready = qmp.wait_event({"BLOCK_JOB_READY"}, job)
        try:
            qmp.cmd("job-complete", {"id": job})
            break
        except RunFailed as e:
            log(f"  job-complete refused ({e}); waiting for the next ready")
    ev_done = qmp.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, job)
    if ev_done["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev_done.get("data", {}):
        raise RunFailed(f"job {job} did not complete: {ev_done}")
    jobs = [j for j in qmp.cmd("query-jobs") if j.get("id") == job]
    if jobs and jobs[0].get("error"):
        raise RunFailed(f"job {job} concluded with an error: {jobs[0]}")
    qmp.cmd("job-dismiss", {"id": job})
    return ev_ready, ev_done


def daemon_label(daemon: str) -> str:
    return "blkmirror daemon" if daemon == "blkmirror" else "qemu-storage-daemon"


# --- parts 1 and 3: an idle job, timed from its command to BLOCK_JOB_COMPLETED

def idle_contestant(ch: Chain, daemon: str, job: str) -> Contestant:
    """job: "commit" (block-commit of run/top into run/base, fresh copies) or
    "top" (blockdev-mirror sync=top of the pristine top onto a new qcow2 over
    the pristine base, the base node shared by source and target)."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        dst = os.path.join(ch.rdir, "dst.qcow2")
        if job == "commit":
            ch.fresh()
        else:
            create_qcow2(dst, v.extra["disk_size"], backing=ch.base)
        if v.cold:
            ctx.drop_caches()
        c = qmp = None
        label = f"{daemon_label(daemon)} {v.name}"
        try:
            c, qmp = start_qmp_daemon(ch.rdir, ctx.blkmirror if daemon == "blkmirror" else None, [])
            if job == "commit":
                add_chain(qmp, ch.run_base, ch.run_top)
                cmd, args = "block-commit", {"job-id": "j0", "device": "top", "top-node": "top",
                                             "base-node": "base", "auto-finalize": True,
                                             "auto-dismiss": False}
            else:
                add_chain(qmp, ch.base, ch.top, base_ro=True)
                add_qcow2(qmp, "dst", dst, backing="base")
                cmd, args = "blockdev-mirror", {"job-id": "j0", "device": "top", "target": "dst",
                                                "sync": "top", "auto-finalize": True,
                                                "auto-dismiss": False}
            cpu0 = proc_cpu(c.p.pid)
            t_cmd = time.monotonic()
            qmp.cmd(cmd, args)
            ev_ready, ev_done = complete_at_ready(qmp, "j0")
            t_done = time.monotonic()
            cpu1 = proc_cpu(c.p.pid)
            rss = proc_hwm_kib(c.p.pid)
            ready = ev_wall(ev_ready) - ev_wall(ev_done) + (t_done - t_cmd)
            qsd_quit(c, qmp)
            qmp = None
            if job == "commit":
                # the base now reads what the chain read before, on its own
                verify_images(ch.top, "qcow2", ch.run_base, "qcow2", label)
                alloc = None
            else:
                verify_images(ch.top, "qcow2", dst, "qcow2", label)
                alloc = allocated(dst)
            return Measure({"": t_done - t_cmd}, rss_kib=rss, alloc=alloc,
                           info={"cpu": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None
                                 else None, "ready": ready,
                                 "offset": ev_done["data"].get("offset")})
        finally:
            if qmp:
                qmp.close()
            if c:
                c.close()
            remove(dst)
            ch.clean()

    key = "blkmirror" if daemon == "blkmirror" else "qsd"
    what = "block-commit" if job == "commit" else "blockdev-mirror sync=top"
    return Contestant(key, f"{daemon_label(daemon)} {what}", run)


def idle_part(ctx: Ctx, ch: Chain, job: str) -> Table:
    a = ctx.args
    name = "commit" if job == "commit" else "sync=top"
    v = Variant(name, ch.rdir, ctx.can_drop_caches, ch.top, ch.top_data,
                {"disk_size": a.chain_size, "data_size": ch.top_data})
    cs = [idle_contestant(ch, "blkmirror", job)]
    if want_peer(ctx, "qsd") and ctx.have["qemu-storage-daemon"]:
        cs.append(idle_contestant(ch, "qsd", job))
    res = run_rotation(ctx, "8", v, cs)
    cache = "page cache dropped before every run" if v.cold else "WARM cache (cannot drop)"
    if job == "commit":
        title = (f"Scenario 8, idle active commit: {fmt_size(ch.top_data)} top layer over a "
                 f"{fmt_size(a.chain_size)} qcow2 base, {QCOW2_CLUSTER} clusters, on disk "
                 f"({a.dir}), {cache}")
    else:
        title = (f"Scenario 8, idle blockdev-mirror sync=top: the same {fmt_size(ch.top_data)} "
                 f"top onto a new qcow2 over the same base, on disk ({a.dir}), {cache}")
    t = time_table(ctx, title, v, cs, res, show_alloc=job != "commit")
    t.notes += speedup_notes(res, [("qsd", "", "qemu-storage-daemon (target >= 1.3)")])
    pairs = [q.times[""] / b.times[""] for q, b in zip(res.get("qsd", []), res["blkmirror"])
             if q and b]
    if pairs:
        r = div(median_of_times(res.get("qsd", [])), median_of_times(res["blkmirror"]))
        t.notes.append(f"target >= 1.3x: median {'met' if r and r >= 1.3 else 'MISSED'}, "
                       f"worst repetition {min(pairs):.2f}x "
                       f"({'met' if min(pairs) >= 1.3 else 'missed'})")
    if job == "commit":
        t.notes.append("both daemons get the same QMP sequence: blockdev-add of base (read-only "
                       "false) and top (backing: base), block-commit {job-id, device: top, "
                       "top-node, base-node, auto-dismiss false} with each daemon's default copy "
                       "mode (blkmirror adaptive, QEMU 7.2 background), job-complete at "
                       "BLOCK_JOB_READY, query-jobs, job-dismiss, quit. Time: block-commit sent "
                       "to BLOCK_JOB_COMPLETED; cpu: the daemon's user + system CPU over the same "
                       "span (/proc); 'ready' in the notes is from the command")
        t.notes.append("every run on fresh copies of the pristine base and top (a commit changes "
                       "the base); afterwards `qemu-img compare` of the base alone against the "
                       "pristine chain and `qemu-img check` of the base")
    else:
        t.notes.append("source: the pristine top and base (read-only nodes); target: a new qcow2 "
                       "from `qemu-img create -b base.qcow2` added with backing: the same base "
                       "node, blockdev-mirror {sync: top, auto-dismiss false}, job-complete at "
                       "ready; afterwards `qemu-img compare` of target+base against top+base and "
                       "`qemu-img check`; 'target allocated' = the new qcow2 file's blocks")
    t.notes.append(f"MB/s and cpu s / GiB over the top layer's {fmt_size(ch.top_data)} of data")
    return t


def median_of_times(ms: list[Measure | None]) -> float | None:
    return med(m.times[""] for m in ms if m)


# --- part 2: active commit while fio writes through an NBD export of the top

def live_contestant(ch: Chain, daemon: str, copy_mode: str | None, commit: bool) -> Contestant:
    """The chain added as in part 1 and the top exported over NBD (nbd-server-start,
    block-export-add writable); fio random writes for --chain-runtime s; with
    commit, block-commit 1 s after fio's start and job-complete at the first
    BLOCK_JOB_READY (fio still writing when it comes early enough). Without:
    the same export and fio with no job (on a fresh top over the pristine
    base, read-only: nothing writes it). Warm page cache."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        a = ctx.args
        ch.fresh(base=commit)
        base = ch.run_base if commit else ch.base
        warm_cache(base)
        warm_cache(ch.run_top)
        os.sync()
        t_run = time.monotonic()
        c = qmp = fio = None
        nsock = os.path.join(ch.rdir, "nbd.sock")
        try:
            c, qmp = start_qmp_daemon(ch.rdir, ctx.blkmirror if daemon == "blkmirror" else None, [])
            add_chain(qmp, base, ch.run_top, base_ro=not commit)
            remove(nsock)
            qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nsock}}})
            qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top",
                                         "writable": True})
            fio = FioNbd(f"nbd+unix:///top?socket={nsock}", "randwrite", a.chain_runtime, ch.rdir)
            cpu0 = proc_cpu(c.p.pid)
            info: dict = {}
            if commit:
                time.sleep(max(0.0, fio.t0 + 1.0 - time.monotonic()))
                if fio.p.poll() is not None:
                    fio.finish()
                    raise RunFailed("fio ended within 1 s")
                args = {"job-id": "j0", "device": "top", "top-node": "top", "base-node": "base",
                        "auto-finalize": True, "auto-dismiss": False}
                if copy_mode:
                    args["copy-mode"] = copy_mode
                t_cmd, t_cmd_wall = time.monotonic(), time.time()
                qmp.cmd("block-commit", args)
                ev_ready, ev_done = complete_at_ready(qmp, "j0")
                t_done = time.monotonic()
                info.update({"commit_after_fio_s": t_cmd - fio.t0,
                             "ready_s": ev_wall(ev_ready) - t_cmd_wall,
                             "done_s": t_done - t_cmd,
                             "t_ready_wall": ev_wall(ev_ready), "t_done_wall": ev_wall(ev_done),
                             "copied": ev_done["data"].get("offset")})
            r = fio.finish()
            cpu1 = proc_cpu(c.p.pid)
            rss = proc_hwm_kib(c.p.pid)
            if not c.alive():
                raise c.exited("the end of the fio run")
            if commit:
                info["ready_during_fio"] = info.pop("t_ready_wall") <= fio.t_end_wall
                info["done_during_fio"] = info.pop("t_done_wall") <= fio.t_end_wall
                info["fio_s"] = fio.t_end - fio.t0
            exports = qmp.cmd("query-block-exports")
            info["export_node"] = next((e.get("node-name") for e in exports if e.get("id") == "e0"),
                                       None)
            if commit and info["export_node"] != "base":
                raise RunFailed(f"after the commit the export is on {info['export_node']!r}, "
                                f"not the base: {exports}")
            qsd_quit(c, qmp)
            qmp = None
            label = f"{daemon_label(daemon)} {'commit under fio' if commit else 'export, no job'}"
            check_qcow2(base if commit else ch.run_top, label)
            info.update(r)
            info.update({"server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None
                         else None, "rss_kib": rss, "load1": os.getloadavg()[0]})
            if commit:
                when = ("while fio wrote" if info["ready_during_fio"]
                        else "after fio had stopped")
                log(f"  {r['iops']:.0f} IOPS, ready {info['ready_s']:.2f}s after block-commit "
                    f"({when}), completed after {info['done_s']:.2f}s")
            else:
                log(f"  {r['iops']:.0f} IOPS (no job)")
            return Measure({"": time.monotonic() - t_run}, rss_kib=rss, info=info)
        finally:
            if fio:
                fio.close()
            if qmp:
                qmp.close()
            if c:
                c.close()
            remove(nsock)
            ch.clean()

    key = ("blkmirror" if daemon == "blkmirror" else "qsd") + (
        f"-{copy_mode}" if copy_mode else "") + ("" if commit else "-nojob")
    label = daemon_label(daemon) + (
        f" block-commit{' copy-mode ' + copy_mode if copy_mode else ''}" if commit
        else " export (no job)")
    return Contestant(key, label, run, kind="live" if commit else "reference")


def live_part(ctx: Ctx, ch: Chain) -> Table:
    a = ctx.args
    qsd = want_peer(ctx, "qsd") and ctx.have["qemu-storage-daemon"]
    cs = [live_contestant(ch, "blkmirror", m, True) for m in a.chain_copy_modes]
    if qsd:
        cs.append(live_contestant(ch, "qsd", None, True))
    cs.append(live_contestant(ch, "blkmirror", None, False))
    if qsd:
        cs.append(live_contestant(ch, "qsd", None, False))
    v = Variant("live commit", ch.rdir, False, ch.top, ch.top_data)
    res = run_rotation(ctx, "8", v, cs)
    header = ["contestant", "fio IOPS (median)", "runs IOPS", "ready after s (from block-commit)",
              "ready while fio wrote", "completed after s", "fio IOPS, same export, no job",
              "IOPS kept", "p99 ms", "server cpu s", "notes"]
    rows = []
    for c in cs:
        if c.kind != "live":
            continue
        ms = res[c.key]
        ok = [m.info for m in ms if m]
        nojob = [m.info for m in res.get(c.key.split("-")[0] + "-nojob", []) if m]
        iops, iops_b = med(i["iops"] for i in ok), med(i["iops"] for i in nojob)
        n_during = sum(1 for i in ok if i["ready_during_fio"])
        n_done = sum(1 for i in ok if i["done_during_fio"])
        ready = med(i["ready_s"] for i in ok)
        notes = [f"completed while fio wrote in {n_done}/{len(ok)} runs"] if ok else []
        after = med(i["commit_after_fio_s"] for i in ok)
        if after is not None:
            notes.append(f"block-commit sent {after:.2f}s after fio's spawn")
        copied = med(i["copied"] for i in ok if i.get("copied") is not None)
        if copied is not None:
            notes.append(f"job offset at completion {fmt_size(copied)}")
        rss = [i["rss_kib"] for i in ok if i.get("rss_kib")]
        if rss:
            notes.append(f"peak RSS {max(rss) / 1024:.0f} MiB")
        cpu = med(i["server_cpu_s"] for i in ok)
        rows.append([c.label + failed_runs(ms), fmt_iops(iops),
                     " ".join(fmt_iops(m.info["iops"]) if m else "FAIL" for m in ms),
                     "-" if ready is None else f"{ready:.2f}",
                     f"{n_during}/{len(ok)}" if ok else "-",
                     fmt_ms(med(i["done_s"] for i in ok)), fmt_iops(iops_b),
                     pct_or_dash(iops, iops_b), fmt_ms(med(i["p99_ms"] for i in ok)),
                     "-" if cpu is None else f"{cpu:.1f}", "; ".join(notes)])
    for c in cs:
        if c.kind == "reference":
            ms = res[c.key]
            ok = [m.info for m in ms if m]
            cpu = med(i["server_cpu_s"] for i in ok)
            rows.append([c.label + failed_runs(ms), fmt_iops(med(i["iops"] for i in ok)),
                         " ".join(fmt_iops(m.info["iops"]) if m else "FAIL" for m in ms),
                         "-", "-", "-", "-", "-", fmt_ms(med(i["p99_ms"] for i in ok)),
                         "-" if cpu is None else f"{cpu:.1f}", "reference: fio with no job"])
    t = Table(f"Scenario 8, active commit under fio: 4 KiB random writes, queue depth 16, "
              f"{a.chain_runtime} s, over NBD to the top ({fmt_size(ch.top_data)} allocated) of "
              f"a {fmt_size(a.chain_size)} qcow2 chain, on disk ({a.dir}), warm page cache",
              header, rows)
    q = [m for m in res.get("qsd", []) if m]
    for mode in a.chain_copy_modes:
        key = f"blkmirror-{mode}"
        ok = [m for m in res.get(key, []) if m]
        if not ok:
            continue
        during = all(m.info["ready_during_fio"] for m in ok)
        checks = [f"ready while fio still writes in {sum(m.info['ready_during_fio'] for m in ok)}"
                  f"/{len(ok)} runs ({'met' if during else 'MISSED'})"]
        if q:
            r = div(med(m.info["iops"] for m in ok), med(m.info["iops"] for m in q))
            pairs = [b.info["iops"] / p.info["iops"] for b, p in zip(res[key], res["qsd"])
                     if b and p and p.info["iops"]]
            checks.append(f"fio IOPS / the daemon's **{fmt_x(r)}** (target >= 1.3: "
                          f"{'met' if r and r >= 1.3 else 'MISSED'}"
                          f"{per_rep(res[key], res['qsd'], lambda m: m.info['iops'])}"
                          + (f"; worst repetition {min(pairs):.2f}x" if pairs else "") + ")")
        t.notes.append(f"blkmirror copy-mode {mode}: " + "; ".join(checks))
    if q:
        n = sum(1 for m in q if m.info["ready_during_fio"])
        t.notes.append(f"qemu-storage-daemon (QEMU 7.2's block-commit has no copy-mode: "
                       f"background): ready while fio wrote in {n}/{len(q)} runs")
    ln = load_note(res)
    if ln:
        t.notes.append(ln)
    t.notes.append("both daemons: blockdev-add of the chain (base read-only false), "
                   "nbd-server-start, block-export-add of the top (writable); fio starts, "
                   "block-commit 1 s later, job-complete at the first BLOCK_JOB_READY (its QMP "
                   "timestamp against fio's end says whether fio still wrote), COMPLETED, "
                   "query-block-exports must show the export on the base, quit, `qemu-img check` "
                   "of the base. Fresh copies of base and top for every commit run; the "
                   "no-job reference writes a fresh top over the pristine base. fio writes "
                   "anywhere in the disk, so its first write into a cluster the top does not "
                   "hold copies the rest of that 64 KiB cluster from the base (in both daemons)")
    return t


# --- the scenario

def scenario_8(ctx: Ctx) -> list[Table]:
    a = ctx.args
    if not ctx.have.get("qemu-img"):
        ctx.notes.append("scenario 8: skipped, qemu-img is not installed")
        return []
    workdir = tempfile.mkdtemp(prefix="s8-", dir=a.dir)
    try:
        need = 3 * a.chain_size + 2 * a.chain_top_data + 512 * MiB
        free = shutil.disk_usage(workdir).free
        if free < need:
            msg = f"scenario 8: skipped, {fmt_size(free)} free in {a.dir}, need {fmt_size(need)}"
            log(msg)
            ctx.notes.append(msg)
            return []
        ch = Chain(workdir)
        ch.make(a.chain_size, a.chain_top_data, a.chain_extent, a.seed + 8)
        tables = []
        if "commit" in a.chain_parts:
            tables.append(idle_part(ctx, ch, "commit"))
        if "live" in a.chain_parts and fio_nbd_available(ctx, "8"):
            tables.append(live_part(ctx, ch))
        if "top" in a.chain_parts:
            tables.append(idle_part(ctx, ch, "top"))
        return tables
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


KEY = "8"
TITLE = "backing chains: active commit idle and under fio, sync=top mirror"
run = scenario_8


def add_arguments(g) -> None:
    g.add_argument("--chain-size", type=parse_size, default=None,
                   help="virtual size of base and top (default 4G)")
    g.add_argument("--chain-top-data", type=parse_size, default=None,
                   help="data in the top layer, spread over the disk's first half (default 1G)")
    g.add_argument("--chain-extent", type=parse_size, default=None,
                   help="size of the top layer's extents (default 256K)")
    g.add_argument("--chain-runtime", type=int, default=None,
                   help="fio runtime of the commit under fio, seconds (default 20)")
    g.add_argument("--chain-copy-modes", default="adaptive",
                   help="blkmirror's block-commit copy modes under fio, comma list of "
                        "adaptive,write-blocking,background (default adaptive, its default)")
    g.add_argument("--chain-parts", default="commit,live,top",
                   help="commit (idle), live (under fio), top (sync=top mirror); default all")


def resolve_arguments(a) -> str | None:
    a.chain_size = a.chain_size or (256 * MiB if a.quick else 4 * GiB)
    a.chain_top_data = a.chain_top_data or (64 * MiB if a.quick else GiB)
    a.chain_extent = a.chain_extent or 256 * KiB
    a.chain_runtime = a.chain_runtime or (5 if a.quick else 20)
    a.chain_copy_modes = [x for x in a.chain_copy_modes.split(",") if x]
    a.chain_parts = [x for x in a.chain_parts.split(",") if x]
    for x in a.chain_copy_modes:
        if x not in ("adaptive", "write-blocking", "background"):
            return f"--chain-copy-modes: unknown {x!r} (adaptive, write-blocking, background)"
    for x in a.chain_parts:
        if x not in ("commit", "live", "top"):
            return f"--chain-parts: unknown {x!r} (commit, live, top)"
    if a.chain_extent % (64 * KiB):
        return "--chain-extent must be a multiple of 64K (the clusters)"
    if a.chain_top_data > a.chain_size // 2:
        return "--chain-top-data must fit in the first half of --chain-size"
    if a.chain_runtime < 2:
        return "--chain-runtime must be >= 2 (the commit starts after 1 s)"
    return None
