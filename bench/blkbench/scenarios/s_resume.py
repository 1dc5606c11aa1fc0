"""docs/measuring.md scenario 8, crash and resume (issue 12): a mirror with crash-safe
state (`--state`) killed with SIGKILL once half the disk is copied, then run again: the
time and bytes of that resume against a full re-copy of the same disk, in the same run.
On disk (the page cache dropped before every timed run when possible)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from ..core import Contestant, Ctx, Measure, Table, Variant, median_of, run_rotation
from ..peers import verify_cmp
from ..procs import RunFailed, check_proc, run_timed
from ..report import speedup_notes, time_table
from ..util import GiB, MiB, fmt_size, fresh_sparse, log, make_dense, parse_size, remove


def kill_at_half(ctx: Ctx, src: str, dst: str, state: str) -> None:
    """Starts a mirror with state, SIGKILLs it once it reported half the disk copied."""
    cmd = [ctx.blkmirror, "mirror", src, dst, "--state", state, "--json", "--no-progress",
           "--progress-interval", "0.2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if not line.startswith("{"):
                continue
            e = json.loads(line)
            d = e.get("data", {})
            if e.get("event") == "PROGRESS" and d.get("len") and d["offset"] >= d["len"] / 2:
                break
            if e.get("event") in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"):
                raise RunFailed("the mirror finished before it could be killed at 50%")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    time.sleep(0.3)  # the kernel drops the dead process's image locks a moment later


def copied_of(stdout: str) -> int | None:
    for line in stdout.splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            if e.get("event") == "BLOCK_JOB_COMPLETED":
                return e["data"].get("offset")
    return None


def contestant(key: str, label: str, resume: bool) -> Contestant:
    def run(ctx: Ctx, v: Variant) -> Measure:
        dst = os.path.join(v.workdir, f"dst-{key}")
        state = os.path.join(v.workdir, f"state-{key}")
        remove(state)
        fresh_sparse(dst, v.size)
        try:
            if resume:
                # A disk in use is not a file written a moment ago: nothing of the
                # source waits in the page cache for the state's first flush.
                ctx.drop_caches()
                kill_at_half(ctx, v.src, dst, state)
            ctx.drop_caches()
            cmd = [ctx.blkmirror, "mirror", v.src, dst, "--json", "--no-progress"]
            if resume:
                cmd += ["--state", state]
            p = run_timed(cmd)
            check_proc(label, cmd, p)
            copied = copied_of(p.out)
            verify_cmp(v.src, dst, label)
            return Measure({"": p.wall}, rss_kib=p.maxrss_kib,
                           info={"cpu": p.utime + p.stime, "resume_copied": copied})
        finally:
            remove(dst)
            remove(state)

    return Contestant(key, label, run)


def scenario_resume(ctx: Ctx) -> list[Table]:
    a = ctx.args
    size = a.resume_size
    workdir = tempfile.mkdtemp(prefix="sr-", dir=a.dir)
    try:
        need = 2 * size + 256 * MiB
        if shutil.disk_usage(workdir).free < need:
            msg = f"scenario resume: skipped, less than {fmt_size(need)} free in {a.dir}"
            log(msg)
            ctx.notes.append(msg)
            return []
        src = os.path.join(workdir, "src")
        log(f"scenario resume: {fmt_size(size)} of random data in {src}")
        make_dense(src, size, a.seed + 8)
        v = Variant("resume", workdir, False, src, size, {})
        cs = [contestant("blkmirror", "resume after SIGKILL at 50% (--state)", True),
              contestant("full", "full re-copy", False)]
        res = run_rotation(ctx, "resume", v, cs)
        t = time_table(ctx, f"Scenario 8 (crash and resume), {fmt_size(size)} on disk ({a.dir})",
                       v, cs, res)
        for c in cs:
            got = [m.info.get("resume_copied") for m in res[c.key] if m and m.info.get("resume_copied")]
            if got:
                t.notes.append(f"{c.label}: copied {', '.join(fmt_size(x) for x in got)} "
                               f"({got[-1] / size * 100:.0f}% of the disk)")
        t.notes += speedup_notes(res, [("full", "", "a full re-copy")])
        return [t]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


KEY = "resume"
TITLE = "crash at 50% and resume, against a full re-copy (scenario 8)"
run = scenario_resume


def add_arguments(g) -> None:
    g.add_argument("--resume-size", type=parse_size, default=None,
                   help="disk size (default 2G)")


def resolve_arguments(a) -> str | None:
    a.resume_size = a.resume_size or (256 * MiB if a.quick else 2 * GiB)
    return None
