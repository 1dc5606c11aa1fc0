"""Issue 13's benchmark: the migrate-back workflow's second mirror (B -> A) on a
dense disk of which 1% changed on B since the switch. blkmirror with
sync=bitmap (only what B's bitmap marks) against blkmirror and
qemu-storage-daemon 7.2 copying everything (sync=full): qemu-storage-daemon 7.2
refuses sync=bitmap for blockdev-mirror ("Sync mode 'bitmap' not supported"),
so its full mirror is the yardstick it offers.

Each run: a daemon with A and B as raw nodes, a bitmap added on B (blkmirror
only), the changes written to B through an NBD export by qemu-io (64 KiB
writes at random 64 KiB-aligned offsets, outside the timing), then the timed
part: blockdev-mirror B -> A from the command to BLOCK_JOB_READY and
block-job-complete to BLOCK_JOB_COMPLETED. Reports wall time, the daemon's CPU
time over the job (from /proc), and the bytes the job says it copied."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time

from ..core import Contestant, Ctx, Measure, Table, Variant, median_of, run_rotation
from ..peers import qsd_quit, start_qmp_daemon
from ..procs import RunFailed
from ..util import GiB, MiB, fmt_size, log, make_dense, parse_size

CHUNK = 64 * 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def change_b(nbd_uri: str, size: int, fraction: float, seed: int) -> None:
    rnd = random.Random(seed)
    n = max(1, int(size * fraction) // CHUNK)
    offs = rnd.sample(range(size // CHUNK), n)
    cmds = []
    for o in offs:
        cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {o * CHUNK} {CHUNK}"]
    for i in range(0, len(cmds), 2000):
        subprocess.run(["qemu-io", "-f", "raw", *cmds[i:i + 2000], nbd_uri], check=True,
                       capture_output=True)


def mirror_contestant(key: str, label: str, qsd: bool, incremental: bool) -> Contestant:
    def run(ctx: Ctx, v: Variant) -> Measure:
        a, b, wd = v.extra["a"], v.src, v.workdir
        nsock = os.path.join(wd, "nbd.sock")
        args = ["--blockdev", f"driver=file,node-name=fa,filename={a}",
                "--blockdev", "driver=raw,node-name=a,file=fa",
                "--blockdev", f"driver=file,node-name=fb,filename={b}",
                "--blockdev", "driver=raw,node-name=b,file=fb",
                "--nbd-server", f"addr.type=unix,addr.path={nsock}",
                "--export", "type=nbd,id=e0,node-name=b,name=b,writable=on"]
        child, qmp = start_qmp_daemon(wd, None if qsd else ctx.blkmirror, args)
        try:
            if incremental:
                # request(): cmd() takes `name` as its own first parameter.
                r = qmp.request("block-dirty-bitmap-add", {"node": "b", "name": "since"})
                if "error" in r:
                    raise RunFailed(f"block-dirty-bitmap-add: {r['error']}")
            v.extra["rep"] = v.extra.get("rep", 0) + 1
            change_b(f"nbd+unix:///b?socket={nsock}", v.size, v.extra["fraction"],
                     ctx.args.seed + v.extra["rep"])
            job = {"job-id": "back", "device": "b", "target": "a", "sync": "full"}
            if incremental:
                job.update({"sync": "bitmap", "bitmap": "since"})
            pid = child.p.pid
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            qmp.cmd("blockdev-mirror", job)
            qmp.wait_event({"BLOCK_JOB_READY"}, "back")
            qmp.cmd("block-job-complete", {"device": "back"})
            ev = qmp.wait_event({"BLOCK_JOB_COMPLETED"}, "back")
            wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        finally:
            qsd_quit(child, qmp)
        # Not timed: the incremental copy must leave A equal to B.
        if subprocess.run(["cmp", "-s", a, b]).returncode != 0:
            raise RunFailed(f"{label}: A differs from B after the mirror")
        return Measure({"": wall}, info={"cpu": cpu, "bytes": ev["data"]["offset"]})

    return Contestant(key, label, run)


def scenario_incremental(ctx: Ctx) -> list[Table]:
    a = ctx.args
    size = a.incremental_size
    workdir = tempfile.mkdtemp(prefix="si-", dir=a.dir)
    try:
        if shutil.disk_usage(workdir).free < 2 * size + 256 * MiB:
            ctx.notes.append("scenario incremental: skipped, not enough free space")
            return []
        b = os.path.join(workdir, "b.img")
        aimg = os.path.join(workdir, "a.img")
        log(f"scenario incremental: {fmt_size(size)} of random data on B, copied to A")
        make_dense(b, size, a.seed)
        subprocess.run(["cp", b, aimg], check=True)
        v = Variant("disk", workdir, False, b, size,
                    {"a": aimg, "fraction": a.incremental_fraction})
        cs = [mirror_contestant("blkmirror", "blkmirror sync=bitmap", False, True),
              mirror_contestant("blkmirror-full", "blkmirror sync=full", False, False)]
        if ctx.have.get("qemu-storage-daemon"):
            cs.append(mirror_contestant("qsd-full", "qemu-storage-daemon 7.2 sync=full", True,
                                        False))
        res = run_rotation(ctx, "incremental", v, cs)
        rows = []
        base = median_of(res["blkmirror"])
        for c in cs:
            ms = [m for m in res[c.key] if m]
            if not ms:
                rows.append([c.label, "failed", "", "", "", ""])
                continue
            med = median_of(ms)
            cpu = sorted(m.info["cpu"] for m in ms)[len(ms) // 2]
            by = sorted(m.info["bytes"] for m in ms)[len(ms) // 2]
            rows.append([c.label, f"{med:.2f}", " ".join(f"{m.times[''] :.2f}" for m in ms),
                         f"{cpu:.2f}", fmt_size(by), f"{med / base:.1f}x" if base else ""])
        t = Table(f"Migrate back: B -> A, {fmt_size(size)} dense disk, "
                  f"{a.incremental_fraction * 100:g}% changed on B (64 KiB writes)",
                  ["contestant", "median s", "runs s", "cpu s (median)", "bytes copied (median)",
                   "time / blkmirror sync=bitmap"], rows)
        t.notes.append("qemu-storage-daemon 7.2 refuses sync=bitmap for blockdev-mirror "
                       "(\"Sync mode 'bitmap' not supported\"): its full mirror is the comparison.")
        t.notes.append("Timed: from blockdev-mirror to BLOCK_JOB_COMPLETED (ready, then "
                       "block-job-complete); writing the changes is not timed.")
        return [t]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


KEY = "incremental"
TITLE = "migrate back with sync=bitmap against full mirrors (issue 13)"
run = scenario_incremental


def add_arguments(g) -> None:
    g.add_argument("--incremental-size", type=parse_size, default=None,
                   help="disk size (default 4G)")
    g.add_argument("--incremental-fraction", type=float, default=0.01,
                   help="fraction of the disk changed on B (default 0.01)")


def resolve_arguments(a) -> str | None:
    a.incremental_size = a.incremental_size or (256 * MiB if a.quick else 4 * GiB)
    return None
