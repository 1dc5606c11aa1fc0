"""qcow2 nodes and backing chains through QMP, compared with
qemu-storage-daemon 7.2: blockdev-add driver qcow2 (file and backing as node
names, inline objects or null; the header's backing file opened implicitly),
query-named-block-nodes field by field, blockdev-del taking the implicit nodes
along, blockdev-create driver qcow2, exports with qemu:allocation-depth, the
mirror job between raw and qcow2, and bad input refused with nothing written."""

import json
import os
import shutil

import pytest

from nbd_helpers import run_tool, uri_for
from qcow2_helpers import (BAD, mirror_to_completion, KiB, MiB, QemuNbd, Qsd, check_image, compare_with_export, create,
                           depth_map, qemu_img, qemu_io, sha)

SIZE = 4 * MiB



def chain(d, base_fmt="qcow2"):
    """base <- top (relative names), written at different places."""
    base = d / f"base.{base_fmt}"
    if base_fmt == "raw":
        qemu_img("create", "-q", "-f", "raw", str(base), str(SIZE))
    else:
        create(base, SIZE)
    qemu_io(base, "write -P 0xb1 0 1M", fmt=base_fmt)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        create("top.qcow2", SIZE, backing=base.name, backing_fmt=base_fmt)
    finally:
        os.chdir(cwd)
    qemu_io(d / "top.qcow2", "write -P 0xd1 512k 1M")
    return base, d / "top.qcow2"


def add_qcow2(q, name, path, **kw):
    q.cmd("blockdev-add", driver="qcow2", node_name=name,
          file={"driver": "file", "filename": str(path)}, **kw)


def by_file(nodes):
    """Named nodes keyed by (drv, file), implicit names left out."""
    return {(n["drv"], n["file"]): n for n in nodes}


def normalize(node):
    n = json.loads(json.dumps(node))
    n.pop("node-name")
    # The image file's own metadata (actual-size) depends on when each daemon
    # last wrote it; compare it only roughly.
    def strip(img):
        img.pop("actual-size", None)
        if "backing-image" in img:
            strip(img["backing-image"])
    strip(n["image"])
    return n


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_query_named_block_nodes_as_qsd(qmp, workdir, base_fmt):
    base, top = chain(workdir, base_fmt)
    add_qcow2(qmp, "top", top)
    ours = qmp.cmd("query-named-block-nodes")
    ours_flat = qmp.cmd("query-named-block-nodes", flat=True)
    qmp.cmd("blockdev-del", node_name="top")
    assert qmp.cmd("query-named-block-nodes") == [], "implicit nodes stayed after blockdev-del"
    qsd = Qsd(workdir)
    try:
        qsd.cmd("blockdev-add", driver="qcow2", node_name="top",
                file={"driver": "file", "filename": str(top)})
        theirs = qsd.cmd("query-named-block-nodes")
        theirs_flat = qsd.cmd("query-named-block-nodes", flat=True)
    finally:
        qsd.stop()
    for mine, ref in ((ours, theirs), (ours_flat, theirs_flat)):
        a, b = by_file(mine), by_file(ref)
        assert a.keys() == b.keys()
        for k in a:
            assert normalize(a[k]) == normalize(b[k]), k
        # The nodes opened from the header have generated names, as in QEMU.
        # (QEMU names the inline file node #blockN too; ours is top-file.)
        for n in mine:
            if n["file"] == str(base):
                assert n["node-name"].startswith("#block"), n["node-name"]


def test_backing_as_node_name_inline_and_null(qmp, workdir):
    base, top = chain(workdir)
    qmp.cmd("blockdev-add", driver="qcow2", node_name="b", read_only=True,
            file={"driver": "file", "filename": str(base), "read-only": True})
    add_qcow2(qmp, "t1", top, backing="b", read_only=True)
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
    assert nodes["t1"]["backing_file"] == str(base)
    assert nodes["t1"]["backing_file_depth"] == 1
    assert nodes["t1"]["image"]["backing-image"]["filename"] == str(base)
    assert qmp.error("blockdev-del", node_name="b")[1].startswith("Node 'b' is busy")
    shutil.copy(top, workdir / "top2.qcow2")
    add_qcow2(qmp, "t2", workdir / "top2.qcow2", backing=None)
    t2 = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}["t2"]
    assert "backing_file" not in t2 and t2["backing_file_depth"] == 0
    assert t2["image"]["backing-filename"] == "base.qcow2"  # the header still says so
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(workdir / "n.sock")}})
    for e in ("t1", "t2"):
        r = qmp.request("block-export-add", {"type": "nbd", "id": "e" + e, "node-name": e, "name": e})
        assert "return" in r, r
    # Without its backing file, what top does not hold reads as zeroes.
    r = run_tool(["qemu-io", "-r", "-f", "raw", uri_for(workdir / "n.sock", "t2"), "-c", "read -P 0 0 512k",
                  "-c", "read -P 0xd1 512k 1M"])
    assert "Pattern verification failed" not in r.stdout
    compare_with_export(top, uri_for(workdir / "n.sock", "t1"))


def test_export_allocation_depth_as_qemu_nbd(qmp, workdir):
    d = workdir / "c"
    d.mkdir()
    base, top = chain(d)
    qemu_io(top, "write -z 3M 64k")
    add_qcow2(qmp, "top", top, read_only=True)
    sock = workdir / "n.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="top", allocation_depth=True)
    ref = QemuNbd(top, workdir / "q.sock")
    try:
        assert depth_map(uri_for(sock, "top")) == depth_map(ref.uri)
    finally:
        ref.stop()
    compare_with_export(top, uri_for(sock, "top"))


def test_blockdev_create_qcow2_then_mirror_raw_into_it(qmp, workdir, images):
    src = images.sparse("src.raw", SIZE, [(0, 256 * KiB), (2 * MiB, 512 * KiB)])
    tgt = workdir / "new.qcow2"
    qmp.cmd("blockdev-create", job_id="c1", options={"driver": "file", "filename": str(tgt), "size": 0})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c1", "status": "concluded"})
    qmp.cmd("job-dismiss", id="c1")
    qmp.cmd("blockdev-add", driver="file", node_name="tf", filename=str(tgt))
    qmp.cmd("blockdev-create", job_id="c2", options={"driver": "qcow2", "file": "tf", "size": SIZE,
                                                      "cluster-size": 65536})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c2", "status": "concluded"})
    [job] = [j for j in qmp.cmd("query-jobs") if j["id"] == "c2"]
    assert "error" not in job, job
    qmp.cmd("job-dismiss", id="c2")
    check_image(tgt)
    qmp.cmd("blockdev-add", driver="qcow2", node_name="dst", file="tf")
    qmp.cmd("blockdev-add", driver="raw", node_name="src", file={"driver": "file", "filename": str(src)})
    mirror_to_completion(qmp, device="src", target="dst", sync="full")
    qmp.cmd("blockdev-del", node_name="dst")
    qmp.cmd("blockdev-del", node_name="tf")
    check_image(tgt)
    r = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(tgt), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mirror_qcow2_chain_into_raw(qmp, workdir, images):
    base, top = chain(workdir)
    dst = images.sparse("dst.raw", SIZE)
    add_qcow2(qmp, "src", top)
    qmp.cmd("blockdev-add", driver="raw", node_name="dst", file={"driver": "file", "filename": str(dst)})
    mirror_to_completion(qmp, device="src", target="dst", sync="full")
    qmp.cmd("blockdev-del", node_name="src")
    r = qemu_img("compare", "-F", "raw", str(top), str(dst), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    check_image(top)


def test_blockdev_create_qcow2_with_backing_and_v2(qmp, workdir):
    create(workdir / "base.qcow2", SIZE)
    for name, opts in (("b.qcow2", {"backing-file": "base.qcow2", "backing-fmt": "qcow2"}),
                       ("v2.qcow2", {"version": "v2", "cluster-size": 4096})):
        p = workdir / name
        qmp.cmd("blockdev-create", job_id="f", options={"driver": "file", "filename": str(p), "size": 0})
        qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "f", "status": "concluded"})
        qmp.cmd("job-dismiss", id="f")
        qmp.cmd("blockdev-add", driver="file", node_name="f", filename=str(p))
        qmp.cmd("blockdev-create", job_id="q", options={"driver": "qcow2", "file": "f", "size": SIZE, **opts})
        qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "q", "status": "concluded"})
        qmp.cmd("job-dismiss", id="q")
        qmp.cmd("blockdev-del", node_name="f")
        check_image(p)
    info = json.loads(qemu_img("info", "--output=json", str(workdir / "b.qcow2")).stdout)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    info = json.loads(qemu_img("info", "--output=json", str(workdir / "v2.qcow2")).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10" and info["cluster-size"] == 4096


@pytest.mark.parametrize("opts,err", [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"size": SIZE, "cluster-size": 3000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"size": SIZE, "version": "v2", "refcount-bits": 1}, "Different refcount widths than 16 bits"),
    ({"size": SIZE, "extended-l2": True, "cluster-size": 4096}, "Extended L2 entries are only supported with cluster sizes"),
    ({"size": SIZE, "backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"size": SIZE, "encrypt": {"format": "luks"}}, "Encrypted images are not supported"),
])
def test_blockdev_create_qcow2_bad_options(qmp, workdir, opts, err):
    p = workdir / "x.qcow2"
    p.write_bytes(b"")
    qmp.cmd("blockdev-add", driver="file", node_name="f", filename=str(p))
    cls, desc = qmp.error("blockdev-create", job_id="q", options={"driver": "qcow2", "file": "f", **opts})
    assert err in desc
    assert p.stat().st_size == 0


def test_blockdev_create_refuses_a_non_empty_file(qmp, workdir, images):
    p = images.dense("data.img", 1 * MiB)
    before = sha(p)
    qmp.cmd("blockdev-add", driver="file", node_name="f", filename=str(p))
    desc = qmp.error("blockdev-create", job_id="q", options={"driver": "qcow2", "file": "f", "size": SIZE})[1]
    assert "is not empty" in desc
    assert sha(p) == before


# --------------------------------------------------------------------------
# Bad input: a clear error, nothing written, no node left behind.




@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_images_refused_over_qmp(qmp, workdir, make):
    p, words = make(workdir)
    files = {f: sha(f) for f in workdir.iterdir() if f.is_file() and f.suffix in (".qcow2", ".raw")}
    cls, desc = qmp.error("blockdev-add", driver="qcow2", node_name="x",
                          file={"driver": "file", "filename": str(p)})
    assert words.lower() in desc.lower(), desc
    assert "\n" not in desc
    assert qmp.cmd("query-named-block-nodes") == [], "a refused blockdev-add left nodes behind"
    for f, s in files.items():
        assert sha(f) == s, f"{f.name} was written"
