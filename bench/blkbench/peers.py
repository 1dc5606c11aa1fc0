"""The contestants and their plumbing: blkmirror's CLI, qemu-storage-daemon
over QMP, nbdcopy, qemu-img, cp, fio (as the device limit and as the NBD client),
and how each copy is verified."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from .core import Contestant, Ctx, Measure, Variant, warm_cache
from .measure import FIO_GRACE, JOB_TIMEOUT, proc_cpu, proc_hwm_kib
from .procs import Child, RunFailed, Spawned, check_proc, file_tail, kill_group, run_timed
from .util import REPO, GiB, KiB, MiB, RUN_TIMEOUT, allocated, fdatasync_path, fmt_size, fresh_sparse, log, remove


sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
from qmp_client import QmpClient, QmpError  # noqa: E402  (the tests' client, reused)


class QMP(QmpClient):
    """The integration tests' QMP client with the bench's conventions:
    arguments as a dict (QMP names have dashes), failures as RunFailed, a
    closed connection as EOFError, and waiting for one of several events of
    one job (a BLOCK_JOB_ERROR on the way fails the run)."""

    def __init__(self, path: str, timeout: float):
        super().__init__(path, timeout=timeout)

    def read(self):
        try:
            return super().read()
        except ConnectionError as e:
            raise EOFError(str(e)) from e

    def cmd(self, name: str, args: dict | None = None):
        try:
            return super().cmd(name, **{k.replace("-", "_"): v for k, v in (args or {}).items()})
        except QmpError as e:
            raise RunFailed(f"QMP error: {e}") from e

    def wait_event(self, names: set[str], job: str) -> dict:
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] in names and ev.get("data", {}).get("device") == job:
                    return self.events.pop(i)
                if ev["event"] == "BLOCK_JOB_ERROR":
                    raise RunFailed(f"job error: {ev}")
            self.events.append(self.read())


def qsd_mirror(src: str, dst: str, workdir: str, src_fmt: str = "raw",
               dst_fmt: str = "raw", dst_nodes: list[str] | None = None) -> dict:
    """One qemu-storage-daemon mirror of src to dst, flow of docs/measuring.md. Returns
    job time (blockdev-mirror sent .. BLOCK_JOB_COMPLETED), total (spawn ..
    daemon exited after quit) and the daemon's peak RSS. The formats are the
    drivers of the nodes over the files (raw or qcow2). dst_nodes: --blockdev
    values that make node `dst` instead of a file (an rbd image, say)."""
    sock = os.path.join(workdir, f"qmp-{os.getpid()}.sock")
    remove(sock)
    if dst_nodes is None:
        dst_nodes = [f"driver=file,node-name=dstf,filename={dst},aio=threads",
                     f"driver={dst_fmt},node-name=dst,file=dstf"]
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=file,node-name=srcf,filename={src},aio=threads",
           "--blockdev", f"driver={src_fmt},node-name=src,file=srcf"]
    for n in dst_nodes:
        cmd += ["--blockdev", n]
    pidfile = sock + ".pid"
    remove(pidfile)
    cmd += ["--chardev", f"socket,id=c0,path={sock},server=on,wait=off",
            "--monitor", "chardev=c0", "--pidfile", pidfile]
    errf = tempfile.TemporaryFile()
    sp = Spawned(cmd, errf, errf)
    t0 = sp.t0
    qmp = None
    try:
        deadline = t0 + 30
        while True:
            if not sp.poll():
                rc = sp.reap(10)[0]
                errf.seek(0)
                raise RunFailed(f"qemu-storage-daemon exited {rc} at start: "
                                f"{errf.read().decode(errors='replace')[-800:]}")
            if qsd_started(pidfile):
                try:
                    qmp = QMP(sock, RUN_TIMEOUT)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise RunFailed("qemu-storage-daemon: no QMP socket after 30 s")
            time.sleep(0.002)
        t_cmd = time.monotonic()
        qmp.cmd("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "dst",
                                    "sync": "full"})
        qmp.wait_event({"BLOCK_JOB_READY"}, "m0")
        t_ready = time.monotonic()
        qmp.cmd("block-job-complete", {"device": "m0"})
        ev = qmp.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, "m0")
        t_done = time.monotonic()
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev.get("data", {}):
            raise RunFailed(f"qemu-storage-daemon job did not complete: {ev}")
        try:
            qmp.cmd("quit")
        except (EOFError, ConnectionResetError, BrokenPipeError):
            pass  # the daemon may close before the reply
        qmp.close()
        qmp = None
        rc, ut, st, rss = sp.reap(30)
        t_exit = time.monotonic()
        if rc != 0:
            errf.seek(0)
            raise RunFailed(f"qemu-storage-daemon exited {rc} after quit: "
                            f"{errf.read().decode(errors='replace')[-800:]}")
        return {"job": t_done - t_cmd, "total": t_exit - t0, "ready": t_ready - t_cmd,
                "start": t_cmd - t0, "maxrss_kib": rss, "cpu": ut + st}
    finally:
        if qmp:
            qmp.close()
        sp.abandon()
        errf.close()
        remove(sock)


def blkmirror_target_rss(info: dict, size: int) -> tuple[int, str]:
    """PERF/DESIGN target: buf-size + bitmap + 32 MiB."""
    buf = info.get("buf", 16 * MiB)
    gran = info.get("granularity", 64 * KiB)
    bitmap = -(-size // gran) // 8
    return buf + bitmap + 32 * MiB, (f"buf {fmt_size(buf)} + bitmap {fmt_size(bitmap)} "
                                     f"(granularity {fmt_size(gran)}) + 32 MiB")


SIZE_RE = r"([\d.]+) (B|KiB|MiB|GiB|TiB)"


def _size_of(num: str, unit: str) -> int:
    return int(float(num) * {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": 1 << 40}[unit])


def parse_blkmirror_stderr(err: str) -> dict:
    info: dict = {}
    m = re.search(r"granularity " + SIZE_RE + r", buffer " + SIZE_RE, err)
    if m:
        info["granularity"] = _size_of(m.group(1), m.group(2))
        info["buf"] = _size_of(m.group(3), m.group(4))
    m = re.search(r"completed in [\d.]+s: " + SIZE_RE + r" copied, " + SIZE_RE + r" zeroed, (\d+) ops",
                  err)
    if m:
        info["copied"] = _size_of(m.group(1), m.group(2))
        info["zeroed"] = _size_of(m.group(3), m.group(4))
        info["ops"] = int(m.group(5))
    # The depth a job without --buf-size chose for its target's round trip.
    m = re.search(r"up to " + SIZE_RE + r" in flight \(target write round trip ([\d.]+) ms\)", err)
    if m:
        info["in_flight_peak"] = _size_of(m.group(1), m.group(2))
        info["rtt_ms"] = float(m.group(3))
    return info


def verify_cmp(src: str, dst: str, who: str) -> None:
    r = subprocess.run(["cmp", src, dst], capture_output=True, text=True)
    if r.returncode != 0:
        raise RunFailed(f"VERIFY MISMATCH after {who}: cmp {src} {dst}: "
                        f"{(r.stdout + r.stderr).strip()}")


def verify_qemu_img(src: str, dst: str, who: str) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, dst],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RunFailed(f"VERIFY MISMATCH after {who}: qemu-img compare {src} {dst}: "
                        f"{(r.stdout + r.stderr).strip()}")


QCOW2_CLUSTER = "64k"  # the cluster size of the layered scenarios' qcow2 images


def qemu_img(*args: str) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RunFailed(f"qemu-img {' '.join(args)}: {(r.stdout + r.stderr).strip()}")


def create_qcow2(path: str, size: int, prealloc: str = "off", backing: str | None = None,
                 backing_fmt: str = "qcow2") -> None:
    """A new qcow2 image (QCOW2_CLUSTER clusters), over a backing file if given."""
    remove(path)
    opts = ["-o", f"cluster_size={QCOW2_CLUSTER},preallocation={prealloc}"]
    if backing:
        opts += ["-b", backing, "-F", backing_fmt]
    qemu_img("create", "-q", "-f", "qcow2", *opts, path, str(size))


def verify_images(src: str, src_fmt: str, dst: str, dst_fmt: str, who: str) -> None:
    """qemu-img compare of what the two images (with their backing chains)
    read, then qemu-img check of the qcow2 side (the target when both are)."""
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", src_fmt, "-F", dst_fmt, src, dst],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RunFailed(f"VERIFY MISMATCH after {who}: qemu-img compare {src} {dst}: "
                        f"{(r.stdout + r.stderr).strip()}")
    if "qcow2" in (src_fmt, dst_fmt):
        check_qcow2(dst if dst_fmt == "qcow2" else src, who)


def check_qcow2(img: str, who: str) -> None:
    c = subprocess.run(["qemu-img", "check", "-q", img], capture_output=True, text=True)
    if c.returncode != 0:
        raise RunFailed(f"qemu-img check {img} after {who}: {(c.stdout + c.stderr).strip()}")


def copy_contestant(key: str, label: str, argv: Callable[[Ctx, str, str], list[str]],
                    fsync_after: bool = False, src_key: str = "src",
                    size_key: str | None = None, kind: str = "copy") -> Contestant:
    """A contestant that is one command copying SRC to a fresh sparse DST.
    fsync_after: the command does not flush the target, so an fdatasync of the
    target is included in its time (blkmirror and qemu-storage-daemon flush)."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        src = v.extra.get(src_key, v.src)
        size = v.extra.get(size_key, v.size) if size_key else v.size
        dst = os.path.join(v.workdir, f"dst-{key}")
        fresh_sparse(dst, size)
        try:
            cmd = argv(ctx, src, dst)
            t0 = time.monotonic()
            p = run_timed(cmd)
            check_proc(label, cmd, p)
            if fsync_after:
                fdatasync_path(dst)
            wall = time.monotonic() - t0 if fsync_after else p.wall
            info = parse_blkmirror_stderr(p.err) if key.startswith("blkmirror") else {}
            info["cpu"] = p.utime + p.stime
            alloc = allocated(dst)
            v.extra["verify"](src, dst, label)
            return Measure({"": wall}, rss_kib=p.maxrss_kib, alloc=alloc, info=info)
        finally:
            remove(dst)

    return Contestant(key, label, run, kind=kind)


def blkmirror_argv(ctx: Ctx, src: str, dst: str) -> list[str]:
    return ([ctx.blkmirror, "mirror", src, dst, "--no-progress"]
            + shlex.split(ctx.args.blkmirror_args))


def qsd_contestant(src_key: str = "src", size_key: str | None = None,
                   verify: bool = True) -> Contestant:
    def run(ctx: Ctx, v: Variant) -> Measure:
        src = v.extra.get(src_key, v.src)
        size = v.extra.get(size_key, v.size) if size_key else v.size
        dst = os.path.join(v.workdir, "dst-qsd")
        fresh_sparse(dst, size)
        try:
            r = qsd_mirror(src, dst, v.workdir)
            alloc = allocated(dst)
            if verify:
                v.extra["verify"](src, dst, "qemu-storage-daemon")
            return Measure({"": r["job"], "total": r["total"]}, rss_kib=r["maxrss_kib"],
                           alloc=alloc, info={"ready": r["ready"], "start": r["start"],
                                              "cpu": r["cpu"]})
        finally:
            remove(dst)

    return Contestant("qsd", "qemu-storage-daemon", run,
                      rows={"": " (job)", "total": " (total)"})


def fio_contestant(key: str, label: str, rw: str, direct: bool) -> Contestant:
    """The device limit: fio sequential 1 MiB blocks, queue depth 16. Time is
    the size divided by fio's bandwidth (fio's own startup excluded)."""

    def run(ctx: Ctx, v: Variant) -> Measure:
        target = v.src if rw == "read" else os.path.join(v.workdir, "fio-write")
        cmd = ["fio", f"--name={key}", f"--filename={target}", f"--rw={rw}", "--bs=1M",
               "--iodepth=16", f"--direct={int(direct)}", f"--ioengine={ctx.args.fio_engine}",
               f"--size={v.size}", "--output-format=json"]
        if rw == "write":
            cmd += ["--fallocate=none", "--end_fsync=1"]
            remove(target)
        try:
            p = run_timed(cmd)
            check_proc(label, cmd, p)
            j = json.loads(p.out[p.out.index("{"):])
            job = j["jobs"][0]["read" if rw == "read" else "write"]
            bw = job["bw_bytes"]
            if not bw:
                raise RunFailed(f"{label}: fio reported no bandwidth")
            return Measure({"": v.size / bw}, info={"bw": bw, "fio_wall": p.wall})
        finally:
            if rw == "write":
                remove(target)

    return Contestant(key, label, run, kind="limit")


def parse_fio_json(out: str, rw: str) -> dict:
    """fio's JSON result; the nbd engine prints "fio: connected to NBD server"
    lines on stdout first, so everything before the first '{' line goes."""
    lines = out.splitlines()
    first = next((i for i, x in enumerate(lines) if x.startswith("{")), None)
    if first is None:
        raise RunFailed(f"fio printed no JSON: {out[-400:]}")
    job = json.loads("\n".join(lines[first:]))["jobs"][0]
    if job.get("error"):
        raise RunFailed(f"fio job error {job['error']}")
    d = job["read" if rw.endswith("read") else "write"]
    if not d.get("total_ios"):
        raise RunFailed(f"fio did no {rw} I/O")
    p99 = d.get("clat_ns", {}).get("percentile", {}).get("99.000000")
    return {"iops": d["iops"], "p99_ms": p99 / 1e6 if p99 is not None else None,
            "mean_ms": d["lat_ns"]["mean"] / 1e6, "ios": d["total_ios"],
            "runtime_s": d["runtime"] / 1000}


class FioNbd:
    """fio over NBD: 4 KiB blocks, queue depth 16, time based (docs/measuring.md)."""

    def __init__(self, uri: str, rw: str, runtime: int, cwd: str):
        self.rw = rw
        self.cmd = ["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                    "--bs=4k", "--iodepth=16", "--time_based", f"--runtime={runtime}",
                    "--output-format=json"]
        self.runtime = runtime
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.t_end = self.t_end_wall = None
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.out,
                                  stderr=self.err, cwd=cwd, start_new_session=True)

    def finish(self) -> dict:
        # fio's own CPU: the children's usage grows by it when it is reaped
        # (nothing else is reaped meanwhile: the bench is one thread).
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            rc = self.p.wait(self.runtime + FIO_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RunFailed(f"fio hung: {shlex.join(self.cmd)}")
        self.t_end, self.t_end_wall = time.monotonic(), time.time()
        self.out.seek(0)
        out = self.out.read().decode(errors="replace")
        if rc != 0:
            raise RunFailed(f"fio exit {rc}: {shlex.join(self.cmd)}\n"
                            f"{(file_tail(self.err) or out[-800:])}")
        r = parse_fio_json(out, self.rw)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r["client_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        return r

    def kill(self) -> None:
        kill_group(self.p)

    def close(self) -> None:
        self.kill()
        self.out.close()
        self.err.close()


def start_blkmirror_serve(ctx: Ctx, src: str, workdir: str,
                          fmt: str | None = None) -> tuple[Child, str]:
    sock = os.path.join(workdir, "bm.sock")
    remove(sock)
    c = Child("blkmirror serve", [ctx.blkmirror, "serve", src, "--socket", sock]
              + (["--format", fmt] if fmt else []), workdir)
    try:
        c.wait_stderr("serving ", 30)
    except BaseException:
        c.close()
        raise
    return c, f"nbd+unix:///?socket={sock}"


def start_blkmirror_mirror(ctx: Ctx, src: str, dst: str, workdir: str,
                           copy_mode: str | None = None,
                           extra: tuple[str, ...] = ()) -> tuple[Child, str]:
    """`blkmirror mirror --socket --json --no-auto-complete`: serves SRC over
    NBD and starts mirroring at once; stays ready until SIGUSR1. PROGRESS
    events every 0.25 s feed the dirty/copied time series."""
    sock = os.path.join(workdir, "bm.sock")
    remove(sock)
    cmd = ([ctx.blkmirror, "mirror", src, dst, "--socket", sock, "--json", "--no-progress",
            "--no-auto-complete", "--progress-interval", "0.25"]
           + (["--copy-mode", copy_mode] if copy_mode else []) + list(extra)
           + shlex.split(ctx.args.blkmirror_args))
    c = Child("blkmirror mirror", cmd, workdir, json_stdout=True)
    try:
        c.wait_event(lambda e: e.get("event") == "NOTE"
                     and "serving" in e.get("data", {}).get("message", ""), 30, "the serving note")
    except BaseException:
        c.close()
        raise
    return c, f"nbd+unix:///?socket={sock}"


def qsd_started(pidfile: str) -> bool:
    """qemu-storage-daemon writes its pid file once its monitors and exports
    exist and it is about to accept connections (its manual says so). Its
    socket file exists earlier, from the chardev's bind(): a client that
    connected then was greeted twice, and once lost the first byte of its
    command ("QMP input member 'xecute' is unexpected")."""
    try:
        with open(pidfile) as f:
            return f.read().strip().isdigit()
    except FileNotFoundError:
        return False


def start_qmp_daemon(workdir: str, blkmirror: str | None, args: list[str],
                     timeout: float = JOB_TIMEOUT) -> tuple[Child, QMP]:
    """qemu-storage-daemon, or `blkmirror daemon` when blkmirror (its binary)
    is given, with the daemon options args and a QMP monitor on a UNIX socket
    in workdir; returns once QMP answers (the monitor comes last, so every
    option before it is in place). timeout: QMP's read timeout."""
    qsock = os.path.join(workdir, "qmp.sock")
    remove(qsock)
    name = "blkmirror daemon" if blkmirror else "qemu-storage-daemon"
    pidfile = qsock + ".pid"
    remove(pidfile)
    cmd = ([blkmirror, "daemon", "--qmp", qsock] + args if blkmirror else
           ["qemu-storage-daemon"] + args
           + ["--chardev", f"socket,id=c0,path={qsock},server=on,wait=off",
              "--monitor", "chardev=c0", "--pidfile", pidfile])
    c = Child(name, cmd, workdir)
    try:
        deadline = time.monotonic() + 30
        while True:
            if not c.alive():
                raise c.exited("QMP came up")
            if os.path.exists(qsock) if blkmirror else qsd_started(pidfile):
                try:
                    return c, QMP(qsock, timeout)
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise RunFailed(f"{name}: no QMP socket after 30 s")
            time.sleep(0.005)
    except BaseException:
        c.close()
        raise


def start_qsd_export(src: str, dst: str | None, workdir: str,
                     blkmirror: str | None = None, fmt: str = "raw") -> tuple[Child, QMP, str]:
    """qemu-storage-daemon with raw file nodes (aio=threads), the source
    exported over NBD (writable), QMP last: once QMP answers, every option
    before it (the NBD server and export) is in place. With blkmirror (its
    binary): `blkmirror daemon`, with the same options, instead. fmt: the
    source node's driver (raw or qcow2)."""
    nsock = os.path.join(workdir, "qsd-nbd.sock")
    remove(nsock)
    args = ["--blockdev", f"driver=file,node-name=srcf,filename={src},aio=threads",
            "--blockdev", f"driver={fmt},node-name=src,file=srcf"]
    if dst:
        args += ["--blockdev", f"driver=file,node-name=dstf,filename={dst},aio=threads",
                 "--blockdev", "driver=raw,node-name=dst,file=dstf"]
    args += ["--nbd-server", f"addr.type=unix,addr.path={nsock}",
             "--export", "type=nbd,id=e0,node-name=src,name=src,writable=on"]
    c, qmp = start_qmp_daemon(workdir, blkmirror, args)
    return c, qmp, f"nbd+unix:///src?socket={nsock}"


def qsd_quit(c: Child, qmp: QMP) -> None:
    try:
        qmp.cmd("quit")
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass  # the daemon may close before the reply
    qmp.close()
    try:
        rc = c.p.wait(30)
    except subprocess.TimeoutExpired:
        raise RunFailed("qemu-storage-daemon still running 30 s after quit")
    if rc != 0:
        raise RunFailed(f"qemu-storage-daemon exited {rc} after quit: {c.tail()}")


def export_fio(ctx: Ctx, v: Variant, server: str, workloads: list[tuple[str, int]],
               fmt: str = "raw") -> Measure:
    """fio against an export with no job running: `blkmirror serve` or the
    daemon's NBD export of v.src. One server, the workloads in order. Before a
    write workload the page cache is dropped (after a sync, so the previous
    run's dirty pages are not written back during this one); before a read
    workload the file is read into it. Why both: the kernel's own cost of a
    4 KiB buffered write on ext4 depends on the size of the page-cache folio it
    lands in (3-5 us in a 4 KiB folio, 16 us in a file written in 1 MiB pieces,
    37 us after a read's readahead: docs/measuring.md), the same for every
    server, so a cold cache lets the servers' own costs show; reads from RAM
    measure the server, not the disk. Per workload: fio's numbers and the
    server's CPU."""
    t_run = time.monotonic()
    c = qmp = fio = None
    info: dict = {}
    try:
        if server == "blkmirror":
            c, uri = start_blkmirror_serve(ctx, v.src, v.workdir, None if fmt == "raw" else fmt)
        else:
            c, qmp, uri = start_qsd_export(v.src, None, v.workdir, fmt=fmt)
        for rw, runtime in workloads:
            if "write" in rw:
                ctx.drop_caches()
            else:
                os.sync()
                warm_cache(v.src)
            cpu0 = proc_cpu(c.p.pid)
            fio = FioNbd(uri, rw, runtime, v.workdir)
            r = fio.finish()
            fio.close()
            fio = None
            cpu1 = proc_cpu(c.p.pid)
            r["server_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
            if not c.alive():
                raise c.exited("the end of the fio run")
            info[rw] = r
            log(f"  {rw}: {r['iops']:.0f} IOPS, p99 {r['p99_ms']:.3f} ms, server cpu "
                f"{r['server_cpu_s'] or 0:.2f}s")
        info["rss_kib"] = proc_hwm_kib(c.p.pid)
        if server == "blkmirror":
            rc = c.stop(signal.SIGTERM, 30)
            if rc != 0:
                raise RunFailed(f"blkmirror serve exited {rc} after SIGTERM: {c.tail()}")
        else:
            qsd_quit(c, qmp)
            qmp = None
        info["load1"] = os.getloadavg()[0]
        return Measure({"": time.monotonic() - t_run}, rss_kib=info["rss_kib"], info=info)
    finally:
        if fio:
            fio.close()
        if qmp:
            qmp.close()
        if c:
            c.close()
