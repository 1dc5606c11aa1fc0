"""docs/measuring.md scenario 9 (issue 14): mirroring into Ceph RBD on a real one-OSD
cluster (scripts/ceph-cluster, memstore, on loopback, started for this scenario and
removed after it). Idle copies of a dense and a sparse file into an rbd image:
blkmirror against qemu-storage-daemon's mirror with QEMU's rbd driver and against
`rbd import`; then live: fio 4 KiB random writes over blkmirror's export while it
mirrors into rbd, against the same fio on the export with no mirror.

Every contestant writes a fresh image and its time excludes making the image (but for
`rbd import`, which makes its own: a few ms). Judges: `qemu-img compare` through
QEMU's own rbd driver, and `rbd du` for the space the target uses."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile

from ..core import Contestant, Ctx, Measure, Table, Variant, run_rotation
from ..peers import parse_blkmirror_stderr, qsd_mirror
from ..procs import RunFailed, check_proc, run_timed
from ..report import speedup_notes, time_table
from ..util import REPO, GiB, MiB, allocated, fmt_size, log, make_dense, make_sparse, parse_size
from .s3_live import base_contestant, live_blkmirror_mode, live_table

CLUSTER = os.path.join(REPO, "scripts", "ceph-cluster")


class Cluster:
    """The scenario's Ceph cluster and its images (pool `rbd`)."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "ceph.conf")
        self._ids = itertools.count()

    def rbd(self, *args: str, timeout: float = 600) -> str:
        cmd = ["rbd", "-c", self.conf, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RunFailed(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r.stdout

    def name(self) -> str:
        return f"rbd/bench-{os.getpid()}-{next(self._ids)}"

    def create(self, size: int, name: str | None = None) -> str:
        """Makes image `name` (default: a fresh one) of `size` bytes; returns its name."""
        name = name or self.name()
        self.rbd("create", "--size", f"{size}B", name)
        return name

    def remove(self, name: str) -> None:
        try:
            self.rbd("rm", "--no-progress", name)
        except RunFailed as e:
            log(f"  (could not remove {name}: {e})")

    def spec(self, name: str) -> str:
        return f"rbd:{name}:conf={self.conf}"

    def used(self, name: str) -> int:
        images = json.loads(self.rbd("du", "--format", "json", name))["images"]
        return sum(i["used_size"] for i in images if i.get("snapshot") is None)

    def verify(self, src: str, name: str, who: str) -> None:
        r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", src,
                            self.spec(name)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RunFailed(f"VERIFY MISMATCH after {who}: qemu-img compare {src} "
                            f"{self.spec(name)}: {(r.stdout + r.stderr).strip()}")


def start_cluster(store: int) -> Cluster:
    # A short path: the daemons' admin sockets live under it.
    root = tempfile.mkdtemp(prefix="s9-ceph-", dir="/tmp")
    env = dict(os.environ, CEPH_MEMSTORE_BYTES=str(store))
    r = subprocess.run([CLUSTER, "start", root], capture_output=True, text=True, env=env,
                       timeout=180)
    if r.returncode != 0:
        raise RunFailed(f"scripts/ceph-cluster start: {r.stderr.strip()}")
    return Cluster(root)


def stop_cluster(c: Cluster) -> None:
    subprocess.run([CLUSTER, "stop", c.root], capture_output=True, timeout=120)


def timed_into_rbd(key: str, label: str, cl: Cluster, copy) -> Contestant:
    """A contestant that copies v.src into a fresh image: copy(ctx, v, name) makes
    the image's content and returns (seconds, info); then verify, `rbd du`, remove."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        name = cl.name()
        try:
            secs, info, rss = copy(ctx, v, name)
            cl.verify(v.src, name, label)
            return Measure({"": secs}, rss_kib=rss, alloc=cl.used(name), info=info)
        finally:
            cl.remove(name)

    return Contestant(key, label, run)


def blkmirror_into(cl: Cluster):
    def copy(ctx: Ctx, v: Variant, name: str):
        cl.create(v.size, name)
        cmd = [ctx.blkmirror, "mirror", v.src, cl.spec(name), "--no-progress"]
        p = run_timed(cmd)
        check_proc("blkmirror mirror", cmd, p)
        info = parse_blkmirror_stderr(p.err)
        info["cpu"] = p.utime + p.stime
        return p.wall, info, p.maxrss_kib
    return copy


def qsd_into(cl: Cluster):
    def copy(ctx: Ctx, v: Variant, name: str):
        cl.create(v.size, name)
        pool, image = name.split("/", 1)
        r = qsd_mirror(v.src, "", v.workdir, dst_nodes=[
            f"driver=rbd,node-name=dst,pool={pool},image={image},conf={cl.conf}"])
        return r["job"], {"cpu": r["cpu"], "ready": r["ready"]}, r["maxrss_kib"]
    return copy


def rbd_import_into(cl: Cluster):
    def copy(ctx: Ctx, v: Variant, name: str):
        cmd = ["rbd", "-c", cl.conf, "import", "--no-progress", v.src, name]
        p = run_timed(cmd)
        check_proc("rbd import", cmd, p)
        return p.wall, {"cpu": p.utime + p.stime}, p.maxrss_kib
    return copy


def idle_tables(ctx: Ctx, cl: Cluster, workdir: str) -> list[Table]:
    a = ctx.args
    tables = []
    for vname in a.rbd_variants:
        if vname == "dense":
            src = os.path.join(workdir, "dense")
            log(f"scenario 9/dense: {fmt_size(a.rbd_size)} of random data")
            make_dense(src, a.rbd_size, a.seed + 9)
            v = Variant("dense", workdir, False, src, a.rbd_size, {})
        elif vname == "sparse":
            src = os.path.join(workdir, "sparse")
            log(f"scenario 9/sparse: {fmt_size(a.rbd_sparse_virtual)} virtual, "
                f"{fmt_size(a.rbd_sparse_data)} of data in 1 MiB extents")
            make_sparse(src, a.rbd_sparse_virtual, a.rbd_sparse_data, a.seed + 9)
            v = Variant("sparse", workdir, False, src, a.rbd_sparse_virtual,
                        {"data_size": allocated(src)})
        else:
            raise SystemExit(f"unknown variant {vname!r} (dense, sparse)")
        cs = [timed_into_rbd("blkmirror", "blkmirror mirror", cl, blkmirror_into(cl))]
        if ctx.have["qemu-storage-daemon"] and (not a.contestants or "qsd" in a.contestants):
            cs.append(timed_into_rbd("qsd", "qemu-storage-daemon (rbd driver)", cl, qsd_into(cl)))
        cs.append(timed_into_rbd("rbd-import", "rbd import", cl, rbd_import_into(cl)))
        res = run_rotation(ctx, "9", v, cs)
        what = (f"{fmt_size(v.size)} dense" if vname == "dense" else
                f"{fmt_size(v.size)} virtual with {fmt_size(v.extra['data_size'])} of data")
        t = time_table(ctx, f"Scenario 9, file -> rbd (one memstore OSD on loopback), {what}",
                       v, cs, res, show_alloc=True)
        t.notes += speedup_notes(res, [("qsd", "", "qemu-storage-daemon (job time)"),
                                       ("rbd-import", "", "rbd import")])
        t.notes.append("target allocated: `rbd du` used size (whole objects)")
        tables.append(t)
        os.unlink(src)
    return tables


def live_tables(ctx: Ctx, cl: Cluster, workdir: str) -> list[Table]:
    a = ctx.args
    src = os.path.join(workdir, "live")
    log(f"scenario 9/live: {fmt_size(a.live_size)} of random data")
    make_dense(src, a.live_size, a.seed + 19)

    def target(ctx: Ctx, v: Variant):
        name = cl.create(v.size)
        return (cl.spec(name), lambda s, d, who: cl.verify(s, name, who),
                lambda: cl.remove(name))

    v = Variant("live-rbd", workdir, False, src, a.live_size, {"live_target": target})
    cs = [Contestant(f"blkmirror-{m}", f"blkmirror mirror --socket --copy-mode {m} (into rbd)",
                     live_blkmirror_mode(m), kind="live") for m in a.rbd_live_modes]
    cs.append(base_contestant("blkmirror-base", "blkmirror serve (no mirror)", "blkmirror"))
    res = run_rotation(ctx, "9", v, cs)
    t = live_table(ctx, v, cs, res, False, None)
    t.title = (f"Scenario 9, live into rbd: fio 4 KiB random writes, queue depth 16, "
               f"{a.live_runtime} s, over blkmirror's export of a {fmt_size(a.live_size)} file "
               f"mirrored into an rbd image")
    os.unlink(src)
    return [t]


def scenario_9(ctx: Ctx) -> list[Table]:
    a = ctx.args
    missing = [t for t in ("ceph-mon", "ceph-osd", "rbd") if shutil.which(t) is None]
    if missing:
        msg = f"scenario 9: skipped, {', '.join(missing)} missing (scripts/deps installs Ceph)"
        log(msg)
        ctx.notes.append(msg)
        return []
    workdir = tempfile.mkdtemp(prefix="s9-", dir=a.dir)
    # One image at a time lives in the OSD's memory: room for the largest, twice.
    store = 2 * max(a.rbd_size, a.rbd_sparse_data, a.live_size) + GiB
    cl = None
    try:
        log(f"scenario 9: starting a Ceph cluster (memstore {fmt_size(store)})")
        cl = start_cluster(store)
        tables = idle_tables(ctx, cl, workdir)
        if "live" in a.rbd_variants_live:
            tables += live_tables(ctx, cl, workdir)
        return tables
    finally:
        if cl:
            stop_cluster(cl)
        shutil.rmtree(workdir, ignore_errors=True)


KEY = "9"
TITLE = "Ceph RBD target"
run = scenario_9


def add_arguments(g) -> None:
    g.add_argument("--rbd-size", type=parse_size, default=None,
                   help="dense file size (default 2G)")
    g.add_argument("--rbd-sparse-virtual", type=parse_size, default=None,
                   help="sparse file's virtual size (default 16G)")
    g.add_argument("--rbd-sparse-data", type=parse_size, default=None,
                   help="sparse file's data (default 512M)")
    g.add_argument("--rbd-variants", default="dense,sparse",
                   help="idle copies: dense, sparse (default both)")
    g.add_argument("--rbd-live", default="live",
                   help="'live' to run the live part, empty to skip it")
    g.add_argument("--rbd-live-modes", default="adaptive,write-blocking",
                   help="copy modes of the live part (default adaptive,write-blocking)")


def resolve_arguments(a) -> str | None:
    a.rbd_size = a.rbd_size or (256 * MiB if a.quick else 2 * GiB)
    a.rbd_sparse_virtual = a.rbd_sparse_virtual or (2 * GiB if a.quick else 16 * GiB)
    a.rbd_sparse_data = a.rbd_sparse_data or (64 * MiB if a.quick else 512 * MiB)
    a.rbd_variants = [x for x in a.rbd_variants.split(",") if x]
    a.rbd_variants_live = [x for x in a.rbd_live.split(",") if x]
    a.rbd_live_modes = [x for x in a.rbd_live_modes.split(",") if x]
    return None
