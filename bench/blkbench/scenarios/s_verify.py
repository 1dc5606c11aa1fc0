"""docs/measuring.md scenario 8, verify part (issue 12): `blkmirror verify` of two equal
files against reading one of them sequentially (the issue's yardstick: at least 0.9x the
speed of reading the slower device), reading both one after the other, `cmp` and
`qemu-img compare`. On disk with a cold page cache and on tmpfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from ..core import Contestant, Ctx, Measure, Table, Variant, median_of, run_rotation
from ..procs import check_proc, run_timed
from ..report import speedup_notes, time_table
from ..util import GiB, MiB, fmt_size, log, make_dense, parse_size


def command_contestant(key: str, label: str, argv, kind: str = "copy") -> Contestant:
    """One command over the variant's two files; its exit status must be 0."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        cmd = argv(ctx, v.src, v.extra["dst"])
        p = run_timed(cmd)
        check_proc(label, cmd, p)
        return Measure({"": p.wall}, rss_kib=p.maxrss_kib, info={"cpu": p.utime + p.stime})

    return Contestant(key, label, run, kind=kind)


def scenario_verify(ctx: Ctx) -> list[Table]:
    a = ctx.args
    size = a.verify_size
    tables = []
    for vname in a.verify_variants:
        if vname == "disk":
            base_dir, cold = a.dir, True
        elif vname == "shm":
            base_dir, cold = a.shm_dir, False
        else:
            raise SystemExit(f"unknown variant {vname!r} (disk, shm)")
        workdir = tempfile.mkdtemp(prefix="sv-", dir=base_dir)
        try:
            need = 2 * size + 256 * MiB
            if shutil.disk_usage(workdir).free < need:
                msg = f"scenario verify/{vname}: skipped, less than {fmt_size(need)} free"
                log(msg)
                ctx.notes.append(msg)
                continue
            src = os.path.join(workdir, "src")
            dst = os.path.join(workdir, "dst")
            log(f"scenario verify/{vname}: {fmt_size(size)} of random data, copied")
            make_dense(src, size, a.seed)
            subprocess.run(["cp", src, dst], check=True)
            v = Variant(vname, workdir, cold and ctx.can_drop_caches, src, size, {"dst": dst})
            direct = ["--direct"] if vname == "disk" else []
            cs = [
                command_contestant("blkmirror", "blkmirror verify",
                                   lambda c, s, d: [c.blkmirror, "verify", s, d, "--no-progress",
                                                    *direct]),
                command_contestant("read-one", "read one file (cat > /dev/null)",
                                   lambda c, s, d: ["sh", "-c", 'cat "$0" > /dev/null', d],
                                   kind="reference"),
                command_contestant("read-both", "read both, one after the other",
                                   lambda c, s, d: ["sh", "-c",
                                                    'cat "$0" > /dev/null && cat "$1" > /dev/null',
                                                    s, d],
                                   kind="reference"),
                command_contestant("cmp", "cmp", lambda c, s, d: ["cmp", s, d]),
            ]
            if ctx.have.get("qemu-img"):
                cs.append(command_contestant(
                    "qemu-img", "qemu-img compare",
                    lambda c, s, d: ["qemu-img", "compare", "-f", "raw", "-F", "raw", s, d]))
            res = run_rotation(ctx, "verify", v, cs)
            where = (f"on disk ({base_dir}), page cache dropped before every run" if v.cold
                     else f"on tmpfs ({base_dir})" if vname == "shm"
                     else f"on disk ({base_dir}), WARM cache (cannot drop)")
            t = time_table(ctx, f"Scenario 8 (verify), two equal {fmt_size(size)} files {where}",
                           v, cs, res)
            base = median_of(res["blkmirror"])
            one = median_of(res.get("read-one", []))
            if base and one:
                t.notes.append(f"verify speed / reading one file's speed = **{one / base:.2f}** "
                               f"(target >= 0.9: {'met' if one / base >= 0.9 else 'missed'})")
            t.notes += speedup_notes(res, [("read-both", "", "reading both files one after "
                                            "the other"), ("cmp", "", "cmp"),
                                           ("qemu-img", "", "qemu-img compare")])
            tables.append(t)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return tables


KEY = "verify"
TITLE = "verify against reading both devices (scenario 8)"
run = scenario_verify


def add_arguments(g) -> None:
    g.add_argument("--verify-size", type=parse_size, default=None,
                   help="size of each file (default 2G)")
    g.add_argument("--verify-variants", default="disk,shm",
                   help="disk (cold cache), shm (tmpfs); default both")


def resolve_arguments(a) -> str | None:
    a.verify_size = a.verify_size or (256 * MiB if a.quick else 2 * GiB)
    a.verify_variants = [x for x in a.verify_variants.split(",") if x]
    return None
