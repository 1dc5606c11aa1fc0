"""The mirror job on backing chains (issue 11, first slice): sync=top copies
only the source's top layer onto a target that has the same base, and COW
alignment makes the first copy into each target cluster cover it whole, so a
target whose backing file does not hold the source's base data (yet) never
ends up with clusters half from that file. Judged by qemu-img (map, compare,
check) and by reading both chains through qemu-io."""

import json
import os
import random
import time

import pytest

from qcow2_helpers import (KiB, MiB, ModelWriter, check_image, create, in_dir, mirror_to_completion,
                           qemu_img, qemu_io, read_raw)

SIZE = 8 * MiB


def source_chain(d, top_writes, cluster_size=65536):
    """base (pattern 0xb1 over all of it) <- top (qemu-io writes at top_writes)."""
    create(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", f"write -P 0xb1 0 {SIZE}")
    in_dir(d, lambda: create("top.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2",
                             cluster_size=cluster_size))
    for i, (off, length) in enumerate(top_writes):
        qemu_io(d / "top.qcow2", f"write -P {0x10 + i % 200} {off} {length}")
    return d / "base.qcow2", d / "top.qcow2"


def mirror(qmp, src, tgt, tgt_backing, **args):
    qmp.cmd("blockdev-add", driver="qcow2", node_name="src",
            file={"driver": "file", "filename": str(src)})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="tb", read_only=True,
            file={"driver": "file", "filename": str(tgt_backing)})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="dst", backing="tb",
            file={"driver": "file", "filename": str(tgt)})
    mirror_to_completion(qmp, device="src", target="dst", **args)
    for n in ("src", "dst", "tb"):
        qmp.cmd("blockdev-del", node_name=n)


def allocated_in_top(path):
    """(start, length) of what the image itself holds (not its backing)."""
    m = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return [(e["start"], e["length"]) for e in m if e["depth"] == 0 and (e["data"] or e["zero"])
            and e.get("present", True)]


def test_sync_top_copies_only_the_top_layer(qmp, workdir):
    writes = [(0, 64 * KiB), (1 * MiB, 128 * KiB), (5 * MiB + 64 * KiB, 64 * KiB)]
    base, top = source_chain(workdir, writes)
    # The target shares the source's base, as a management tool sets it up.
    in_dir(workdir, lambda: create("copy.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2"))
    mirror(qmp, top, workdir / "copy.qcow2", base, sync="top")
    check_image(workdir / "copy.qcow2")
    r = qemu_img("compare", str(top), str(workdir / "copy.qcow2"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert allocated_in_top(workdir / "copy.qcow2") == allocated_in_top(top)


def test_sync_top_keeps_zeroes_the_top_layer_puts_over_the_base(qmp, workdir):
    base, top = source_chain(workdir, [(2 * MiB, 64 * KiB)])
    qemu_io(top, "write -z 3M 128k")  # zero clusters in the top hide base data
    in_dir(workdir, lambda: create("copy.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2"))
    mirror(qmp, top, workdir / "copy.qcow2", base, sync="top")
    r = qemu_img("compare", str(top), str(workdir / "copy.qcow2"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sync_full_with_a_raw_chain_base_copies_everything(qmp, workdir, images):
    base, top = source_chain(workdir, [(1 * MiB, 64 * KiB)])
    dst = images.sparse("dst.raw", SIZE)
    qmp.cmd("blockdev-add", driver="qcow2", node_name="src",
            file={"driver": "file", "filename": str(top)})
    qmp.cmd("blockdev-add", driver="raw", node_name="dst",
            file={"driver": "file", "filename": str(dst)})
    qmp.cmd("blockdev-mirror", job_id="m", device="src", target="dst", sync="full")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=60)
    qmp.cmd("block-job-complete", device="m")
    qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "m"}, timeout=60)
    qmp.cmd("blockdev-del", node_name="src")
    r = qemu_img("compare", "-F", "raw", str(top), str(dst), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cluster_size", [64 * KiB, 2 * MiB])
def test_cow_alignment_first_copy_covers_the_target_cluster(qmp, workdir, cluster_size):
    # Small scattered writes in the top layer, 4 KiB granularity; the target's
    # backing file holds OTHER data (0xee: a base not copied yet). Each target
    # cluster the copy touches must read as the source does, whole: without COW
    # alignment its untouched part would come from the target's backing file.
    rnd = random.Random(cluster_size)
    clusters = SIZE // cluster_size
    writes = [(rnd.randrange(0, SIZE // 4096 - 1) * 4096, 4096) for _ in range(12 if clusters > 8 else 1)]
    # 4 KiB clusters in the source's top: what it holds is 4 KiB pieces.
    base, top = source_chain(workdir, writes, cluster_size=4096)
    create(workdir / "other.qcow2", SIZE)
    qemu_io(workdir / "other.qcow2", f"write -P 0xee 0 {SIZE}")
    in_dir(workdir, lambda: create("copy.qcow2", SIZE, backing="other.qcow2", backing_fmt="qcow2",
                                   cluster_size=cluster_size))
    mirror(qmp, top, workdir / "copy.qcow2", workdir / "other.qcow2", sync="top", granularity=4096)
    check_image(workdir / "copy.qcow2")
    src = read_raw(top, workdir / "src.raw")
    got = read_raw(workdir / "copy.qcow2", workdir / "got.raw")
    touched = sorted({off // cluster_size for off, _ in writes})
    for c in touched:
        lo, hi = c * cluster_size, min((c + 1) * cluster_size, SIZE)
        assert got[lo:hi] == src[lo:hi], f"target cluster {c} ({cluster_size} B) differs from the source"
    # Clusters the top never touched still read the target's own backing file.
    untouched = next(c for c in range(SIZE // cluster_size) if c not in touched)
    assert got[untouched * cluster_size] == 0xee


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_sync_top_with_a_writing_client_matches_the_model(qmp, workdir, seed, copy_mode):
    # A client writes the exported source all through the job (small writes,
    # so many land in target clusters not written yet); after complete the
    # export serves the target chain, which must read as the model does.
    import nbd
    import threading
    rnd = random.Random(seed)
    base, top = source_chain(workdir, [(rnd.randrange(0, SIZE // 4096) * 4096, 4096) for _ in range(20)],
                             cluster_size=4096)
    # The target shares the base (so every byte can be checked); its 64 KiB
    # clusters over 4 KiB chunks still take the COW-aligned path: widened
    # copies, and client writes into clusters not yet written left to them.
    in_dir(workdir, lambda: create("copy.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2"))
    model = bytearray(read_raw(top, workdir / "src0.raw"))
    qmp.cmd("blockdev-add", driver="qcow2", node_name="src", file={"driver": "file", "filename": str(top)})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="dst", file={"driver": "file", "filename": str(workdir / "copy.qcow2")})
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="src", writable=True)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///src?socket={sock}")
    stop = threading.Event()
    errors = []

    def client():
        try:
            while not stop.is_set():
                length = rnd.choice([512, 4096, 6000, 65536])
                off = rnd.randrange(0, SIZE - length)
                data = rnd.randbytes(length)
                h.pwrite(data, off)
                model[off:off + length] = data
                # Background copies converge only while the client writes
                # slower than the copy (that is what write-blocking is for).
                if copy_mode == "background":
                    time.sleep(0.005)
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    try:
        qmp.cmd("blockdev-mirror", job_id="m", device="src", target="dst", sync="top", granularity=4096,
                copy_mode=copy_mode, speed=16 * MiB)
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=60)
        qmp.cmd("block-job-complete", device="m")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "m"}, timeout=60)
        assert "error" not in ev["data"], ev
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    # The export now serves the target: its reads are the model.
    got = b"".join(h.pread(min(1 * MiB, SIZE - o), o) for o in range(0, SIZE, 1 * MiB))
    assert got == bytes(model), "the target chain read through the export differs from the model"
    h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    for n in ("src", "dst"):
        qmp.cmd("blockdev-del", node_name=n)
    check_image(workdir / "copy.qcow2")
    assert read_raw(workdir / "copy.qcow2", workdir / "final.raw") == bytes(model)


def test_cli_shallow_copy_with_sync_top(cli, workdir):
    writes = [(256 * KiB, 64 * KiB), (6 * MiB, 192 * KiB)]
    base, top = source_chain(workdir, writes)
    res = cli.mirror(str(top), str(workdir / "copy.qcow2"), "--create", "--format", "qcow2",
                     "--backing", str(base), "--backing-format", "qcow2", "--sync", "top", "--no-progress")
    assert res.returncode == 0, res.stderr
    check_image(workdir / "copy.qcow2")
    assert allocated_in_top(workdir / "copy.qcow2") == allocated_in_top(top)
    r = qemu_img("compare", str(top), str(workdir / "copy.qcow2"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_libvirt_shallow_blockcopy_sequence(qmp, workdir):
    # `virsh blockcopy --shallow --reuse-external --pivot` with -blockdev, as
    # docs/qmp.md writes it down, while a client writes the disk all along.
    import nbd
    base, top = source_chain(workdir, [(i * 512 * KiB, 64 * KiB) for i in range(0, 16, 3)])
    in_dir(workdir, lambda: create("copy.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2"))
    copy = workdir / "copy.qcow2"
    model = bytearray(read_raw(top, workdir / "start.raw"))
    # libvirt's nodes: a protocol (file) node and a format node per layer.
    for n, path, backing, ro in (("libvirt-1", base, None, True), ("libvirt-2", top, "libvirt-1-format", False)):
        qmp.cmd("blockdev-add", driver="file", node_name=f"{n}-storage", filename=str(path), read_only=ro)
        qmp.cmd("blockdev-add", driver="qcow2", node_name=f"{n}-format", file=f"{n}-storage",
                backing=backing, read_only=ro)
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="vda", node_name="libvirt-2-format", writable=True)
    w = ModelWriter(f"nbd+unix:///libvirt-2-format?socket={sock}", model, 5, SIZE, pace=0.002)
    try:
        # 1. The copy's chain: its own nodes, its backing the source's base node.
        qmp.cmd("blockdev-add", driver="file", node_name="libvirt-3-storage", filename=str(copy))
        qmp.cmd("blockdev-add", driver="qcow2", node_name="libvirt-3-format", file="libvirt-3-storage",
                backing="libvirt-1-format")
        # 2. The job.
        qmp.cmd("blockdev-mirror", job_id="copy-vda-libvirt-3-format", device="libvirt-2-format",
                target="libvirt-3-format", sync="top", auto_finalize=True, auto_dismiss=False)
        job = "copy-vda-libvirt-3-format"
        qmp.wait_event("JOB_STATUS_CHANGE", match={"id": job, "status": "ready"}, timeout=60)
        # After ready, the copy read through its own chain is the disk: checked
        # twice at moments the client is held and the job has caught up.
        qmp.cmd("block-export-add", type="nbd", id="copy", node_name="libvirt-3-format")
        view = nbd.NBD()
        view.connect_uri(f"nbd+unix:///libvirt-3-format?socket={sock}")
        for _ in range(2):
            time.sleep(0.3)
            w.pause()
            try:
                deadline = time.monotonic() + 30
                while True:
                    j = next(j for j in qmp.cmd("query-jobs") if j["id"] == job)
                    if j["current-progress"] == j["total-progress"]:
                        break
                    assert time.monotonic() < deadline, j
                    time.sleep(0.02)
                got = b"".join(view.pread(MiB, o) for o in range(0, SIZE, MiB))
                assert got == bytes(model), "the copy's chain differs from the disk after ready"
            finally:
                w.resume()
        view.shutdown()
        qmp.cmd("block-export-del", id="copy")
        # 3. Pivot, with the client still writing.
        qmp.cmd("job-complete", id=job)
        qmp.wait_event("JOB_STATUS_CHANGE", match={"id": job, "status": "concluded"}, timeout=60)
    finally:
        w.finish()
    jobs = qmp.cmd("query-jobs")
    assert len(jobs) == 1 and "error" not in jobs[0], jobs
    assert jobs[0]["type"] == "mirror" and jobs[0]["current-progress"] == jobs[0]["total-progress"]
    qmp.cmd("job-dismiss", id=job)
    assert qmp.cmd("query-jobs") == []
    # 4. The old top leaves; the base stays, the copy's backing now.
    qmp.cmd("blockdev-del", node_name="libvirt-2-format")
    qmp.cmd("blockdev-del", node_name="libvirt-2-storage")
    exports = {e["id"]: e["node-name"] for e in qmp.cmd("query-block-exports")}
    assert exports == {"vda": "libvirt-3-format"}
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
    assert set(nodes) == {"libvirt-1-storage", "libvirt-1-format", "libvirt-3-storage", "libvirt-3-format"}
    assert nodes["libvirt-3-format"]["backing_file_depth"] == 1
    assert w.read_all() == bytes(model)
    w.h.shutdown()
    qmp.cmd("block-export-del", id="vda")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "vda"})
    for n in ("libvirt-3-format", "libvirt-3-storage", "libvirt-1-format", "libvirt-1-storage"):
        qmp.cmd("blockdev-del", node_name=n)
    check_image(copy)
    assert read_raw(copy, workdir / "final.raw") == bytes(model)
    # Shallow: the copy holds the top's data and the client's writes, not the base.
    assert sum(length for _, length in allocated_in_top(copy)) < SIZE
