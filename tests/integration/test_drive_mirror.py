"""drive-mirror (issue 11, "Mirror on chains"): the target named by a file
name, created (mode absolute-paths: a qcow2 over the source's backing file for
sync=top, a standalone raw or qcow2 image for sync=full) or opened as it is
(mode existing), mirrored into, and switched to on complete, on chains made
by qemu-img and written by qemu-io; the images judged by qemu-img (info, map,
compare, check) afterwards. Every refusal with QEMU's class and text, and no
file left behind."""

import json
import os
import random
import threading
import time

import pytest

from qcow2_helpers import KiB, MiB, check_image, create, qemu_img, qemu_io, read_raw

SIZE = 8 * MiB


def chain(d):
    """base.qcow2 (0xb1 everywhere) <- top.qcow2 (-b base -F qcow2) with writes."""
    create(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", f"write -P 0xb1 0 {SIZE}")
    create(d / "top.qcow2", SIZE, backing=d / "base.qcow2", backing_fmt="qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x31 1M 64k", "write -P 0x32 3M 512k",
            "write -z 6M 128k")
    return d / "base.qcow2", d / "top.qcow2"


def add_top(qmp, top):
    """The top as blockdev-add opens it: its backing file from the header."""
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top",
            file={"driver": "file", "filename": str(top)})


def drive_to_switch(qmp, job="m", timeout=60):
    qmp.wait_event("BLOCK_JOB_READY", match={"device": job}, timeout=timeout)
    qmp.cmd("block-job-complete", device=job)
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": job}, timeout=timeout)
    assert "error" not in ev["data"], ev


def nodes(qmp):
    return {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}


def top_layer_extents(path):
    """qemu-img map of an image: the ranges its own layer holds (depth 0)."""
    r = qemu_img("map", "-U", "--output=json", str(path))
    return [(e["start"], e["length"], e["zero"]) for e in json.loads(r.stdout)
            if e["depth"] == 0 and (e["data"] or e["zero"]) and e.get("present", True)]


def info(path):
    return json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)


def test_sync_top_creates_a_qcow2_over_the_sources_backing_file(daemon, qmp, workdir):
    base, top = chain(workdir)
    add_top(qmp, top)
    before = nodes(qmp)
    target = workdir / "new.qcow2"
    qmp.cmd("drive-mirror", job_id="m", device="top", target=str(target), sync="top",
            format="qcow2", node_name="new")
    # The new node is there while the job runs, over the source's backing node.
    n = nodes(qmp)
    assert n["new"]["drv"] == "qcow2" and n["new"]["file"] == str(target), n["new"]
    assert n["new"]["backing_file"] == str(base), n["new"]
    assert n["new"]["image"]["backing-image"]["filename"] == str(base)
    assert len(n) == len(before) + 2  # the qcow2 node and its file node
    drive_to_switch(qmp)
    # The old source stays as QEMU leaves it (a named node).
    assert "top" in nodes(qmp)
    daemon.stop()
    i = info(target)
    assert i["backing-filename"] == str(base) and i["backing-filename-format"] == "qcow2", i
    assert i["virtual-size"] == SIZE and i["format"] == "qcow2"
    # Only what the top layer holds was copied.
    assert top_layer_extents(target) == top_layer_extents(top)
    qemu_img("compare", str(target), str(top))
    check_image(target)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_sync_full_makes_a_standalone_image(daemon, qmp, workdir, fmt):
    base, top = chain(workdir)
    add_top(qmp, top)
    target = workdir / f"full.{fmt}"
    qmp.cmd("drive-mirror", job_id="m", device="top", target=str(target), sync="full",
            format=fmt)
    # No node-name: an implicit one, as QEMU's "#blockN".
    new = [n for n in nodes(qmp).values() if n["file"] == str(target) and n["drv"] == fmt]
    assert len(new) == 1 and new[0]["node-name"].startswith("#block"), new
    drive_to_switch(qmp)
    daemon.stop()
    i = info(target)
    assert i["format"] == fmt and i["virtual-size"] == SIZE and "backing-filename" not in i, i
    qemu_img("compare", "-f", fmt, "-F", "qcow2", str(target), str(top))
    if fmt == "qcow2":
        check_image(target)


def test_default_format_is_the_sources(daemon, qmp, workdir):
    base, top = chain(workdir)
    add_top(qmp, top)
    target = workdir / "same.img"
    qmp.cmd("drive-mirror", job_id="m", device="top", target=str(target), sync="top")
    drive_to_switch(qmp)
    daemon.stop()
    assert info(target)["format"] == "qcow2"
    qemu_img("compare", str(target), str(top))


@pytest.mark.parametrize("give_format", [True, False])
def test_mode_existing_opens_the_target_with_its_chain(daemon, qmp, workdir, give_format):
    base, top = chain(workdir)
    add_top(qmp, top)
    # A shallow target as a management tool makes it, over the same base.
    target = create(workdir / "shallow.qcow2", SIZE, backing=base, backing_fmt="qcow2")
    args = {"format": "qcow2"} if give_format else {}
    qmp.cmd("drive-mirror", job_id="m", device="top", target=str(target), sync="top",
            mode="existing", node_name="dst", **args)
    n = nodes(qmp)
    assert n["dst"]["drv"] == "qcow2" and n["dst"]["backing_file"] == str(base), n["dst"]
    drive_to_switch(qmp)
    daemon.stop()
    assert top_layer_extents(target) == top_layer_extents(top)
    qemu_img("compare", str(target), str(top))
    check_image(target)


def test_live_export_moves_to_the_target_with_no_write_lost(daemon, qmp, workdir):
    import nbd
    base, top = chain(workdir)
    add_top(qmp, top)
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="top", writable=True)
    model = read_raw(top, workdir / "start.raw")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///top?socket={sock}")
    stop, errors = threading.Event(), []
    rnd = random.Random(7)

    def write():
        try:
            while not stop.is_set():
                length = rnd.choice([512, 4096, 65536])
                off = rnd.randrange(0, SIZE - length)
                data = rnd.randbytes(length)
                h.pwrite(data, off)
                model[off:off + length] = data
                time.sleep(0.001)
        except Exception as e:  # checked below
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    try:
        target = workdir / "live.qcow2"
        qmp.cmd("drive-mirror", job_id="m", device="top", target=str(target), sync="top",
                node_name="live", copy_mode="write-blocking")
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=60)
        time.sleep(0.1)
        qmp.cmd("block-job-complete", device="m")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "m"}, timeout=60)
        assert "error" not in ev["data"], ev
        time.sleep(0.1)  # writes after the switch land on the target
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    exports = qmp.cmd("query-block-exports")
    assert exports[0]["node-name"] == "live", exports
    got = b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
    assert got == bytes(model), "the export after complete differs from the model"
    h.shutdown()
    daemon.stop()
    assert read_raw(target, workdir / "after.raw") == model
    assert info(target)["backing-filename"] == str(base)
    check_image(target)


def test_cancel_closes_the_target_node(qmp, workdir):
    base, top = chain(workdir)
    add_top(qmp, top)
    before = set(nodes(qmp))
    target = workdir / "cancelled.qcow2"
    qmp.cmd("drive-mirror", job_id="m", device="top", target=str(target), sync="full",
            node_name="gone", speed=64 * KiB, auto_dismiss=False)
    assert "gone" in nodes(qmp)
    qmp.cmd("block-job-cancel", device="m", force=True)
    qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "m"})
    deadline = time.monotonic() + 10
    while set(nodes(qmp)) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    # Closed once the job ended, before job-dismiss, as QEMU drops its reference.
    assert set(nodes(qmp)) == before
    qmp.cmd("job-dismiss", id="m")
    # The source is free again, and the file (as in QEMU) stays.
    assert target.exists()
    qmp.cmd("drive-mirror", job_id="m2", device="top", target=str(workdir / "again.qcow2"),
            sync="top")
    drive_to_switch(qmp, "m2")


def refusals(workdir):
    t = str(workdir / "new.qcow2")
    top = str(workdir / "top.qcow2")
    missing = str(workdir / "missing.qcow2")
    return [
        ({"device": "top", "target": t}, "GenericError", "Parameter 'sync' is missing"),
        ({"device": "nope", "target": t, "sync": "full"}, "GenericError",
         "Cannot find device='nope' nor node-name='nope'"),
        ({"device": "top", "target": t, "sync": "full", "format": "vmdk9"}, "GenericError",
         "Unknown file format 'vmdk9'"),
        ({"device": "top", "target": t, "sync": "full", "format": "vmdk9", "mode": "existing"},
         "GenericError", "Unknown driver 'vmdk9'"),
        ({"device": "top", "target": t, "sync": "bogus"}, "GenericError",
         "Parameter 'sync' does not accept value 'bogus'"),
        ({"device": "top", "target": t, "sync": "full", "mode": "relative"}, "GenericError",
         "Parameter 'mode' does not accept value 'relative'"),
        ({"device": "top", "target": missing, "sync": "full", "mode": "existing"},
         "GenericError", f"Could not open '{missing}': No such file or directory"),
        ({"device": "top", "target": top, "sync": "full", "mode": "existing"}, "GenericError",
         f"'{top}' is the image of node 'top' in the source's chain: a mirror cannot write "
         "into it"),
        ({"device": "top", "target": top, "sync": "full"}, "GenericError",
         f"Could not create '{top}': File exists"),
        ({"device": "top", "target": t, "sync": "full", "replaces": "top"}, "GenericError",
         "a node-name must be provided when replacing a named node of the graph"),
        ({"device": "top", "target": t, "sync": "full", "node-name": "top"}, "GenericError",
         "Duplicate nodes with node-name='top'"),
        ({"device": "top", "target": t, "sync": "full", "node-name": "1bad"}, "GenericError",
         "Invalid node-name: '1bad'"),
        ({"device": "top", "target": t, "sync": "top", "format": "raw"}, "GenericError",
         "Backing file not supported for file format 'raw'"),
        ({"device": "top", "target": t, "sync": "none"}, "GenericError",
         "drive-mirror: sync 'none' needs mode 'existing' (a target image that reads the "
         "source's data through its own backing chain)"),
        ({"device": "top", "target": t, "sync": "full", "target-is-zero": True}, "GenericError",
         "Parameter 'target-is-zero' is unexpected"),
        ({"device": "top", "target": t, "sync": "full", "granularity": 1000}, "GenericError",
         "Parameter 'granularity' expects a power of 2"),
        ({"device": "top", "target": t, "sync": "full", "job-id": "1x"}, "GenericError",
         "Invalid job ID '1x'"),
        ({"device": "#block001", "target": t, "sync": "full"}, "GenericError",
         "Need a root block node"),
    ]


def test_refusals_have_qemus_texts_and_create_nothing(qmp, workdir):
    base, top = chain(workdir)
    add_top(qmp, top)
    files = set(os.listdir(workdir))
    before = nodes(qmp)
    assert "#block001" in before  # the base, opened from top's header
    for args, cls, desc in refusals(workdir):
        err = qmp.error("drive-mirror", **{k.replace("-", "_"): v for k, v in args.items()})
        assert err == (cls, desc), (args, err)
        assert set(os.listdir(workdir)) == files, args
        assert nodes(qmp).keys() == before.keys(), args
    assert qmp.cmd("query-jobs") == []


def test_busy_device_is_refused(qmp, workdir):
    base, top = chain(workdir)
    add_top(qmp, top)
    qmp.cmd("drive-mirror", job_id="m", device="top", target=str(workdir / "a.qcow2"),
            sync="full", speed=64 * KiB)
    files = set(os.listdir(workdir))
    err = qmp.error("drive-mirror", job_id="m2", device="top",
                    target=str(workdir / "b.qcow2"), sync="full")
    assert err == ("GenericError", "Node 'top' is busy: block device is in use by job m"), err
    err = qmp.error("drive-mirror", device="top", target=str(workdir / "b.qcow2"),
                    sync="full", job_id="m")
    assert err[0] == "GenericError"
    assert set(os.listdir(workdir)) == files
    qmp.cmd("block-job-cancel", device="m", force=True)
    qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "m"})
