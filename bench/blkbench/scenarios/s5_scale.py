"""docs/measuring.md scenario 5: scale. The same amount of data (1 GiB in 1 MiB extents at
random offsets) in ever larger virtual disks, against the same data dense: time
must follow the data, not the virtual size, and memory must follow the buffer
and the dirty bitmap (buf-size + bitmap + 32 MiB).

It runs on tmpfs (--shm-dir): ext4 cannot hold a file above 16 TiB, tmpfs holds
64 TiB sparse files, and without a disk under it the table shows the engine's
own cost of a large virtual size. blkmirror only: the daemon peer allocates the
whole target (scenario 2 shows it), which a 1 TiB target cannot afford here."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile

from ..core import Ctx, Table, Variant, run_rotation
from ..peers import blkmirror_argv, blkmirror_target_rss, copy_contestant
from ..scenarios.s2_sparse import verify_sparse_or_dense
from ..util import GiB, MiB, fmt_ratio, fmt_s, fmt_size, log, make_dense, make_sparse, parse_size

KEY = "5"
TITLE = "scale: 1 GiB of data in virtual disks up to 64 TiB"


def add_arguments(g) -> None:
    g.add_argument("--scale-data", type=parse_size, default=None,
                   help="data in every disk (default 1G)")
    g.add_argument("--scale-virtual", default=None,
                   help="comma list of virtual sizes (default 16G,1T,64T)")


def resolve_arguments(a) -> str | None:
    a.scale_data = a.scale_data or (64 * MiB if a.quick else GiB)
    a.scale_virtual = [parse_size(x) for x in
                       (a.scale_virtual or ("4G,1T,64T" if a.quick else "16G,1T,64T")).split(",")
                       if x]
    if any(v < a.scale_data for v in a.scale_virtual):
        return "--scale-virtual sizes must hold --scale-data"
    return None


def run(ctx: Ctx) -> list[Table]:
    a = ctx.args
    data = a.scale_data
    workdir = tempfile.mkdtemp(prefix="s5-", dir=a.shm_dir)
    try:
        need = (len(a.scale_virtual) + 3) * data + 256 * MiB
        if shutil.disk_usage(workdir).free < need:
            msg = f"scenario 5: skipped, less than {fmt_size(need)} free in {a.shm_dir}"
            log(msg)
            ctx.notes.append(msg)
            return []
        dense = os.path.join(workdir, "dense")
        log(f"scenario 5: {fmt_size(data)} dense, and in sparse disks of "
            f"{', '.join(fmt_size(v) for v in a.scale_virtual)}")
        make_dense(dense, data, a.seed + 5)
        extra = {"verify": verify_sparse_or_dense, "dense": dense, "size-dense": data}
        cs = [copy_contestant("blkmirror", f"blkmirror, {fmt_size(data)} dense", blkmirror_argv,
                              src_key="dense", size_key="size-dense")]
        for vsize in a.scale_virtual:
            name = fmt_size(vsize).replace(" ", "")
            src = os.path.join(workdir, f"sparse-{name}")
            make_sparse(src, vsize, data, a.seed)
            extra[f"src-{name}"], extra[f"size-{name}"] = src, vsize
            cs.append(copy_contestant(f"blkmirror-{name}", f"blkmirror, {name} virtual",
                                      blkmirror_argv, src_key=f"src-{name}",
                                      size_key=f"size-{name}"))
        v = Variant("scale", workdir, False, dense, data, extra)
        res = run_rotation(ctx, "5", v, cs)
        return [scale_table(ctx, v, cs, res, data)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def scale_table(ctx, v, cs, res, data) -> Table:
    header = ["disk", "virtual", "median s", "runs s", "worst s", "time / dense time",
              "cpu s", "peak RSS", "RSS target (buf + bitmap + 32 MiB)", "verdict"]
    base = [m.times[""] for m in res["blkmirror"] if m]
    base_med = statistics.median(base) if base else None
    rows = []
    for c in cs:
        ms = [m for m in res[c.key] if m]
        size = v.extra[c.key.replace("blkmirror", "size") if c.key != "blkmirror" else "size-dense"]
        times = [m.times[""] for m in ms]
        med = statistics.median(times) if times else None
        cpu = statistics.median(m.info["cpu"] for m in ms) if ms else None
        rss = max((m.rss_kib for m in ms if m.rss_kib), default=0) * 1024
        target, how = blkmirror_target_rss(ms[-1].info if ms else {}, size)
        ratio = med / base_med if med and base_med else None
        verdict = []
        if c.key != "blkmirror" and ratio is not None:
            verdict.append(f"time {'OK' if ratio <= 1.2 else 'OVER 1.2x'}")
        if rss:
            verdict.append("RSS OK" if rss <= target else "RSS OVER")
        rows.append([c.label, fmt_size(size), fmt_s(med),
                     " ".join(fmt_s(m.times[""]) if m else "FAIL" for m in res[c.key]),
                     fmt_s(max(times) if times else None),
                     "1.00 (base)" if c.key == "blkmirror" else fmt_ratio(ratio),
                     f"{cpu:.2f}" if cpu is not None else "-",
                     fmt_size(rss) if rss else "-", f"{fmt_size(target)} ({how})",
                     ", ".join(verdict)])
    t = Table(f"Scenario 5, scale: {fmt_size(data)} of data in 1 MiB extents, on tmpfs "
              f"({ctx.args.shm_dir}), empty sparse targets", header, rows)
    t.notes.append("targets: 1 TiB virtual at most 1.2x the dense copy's time; 64 TiB completes "
                   "with peak RSS within buf-size + bitmap + 32 MiB; every target is verified "
                   "(qemu-img compare for the sparse disks)")
    return t
