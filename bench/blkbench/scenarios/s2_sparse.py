"""docs/measuring.md scenario 2: a sparse disk (1 MiB data extents at random offsets):
time, and how much of the target ends up allocated."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..core import Ctx, Table, Variant, median_of, run_rotation
from ..peers import blkmirror_argv, copy_contestant, qsd_contestant, verify_cmp, verify_qemu_img
from ..report import rss_note, speedup_notes, time_table
from ..util import GiB, MiB, allocated, fmt_size, log, make_dense, make_sparse, parse_size, remove


def scenario_2(ctx: Ctx) -> list[Table]:
    a = ctx.args
    virtual, data = a.sparse_virtual, a.sparse_data
    base_dir = a.dir
    tables = []
    workdir = tempfile.mkdtemp(prefix="s2-", dir=base_dir)
    try:
        free = shutil.disk_usage(workdir).free
        margin = 16 * GiB if not a.quick else 1 * GiB
        fixed = 3 * data + 256 * MiB  # sparse source, dense reference, a sparse target
        if free < fixed:
            msg = f"scenario 2: skipped, {fmt_size(free)} free, need {fmt_size(fixed)}"
            log(msg)
            ctx.notes.append(msg)
            return []
        want_qsd = ctx.have["qemu-storage-daemon"] and (
            not a.contestants or "qsd" in a.contestants)
        # qemu-storage-daemon fully allocates the target: it needs the virtual size free
        qsd_virtual = a.qsd_sparse_virtual or virtual
        if want_qsd and not a.qsd_sparse_virtual and free < virtual + fixed + margin:
            qsd_virtual = min(virtual, 16 * GiB)
            if free < qsd_virtual + fixed + margin:
                qsd_virtual = 0
        sizes = [virtual]
        if want_qsd and qsd_virtual and qsd_virtual != virtual:
            sizes.append(qsd_virtual)
        if want_qsd and qsd_virtual != virtual:
            msg = (f"scenario 2: qemu-storage-daemon allocates the whole target and "
                   f"{fmt_size(free)} is free in {base_dir} (< {fmt_size(virtual)} + "
                   f"{fmt_size(fixed + margin)} margin): it runs "
                   + (f"only on a {fmt_size(qsd_virtual)} virtual disk (same data size), in a "
                      f"separate table where all contestants run at that size"
                      if qsd_virtual else "nowhere (not enough space even for 16 GiB)"))
            log(msg)
            ctx.notes.append(msg)

        dense = os.path.join(workdir, "dense")
        log(f"scenario 2: creating a dense {fmt_size(data)} reference file")
        make_dense(dense, data, a.seed + 7)
        for vsize in sizes:
            src = os.path.join(workdir, f"sparse-{vsize}")
            log(f"scenario 2: creating {fmt_size(vsize)} virtual with {fmt_size(data)} of data "
                f"in 1 MiB extents (seed {a.seed})")
            n = make_sparse(src, vsize, data, a.seed)
            src_alloc = allocated(src)
            v = Variant(f"{fmt_size(vsize).replace(' ', '')}", workdir, ctx.can_drop_caches,
                        src, vsize, {"verify": verify_sparse_or_dense, "dense": dense,
                                     "dense_size": data, "data_size": data})

            def want(k: str) -> bool:
                return not a.contestants or k in a.contestants

            cs = [copy_contestant("blkmirror", "blkmirror", blkmirror_argv)]
            if want_qsd and vsize == qsd_virtual:
                cs.append(qsd_contestant())
            if want("nbdcopy") and ctx.have["nbdcopy"]:
                cs.append(copy_contestant(
                    "nbdcopy", "nbdcopy --flush", lambda c, s, d: ["nbdcopy", "--flush", s, d]))
            if want("qemu-img") and ctx.have["qemu-img"]:
                cs.append(copy_contestant(
                    "qemu-img", "qemu-img convert -n",
                    lambda c, s, d: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", s, d],
                    fsync_after=True))
            cs.append(copy_contestant("blkmirror-dense", f"ref: blkmirror, {fmt_size(data)} dense",
                                      blkmirror_argv, src_key="dense", size_key="dense_size",
                                      kind="reference"))
            cs.append(copy_contestant("cp-dense", f"ref: cp, {fmt_size(data)} dense",
                                      lambda c, s, d: ["cp", s, d], fsync_after=True,
                                      src_key="dense", size_key="dense_size", kind="reference"))
            cold = "page cache dropped before every run" if v.cold else "WARM cache"
            res = run_rotation(ctx, "2", v, cs)
            t = time_table(ctx, f"Scenario 2, sparse: {fmt_size(vsize)} virtual, {fmt_size(data)} "
                                f"of data in {n} x 1 MiB extents, on disk ({base_dir}), {cold}",
                           v, cs, res, show_alloc=True)
            t.notes.append(f"source allocated: {fmt_size(src_alloc)}; MB/s is over the "
                           f"{fmt_size(data)} of data")
            for c in cs:
                if c.kind != "copy":
                    continue
                allocs = [m.alloc for m in res[c.key] if m and m.alloc is not None]
                if allocs:
                    t.notes.append(f"{c.label}: target allocated / source allocated = "
                                   f"**{max(allocs) / src_alloc:.2f}**")
            t.notes += speedup_notes(res, [
                ("qsd", "", "qemu-storage-daemon (job time)"),
                ("qsd", "total", "qemu-storage-daemon (total incl. daemon start)"),
                ("nbdcopy", "", "nbdcopy"),
                ("qemu-img", "", "qemu-img convert"),
            ])
            base = median_of(res["blkmirror"])
            for k, lbl in (("blkmirror-dense", "blkmirror"), ("cp-dense", "cp")):
                ref = median_of(res.get(k, []))
                if ref and base:
                    ok = "OK" if base <= 2 * ref else "OVER 2x"
                    t.notes.append(f"blkmirror sparse time / {lbl} copying the {fmt_size(data)} "
                                   f"alone = **{base / ref:.2f}** (target <= 2: {ok})")
            nn = rss_note(ctx, res, vsize)
            if nn:
                t.notes.append(nn)
            tables.append(t)
            remove(src)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return tables


def verify_sparse_or_dense(src: str, dst: str, who: str) -> None:
    """Scenario 2: hole-aware qemu-img compare for the sparse copies (cmp would
    read every hole), cmp for the small dense references."""
    if allocated(src) >= os.stat(src).st_size // 2:
        verify_cmp(src, dst, who)
    else:
        verify_qemu_img(src, dst, who)


KEY = "2"
TITLE = "sparse"
run = scenario_2


def add_arguments(g) -> None:
    g.add_argument("--sparse-virtual", type=parse_size, default=None,
                   help="virtual size (default 64G)")
    g.add_argument("--sparse-data", type=parse_size, default=None,
                   help="data in 1 MiB extents (default 512M)")
    g.add_argument("--qsd-sparse-virtual", type=parse_size, default=None,
                   help="virtual size for qemu-storage-daemon, which allocates the whole target "
                        "(default: the virtual size, or 16G when free space is short)")


def resolve_arguments(a) -> str | None:
    a.sparse_virtual = a.sparse_virtual or (4 * GiB if a.quick else 64 * GiB)
    a.sparse_data = a.sparse_data or (64 * MiB if a.quick else 512 * MiB)
    return None
