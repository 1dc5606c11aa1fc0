"""Dirty bitmaps over QMP (block-dirty-bitmap-*, transaction,
query-named-block-nodes), checked against what qemu-storage-daemon 7.2 answers:
the texts below were taken from it. Writes come from qemu-io over an NBD export
of the node, so they take the same path every client write takes."""

import subprocess

import pytest

from conftest import KiB, MiB
from qmp_client import QmpError

SIZE = 4 * MiB


@pytest.fixture
def node(qmp, images, workdir):
    img = images.zeros("a.img", SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="fa", filename=str(img))
    qmp.cmd("blockdev-add", driver="raw", node_name="a", file="fa")
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="a", writable=True)
    return f"nbd+unix:///a?socket={sock}"


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [uri], check=True, capture_output=True, timeout=60)


def do(qmp, cmd, **args):
    """qmp.cmd for commands with a `name` argument (cmd's own first parameter)."""
    args = {k.replace("_", "-"): v for k, v in args.items()}
    r = qmp.request(cmd, args)
    if "error" in r:
        raise QmpError(r["error"]["class"], r["error"]["desc"])
    return r["return"]


def fails(qmp, cmd, **args):
    try:
        do(qmp, cmd, **args)
    except QmpError as e:
        return e.cls, e.desc
    raise AssertionError(f"{cmd} {args} succeeded")


def bitmaps(qmp, node_name="a"):
    for n in qmp.cmd("query-named-block-nodes", flat=True):
        if n["node-name"] == node_name:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError(node_name)


def test_add_lists_and_records_writes_zeroes_and_discards(qmp, node):
    do(qmp, "block-dirty-bitmap-add", node="a", name="b0")
    do(qmp, "block-dirty-bitmap-add", node="a", name="fine", granularity=4096)
    do(qmp, "block-dirty-bitmap-add", node="a", name="off", disabled=True)
    got = bitmaps(qmp)
    assert got["b0"] == {"name": "b0", "recording": True, "persistent": False, "busy": False,
                         "granularity": 65536, "count": 0}
    assert got["off"]["recording"] is False
    # Newest first, as QEMU lists them.
    names = [b["name"] for n in qmp.cmd("query-named-block-nodes")
             if n["node-name"] == "a" for b in n["dirty-bitmaps"]]
    assert names == ["off", "fine", "b0"]
    qemu_io(node, "write 4k 4k", "write -z 1M 8k", "discard 3M 64k")
    got = bitmaps(qmp)
    assert got["b0"]["count"] == 3 * 64 * KiB
    assert got["fine"]["count"] == 4 * KiB + 8 * KiB + 64 * KiB
    assert got["off"]["count"] == 0
    # The file node below has no bitmaps, so no member.
    assert "dirty-bitmaps" not in [n for n in qmp.cmd("query-named-block-nodes")
                                   if n["node-name"] == "fa"][0]


def test_clear_disable_enable_remove(qmp, node):
    do(qmp, "block-dirty-bitmap-add", node="a", name="b")
    qemu_io(node, "write 0 4k")
    do(qmp, "block-dirty-bitmap-clear", node="a", name="b")
    assert bitmaps(qmp)["b"]["count"] == 0
    do(qmp, "block-dirty-bitmap-disable", node="a", name="b")
    qemu_io(node, "write 0 4k")
    assert bitmaps(qmp)["b"] == {**bitmaps(qmp)["b"], "count": 0, "recording": False}
    do(qmp, "block-dirty-bitmap-enable", node="a", name="b")
    qemu_io(node, "write 128k 4k")
    assert bitmaps(qmp)["b"]["count"] == 64 * KiB
    do(qmp, "block-dirty-bitmap-remove", node="a", name="b")
    assert bitmaps(qmp) == {}


def test_merge_across_granularities_and_nodes(qmp, node, images):
    do(qmp, "block-dirty-bitmap-add", node="a", name="fine", granularity=512)
    do(qmp, "block-dirty-bitmap-add", node="a", name="coarse", disabled=True)
    qemu_io(node, "write 70k 1k")
    do(qmp, "block-dirty-bitmap-merge", node="a", target="coarse", bitmaps=["fine"])
    assert bitmaps(qmp)["coarse"]["count"] == 64 * KiB
    # Another node of the same size: {node, name} sources.
    img = images.zeros("b.img", SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="b", filename=str(img))
    do(qmp, "block-dirty-bitmap-add", node="b", name="x", granularity=512)
    do(qmp, "block-dirty-bitmap-merge", node="b", target="x",
            bitmaps=[{"node": "a", "name": "coarse"}])
    assert bitmaps(qmp, "b")["x"]["count"] == 64 * KiB


BAD = [
    ("block-dirty-bitmap-add", dict(node="nope", name="x"),
     "Cannot find device='nope' nor node-name='nope'"),
    ("block-dirty-bitmap-add", dict(node="a", name=""), "Bitmap name cannot be empty"),
    ("block-dirty-bitmap-add", dict(node="a", name="x", granularity=1000),
     "Granularity must be power of 2 and at least 512"),
    ("block-dirty-bitmap-add", dict(node="a", name="x", granularity=256),
     "Granularity must be power of 2 and at least 512"),
    ("block-dirty-bitmap-add", dict(node="a", name="b1"), "Bitmap already exists: b1"),
    ("block-dirty-bitmap-add", dict(node="a", name="x" * 1024), "Bitmap name too long: " + "x" * 1024),
    ("block-dirty-bitmap-add", dict(node="a", name="p", persistent=True),
     "Can't store persistent bitmaps to a: Operation not supported"),
    ("block-dirty-bitmap-remove", dict(node="a", name="nope"), "Dirty bitmap 'nope' not found"),
    ("block-dirty-bitmap-remove", dict(node="nope", name="b1"), "Node 'nope' not found"),
    ("block-dirty-bitmap-clear", dict(node="fa", name="b1"), "Dirty bitmap 'b1' not found"),
    ("block-dirty-bitmap-enable", dict(node="a", name="nope"), "Dirty bitmap 'nope' not found"),
    ("block-dirty-bitmap-merge", dict(node="a", target="nope", bitmaps=["b1"]),
     "Dirty bitmap 'nope' not found"),
    ("block-dirty-bitmap-merge", dict(node="a", target="b1", bitmaps=["b2", "nope"]),
     "Dirty bitmap 'nope' not found"),
    ("block-dirty-bitmap-merge", dict(node="a", target="b1", bitmaps=[{"node": "small", "name": "s"}]),
     "Bitmaps are of different sizes (destination size is 4194304, source size is 1048576) "
     "and can't be merged"),
]


@pytest.mark.parametrize("cmd,args,desc", BAD, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD)])
def test_bad_input_qemu_texts_and_no_side_effect(qmp, node, images, cmd, args, desc):
    do(qmp, "block-dirty-bitmap-add", node="a", name="b1", disabled=True)
    do(qmp, "block-dirty-bitmap-add", node="a", name="b2", granularity=4096)
    qemu_io(node, "write 0 4k")
    small = images.zeros("s.img", MiB)
    qmp.cmd("blockdev-add", driver="file", node_name="small", filename=str(small))
    do(qmp, "block-dirty-bitmap-add", node="small", name="s")
    before = bitmaps(qmp)
    assert fails(qmp, cmd, **args) == ("GenericError", desc)
    assert bitmaps(qmp) == before


def test_transaction_all_or_nothing(qmp, node):
    do(qmp, "block-dirty-bitmap-add", node="a", name="b1")
    qemu_io(node, "write 0 4k")
    before = bitmaps(qmp)
    # The last action fails: the add, clear and disable before it are undone.
    assert fails(qmp, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "t1"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "a", "name": "b1"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "a", "name": "b1"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "a", "name": "nope"}},
    ]) == ("GenericError", "Dirty bitmap 'nope' not found")
    assert bitmaps(qmp) == before
    assert fails(qmp, "transaction", actions=[
        {"type": "block-dirty-bitmap-remove", "data": {"node": "a", "name": "b1"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "a", "name": "b1"}},
    ]) == ("GenericError",
           "Bitmap 'b1' is currently in use by another operation and cannot be used")
    assert bitmaps(qmp) == before
    assert fails(qmp, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "t1"}},
        {"type": "abort", "data": {}},
    ]) == ("GenericError", "Transaction aborted using Abort action")
    assert bitmaps(qmp) == before
    assert fails(qmp, "transaction", actions=[{"type": "bogus", "data": {}}]) == (
        "GenericError", "Parameter 'type' does not accept value 'bogus'")
    assert fails(qmp, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "t3"}}],
        properties={"completion-mode": "grouped"}) == (
        "GenericError",
        "Action 'block-dirty-bitmap-add' does not support Transaction property "
        "completion-mode = grouped")
    assert bitmaps(qmp) == before
    # libvirt's pattern around a backup: a new bitmap, the old one disabled and
    # merged into it, in one step; later actions see earlier ones.
    do(qmp, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "t2", "disabled": True}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "a", "target": "t2", "bitmaps": ["b1"]}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "a", "name": "b1"}},
    ])
    got = bitmaps(qmp)
    assert got["t2"]["count"] == 64 * KiB and got["t2"]["recording"] is False
    assert got["b1"]["recording"] is False
    do(qmp, "transaction", actions=[])


# --------------------------------------------------------------------------
# Export as the qemu:dirty-bitmap:NAME meta context


def nbdinfo_map(uri, ctx):
    out = subprocess.run(["nbdinfo", "--json", f"--map={ctx}", uri], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    import json
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def test_nbdinfo_map_lists_exactly_the_written_ranges(qmp, node, workdir):
    do(qmp, "block-dirty-bitmap-add", node="a", name="fine", granularity=512)
    do(qmp, "block-dirty-bitmap-add", node="a", name="b0")
    qemu_io(node, "write 4k 4k", "write -z 1M 8k", "discard 3M 64k", "write 3584k 512")
    do(qmp, "block-export-add", type="nbd", id="bk", name="backup", node_name="a",
            writable=True, bitmaps=["fine", {"node": "a", "name": "b0"}])
    uri = f"nbd+unix:///backup?socket={workdir / 'nbd.sock'}"
    dirty = [(o, n) for o, n, t in nbdinfo_map(uri, "qemu:dirty-bitmap:fine") if t == 1]
    assert dirty == [(4 * KiB, 4 * KiB), (MiB, 8 * KiB), (3 * MiB, 64 * KiB),
                     (3584 * KiB, 512)]
    ext = nbdinfo_map(uri, "qemu:dirty-bitmap:b0")
    assert sum(n for _, n, _ in ext) == SIZE
    assert [(o, n) for o, n, t in ext if t == 1] == [
        (0, 64 * KiB), (MiB, 64 * KiB), (3 * MiB, 64 * KiB), (3584 * KiB, 64 * KiB)]
    # Both contexts and base:allocation are listed.
    listed = subprocess.run(["nbdinfo", "--list", uri], capture_output=True, text=True,
                            check=True, timeout=60).stdout
    assert "qemu:dirty-bitmap:fine" in listed and "qemu:dirty-bitmap:b0" in listed
    # Exported: busy, so QMP may not remove it; free again after block-export-del.
    assert bitmaps(qmp)["fine"]["busy"] is True
    assert fails(qmp, "block-dirty-bitmap-remove", node="a", name="fine") == (
        "GenericError", "Bitmap 'fine' is currently in use by another operation and cannot be used")
    qmp.cmd("block-export-del", id="bk")
    assert bitmaps(qmp)["fine"]["busy"] is False
    do(qmp, "block-dirty-bitmap-remove", node="a", name="fine")


def test_export_bitmap_bad_input(qmp, node):
    do(qmp, "block-dirty-bitmap-add", node="a", name="b0")
    assert fails(qmp, "block-export-add", type="nbd", id="x", name="x", node_name="a",
                     bitmaps=["nope"]) == ("GenericError", "Bitmap 'nope' is not found")
    assert fails(qmp, "block-export-add", type="nbd", id="x", name="x", node_name="a",
                     bitmaps=["b0"]) == (
        "GenericError", "Enabled bitmap 'b0' incompatible with readonly export")
    do(qmp, "block-dirty-bitmap-disable", node="a", name="b0")
    do(qmp, "block-export-add", type="nbd", id="x", name="x", node_name="a", bitmaps=["b0"])
    assert fails(qmp, "block-export-add", type="nbd", id="y", name="y", node_name="a",
                     bitmaps=["b0"]) == (
        "GenericError", "Bitmap 'b0' is currently in use by another operation and cannot be used")
    assert qmp.cmd("query-block-exports")  # still serving


# --------------------------------------------------------------------------
# blockdev-mirror sync=bitmap (the workflow: test_migrate_back.py)


def test_sync_bitmap_copies_only_marked_ranges_and_never_keeps_it(qmp, node, images):
    tgt = images.zeros("t.img", SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="t", filename=str(tgt))
    do(qmp, "block-dirty-bitmap-add", node="a", name="b0")
    qemu_io(node, "write -P 7 64k 4k", "write -P 9 2M 64k")
    qmp.request("blockdev-mirror", {"job-id": "j", "device": "a", "target": "t",
                                    "sync": "bitmap", "bitmap": "b0"})
    assert bitmaps(qmp)["b0"]["busy"] is True
    assert fails(qmp, "block-dirty-bitmap-clear", node="a", name="b0") == (
        "GenericError", "Bitmap 'b0' is currently in use by another operation and cannot be used")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-cancel", device="j")  # ready: ends in sync, no switch
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert ev["data"]["offset"] == 2 * 64 * KiB
    got = tgt.read_bytes()
    assert got[64 * KiB:68 * KiB] == b"\7" * 4096 and got[2 * MiB:2 * MiB + 64 * KiB] == b"\x09" * 65536
    assert got[:64 * KiB] == bytes(64 * KiB)  # not marked: not copied
    # bitmap-mode never (the default): left as it was, and free again.
    assert bitmaps(qmp)["b0"]["busy"] is False and bitmaps(qmp)["b0"]["count"] == 2 * 64 * KiB


MIRROR_BAD = [
    (dict(sync="bitmap"), "must provide a valid bitmap name for 'bitmap' sync mode"),
    (dict(sync="bitmap", bitmap="nope"), "Bitmap 'nope' could not be found"),
    (dict(sync="full", bitmap="b0"), "a bitmap was given, but sync mode is 'full', not 'bitmap'"),
    (dict(sync="bitmap", bitmap_mode="never"), "Cannot specify bitmap sync mode without a bitmap"),
    (dict(sync="bitmap", bitmap="b0", bitmap_mode="always"),
     "Bitmap sync mode 'always' is not supported by blkmirror's mirror (use 'never' or 'on-success')"),
    (dict(sync="bitmap", bitmap="busy"),
     "Bitmap 'busy' is currently in use by another operation and cannot be used"),
    (dict(sync="bitmap", bitmap="onother"), "Bitmap 'onother' could not be found"),
]


@pytest.mark.parametrize("args,desc", MIRROR_BAD, ids=[str(i) for i in range(len(MIRROR_BAD))])
def test_sync_bitmap_bad_input(qmp, node, images, args, desc):
    tgt = images.zeros("t.img", SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="t", filename=str(tgt))
    do(qmp, "block-dirty-bitmap-add", node="a", name="b0")
    do(qmp, "block-dirty-bitmap-add", node="a", name="busy", disabled=True)
    do(qmp, "block-dirty-bitmap-add", node="t", name="onother")
    do(qmp, "block-export-add", type="nbd", id="x", name="x", node_name="a", bitmaps=["busy"])
    before = bitmaps(qmp)
    assert qmp.error("blockdev-mirror", job_id="j", device="a", target="t", **args) == (
        "GenericError", desc)
    assert bitmaps(qmp) == before and qmp.cmd("query-block-jobs") == []


def test_bitmap_on_a_mirror_target_records_the_jobs_writes(qmp, node, images):
    # The job writes its target's device directly (not through the node's
    # request path); an incremental backup of the target must still see them.
    qemu_io(node, "write -P 5 1M 64k", "write -P 6 3M 4k")
    tgt = images.zeros("t.img", SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="t", filename=str(tgt))
    do(qmp, "block-dirty-bitmap-add", node="t", name="tb")
    qmp.cmd("blockdev-mirror", job_id="j", device="a", target="t", sync="full")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-cancel", device="j")
    qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert bitmaps(qmp, "t")["tb"]["count"] >= 2 * 64 * KiB
