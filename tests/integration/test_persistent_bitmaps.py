"""Persistent dirty bitmaps (issue 13): qcow2's bitmaps extension, read and
written as QEMU does (qemu-img bitmap/info/check and qemu-nbd are the judges),
a raw image's side file, the in-use flag after kill -9, and the migrate-back
workflow across a daemon restart."""

import json
import os
import random
import signal
import subprocess

import pytest

from conftest import KiB, MiB
from qmp_client import Daemon
from test_dirty_bitmaps import bitmaps, do, fails, qemu_io
from test_migrate_back import GRAN, Writer, aligned_bytes, complete, finish, wait_synced

SIZE = 16 * MiB


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)


def img_bitmaps(path):
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", str(path)).stdout)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def qemu_check(path):
    r = sh("qemu-img", "check", "-U", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def dirty_map(path, name):
    """The dirty ranges of bitmap `name` of a qcow2 image, as QEMU reads them."""
    r = sh("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", "--", "[", "qemu-nbd", "-r",
           "-f", "qcow2", "-B", name, str(path), "]")
    return [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] == 1]


def add_qcow2(qmp, name, path, read_only=False):
    qmp.cmd("blockdev-add", driver="qcow2", node_name=name, read_only=read_only,
            file={"driver": "file", "filename": str(path), "read-only": read_only})


def add_raw(qmp, name, path):
    qmp.cmd("blockdev-add", driver="file", node_name="f" + name, filename=str(path))
    qmp.cmd("blockdev-add", driver="raw", node_name=name, file="f" + name)


def export(qmp, workdir, node, *bitmap_names):
    sock = workdir / "nbd.sock"
    if not sock.exists():
        qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.request("block-export-add", {"type": "nbd", "id": "e-" + node, "node-name": node,
                                     "writable": True, "bitmaps": list(bitmap_names)})
    return f"nbd+unix:///{node}?socket={sock}"


def nbd_map(uri, name):
    r = sh("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", uri)
    return [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] == 1]


def qcow2(images, name, size=SIZE, *opts):
    path = images.path(name)
    sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(size))
    return path


def quit_daemon(daemon, qmp):
    qmp.request("quit", {})
    assert daemon.proc.wait(60) == 0, daemon.output()


def test_bitmaps_qemu_img_wrote_are_loaded_with_their_ranges(qmp, daemon, images, workdir):
    img = qcow2(images, "a.qcow2")
    sh("qemu-img", "bitmap", "--add", "-g", "65536", str(img), "b0")
    sh("qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "-c", "write 5M 1", str(img))
    sh("qemu-img", "bitmap", "--add", "--disable", "-g", "4096", str(img), "off")
    add_qcow2(qmp, "a", img)
    got = bitmaps(qmp)
    assert got["b0"] == {"name": "b0", "recording": True, "persistent": True, "busy": False,
                         "granularity": 65536, "count": 128 * KiB}
    assert got["off"]["recording"] is False and got["off"]["persistent"] is True
    # Marked in use on disk while we hold them; the node's image info agrees.
    assert all("in-use" in b["flags"] for b in img_bitmaps(img))
    node = [n for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == "a"][0]
    assert node["image"]["format-specific"]["data"]["bitmaps"] == img_bitmaps(img)
    uri = export(qmp, workdir, "a", "b0")
    assert nbd_map(uri, "b0") == [(1 * MiB, 64 * KiB), (5 * MiB, 64 * KiB)]
    qemu_io(uri, "write 9M 4k")
    quit_daemon(daemon, qmp)
    qemu_check(img)
    assert [(b["name"], b["flags"]) for b in img_bitmaps(img)] == [("b0", ["auto"]), ("off", [])]
    assert dirty_map(img, "b0") == [(1 * MiB, 64 * KiB), (5 * MiB, 64 * KiB), (9 * MiB, 64 * KiB)]
    assert dirty_map(img, "off") == []


def test_bitmaps_we_write_are_read_and_merged_by_qemu_img(qmp, daemon, images, workdir):
    img = qcow2(images, "a.qcow2")
    add_qcow2(qmp, "a", img)
    do(qmp, "block-dirty-bitmap-add", node="a", name="p", granularity=4096, persistent=True)
    do(qmp, "block-dirty-bitmap-add", node="a", name="off", persistent=True, disabled=True)
    do(qmp, "block-dirty-bitmap-add", node="a", name="temp")
    uri = export(qmp, workdir, "a")
    qemu_io(uri, "write 0 1k", "write -z 3M 8k", "discard 12M 64k")
    quit_daemon(daemon, qmp)
    qemu_check(img)
    assert img_bitmaps(img) == [
        {"name": "p", "granularity": 4096, "flags": ["auto"]},
        {"name": "off", "granularity": 65536, "flags": []},
    ]
    expect = [(0, 4 * KiB), (3 * MiB, 8 * KiB), (12 * MiB, 64 * KiB)]
    assert dirty_map(img, "p") == expect
    sh("qemu-img", "bitmap", "--merge", "p", str(img), "off")
    assert dirty_map(img, "off") == [(0, 64 * KiB), (3 * MiB, 64 * KiB), (12 * MiB, 64 * KiB)]
    qemu_check(img)
    # And the daemon reads back what qemu-img merged.
    d2 = Daemon(daemon.proc.args[0], workdir)
    try:
        with d2.client() as q2:
            add_qcow2(q2, "a", img)
            got = bitmaps(q2)
            assert got["off"]["count"] == 3 * 64 * KiB and got["p"]["count"] == 76 * KiB
    finally:
        assert d2.stop() == 0
    qemu_check(img)


def test_remove_takes_it_out_of_the_image_and_frees_its_clusters(qmp, daemon, images):
    img = qcow2(images, "a.qcow2")
    for name in ("x", "y"):
        sh("qemu-img", "bitmap", "--add", str(img), name)
    sh("qemu-io", "-f", "qcow2", "-c", "write 0 16M", str(img))
    add_qcow2(qmp, "a", img)
    do(qmp, "block-dirty-bitmap-remove", node="a", name="x")
    assert [b["name"] for b in img_bitmaps(img)] == ["y"]
    qemu_check(img)
    do(qmp, "transaction", actions=[
        {"type": "block-dirty-bitmap-remove", "data": {"node": "a", "name": "y"}}])
    assert img_bitmaps(img) == []
    quit_daemon(daemon, qmp)
    qemu_check(img)
    info = json.loads(sh("qemu-img", "info", "--output=json", str(img)).stdout)
    assert "bitmaps" not in info["format-specific"]["data"]


def test_kill_9_leaves_them_in_use_and_refused_for_incremental_use(daemon, blkmirror_bin, images,
                                                                  workdir):
    img = qcow2(images, "a.qcow2")
    sh("qemu-img", "bitmap", "--add", str(img), "b")
    tgt = qcow2(images, "t.qcow2")
    with daemon.client() as qmp:
        add_qcow2(qmp, "a", img)
        uri = export(qmp, workdir, "a")
        qemu_io(uri, "write 0 64k")
        do(qmp, "block-dirty-bitmap-add", node="a", name="p", persistent=True)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(30)
    # QEMU agrees: in use; the image itself is sound.
    assert [(b["name"], b["flags"]) for b in img_bitmaps(img)] == [("b", ["in-use", "auto"])]
    qemu_check(img)
    os.unlink(workdir / "nbd.sock")
    d2 = Daemon(blkmirror_bin, workdir)
    try:
        with d2.client() as qmp:
            add_qcow2(qmp, "a", img)
            add_qcow2(qmp, "t", tgt)
            got = bitmaps(qmp)
            assert got == {"b": {"name": "b", "recording": True, "persistent": True, "busy": False,
                                 "granularity": 65536, "count": 0, "inconsistent": True}}
            text = "Bitmap 'b' is inconsistent and cannot be used"
            r = qmp.request("blockdev-mirror", {"job-id": "j", "device": "a", "target": "t",
                                                "sync": "bitmap", "bitmap": "b",
                                                "bitmap-mode": "never"})
            assert r["error"]["desc"] == text
            sock = workdir / "nbd2.sock"
            qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            r = qmp.request("block-export-add", {"type": "nbd", "id": "e", "node-name": "a",
                                                 "bitmaps": ["b"]})
            assert r["error"]["desc"] == text
            do(qmp, "block-dirty-bitmap-add", node="a", name="m")
            assert fails(qmp, "block-dirty-bitmap-merge", node="a", target="m",
                         bitmaps=["b"]) == ("GenericError", text)
            assert fails(qmp, "block-dirty-bitmap-clear", node="a", name="b") == (
                "GenericError", text)
            assert bitmaps(qmp)["b"]["inconsistent"] is True
            # A clean close keeps it as found; only removing it helps.
            qmp.cmd("blockdev-del", node_name="a")
            assert [b["flags"] for b in img_bitmaps(img)] == [["in-use", "auto"]]
            add_qcow2(qmp, "a", img)
            do(qmp, "block-dirty-bitmap-remove", node="a", name="b")
            assert img_bitmaps(img) == []
    finally:
        assert d2.stop() == 0
    qemu_check(img)


BAD = [
    (dict(node="fa", name="p", persistent=True),
     "Can't store persistent bitmaps to fa: Operation not supported"),
    (dict(node="q", name="x" * 1024, persistent=True),
     "Can't make bitmap '" + "x" * 1024 + "' persistent in 'q': Name length exceeds maximum "
     "(1023 characters)"),
    (dict(node="q", name="b", persistent=True), "Bitmap already exists: b"),
    (dict(node="q", name="b"), "Bitmap already exists: b"),
    (dict(node="q", name="p", persistent=True, granularity=1000),
     "Granularity must be power of 2 and at least 512"),
    (dict(node="q", name="p", persistent=True, granularity=1 << 32),
     "Granularity must be power of 2 and at least 512"),
    (dict(node="v2", name="p", persistent=True),
     "Can't make bitmap 'p' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"),
    (dict(node="ro", name="p", persistent=True),
     "Can't make bitmap 'p' persistent in 'ro': the node is read-only"),
    (dict(node="nbd", name="p", persistent=True),
     "Can't store persistent bitmaps to nbd: Operation not supported"),
]


@pytest.mark.parametrize("args,desc", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_qemu_texts_and_no_side_effect(qmp, daemon, images, workdir, args, desc):
    q = qcow2(images, "q.qcow2")
    sh("qemu-img", "bitmap", "--add", str(q), "b")
    v2 = qcow2(images, "v2.qcow2", SIZE, "-o", "compat=0.10")
    ro = qcow2(images, "ro.qcow2")
    add_qcow2(qmp, "q", q)
    add_qcow2(qmp, "v2", v2)
    add_qcow2(qmp, "ro", ro, read_only=True)
    qmp.cmd("blockdev-add", driver="file", node_name="fa", filename=str(images.zeros("a", SIZE)))
    export(qmp, workdir, "q")
    qmp.cmd("blockdev-add", driver="nbd", node_name="nbd",
            server={"type": "unix", "path": str(workdir / "nbd.sock")}, export="q")
    before = {n: bitmaps(qmp, n) for n in ("q", "v2", "ro", "fa", "nbd")}
    assert fails(qmp, "block-dirty-bitmap-add", **args) == ("GenericError", desc)
    assert {n: bitmaps(qmp, n) for n in before} == before
    qmp.cmd("blockdev-del", node_name="nbd")  # a client of our own export: gone first
    quit_daemon(daemon, qmp)
    assert [b["name"] for b in img_bitmaps(q)] == ["b"]
    for path in (q, v2, ro):
        qemu_check(path)
    assert img_bitmaps(v2) == [] and img_bitmaps(ro) == []


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_migrate_back_across_a_daemon_restart(daemon, blkmirror_bin, images, workdir, fmt):
    """A -> B, a persistent bitmap on B from the switch on, clients write on B;
    the daemon stops cleanly and starts again; B -> A with sync=bitmap copies
    only what changed. A python-libnbd writer's model judges both disks."""
    size = 64 * MiB
    rnd = random.Random(31)
    a = images.dense("a.img", size)
    if fmt == "qcow2":
        b = qcow2(images, "b.qcow2", size)
    else:
        b = images.zeros("b.img", size)

    def add_b(q):
        if fmt == "qcow2":
            add_qcow2(q, "b", b)
        else:
            add_raw(q, "b", b)

    with daemon.client() as qmp:
        add_raw(qmp, "a", a)
        add_b(qmp)
        sock = workdir / "nbd.sock"
        qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        qmp.request("block-export-add", {"type": "nbd", "id": "e", "node-name": "a",
                                         "name": "disk", "writable": True})
        w = Writer(f"nbd+unix:///disk?socket={sock}", rnd.random())
        w.model[:] = a.read_bytes()
        w.start()
        try:
            qmp.cmd("blockdev-mirror", job_id="out", device="a", target="b", sync="full")
            complete(qmp, "out")
            w.hold.set()
            assert w.held.wait(30)
            wait_synced(qmp, "out")
            do(qmp, "block-dirty-bitmap-add", node="b", name="since-switch", persistent=True)
            since = w.mark()
            w.hold.clear()
            finish(qmp, "out")
            while w.mark() < since + 200:
                assert w.is_alive(), w.error
                w.stop.wait(0.01)
        finally:
            w.stop.set()
            w.join(60)
        assert w.error is None, w.error
        quit_daemon(daemon, qmp)
    if fmt == "qcow2":
        qemu_check(b)
        assert img_bitmaps(b) == [{"name": "since-switch", "granularity": GRAN,
                                   "flags": ["auto"]}]
    else:
        assert os.path.exists(str(b) + ".blkmirror-bitmaps")
    d2 = Daemon(blkmirror_bin, workdir)
    try:
        with d2.client() as qmp:
            add_raw(qmp, "a", a)
            add_b(qmp)
            bm = bitmaps(qmp, "b")["since-switch"]
            assert bm["persistent"] and "inconsistent" not in bm and bm["count"] > 0
            qmp.cmd("blockdev-mirror", job_id="back", device="b", target="a", sync="bitmap",
                    bitmap="since-switch", bitmap_mode="on-success")
            complete(qmp, "back")
            back = finish(qmp, "back")
            assert bitmaps(qmp, "b")["since-switch"]["count"] == 0
    finally:
        assert d2.stop() == 0
    assert a.read_bytes() == bytes(w.model)
    changed = w.log[since:]
    bound = aligned_bytes(changed)
    assert 0 < back["offset"] <= bound, (back, bound, len(changed))
    print(f"incremental mirror after a restart copied {back['offset']} bytes "
          f"(bound {bound}, {len(changed)} writes of {size})")


def test_raw_side_file_survives_restarts_and_marks_crashes_and_foreign_writes(
        daemon, blkmirror_bin, images, workdir):
    img = images.zeros("a.img", SIZE)
    side = str(img) + ".blkmirror-bitmaps"
    with daemon.client() as qmp:
        add_raw(qmp, "a", img)
        do(qmp, "block-dirty-bitmap-add", node="a", name="p", granularity=4096, persistent=True)
        uri = export(qmp, workdir, "a")
        qemu_io(uri, "write 1M 6k")
        quit_daemon(daemon, qmp)
    assert os.path.exists(side)

    def reopen(expect):
        d = Daemon(blkmirror_bin, workdir)
        try:
            with d.client() as qmp:
                add_raw(qmp, "a", img)
                got = bitmaps(qmp)["p"]
                for k, v in expect.items():
                    assert got.get(k) == v, got
                if "inconsistent" not in expect:
                    sock = workdir / "n.sock"
                    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
                    r = qmp.request("block-export-add", {"type": "nbd", "id": "e",
                                                         "node-name": "a", "bitmaps": ["p"],
                                                         "writable": True})
                    assert "return" in r, r
                    assert nbd_map(f"nbd+unix:///a?socket={sock}", "p") == [(1 * MiB, 8 * KiB)]
                return d
        except BaseException:
            d.stop()
            raise

    assert reopen({"count": 8 * KiB, "persistent": True}).stop() == 0
    # kill -9 of a daemon holding it: in use, inconsistent at the next open.
    d = reopen({"count": 8 * KiB})
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    os.unlink(workdir / "n.sock")
    assert reopen({"inconsistent": True, "count": 0}).stop() == 0
    # Still inconsistent until removed; a new one is clean, and a write by
    # another program while no daemon held it makes it inconsistent too.
    d = Daemon(blkmirror_bin, workdir)
    with d.client() as qmp:
        add_raw(qmp, "a", img)
        assert bitmaps(qmp)["p"]["inconsistent"] is True
        do(qmp, "block-dirty-bitmap-remove", node="a", name="p")
        do(qmp, "block-dirty-bitmap-add", node="a", name="p", granularity=4096, persistent=True)
    assert d.stop() == 0
    with open(img, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"x" * 512)
    assert reopen({"inconsistent": True}).stop() == 0


def completed(stdout):
    for line in stdout.splitlines():
        ev = json.loads(line)
        if ev["event"] == "BLOCK_JOB_COMPLETED":
            return ev["data"]
    raise AssertionError(stdout)


def test_cli_mirror_bitmap_copies_what_qemu_io_wrote_since_bitmap_add(cli, images):
    """B is a qcow2 copy of A; `blkmirror bitmap --add` puts a persistent bitmap
    in it, qemu-io writes B (QEMU records them in it), then `blkmirror mirror
    --bitmap` brings A up to date copying only those granules."""
    a = images.dense("a.img", SIZE)
    b = images.path("b.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", str(a), str(b))
    r = cli.run("bitmap", "--add", "-g", "4k", b, "since")
    assert r.returncode == 0, r.stderr
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 7 100k 10k", "-c", "write -P 8 9M 4k",
       "-c", "write -z 12M 64k", str(b))
    r = cli.run("bitmap", "--json", b)
    assert json.loads(r.stdout) == [{"name": "since", "granularity": 4096, "recording": True,
                                     "count": 4096 * 3 + 4096 + 65536}], r.stdout
    r = cli.mirror(b, a, "--bitmap", "since", "--granularity", "4k", "--json")
    assert r.returncode == 0, r.stderr
    assert completed(r.stdout)["offset"] == 4096 * 3 + 4096 + 65536
    assert sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(b), str(a)).returncode == 0
    # The source was only read: its bitmap is as it was, consistent.
    assert img_bitmaps(b) == [{"name": "since", "granularity": 4096, "flags": ["auto"]}]
    qemu_check(b)
    r = cli.run("bitmap", "--remove", b, "since")
    assert r.returncode == 0 and img_bitmaps(b) == []
    qemu_check(b)


def test_cli_bitmap_bad_input_changes_nothing(cli, images):
    b = images.path("b.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(b), "4M")
    sh("qemu-img", "bitmap", "--add", str(b), "x")
    raw = images.zeros("r.img", 4 * MiB)
    before = b.read_bytes()
    for args, text in [
        (("--add", b, "x"), "Bitmap already exists: x"),
        (("--remove", b, "nope"), "Dirty bitmap 'nope' not found"),
        (("--add", "-g", "1000", b, "y"), "Granularity must be power of 2 and at least 512"),
        (("--add", b, "y" * 1024),
         f"Can't make bitmap '{'y' * 1024}' persistent in '{b}': Name length exceeds maximum "
         "(1023 characters)"),
        (("--clear", b), "--clear needs the bitmap's NAME"),
    ]:
        r = cli.run("bitmap", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().endswith("blkmirror: " + text), r.stderr
    assert [x["name"] for x in img_bitmaps(b)] == ["x"]
    qemu_check(b)
    assert b.read_bytes() == before
    # A raw file's bitmap is refused for --bitmap once another program wrote it.
    assert cli.run("bitmap", "--add", raw, "r").returncode == 0
    with open(raw, "r+b") as f:
        f.write(b"z" * 4096)
    r = cli.mirror(raw, images.zeros("t.img", 4 * MiB), "--bitmap", "r")
    assert r.returncode == 2 and "Bitmap 'r' is inconsistent and cannot be used" in r.stderr, \
        r.stderr
    r = cli.mirror(raw, images.path("t.img"), "--bitmap", "nope")
    assert r.returncode == 2 and "Bitmap 'nope' could not be found" in r.stderr, r.stderr


def test_reopen_read_only_stores_them_and_read_write_marks_them_in_use(qmp, images, workdir):
    """As QEMU's qcow2_reopen_bitmaps_ro/_rw: stored and kept read-only going
    read-only; marked in use and recording again going read-write."""
    img = qcow2(images, "a.qcow2")
    qmp.cmd("blockdev-add", driver="file", node_name="fa", filename=str(img))
    qmp.cmd("blockdev-add", driver="qcow2", node_name="a", file="fa")
    do(qmp, "block-dirty-bitmap-add", node="a", name="p", persistent=True)
    uri = export(qmp, workdir, "a")
    qemu_io(uri, "write 2M 4k")
    qmp.cmd("block-export-del", id="e-a")
    entry = {"driver": "qcow2", "node-name": "a", "file": "fa"}
    qmp.cmd("blockdev-reopen", options=[{**entry, "read-only": True}])
    assert img_bitmaps(img) == [{"name": "p", "granularity": 65536, "flags": ["auto"]}]
    assert fails(qmp, "block-dirty-bitmap-clear", node="a", name="p") == (
        "GenericError", "Bitmap 'p' is readonly and cannot be modified")
    t = qcow2(images, "t.qcow2")
    add_qcow2(qmp, "t", t)
    r = qmp.request("blockdev-mirror", {"job-id": "j", "device": "a", "target": "t",
                                        "sync": "bitmap", "bitmap": "p",
                                        "bitmap-mode": "on-success"})
    assert r["error"]["desc"] == "Bitmap 'p' is readonly and cannot be modified"
    qmp.cmd("blockdev-del", node_name="t")
    qmp.cmd("blockdev-reopen", options=[{**entry, "read-only": False}])
    assert img_bitmaps(img)[0]["flags"] == ["in-use", "auto"]
    do(qmp, "block-dirty-bitmap-clear", node="a", name="p")
    assert bitmaps(qmp)["p"]["count"] == 0
    qmp.cmd("blockdev-del", node_name="a")
    qmp.cmd("blockdev-del", node_name="fa")
    assert img_bitmaps(img) == [{"name": "p", "granularity": 65536, "flags": ["auto"]}]
    assert dirty_map(img, "p") == []
    qemu_check(img)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cli_serve_records_clients_writes_in_the_images_bitmaps(cli, images, workdir, fmt):
    """`blkmirror serve` is one of the ways B is used between the two mirrors:
    its clients' writes land in the image's persistent bitmaps."""
    if fmt == "qcow2":
        img = qcow2(images, "b.qcow2")
    else:
        img = images.zeros("b.img", SIZE)
    assert cli.run("bitmap", "--add", "-g", "4k", img, "since").returncode == 0
    sock = workdir / "s.sock"
    run = cli.start("serve", img, "--socket", sock)
    run.wait_for_line("serving", 30)
    qemu_io(f"nbd+unix:///?socket={sock}", "write 1M 4k", "write -z 8M 8k")
    run.send_signal(signal.SIGTERM)
    assert run.finish(30).returncode == 0
    r = cli.run("bitmap", "--json", img)
    assert json.loads(r.stdout) == [{"name": "since", "granularity": 4096, "recording": True,
                                     "count": 12 * KiB}], r.stderr
    if fmt == "qcow2":
        assert dirty_map(img, "since") == [(1 * MiB, 4 * KiB), (8 * MiB, 8 * KiB)]
        qemu_check(img)


def test_a_grown_image_stores_its_bitmaps_at_the_new_size(qmp, daemon, images, workdir):
    img = qcow2(images, "a.qcow2")
    sh("qemu-img", "bitmap", "--add", str(img), "old")
    add_qcow2(qmp, "a", img)
    do(qmp, "block-dirty-bitmap-add", node="a", name="p", persistent=True)
    qmp.cmd("block_resize", node_name="a", size=2 * SIZE)
    uri = export(qmp, workdir, "a")
    qemu_io(uri, "write 1M 4k", f"write {SIZE + MiB} 4k")
    quit_daemon(daemon, qmp)
    qemu_check(img)
    for name in ("old", "p"):
        assert dirty_map(img, name) == [(1 * MiB, 64 * KiB), (SIZE + MiB, 64 * KiB)], name


def test_an_aborted_transaction_leaves_the_image_as_it_was(qmp, daemon, images):
    img = qcow2(images, "a.qcow2")
    sh("qemu-img", "bitmap", "--add", str(img), "keep")
    add_qcow2(qmp, "a", img)
    before = img_bitmaps(img)
    r = qmp.request("transaction", {"actions": [
        {"type": "block-dirty-bitmap-remove", "data": {"node": "a", "name": "keep"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "new",
                                                    "persistent": True}},
        {"type": "abort", "data": {}}]})
    assert r["error"]["desc"] == "Transaction aborted using Abort action"
    assert img_bitmaps(img) == before
    assert list(bitmaps(qmp)) == ["keep"]
    quit_daemon(daemon, qmp)
    assert [b["name"] for b in img_bitmaps(img)] == ["keep"]
    qemu_check(img)


def repaired_ranges(stdout):
    out = []
    for line in stdout.splitlines():
        word, _, off, _, length = line.split()
        assert word == "repaired", line
        out.append((int(off), int(length)))
    return out


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cli_verify_repair_records_its_writes_and_stores_the_bitmaps(cli, images, fmt):
    """verify --repair writes DST: DST's persistent bitmap records exactly the
    chunks it repaired, and is stored consistent (not left in use)."""
    src = images.dense("a.img", SIZE)
    if fmt == "qcow2":
        dst = images.path("b.qcow2")
        sh("qemu-img", "convert", "-O", "qcow2", str(src), str(dst))
    else:
        dst = images.path("b.img")
        dst.write_bytes(src.read_bytes())
    assert cli.run("bitmap", "--add", "-g", "4k", dst, "since").returncode == 0
    with open(src, "r+b") as f:
        for off in (1 * MiB + 5, 9 * MiB + 70 * KiB):
            f.seek(off)
            f.write(b"\xa5" * 100)
    r = cli.run("verify", "--repair", "--no-progress", src, dst)
    assert r.returncode == 0, r.stderr
    repaired = repaired_ranges(r.stdout)
    assert repaired == [(1 * MiB, 64 * KiB), (9 * MiB + 64 * KiB, 64 * KiB)], r.stdout
    r = cli.run("bitmap", "--json", dst)
    assert json.loads(r.stdout) == [{"name": "since", "granularity": 4096, "recording": True,
                                     "count": 128 * KiB}], r.stdout
    if fmt == "qcow2":
        assert img_bitmaps(dst) == [{"name": "since", "granularity": 4096, "flags": ["auto"]}]
        qemu_check(dst)
        assert dirty_map(dst, "since") == repaired


def test_cli_commit_records_in_the_base_and_carries_the_tops_bitmaps(cli, images):
    """blkmirror commit: the base's bitmaps record what the commit wrote; the
    top's persistent bitmaps are carried into the base (created there when
    missing); all stored consistent, in both images."""
    base = qcow2(images, "base.qcow2")
    sh("qemu-img", "bitmap", "--add", "-g", "64k", str(base), "b0")
    sh("qemu-img", "bitmap", "--add", "-g", "64k", str(base), "both")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(base))
    top = images.path("top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    sh("qemu-img", "bitmap", "--add", "-g", "4k", str(top), "t0")
    sh("qemu-img", "bitmap", "--add", "-g", "64k", str(top), "both")
    sh("qemu-img", "bitmap", "--add", "--disable", str(top), "off")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -P 3 5M 128k", str(top))
    r = cli.run("commit", "--no-progress", top)
    assert r.returncode == 0, r.stderr
    written = [(1 * MiB, 64 * KiB), (5 * MiB, 128 * KiB)]
    assert {b["name"]: b["flags"] for b in img_bitmaps(base)} == {
        "b0": ["auto"], "both": ["auto"], "t0": ["auto"], "off": []}
    qemu_check(base)
    assert dirty_map(base, "b0") == [(0, 64 * KiB)] + written
    assert dirty_map(base, "both") == [(0, 64 * KiB)] + written
    assert dirty_map(base, "t0") == written
    assert dirty_map(base, "off") == []  # it recorded nothing in the top
    assert [b["granularity"] for b in img_bitmaps(base) if b["name"] == "t0"] == [4096]
    # The top keeps its own, consistent, as they were.
    assert {b["name"]: b["flags"] for b in img_bitmaps(top)} == {
        "t0": ["auto"], "both": ["auto"], "off": []}
    qemu_check(top)
    assert dirty_map(top, "t0") == written


def test_cli_bad_input_after_the_open_leaves_the_bitmaps_consistent(cli, images):
    """mirror --bitmap with a bitmap SRC lacks is refused after DST (and its
    bitmaps) were opened: DST's bitmaps are stored again, not left in use."""
    src = images.dense("a.img", 4 * MiB)
    dst = images.path("b.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", str(src), str(dst))
    sh("qemu-img", "bitmap", "--add", str(dst), "x")
    r = cli.mirror(src, dst, "--bitmap", "nope")
    assert r.returncode == 2 and "Bitmap 'nope' could not be found" in r.stderr, r.stderr
    assert img_bitmaps(dst) == [{"name": "x", "granularity": 65536, "flags": ["auto"]}]
    qemu_check(dst)


def granules(ranges, g):
    return {o // g + i for o, n in ranges for i in range((o % g + n + g - 1) // g)}


def test_cli_commit_while_serving_carries_the_writes_before_and_after_the_switch(
        cli, images, workdir):
    """Served: a client writes the top after ready and the base after the
    switch; the bitmap carried from the top into the base has both (the
    carry happens before the switch: no write falls between)."""
    base = qcow2(images, "base.qcow2")
    sh("qemu-img", "bitmap", "--add", "-g", "64k", str(base), "b0")
    top = images.path("top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    sh("qemu-img", "bitmap", "--add", "-g", "4k", str(top), "t0")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", str(top))
    sock = workdir / "c.sock"
    run = cli.start("commit", top, "--socket", sock, "--no-auto-complete", "--no-progress")
    run.wait_for_line("serving", 30)
    uri = f"nbd+unix:///?socket={sock}"
    run.wait_for_line("ready", 60)
    qemu_io(uri, "write -P 4 3M 4k")  # the top's, mirrored into the base
    run.send_signal(signal.SIGUSR1)
    run.wait_for_line("serving the base now", 60)
    qemu_io(uri, "write -P 5 7M 4k")  # the base's
    run.send_signal(signal.SIGTERM)
    r = run.finish(30)
    assert r.returncode == 0, r.stderr
    assert {b["name"]: b["flags"] for b in img_bitmaps(base)} == {"b0": ["auto"], "t0": ["auto"]}
    qemu_check(base)
    assert dirty_map(base, "b0") == [(1 * MiB, 64 * KiB), (3 * MiB, 64 * KiB),
                                     (7 * MiB, 64 * KiB)]
    # Exactly the writes, give or take the rest of a 64 KiB copy the job made
    # of the 3M write after the carry created t0 in the base.
    written = [(1 * MiB, 64 * KiB), (3 * MiB, 4 * KiB), (7 * MiB, 4 * KiB)]
    got = granules(dirty_map(base, "t0"), 4 * KiB)
    coarse = {x for x in range(SIZE // (4 * KiB)) if x // 16 in granules(written, 64 * KiB)}
    assert granules(written, 4 * KiB) <= got <= coarse, got
    assert dirty_map(top, "t0") == written[:2]
    qemu_check(top)


def test_cli_commit_names_a_bitmap_it_cannot_carry(cli, images):
    """A v2 base cannot store bitmaps: the commit still succeeds, says which
    bitmap stayed behind and why, and the top keeps it, consistent."""
    base = qcow2(images, "base.qcow2", SIZE, "-o", "compat=0.10")
    top = images.path("top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    sh("qemu-img", "bitmap", "--add", str(top), "t0")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", str(top))
    r = cli.run("commit", "--no-progress", top)
    assert r.returncode == 0, r.stderr
    note = [x for x in r.stderr.splitlines() if x.startswith("bitmap 't0'")]
    assert len(note) == 1 and note[0].startswith(f"bitmap 't0' of {top} not carried into {base}: ")
    assert note[0].endswith("Cannot store dirty bitmaps in qcow2 v2 files; it stays as it was")
    assert img_bitmaps(top) == [{"name": "t0", "granularity": 65536, "flags": ["auto"]}]
    assert dirty_map(top, "t0") == [(1 * MiB, 64 * KiB)]
    qemu_check(top)
    qemu_check(base)


def test_cli_commit_carries_the_bitmaps_of_the_layers_between(cli, images):
    """base <- mid <- top, committed into base: mid is dropped too, and its
    bitmap (mid's writes only) lands in the base; a name in both mid and top
    takes the newest layer's granularity and both layers' bits."""
    base = qcow2(images, "base.qcow2")
    mid, top = images.path("mid.qcow2"), images.path("top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    sh("qemu-img", "bitmap", "--add", "-g", "64k", str(mid), "m")
    sh("qemu-img", "bitmap", "--add", "-g", "64k", str(mid), "both")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 2M 64k", str(mid))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    sh("qemu-img", "bitmap", "--add", "-g", "4k", str(top), "both")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 2 6M 4k", str(top))
    r = cli.run("commit", "--no-progress", top)
    assert r.returncode == 0, r.stderr
    assert {b["name"]: b["granularity"] for b in img_bitmaps(base)} == {"m": 65536, "both": 4096}
    qemu_check(base)
    assert dirty_map(base, "m") == [(2 * MiB, 64 * KiB)]
    assert dirty_map(base, "both") == [(2 * MiB, 64 * KiB), (6 * MiB, 4 * KiB)]
    for img in (mid, top):
        assert all(b["flags"] == ["auto"] for b in img_bitmaps(img))
        qemu_check(img)
