"""docs/measuring.md scenario 3: a live mirror while fio writes to the source over NBD,
for each copy mode, through blkmirror's CLI (`blkmirror mirror --socket`), its
QMP daemon (`blkmirror daemon`), and qemu-storage-daemon."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from typing import Callable

from ..core import Contestant, Ctx, Measure, Table, Variant, failed_runs, fio_nbd_available, run_rotation, want_peer
from ..measure import JOB_TIMEOUT, proc_cpu, proc_hwm_kib
from ..peers import FioNbd, QMP, export_fio, parse_blkmirror_stderr, qsd_quit, start_blkmirror_mirror, start_qsd_export, verify_cmp
from ..procs import RunFailed
from ..report import div, fmt_iops, fmt_ms, fmt_x, load_note, med, pct_or_dash, svg_panels
from ..util import GiB, MiB, fmt_size, fresh_sparse, log, make_dense, parse_size, remove


def live_blkmirror_mode(copy_mode: str, state: bool = False) -> Callable[[Ctx, Variant], Measure]:
    return lambda ctx, v: live_blkmirror(ctx, v, copy_mode, state)


def live_qsd_mode(copy_mode: str, daemon: str = "qsd") -> Callable[[Ctx, Variant], Measure]:
    return lambda ctx, v: live_qsd(ctx, v, copy_mode, daemon)


def blkmirror_series(evs: list[tuple[float, dict]], t0: float) -> tuple[list, list]:
    """(t, dirty, copied) from PROGRESS/READY events, times from t0 (the mirror
    start); plus (t, what) marks for copy-mode changes."""
    pts, marks = [], []
    for t, e in evs:
        d = e.get("data", {})
        if e.get("event") in ("PROGRESS", "BLOCK_JOB_READY") and "offset" in d and "len" in d:
            pts.append((t - t0, max(0, d["len"] - d["offset"]), d["offset"]))
        elif e.get("event") == "BLOCK_JOB_COPY_MODE_CHANGED":  # QMP's name, as --json emits it
            marks.append((t - t0, f"-> {d.get('copy-mode')}"))
        if e.get("event") == "BLOCK_JOB_READY":
            marks.append((t - t0, "ready"))
    return pts, marks


def live_blkmirror(ctx: Ctx, v: Variant, copy_mode: str = "background",
                   state: bool = False) -> Measure:
    """`blkmirror mirror --socket --no-auto-complete` with fio writing to its
    export. blkmirror cannot start the job later than its export, so fio starts
    right after the export is up, i.e. together with the mirror (the daemon's
    job starts 1 s after fio, per docs/measuring.md). At fio's end: wait for ready,
    SIGUSR1 (complete: the export switches to DST), BLOCK_JOB_COMPLETED,
    SIGTERM, cmp."""
    a = ctx.args
    # v.extra["live_target"](ctx, v) -> (DST, verify(src, dst, who), cleanup()) puts the
    # target elsewhere (scenario 9: an rbd image); by default a fresh sparse file.
    if "live_target" in v.extra:
        dst, verify, cleanup = v.extra["live_target"](ctx, v)
    else:
        dst = os.path.join(v.workdir, "dst-blkmirror")
        fresh_sparse(dst, v.size)
        verify, cleanup = verify_cmp, lambda: remove(dst)
    os.sync()
    t_run = time.monotonic()
    c = fio = None

    def is_ev(name):
        return lambda e: e.get("event") == name

    try:
        extra: tuple[str, ...] = ()
        if state:  # crash-safe state, a fresh file each run (issue 12's IOPS cost)
            state_path = os.path.join(v.workdir, "bm.state")
            remove(state_path)
            extra = ("--state", state_path)
        c, uri = start_blkmirror_mirror(ctx, v.src, dst, v.workdir, copy_mode, extra)
        fio = FioNbd(uri, "randwrite", a.live_runtime, v.workdir)
        cpu0 = proc_cpu(c.p.pid)
        t_start, _ = c.wait_event(lambda e: e.get("event") == "JOB_STATUS_CHANGE"
                                  and e.get("data", {}).get("status") == "running", 30,
                                  "the job start")
        r = fio.finish()
        cpu1 = proc_cpu(c.p.pid)
        with c.cv:
            evs = list(c.events)
        # blkmirror cannot be asked: the last offset it reported (PROGRESS
        # once a second, or READY) before fio ended
        offs = [(t, e["data"]["offset"]) for t, e in evs
                if t <= fio.t_end and e.get("event") in ("PROGRESS", "BLOCK_JOB_READY")
                and "offset" in e.get("data", {})]
        off_end = offs[-1][1] if offs else None
        log(f"  fio done ({r['iops']:.0f} IOPS); waiting for ready, then complete")
        off_end_age = fio.t_end - offs[-1][0] if offs else None
        t_ready, ev_ready = c.wait_event(is_ev("BLOCK_JOB_READY"), JOB_TIMEOUT, "BLOCK_JOB_READY")
        t_usr1 = time.monotonic()
        c.signal(signal.SIGUSR1)
        t_done, ev_done = c.wait_event(is_ev("BLOCK_JOB_COMPLETED"), JOB_TIMEOUT,
                                       "BLOCK_JOB_COMPLETED")
        if ev_done.get("data", {}).get("error"):
            raise RunFailed(f"blkmirror job failed: {ev_done}")
        rss = proc_hwm_kib(c.p.pid)
        rc = c.stop(signal.SIGTERM, 60)
        if rc != 0:
            raise RunFailed(f"blkmirror mirror exited {rc} after SIGTERM: {c.tail()}")
        with c.cv:
            evs = list(c.events)
        # Until the complete request (the daemon's series runs until ready, or
        # until fio's end when that is later).
        series, marks = blkmirror_series([(t, e) for t, e in evs if t <= t_usr1], t_start)
        switched = [m for m in marks if m[1].startswith("->")]
        # The job's own copying (read from the source, written to the target),
        # without the client writes it mirrored: from the final NOTE.
        done_note = " ".join(e.get("data", {}).get("message", "") for _, e in evs
                             if e.get("event") == "NOTE")
        own = parse_blkmirror_stderr(done_note)
        log("  completed; verifying")
        verify(v.src, dst, "blkmirror mirror (live)")
        info = dict(r)
        info.update({
            "server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
            "mirror_after_fio_s": t_start - fio.t0,
            "ready_s": t_ready - t_start,
            "ready_during_fio": t_ready <= fio.t_end,
            "ready_after_fio_end_s": t_ready - fio.t_end,
            "copied_ready": ev_ready["data"]["offset"],
            "copied_fio_end": off_end,
            "copied_fio_end_age_s": off_end_age,
            "copied_final": ev_done["data"]["offset"],
            "complete_s": t_done - t_usr1,
            "rss_kib": rss,
            "load1": os.getloadavg()[0],
            "copy_mode": copy_mode,
            "own_copied": own.get("copied"),
            "switched_s": switched[0][0] if switched else None,
            "fio_end_s": fio.t_end - t_start,
            "series": series,
            "marks": marks,
        })
        log_live(info, v.size)
        return Measure({"": time.monotonic() - t_run}, rss_kib=rss, info=info)
    finally:
        if fio:
            fio.close()
        if c:
            c.close()
        cleanup()


def qsd_sample(qmp: QMP, t0: float, series: list) -> bool:
    """One query-block-jobs sample of job m0 into series; False once it is ready."""
    jobs = qmp.cmd("query-block-jobs")
    job = next((j for j in jobs if j.get("device") == "m0"), None)
    if job is None:
        return False
    series.append((time.monotonic() - t0, max(0, job["len"] - job["offset"]), job["offset"]))
    return not job.get("ready")


def live_qsd(ctx: Ctx, v: Variant, copy_mode: str | None = None, daemon: str = "qsd") -> Measure:
    """qemu-storage-daemon (daemon "qsd") or `blkmirror daemon` ("blkmirror")
    exporting the source; fio starts; 1 s later blockdev-mirror with the
    daemon's default granularity (copy-mode from --qsd-copy-mode). At fio's end:
    query-block-jobs (offset), wait for BLOCK_JOB_READY (its QMP timestamp says
    whether it came while fio ran), block-job-complete, BLOCK_JOB_COMPLETED,
    quit, cmp. The same flow for both daemons: the method difference between
    blkmirror's CLI and a QMP daemon stays out of the comparison."""
    a = ctx.args
    dst = os.path.join(v.workdir, f"dst-{daemon}")
    fresh_sparse(dst, v.size)
    os.sync()
    t_run = time.monotonic()
    c = qmp = fio = None
    try:
        c, qmp, uri = start_qsd_export(v.src, dst, v.workdir,
                                       ctx.blkmirror if daemon == "blkmirror" else None)
        fio = FioNbd(uri, "randwrite", a.live_runtime, v.workdir)
        cpu0 = proc_cpu(c.p.pid)
        time.sleep(max(0.0, fio.t0 + 1.0 - time.monotonic()))
        if fio.p.poll() is not None:
            fio.finish()
            raise RunFailed("fio ended within 1 s")
        t_cmd, t_cmd_wall = time.monotonic(), time.time()
        copy_mode = copy_mode or a.qsd_copy_mode
        qmp.cmd("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "dst",
                                    "sync": "full", "copy-mode": copy_mode})
        # Sample the job every 0.25 s while fio runs (the time series).
        series: list = []
        while fio.p.poll() is None:
            qsd_sample(qmp, t_cmd, series)
            time.sleep(0.25)
        r = fio.finish()
        cpu1 = proc_cpu(c.p.pid)
        jobs = qmp.cmd("query-block-jobs")
        job = next((j for j in jobs if j.get("device") == "m0"), None)
        if job is None:
            raise RunFailed(f"qemu-storage-daemon: job m0 gone at the end of fio: {jobs}")
        off_end = job["offset"]
        log(f"  fio done ({r['iops']:.0f} IOPS); waiting for ready, then complete")
        deadline = time.monotonic() + JOB_TIMEOUT
        while qsd_sample(qmp, t_cmd, series) and time.monotonic() < deadline:
            time.sleep(0.25)
        ev_ready = qmp.wait_event({"BLOCK_JOB_READY"}, "m0")
        ts = ev_ready.get("timestamp", {})
        t_ready_wall = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
        t_cmp = time.monotonic()
        qmp.cmd("block-job-complete", {"device": "m0"})
        ev_done = qmp.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, "m0")
        t_done = time.monotonic()
        if ev_done["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev_done.get("data", {}):
            raise RunFailed(f"qemu-storage-daemon job did not complete: {ev_done}")
        rss = proc_hwm_kib(c.p.pid)
        qsd_quit(c, qmp)
        qmp = None
        log("  completed; cmp")
        verify_cmp(v.src, dst, "qemu-storage-daemon blockdev-mirror (live)")
        info = dict(r)
        info.update({
            "server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
            "mirror_after_fio_s": t_cmd - fio.t0,
            "ready_s": t_ready_wall - t_cmd_wall,
            "ready_during_fio": t_ready_wall <= fio.t_end_wall,
            "ready_after_fio_end_s": t_ready_wall - fio.t_end_wall,
            "copied_ready": ev_ready["data"]["offset"],
            "copied_fio_end": off_end,
            "copied_fio_end_age_s": 0.0,
            "copied_final": ev_done["data"]["offset"],
            "complete_s": t_done - t_cmp,
            "rss_kib": rss,
            "load1": os.getloadavg()[0],
            "copy_mode": copy_mode,
            "fio_end_s": fio.t_end - t_cmd,
            "series": series,
            "marks": [(t_ready_wall - t_cmd_wall, "ready")],
        })
        log_live(info, v.size)
        return Measure({"": time.monotonic() - t_run}, rss_kib=rss, info=info)
    finally:
        if fio:
            fio.close()
        if qmp:
            qmp.close()
        if c:
            c.close()
        remove(dst)


def log_live(i: dict, size: int) -> None:
    when = "while fio ran" if i["ready_during_fio"] else f"{i['ready_after_fio_end_s']:.1f}s after fio"
    log(f"  {i['iops']:.0f} IOPS, p99 {i['p99_ms']:.3f} ms; ready {i['ready_s']:.2f}s after the "
        f"mirror start ({when}); copied/disk: ready {i['copied_ready'] / size:.2f}, fio end "
        f"{(i['copied_fio_end'] or 0) / size:.2f}, completed {i['copied_final'] / size:.2f}")


def base_contestant(key: str, label: str, server: str) -> Contestant:
    def run(ctx: Ctx, v: Variant) -> Measure:
        m = export_fio(ctx, v, server, [("randwrite", ctx.args.live_runtime)])
        m.info.update(m.info.pop("randwrite"))
        return m
    return Contestant(key, label, run, kind="reference")


def scenario_3(ctx: Ctx) -> list[Table]:
    a = ctx.args
    size = a.live_size
    if not fio_nbd_available(ctx, "3"):
        return []
    workdir = tempfile.mkdtemp(prefix="s3-", dir=a.dir)
    try:
        need = 2 * size + 256 * MiB
        free = shutil.disk_usage(workdir).free
        if free < need:
            msg = f"scenario 3: skipped, {fmt_size(free)} free in {a.dir}, need {fmt_size(need)}"
            log(msg)
            ctx.notes.append(msg)
            return []
        src = os.path.join(workdir, "src")
        log(f"scenario 3: creating {fmt_size(size)} of random data in {src}")
        make_dense(src, size, a.seed + 3)
        # Cold page cache before every run: the mirror reads the source from
        # disk, as a migration does, and fio's writes land in fresh 4 KiB
        # folios (see export_fio for why that matters).
        v = Variant("live", workdir, True, src, size, {})
        qsd = want_peer(ctx, "qsd") and ctx.have["qemu-storage-daemon"]
        cs = [Contestant(f"blkmirror-{m}", f"blkmirror mirror --socket --copy-mode {m}",
                         live_blkmirror_mode(m), kind="live") for m in a.blkmirror_copy_modes]
        cs += [Contestant(f"blkmirror-{m}-state", f"blkmirror mirror --socket --copy-mode {m} --state",
                          live_blkmirror_mode(m, True), kind="live") for m in a.blkmirror_state_modes]
        cs += [Contestant(f"blkmirror-daemon-{m}", f"blkmirror daemon blockdev-mirror copy-mode {m}",
                          live_qsd_mode(m, "blkmirror"), kind="live")
               for m in a.blkmirror_daemon_copy_modes]
        if qsd:
            cs += [Contestant(f"qsd-{m}", f"qemu-storage-daemon blockdev-mirror copy-mode {m}",
                              live_qsd_mode(m), kind="live") for m in a.qsd_copy_modes]
        cs.append(base_contestant("blkmirror-base", "blkmirror serve (no mirror)", "blkmirror"))
        if qsd:
            cs.append(base_contestant("qsd-base", "qemu-storage-daemon export (no mirror)", "qsd"))
        res = run_rotation(ctx, "3", v, cs)
        plot = live_plot(ctx, v, cs, res)
        return [live_table(ctx, v, cs, res, qsd, plot)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def live_summary(ok: list[dict], okb: list[dict], size: int) -> dict:
    def cp(k):
        x = med(i[k] for i in ok)
        return None if x is None else x / size
    return {"iops": med(i["iops"] for i in ok), "iops_b": med(i["iops"] for i in okb),
            "p99": med(i["p99_ms"] for i in ok), "p99_b": med(i["p99_ms"] for i in okb),
            "amp_final": cp("copied_final"), "amp_end": cp("copied_fio_end"),
            "amp_ready": cp("copied_ready"),
            "own": cp("own_copied") if any(i.get("own_copied") is not None for i in ok) else None,
            "during": bool(ok) and all(i["ready_during_fio"] for i in ok)}


def live_table(ctx: Ctx, v: Variant, cs: list[Contestant], res: dict[str, list[Measure | None]],
               qsd: bool, plot: str | None) -> Table:
    a = ctx.args
    size = v.size
    header = ["contestant", "ready after s (from mirror start)", "copied/disk at ready",
              "copied/disk at end of fio", "copied/disk at completion", "fio IOPS (mirror)",
              "fio IOPS (no mirror)", "IOPS kept", "p99 ms (mirror)", "p99 ms (no mirror)",
              "notes"]
    rows = []
    summary = {}
    for c in cs:
        if c.kind != "live":
            continue
        key, label = c.key, c.label
        bkey = "blkmirror-base" if key.startswith("blkmirror") else "qsd-base"
        ms = [m.info if m else None for m in res.get(key, [])]
        bs = [m.info if m else None for m in res.get(bkey, [])]
        ok = [i for i in ms if i]
        okb = [i for i in bs if i]
        n_during = sum(1 for i in ok if i["ready_during_fio"])
        ready = med(i["ready_s"] for i in ok)
        if not ok:
            ready_s = "-"
        elif n_during == 0:
            ready_s = (f"not while fio ran ({ready:.1f}; "
                       f"{med(i['ready_after_fio_end_s'] for i in ok):.1f} after fio ended)")
        else:
            ready_s = f"{ready:.2f} ({n_during}/{len(ok)} runs while fio ran)"
        sm = live_summary(ok, okb, size)
        summary[key] = sm
        notes = [f"IOPS per run: {' '.join(fmt_iops(i['iops']) if i else 'FAIL' for i in ms)}"]
        own = med(i["own_copied"] for i in ok if i.get("own_copied") is not None)
        if own is not None:
            notes.append(f"job's own copies (source read + target write, mirrored client "
                         f"writes excluded) {own / size:.2f}x the disk")
        sw = [i["switched_s"] for i in ok if i.get("switched_s") is not None]
        if sw:
            notes.append(f"switched itself to write-blocking {med(sw):.1f}s after the start "
                         f"({len(sw)}/{len(ok)} runs)")
        elif key.endswith("adaptive") and ok and all("switched_s" in i for i in ok):
            notes.append("stayed in background mode")  # the daemon path does not watch
        after = med(i["mirror_after_fio_s"] for i in ok)
        if after is not None:
            notes.append(f"mirror started {after:+.2f}s after fio's spawn")
        cpu = med(i["server_cpu_s"] for i in ok)
        if cpu is not None:
            notes.append(f"server cpu during fio {cpu:.1f}s")
        comp = med(i["complete_s"] for i in ok)
        if comp is not None:
            notes.append(f"complete took {comp:.2f}s")
        rss = [i["rss_kib"] for i in ok if i.get("rss_kib")]
        if rss:
            notes.append(f"peak RSS {max(rss) / 1024:.0f} MiB")
        rows.append([label + failed_runs(res.get(key, [])), ready_s,
                     fmt_x(sm["amp_ready"]), fmt_x(sm["amp_end"]), fmt_x(sm["amp_final"]),
                     fmt_iops(sm["iops"]), fmt_iops(sm["iops_b"]),
                     pct_or_dash(sm["iops"], sm["iops_b"]), fmt_ms(sm["p99"]),
                     fmt_ms(sm["p99_b"]), "; ".join(notes)])
    t = Table(f"Scenario 3, live: fio 4 KiB random writes, queue depth 16, {a.live_runtime} s, "
              f"over NBD to a {fmt_size(size)} source of random data, on disk ({a.dir}, page "
              f"cache dropped before each run), mirrored to an empty sparse target", header, rows)
    # The targets: our active modes against the daemon's write-blocking.
    q = summary.get("qsd-write-blocking")
    for path, mode in [(p, m) for p in ("blkmirror", "blkmirror-daemon")
                       for m in ("write-blocking", "adaptive")]:
        b = summary.get(f"{path}-{mode}")
        if not b:
            continue
        checks = [f"ready while fio still writes: {'yes: OK' if b['during'] else 'no: MISSED'}"]
        amp = b["amp_final"]
        if amp is not None:
            checks.append(f"copied/disk at completion by the offset counter (mirrored client "
                          f"writes included, as the daemon counts) {amp:.2f} (target <= 1.3: "
                          f"{'OK' if amp <= 1.3 else 'MISSED'})")
        own = b.get("own")
        if own is not None:
            checks.append(f"the job's own copies/disk {own:.2f} "
                          f"({'OK' if own <= 1.3 else 'MISSED'} against 1.3)")
        if q:
            r = div(b["iops"], q["iops"])
            if r is not None:
                checks.append(f"fio IOPS vs the daemon's write-blocking **{fmt_x(r)}** "
                              f"(target >= 1.5: {'OK' if r >= 1.5 else 'MISSED'})")
            r = div(b["p99"], q["p99"])
            if r is not None:
                checks.append(f"p99 vs the daemon's write-blocking **{fmt_x(r)}** "
                              f"(target <= 0.7: {'OK' if r <= 0.7 else 'MISSED'})")
        if b["iops"] is not None and b["iops_b"]:
            kept = b["iops"] / b["iops_b"]
            checks.append(f"IOPS kept of its own no-mirror export {kept * 100:.0f}% "
                          f"(target >= 70%: {'OK' if kept >= 0.7 else 'MISSED'})")
        via = "mirror --socket" if path == "blkmirror" else "daemon (QMP)"
        t.notes.append(f"blkmirror {via} {mode}: " + "; ".join(checks))
    b, qb = summary.get("blkmirror-background"), summary.get("qsd-background")
    if b and qb:
        t.notes.append(f"background mode, blkmirror / daemon: fio IOPS "
                       f"{fmt_x(div(b['iops'], qb['iops']))}, copy amplification "
                       f"{fmt_x(div(b['amp_final'], qb['amp_final']))}, p99 "
                       f"{fmt_x(div(b['p99'], qb['p99']))}")
    for key, sm in summary.items():
        if not key.endswith("-state"):
            continue
        plain = summary.get(key[:-len("-state")])
        r = div(sm["iops"], plain["iops"]) if plain else None
        if r is not None:
            t.notes.append(f"crash-safe state ({key[len('blkmirror-'):-len('-state')]}): fio IOPS "
                           f"with --state / without **{r * 100:.0f}%** (target >= 90%: "
                           f"{'met' if r >= 0.9 else 'missed'})")
    if plot:
        t.notes.append(f"dirty and copied bytes over time, per mode: `{plot}`")
    ln = load_note(res)
    if ln:
        t.notes.append(ln)
    t.notes.append("start: the daemon's job starts 1 s after fio (docs/measuring.md). blkmirror has no way to "
                   "start the job after its export is up, so its mirror starts with the export and "
                   "fio connects right after: blkmirror mirrors during all of fio's run, including "
                   "the first second (a small handicap for blkmirror)")
    t.notes.append("time to ready: from the mirror start (blkmirror: its job 'running' event; the "
                   "daemon: blockdev-mirror sent) to BLOCK_JOB_READY; 'not while fio ran' = ready "
                   "only after fio had stopped writing. Copied = the job's offset (every byte "
                   "copied or zeroed, re-copies and synchronously mirrored client writes "
                   "included) / disk size: at BLOCK_JOB_READY, at fio's end and at "
                   "BLOCK_JOB_COMPLETED")
    t.notes.append("fio IOPS and p99 (completion latency) are over fio's whole run; 'no mirror' is "
                   "fio on the same contestant's export with no job (`blkmirror serve` for both "
                   "blkmirror paths, the daemon's export alone); IOPS kept = mirror / no mirror. "
                   "After completion every target is checked with cmp against the source")
    t.notes.append("two blkmirror paths: `blkmirror mirror --socket` (the CLI: serves the source "
                   "and mirrors at once, granularity from the target as the CLI picks it) and "
                   "`blkmirror daemon` driven over QMP exactly as the daemon peer is "
                   "(blockdev-mirror 1 s after fio starts, default granularity, query-block-jobs "
                   "for the offset)")
    return t


def live_plot(ctx: Ctx, v: Variant, cs: list[Contestant],
              res: dict[str, list[Measure | None]]) -> str | None:
    """Draws dirty bytes and copied bytes over time, one panel per mirrored
    contestant (its first successful run), as a hand-written SVG (no plotting
    library needed). Returns the file's path."""
    panels = []
    for c in cs:
        if c.kind != "live":
            continue
        m = next((m for m in res.get(c.key, []) if m and m.info.get("series")), None)
        if m:
            panels.append((c.label, m.info))
    if not panels:
        return None
    path = os.path.join(ctx.args.dir, "scenario3-live.svg")
    with open(path, "w") as f:
        f.write(svg_panels(panels, v.size, ctx.args.live_runtime))
    with open(os.path.join(ctx.args.dir, "scenario3-series.json"), "w") as f:
        json.dump([{"label": lb, "series": i["series"], "marks": i.get("marks", []),
                    "fio_end_s": i.get("fio_end_s")} for lb, i in panels], f)
    log(f"scenario 3: time series drawn in {path}")
    return path


KEY = "3"
TITLE = "live, fio writing over NBD during the mirror"
run = scenario_3


def add_arguments(g) -> None:
    g.add_argument("--live-size", type=parse_size, default=None, help="source size (default 2G)")
    g.add_argument("--live-runtime", type=int, default=None,
                   help="fio runtime in seconds (default 20)")
    g.add_argument("--qsd-copy-mode", default="background",
                   choices=["background", "write-blocking"],
                   help=argparse.SUPPRESS)  # superseded by --qsd-copy-modes
    g.add_argument("--qsd-copy-modes", default="background,write-blocking",
                   help="the daemon peer's copy modes (default background,write-blocking)")
    g.add_argument("--blkmirror-copy-modes", default="background,write-blocking,adaptive",
                   help="`blkmirror mirror --socket` copy modes (default all three)")
    g.add_argument("--blkmirror-state-modes", default="write-blocking,adaptive",
                   help="copy modes run again with --state (crash-safe state; its IOPS cost "
                        "against the same mode without; empty: none)")
    g.add_argument("--blkmirror-daemon-copy-modes", default="write-blocking,adaptive",
                   help="`blkmirror daemon` (QMP, as the daemon peer is driven) copy modes "
                        "(default write-blocking,adaptive; empty: none)")


def resolve_arguments(a) -> str | None:
    a.live_size = a.live_size or (256 * MiB if a.quick else 2 * GiB)
    a.live_runtime = a.live_runtime or (5 if a.quick else 20)
    a.qsd_copy_modes = [x for x in a.qsd_copy_modes.split(",") if x]
    a.blkmirror_copy_modes = [x for x in a.blkmirror_copy_modes.split(",") if x]
    a.blkmirror_daemon_copy_modes = [x for x in a.blkmirror_daemon_copy_modes.split(",") if x]
    a.blkmirror_state_modes = [x for x in a.blkmirror_state_modes.split(",") if x]
    if a.live_runtime < 2:
        return "--live-runtime must be >= 2 (the daemon's job starts after 1 s)"
    return None
