"""drive-mirror (issue 11): the daemon creates or opens the target by file
name. absolute-paths with sync=top makes a qcow2 over the source's backing
file (and reads through the source's backing node at once), sync=full a
standalone image, mode existing opens what is there; the new node is in
query-named-block-nodes, clients move to it on complete with a writer checked
against a model, a cancelled job's node is closed again; refusals carry
qemu-storage-daemon 7.2's texts and create no file. qemu-img judges the images."""

import json
import os
import time

import pytest

from qcow2_helpers import (MiB, ModelWriter, Qsd, check_image, create, qemu_img, qemu_io,
                           read_raw)

SIZE = 8 * MiB


def chain(d):
    create(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", f"write -P 0xb1 0 {SIZE}")
    create(d / "top.qcow2", SIZE, backing=str(d / "base.qcow2"), backing_fmt="qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x31 1M 128k", "write -P 0x32 5M 64k")
    return d / "base.qcow2", d / "top.qcow2"


def add_chain(qmp, base, top):
    qmp.cmd("blockdev-add", driver="qcow2", node_name="base", read_only=True,
            file={"driver": "file", "filename": str(base)})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top", backing="base",
            file={"driver": "file", "filename": str(top)})


def export(qmp, workdir, node="top"):
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name=node, writable=True)
    return f"nbd+unix:///{node}?socket={sock}"


def nodes(qmp):
    return {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}


def complete(qmp, job):
    qmp.wait_event("BLOCK_JOB_READY", match={"device": job}, timeout=60)
    qmp.cmd("job-complete", id=job)
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": job}, timeout=60)
    assert "error" not in ev["data"], ev


def close(qmp, w, names):
    w.h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    for n in names:
        qmp.cmd("blockdev-del", node_name=n)


def top_allocation(path):
    m = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return sum(e["length"] for e in m if e["depth"] == 0 and e["data"])


def test_absolute_paths_sync_top_with_a_writer(qmp, workdir):
    base, top = chain(workdir)
    model = bytearray(read_raw(top, workdir / "start.raw"))
    add_chain(qmp, base, top)
    w = ModelWriter(export(qmp, workdir), model, 3, SIZE, pace=0.002)
    copy = workdir / "copy.qcow2"
    try:
        qmp.cmd("drive-mirror", device="top", target=str(copy), sync="top", node_name="copy",
                job_id="m")
        n = nodes(qmp)["copy"]
        assert n["drv"] == "qcow2" and n["backing_file_depth"] == 1, n
        assert n["image"]["backing-filename"] == str(base), n
        complete(qmp, "m")
    finally:
        w.finish()
    assert {e["id"]: e["node-name"] for e in qmp.cmd("query-block-exports")} == {"e": "copy"}
    assert w.read_all() == bytes(model)
    close(qmp, w, ["copy", "top"])
    qmp.cmd("blockdev-del", node_name="base")
    info = json.loads(qemu_img("info", "--output=json", str(copy)).stdout)
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "qcow2"
    check_image(copy)
    assert read_raw(copy, workdir / "final.raw") == bytes(model)
    # Shallow: the copy holds what the top and the writer wrote, not the base.
    assert top_allocation(copy) < SIZE // 2


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_absolute_paths_sync_full_makes_a_standalone_image(qmp, workdir, fmt):
    base, top = chain(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, top)
    copy = workdir / f"copy.{fmt}"
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="full", format=fmt)
    implicit = [k for k, v in nodes(qmp).items() if k.startswith("#block")
                and v["file"] == str(copy) and v["drv"] != "file"]
    assert len(implicit) == 1, nodes(qmp)
    complete(qmp, "top")
    for n in (implicit[0], "top", "base"):
        if n in nodes(qmp):
            qmp.cmd("blockdev-del", node_name=n)
    info = json.loads(qemu_img("info", "--output=json", str(copy)).stdout)
    assert info["format"] == fmt and "backing-filename" not in info
    if fmt == "qcow2":
        check_image(copy)
    assert read_raw(copy, workdir / "final.raw") == model


def test_mode_existing_opens_the_chain_from_the_header(qmp, workdir):
    base, top = chain(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, top)
    copy = workdir / "pre.qcow2"
    create(copy, SIZE, backing=str(base), backing_fmt="qcow2")
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="top", mode="existing",
            node_name="pre")
    assert nodes(qmp)["pre"]["backing_file_depth"] == 1
    complete(qmp, "top")
    for n in ("pre", "top", "base"):
        qmp.cmd("blockdev-del", node_name=n)
    check_image(copy)
    assert read_raw(copy, workdir / "final.raw") == model


def test_cancelled_job_closes_its_target_node(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    copy = workdir / "c.qcow2"
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="full", node_name="c", speed=1)
    assert "c" in nodes(qmp)
    qmp.cmd("job-cancel", id="top")
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "top", "status": "null"})
    deadline = time.monotonic() + 10
    while "c" in nodes(qmp):
        assert time.monotonic() < deadline, sorted(nodes(qmp))
        time.sleep(0.05)
    assert copy.exists()  # the file stays, as in QEMU
    qemu_img("info", str(copy))  # and is not held any more


REFUSALS = [
    ({"device": "nope", "target": "{d}/a.qcow2", "sync": "full"},
     "Cannot find device='nope' nor node-name='nope'"),
    ({"device": "base", "target": "{d}/b.qcow2", "sync": "full"}, "Need a root block node"),
    ({"device": "top", "target": "{d}/c.qcow2"}, "Parameter 'sync' is missing"),
    ({"device": "top", "target": "{d}/d.qcow2", "sync": "full", "replaces": "top"},
     "a node-name must be provided when replacing a named node of the graph"),
    ({"device": "top", "target": "{d}/e.img", "sync": "full", "format": "vmdk2"},
     "Unknown file format 'vmdk2'"),
    ({"device": "top", "target": "{d}/f.qcow2", "sync": "full", "mode": "sideways"},
     "Parameter 'mode' does not accept value 'sideways'"),
]


def test_refusals_match_qemu_storage_daemon_and_create_nothing(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    qsd_dir = workdir / "qsd"
    qsd_dir.mkdir()
    qsd = Qsd(workdir)
    try:
        qsd.cmd("blockdev-add", driver="qcow2", node_name="base", read_only=True,
                file={"driver": "file", "filename": str(base), "locking": "off"})
        qsd.cmd("blockdev-add", driver="qcow2", node_name="top", backing="base", read_only=True,
                file={"driver": "file", "filename": str(top), "locking": "off"})
        for args, text in REFUSALS:
            ours = qmp.error("drive-mirror", **{k.replace("-", "_"): v.format(d=workdir)
                                                for k, v in args.items()})
            theirs = qsd.error("drive-mirror", **{k: v.format(d=qsd_dir) for k, v in args.items()})
            assert ours[1] == text, (args, ours)
            assert theirs[1] == text, (args, theirs)
    finally:
        qsd.stop()
    # Ours only: an existing file is not overwritten in absolute-paths mode
    # (QEMU truncates it), a raw target cannot have a backing file, mode
    # existing needs the file.
    keep = workdir / "keep.qcow2"
    keep.write_bytes(b"precious")
    cls, desc = qmp.error("drive-mirror", device="top", target=str(keep), sync="full")
    assert "File exists" in desc and keep.read_bytes() == b"precious"
    cls, desc = qmp.error("drive-mirror", device="top", target=str(workdir / "r.raw"), sync="top",
                          format="raw")
    assert desc == "'raw' does not support backing files"
    cls, desc = qmp.error("drive-mirror", device="top", target=str(workdir / "none.qcow2"),
                          sync="full", mode="existing", format="qcow2")
    assert "none.qcow2" in desc
    qmp.cmd("drive-mirror", device="top", target=str(workdir / "busy.qcow2"), sync="full",
            speed=1, node_name="busy")
    cls, desc = qmp.error("drive-mirror", device="top", target=str(workdir / "g.qcow2"),
                          sync="full", job_id="other")
    assert desc.startswith("Node 'top' is busy"), desc
    made = {p.name for p in workdir.iterdir()} - {"base.qcow2", "top.qcow2", "keep.qcow2",
                                                     "busy.qcow2"}
    assert not {m for m in made if m.endswith((".qcow2", ".img", ".raw"))}, made


def test_absolute_paths_writes_an_absolute_backing_name(qmp, workdir):
    """Regression: a source added by a name relative to the daemon's directory
    got that relative name written into the new image, which resolves it
    against its own directory: the image named a file that is not there."""
    base, top = chain(workdir)
    model = read_raw(top, workdir / "start.raw")
    rel = os.path.relpath(workdir)  # the daemon runs in the test's directory
    assert not os.path.isabs(rel) and os.sep in rel
    qmp.cmd("blockdev-add", driver="qcow2", node_name="base", read_only=True,
            file={"driver": "file", "filename": os.path.join(rel, "base.qcow2")})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top", backing="base",
            file={"driver": "file", "filename": os.path.join(rel, "top.qcow2")})
    (workdir / "sub").mkdir()
    copy = workdir / "sub" / "copy.qcow2"
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="top", node_name="copy")
    complete(qmp, "top")
    for n in ("copy", "top", "base"):
        qmp.cmd("blockdev-del", node_name=n)
    info = json.loads(qemu_img("info", "--output=json", str(copy)).stdout)
    assert info["backing-filename"] == str(base), info
    check_image(copy)
    assert read_raw(copy, workdir / "final.raw") == model


def test_sync_top_copies_only_the_top_layers_allocation(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    copy = workdir / "shallow.qcow2"
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="top", node_name="shallow")
    complete(qmp, "top")
    for n in ("shallow", "top", "base"):
        qmp.cmd("blockdev-del", node_name=n)

    def own_extents(path):
        m = json.loads(qemu_img("map", "-U", "--output=json", str(path)).stdout)
        return [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["data"]]

    assert own_extents(copy) == own_extents(top)
    info = json.loads(qemu_img("info", "--output=json", str(copy)).stdout)
    assert info["virtual-size"] == SIZE and info["format"] == "qcow2", info
    qemu_img("compare", str(copy), str(top))
    check_image(copy)


def test_mode_existing_probes_the_format(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    copy = create(workdir / "probed.qcow2", SIZE, backing=str(base), backing_fmt="qcow2")
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="top", mode="existing",
            node_name="probed")
    n = nodes(qmp)["probed"]
    assert n["drv"] == "qcow2" and n["backing_file"] == str(base), n
    complete(qmp, "top")
    assert "top" in nodes(qmp)  # the old source stays, as QEMU leaves a named node
    for k in ("probed", "top", "base"):
        qmp.cmd("blockdev-del", node_name=k)
    qemu_img("compare", str(copy), str(top))


def test_absolute_paths_sync_none_reads_through_the_source(qmp, workdir):
    """sync=none: the new qcow2 names the source as its backing file (QEMU's
    rule) and reads through the source node. Regression: on complete the
    target's own backing edge moved onto the target with the source's other
    parents, a loop that crashed the daemon at the first read."""
    base, top = chain(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, top)
    copy = workdir / "none.qcow2"
    qmp.cmd("drive-mirror", device="top", target=str(copy), sync="none", node_name="none")
    assert nodes(qmp)["none"]["backing_file"] == str(top)
    complete(qmp, "top")
    n = nodes(qmp)
    assert n["none"]["backing_file"] == str(top) and n["none"]["backing_file_depth"] == 2, n
    assert n["top"]["backing_file_depth"] == 1
    import nbd
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="none")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///none?socket={sock}")
    assert b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB)) == bytes(model)
    h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    for k in ("none", "top", "base"):
        qmp.cmd("blockdev-del", node_name=k)
    info = json.loads(qemu_img("info", "--output=json", str(copy)).stdout)
    assert info["backing-filename"] == str(top), info
    check_image(copy)
    assert read_raw(copy, workdir / "final.raw") == model


def test_absolute_paths_sync_none_under_a_writer_is_refused_cleanly(qmp, workdir):
    """The source's writer and a backing link that cannot share write: refused
    with the permission conflict, no file and no node left."""
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    export(qmp, workdir)
    before = set(nodes(qmp))
    copy = workdir / "none.qcow2"
    cls, desc = qmp.error("drive-mirror", device="top", target=str(copy), sync="none")
    assert desc.startswith("Permission conflict on node 'top'"), desc
    assert not copy.exists() and set(nodes(qmp)) == before
