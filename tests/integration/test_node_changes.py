"""blockdev-reopen (the read-only flag, as libvirt flips a base before and
after a commit) and block_resize / block-resize (issue 11): the change seen
from outside (image locks as qemu-io meets them, sizes as qemu-img and new NBD
clients see them, data kept, `qemu-img check` clean), and refusals with
qemu-storage-daemon 7.2's own texts, sent to both daemons in the same test."""

import json
import os
import shutil
import subprocess

import pytest

from qcow2_helpers import MiB, Qsd, check_image, create, qemu_img, qemu_io, read_raw

SIZE = 8 * MiB


def chain(d):
    """base.qcow2 (0xb1) <- top.qcow2 (0x31 at 1M)."""
    create(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", f"write -P 0xb1 0 {SIZE}")
    create(d / "top.qcow2", SIZE, backing=str(d / "base.qcow2"), backing_fmt="qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x31 1M 64k")
    return d / "base.qcow2", d / "top.qcow2"


def add_chain(qmp, base, top, base_ro=True):
    """libvirt's way: protocol nodes by name, the base read-only."""
    qmp.cmd("blockdev-add", driver="file", node_name="base-file", filename=str(base),
            read_only=base_ro)
    qmp.cmd("blockdev-add", driver="qcow2", node_name="base", file="base-file",
            read_only=base_ro)
    qmp.cmd("blockdev-add", driver="file", node_name="top-file", filename=str(top))
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top", file="top-file", backing="base")


def base_entry(read_only):
    return {"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": read_only}


def node(qmp, name):
    return next(n for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == name)


def readable_elsewhere(path):
    r = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(path)],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and "lock" not in r.stderr + r.stdout


def test_reopen_flips_a_base_read_write_and_back(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    assert node(qmp, "base")["ro"] is True
    assert readable_elsewhere(base)
    qmp.cmd("blockdev-reopen", options=[base_entry(False)])
    assert node(qmp, "base")["ro"] is False
    # Held writable now: another reader that does not share writes is refused.
    assert not readable_elsewhere(base)
    # A commit into it needs no reopen of its own and keeps it read-write.
    qmp.cmd("block-commit", job_id="c", device="top", base_node="base")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"})
    qmp.cmd("job-complete", id="c")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"})
    assert "error" not in ev["data"], ev
    qmp.cmd("blockdev-reopen", options=[base_entry(True)])
    assert node(qmp, "base")["ro"] is True
    assert readable_elsewhere(base)
    for n in ("top", "top-file", "base", "base-file"):
        qmp.cmd("blockdev-del", node_name=n)
    check_image(base)
    out = qemu_io(base, "read -P 0x31 1M 64k", "read -P 0xb1 0 1M").stdout
    assert "Pattern verification failed" not in out


def test_reopen_of_several_nodes_is_all_or_nothing(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    bad = {"driver": "qcow2", "node-name": "nope", "file": "x"}
    cls, desc = qmp.error("blockdev-reopen", options=[base_entry(False), bad])
    assert (cls, desc) == ("GenericError", "Failed to find node with node-name='nope'")
    assert node(qmp, "base")["ro"] is True
    assert readable_elsewhere(base)


REOPEN_REFUSALS = [
    ([{"driver": "qcow2", "file": "base-file"}], "node-name not specified"),
    ([{"driver": "qcow2", "node-name": "nope", "file": "base-file"}],
     "Failed to find node with node-name='nope'"),
    ([{"driver": "raw", "node-name": "base", "file": "base-file"}],
     "Cannot change the option 'driver'"),
    ([{"driver": "file", "node-name": "base-file", "filename": "/nonexistent"}],
     "Cannot change the option 'filename'"),
    ([{"driver": "qcow2", "node-name": "top", "file": "top-file"}],
     "backing is missing for 'top'"),
]


def test_reopen_refusals_match_qemu_storage_daemon(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    qsd = Qsd(workdir)
    try:
        qsd.cmd("blockdev-add", driver="file", node_name="base-file", filename=str(base),
                read_only=True)
        qsd.cmd("blockdev-add", driver="qcow2", node_name="base", file="base-file",
                read_only=True)
        qsd.cmd("blockdev-add", driver="file", node_name="top-file", filename=str(top),
                locking="off")
        qsd.cmd("blockdev-add", driver="qcow2", node_name="top", file="top-file",
                backing="base", read_only=True)
        for options, text in REOPEN_REFUSALS:
            ours = qmp.error("blockdev-reopen", options=options)
            theirs = qsd.error("blockdev-reopen", options=options)
            assert ours == ("GenericError", text), options
            assert theirs[1] == text, (options, theirs)
    finally:
        qsd.stop()
    # Ours only: QEMU 7.2 can move a node onto another file or backing
    # child; blkmirror refuses rather than pretend.
    ours = qmp.error("blockdev-reopen",
                     options=[{"driver": "qcow2", "node-name": "base", "file": "top-file"}])
    assert ours == ("GenericError", "Cannot change the option 'file'")
    ours = qmp.error("blockdev-reopen", options=[
        {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "top-file"}])
    assert ours == ("GenericError", "Cannot change the option 'backing'")
    # Nor does it change qcow2's runtime options, which QEMU 7.2 may.
    ours = qmp.error("blockdev-reopen", options=[dict(base_entry(True), **{"lazy-refcounts": True})])
    assert ours == ("GenericError", "Cannot change the option 'lazy-refcounts'")
    assert node(qmp, "base")["ro"] is True
    assert node(qmp, "top")["ro"] is False


def test_resize_grows_a_qcow2_node_and_keeps_its_data(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    qmp.cmd("block_resize", node_name="top", size=16 * MiB)
    assert node(qmp, "top")["image"]["virtual-size"] == 16 * MiB
    # Far enough that the L1 table needs more clusters than it has.
    qmp.cmd("block-resize", node_name="top", size=1 << 46)
    for n in ("top", "top-file", "base", "base-file"):
        qmp.cmd("blockdev-del", node_name=n)
    info = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    assert info["virtual-size"] == 1 << 46
    check_image(top)
    out = qemu_io(top, "read -P 0x31 1M 64k", "read -P 0xb1 0 1M",
                  f"read -P 0 {SIZE} 1M", f"read -P 0 {(1 << 46) - MiB} 1M").stdout
    assert "Pattern verification failed" not in out, out
    assert qemu_io(top, f"read -P 0x31 1M 64k").stdout.count("read 65536/65536") == 1


def test_resize_of_a_raw_node_and_what_new_clients_see(qmp, workdir):
    img = workdir / "disk.raw"
    img.write_bytes(b"\x5a" * SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="f", filename=str(img))
    qmp.cmd("blockdev-add", driver="raw", node_name="d", file="f")
    qmp.cmd("block_resize", node_name="d", size=12 * MiB)
    assert os.path.getsize(img) == 12 * MiB
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="d", writable=True)
    import nbd
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///d?socket={sock}")
    assert h.get_size() == 12 * MiB
    assert h.pread(4096, 12 * MiB - 4096) == bytes(4096)
    assert h.pread(4096, 0) == b"\x5a" * 4096
    # An NBD export does not share resizing (QEMU's rule): refused, and the
    # connected client goes on.
    cls, desc = qmp.error("block_resize", node_name="d", size=4 * MiB)
    assert cls == "GenericError" and desc.startswith("Permission conflict on node 'd'"), desc
    h.pwrite(b"\x77" * 512, 12 * MiB - 512)
    h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    qmp.cmd("block_resize", node_name="d", size=4 * MiB)  # raw may shrink, as in QEMU
    assert os.path.getsize(img) == 4 * MiB
    assert img.read_bytes() == b"\x5a" * (4 * MiB)


def test_resize_refusals_match_qemu_storage_daemon(qmp, workdir):
    base, top = chain(workdir)
    add_chain(qmp, base, top)
    ro = workdir / "ro.raw"
    ro.write_bytes(bytes(SIZE))
    qmp.cmd("blockdev-add", driver="file", node_name="ro", filename=str(ro), read_only=True)
    qsd = Qsd(workdir)
    cases = [
        ({"device": "top", "size": 16 * MiB}, "Cannot find device='top' nor node-name=''"),
        ({"node-name": "nope", "size": 16 * MiB}, "Cannot find device='' nor node-name='nope'"),
        ({"node-name": "top", "size": -1}, "Parameter 'size' expects a >0 size"),
        ({"node-name": "top", "size": 16 * MiB + 100}, "The new size must be a multiple of 512"),
        ({"node-name": "base", "size": 16 * MiB}, "Device '(null)' is in use"),  # a backing file
        ({"node-name": "ro", "size": 16 * MiB}, "Image is read-only"),
        ({"node-name": "top"}, "Parameter 'size' is missing"),
    ]
    try:
        qsd.cmd("blockdev-add", driver="file", node_name="base-file", filename=str(base),
                read_only=True)
        qsd.cmd("blockdev-add", driver="qcow2", node_name="base", file="base-file",
                read_only=True)
        (workdir / "ro-qsd.raw").write_bytes(bytes(SIZE))
        qsd.cmd("blockdev-add", driver="file", node_name="ro",
                filename=str(workdir / "ro-qsd.raw"), read_only=True)
        copy = workdir / "top-qsd.qcow2"
        shutil.copy(top, copy)
        qsd.cmd("blockdev-add", driver="qcow2", node_name="top", backing="base",
                file={"driver": "file", "filename": str(copy)})
        for args, text in cases:
            ours = qmp.error("block_resize", **{k.replace("-", "_"): v for k, v in args.items()})
            theirs = qsd.error("block_resize", **{k.replace("-", "_"): v for k, v in args.items()})
            assert ours == ("GenericError", text), args
            assert theirs[1] == text, (args, theirs)
    finally:
        qsd.stop()
    # A node a job holds is in use (QEMU names the device argument, absent here).
    qmp.cmd("block-commit", job_id="c", device="top", base_node="base", speed=1)
    assert qmp.error("block_resize", node_name="top", size=16 * MiB) == (
        "GenericError", "Device '(null)' is in use")
    qmp.cmd("job-cancel", id="c")
    qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "c"})
    # The job lets go of its nodes when it is dismissed (automatically here).
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c", "status": "null"})
    for n in ("top", "base"):
        assert node(qmp, n)["image"]["virtual-size"] == SIZE
    # Ours only: a qcow2 node grows but does not shrink (QEMU 7.2 shrinks one
    # when nothing is allocated past the new end).
    desc = qmp.error("block_resize", node_name="top", size=4 * MiB)[1]
    assert "shrinking" in desc and "not supported" in desc, desc
