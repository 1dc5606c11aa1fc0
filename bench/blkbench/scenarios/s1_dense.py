"""docs/measuring.md scenario 1: an idle dense copy, on disk with a cold page cache and on
tmpfs, against the daemon peer, nbdcopy, qemu-img, cp and the device limit."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..core import Ctx, Table, Variant, median_of, run_rotation
from ..peers import blkmirror_argv, copy_contestant, fio_contestant, qsd_contestant, verify_cmp
from ..report import rss_note, speedup_notes, time_table
from ..util import GiB, MiB, fmt_size, log, make_dense, parse_size


def scenario_1(ctx: Ctx) -> list[Table]:
    a = ctx.args
    size = a.size
    tables = []
    for vname in a.variants:
        if vname == "disk":
            base_dir, cold = a.dir, True
        elif vname == "shm":
            base_dir, cold = a.shm_dir, False
        else:
            raise SystemExit(f"unknown variant {vname!r} (disk, shm)")
        workdir = tempfile.mkdtemp(prefix="s1-", dir=base_dir)
        try:
            need = 2 * size + 256 * MiB
            free = shutil.disk_usage(workdir).free
            if free < need:
                msg = (f"scenario 1/{vname}: skipped, {fmt_size(free)} free in {base_dir}, "
                       f"need {fmt_size(need)}")
                log(msg)
                ctx.notes.append(msg)
                continue
            src = os.path.join(workdir, "src")
            log(f"scenario 1/{vname}: creating {fmt_size(size)} of random data in {src}")
            make_dense(src, size, a.seed)
            v = Variant(vname, workdir, cold and ctx.can_drop_caches, src, size,
                        {"verify": verify_cmp})
            direct = vname == "disk"
            cs = [copy_contestant("blkmirror", "blkmirror", blkmirror_argv)]
            avail = set(a.contestants) if a.contestants else None

            def want(k: str) -> bool:
                return avail is None or k in avail

            if want("qsd") and ctx.have["qemu-storage-daemon"]:
                cs.append(qsd_contestant())
            if want("nbdcopy") and ctx.have["nbdcopy"]:
                cs.append(copy_contestant(
                    "nbdcopy", "nbdcopy --flush", lambda c, s, d: ["nbdcopy", "--flush", s, d]))
            if want("qemu-img") and ctx.have["qemu-img"]:
                cs.append(copy_contestant(
                    "qemu-img", "qemu-img convert -n",
                    lambda c, s, d: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", s, d],
                    fsync_after=True))
            if want("cp"):
                cs.append(copy_contestant("cp", "cp", lambda c, s, d: ["cp", s, d],
                                          fsync_after=True))
            if want("fio") and ctx.have["fio"]:
                mode = "O_DIRECT" if direct else "buffered"
                cs.append(fio_contestant("fio-read", f"device read limit (fio, {mode})",
                                         "read", direct))
                cs.append(fio_contestant("fio-write", f"device write limit (fio, {mode})",
                                         "write", direct))
            res = run_rotation(ctx, "1", v, cs)
            where = (f"on disk ({base_dir}), page cache dropped before every run"
                     if v.cold else (f"on tmpfs ({base_dir})" if vname == "shm"
                                     else f"on disk ({base_dir}), WARM cache (cannot drop)"))
            t = time_table(ctx, f"Scenario 1, idle dense copy, {fmt_size(size)} {where}",
                           v, cs, res)
            t.notes += speedup_notes(res, [
                ("qsd", "", "qemu-storage-daemon (job time)"),
                ("qsd", "total", "qemu-storage-daemon (total incl. daemon start)"),
                ("nbdcopy", "", "nbdcopy"),
                ("qemu-img", "", "qemu-img convert"),
                ("cp", "", "cp"),
            ])
            base = median_of(res["blkmirror"])
            for k in ("fio-read", "fio-write"):
                lim = median_of(res.get(k, []))
                if lim and base:
                    what = "read" if k == "fio-read" else "write"
                    t.notes.append(f"blkmirror vs device {what} limit: limit time / blkmirror time = "
                                   f"**{lim / base:.2f}** (1.00 = at the limit; "
                                   f"blkmirror takes {base / lim:.2f}x the limit's time)")
            n = rss_note(ctx, res, size)
            if n:
                t.notes.append(n)
            tables.append(t)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return tables


KEY = "1"
TITLE = "idle copy, dense"
run = scenario_1


def add_arguments(g) -> None:
    g.add_argument("--size", type=parse_size, default=None, help="data size (default 2G)")
    g.add_argument("--variants", default="disk,shm",
                   help="disk (cold cache), shm (tmpfs); default both")


def resolve_arguments(a) -> str | None:
    a.size = a.size or (256 * MiB if a.quick else 2 * GiB)
    a.variants = [x for x in a.variants.split(",") if x]
    return None
