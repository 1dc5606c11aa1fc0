"""Graph safety (issue 17 items 1, 2, 12, 13, 15): `replaces` validated, a
mirror's target refusing other writers, image locks shared with QEMU's tools,
devices that change under the job, and a remote target that is not the one the
job started with. docs/design/permissions.md, docs/design/mirror-job.md."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from nbd_helpers import nbd_server, run_tool  # noqa: F401
from nbd_peers import peers, read_export  # noqa: F401

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB

CONFLICT = ("Permission conflict on node 'copy': permissions 'write' are both required by "
            "NBD export '{name}' (uses node 'copy' as 'root' child) and unshared by mirror job "
            "'j' (uses node 'copy' as 'target' child).")



def add_file(qmp, name, path, **kw):
    qmp.cmd("blockdev-add", driver="file", node_name=name, filename=str(path), **kw)


def export_add(qmp, id, node, name, writable):
    """block-export-add; returns the error desc or None. (`name` clashes with
    QmpClient.cmd's own first parameter.)"""
    r = qmp.request("block-export-add", {"type": "nbd", "id": id, "node-name": node, "name": name,
                                         "writable": writable})
    return r["error"]["desc"] if "error" in r else None


def nbd_start(qmp, workdir):
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(workdir / "nbd.sock")}})


# ---------------------------------------------------------------- item 1


def test_replaces_unrelated_node_refused(qmp, images, workdir, check):
    one = images.dense("one.img", SIZE)
    two = images.dense("two.img", SIZE)
    copy = images.sparse("copy.img", SIZE)
    add_file(qmp, "one", one)
    add_file(qmp, "two", two)
    add_file(qmp, "copy", copy)
    nbd_start(qmp, workdir)
    qmp.cmd("block-export-add", type="nbd", id="e2", node_name="two", writable=True)
    cls, desc = qmp.error("blockdev-mirror", job_id="j", device="one", target="copy", sync="full",
                          replaces="two")
    assert desc == ("Cannot replace 'two' by a node mirrored from 'one', because it cannot be "
                    "guaranteed that doing so would not lead to an abrupt change of visible data")
    assert qmp.cmd("query-block-jobs") == []
    assert {e["node-name"] for e in qmp.cmd("query-block-exports")} == {"two"}


def test_replaces_file_below_raw_source_switches(qmp, images, workdir, check):
    src = images.dense("src.img", SIZE)
    copy = images.sparse("copy.img", SIZE)
    add_file(qmp, "f", src)
    qmp.cmd("blockdev-add", driver="raw", node_name="r", file="f")
    add_file(qmp, "copy", copy)
    nbd_start(qmp, workdir)
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="f", writable=True)
    qmp.cmd("blockdev-mirror", job_id="j", device="r", target="copy", sync="full", replaces="f")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-complete", device="j")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert "error" not in ev["data"], ev
    assert [e["node-name"] for e in qmp.cmd("query-block-exports")] == ["copy"]
    check.assert_identical(src, copy)


# ---------------------------------------------------------------- item 2


def test_export_of_target_before_mirror_refused(qmp, images, workdir):
    add_file(qmp, "src", images.dense("src.img", SIZE))
    add_file(qmp, "copy", images.sparse("copy.img", SIZE))
    nbd_start(qmp, workdir)
    qmp.cmd("block-export-add", type="nbd", id="w", node_name="copy", writable=True)
    cls, desc = qmp.error("blockdev-mirror", job_id="j", device="src", target="copy", sync="full")
    assert desc == CONFLICT.format(name="copy"), desc
    assert qmp.cmd("query-block-jobs") == []


def test_export_of_target_after_mirror_started_refused(qmp, images, workdir, check):
    src = images.dense("src.img", SIZE)
    copy = images.sparse("copy.img", SIZE)
    add_file(qmp, "src", src)
    add_file(qmp, "copy", copy)
    nbd_start(qmp, workdir)
    # Slow, so the job is surely running when the exports come.
    qmp.cmd("blockdev-mirror", job_id="j", device="src", target="copy", sync="full", speed=4 * MiB)
    desc = export_add(qmp, "w", "copy", "w", True)
    assert desc == CONFLICT.format(name="w"), desc
    # Readers are let in: they cannot change what the job copies.
    assert export_add(qmp, "r", "copy", "r", False) is None
    qmp.cmd("block-job-set-speed", device="j", speed=0)
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-complete", device="j")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert "error" not in ev["data"], ev
    check.assert_identical(src, copy)
    # After the switch-over the job's claim on the target is gone.
    assert export_add(qmp, "w", "copy", "w", True) is None


# ---------------------------------------------------------------- item 12


def serve(blkmirror_bin, image, sock, *args):
    return subprocess.run([blkmirror_bin, "serve", str(image), "--socket", str(sock), *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_lock_second_writable_serve_refused(blkmirror_bin, nbd_server, images, workdir):
    img = images.dense("a.img", MiB)
    first = nbd_server(img)
    r = serve(blkmirror_bin, img, workdir / "second.sock")
    assert r.returncode != 0
    assert f'Failed to get "write" lock. Is another process using the image [{img}]?' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (workdir / "second.sock").exists()
    first.assert_alive()
    assert os.path.exists(first.sock)  # the first one's socket was left alone
    # --locking off is the operator's way through.
    srv = nbd_server(img, "--locking", "off", sock=workdir / "third.sock")
    srv.assert_alive()


def test_lock_mirror_of_served_image_refused(cli, nbd_server, images, workdir):
    img = images.dense("a.img", MiB)
    nbd_server(img)
    r = cli.mirror(img, workdir / "c.img", "--create")
    assert r.returncode != 0
    assert f'Failed to get shared "write" lock. Is another process using the image [{img}]?' in r.stderr
    assert not (workdir / "c.img").exists()
    r = cli.mirror(img, workdir / "c.img", "--create", "--locking", "off", "--no-progress")
    assert r.returncode == 0, r.stderr


def test_lock_qemu_io_refused_while_served(nbd_server, images):
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    img = images.dense("a.img", MiB)
    nbd_server(img)
    r = run_tool(["qemu-io", "-f", "raw", "-c", "write 0 4k", img], check=False)
    assert r.returncode != 0
    assert 'Failed to get "write" lock' in r.stdout + r.stderr, r.stdout + r.stderr
    # QEMU's read-only tools share writes with others: they may read.
    run_tool(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", img])


def test_lock_qemu_nbd_writer_refuses_blkmirror(cli, peers, images, workdir, blkmirror_bin):
    img = images.dense("a.img", MiB)
    peers.qemu_nbd(img, "raw")
    r = serve(blkmirror_bin, img, workdir / "s.sock")
    # qemu-nbd shares writes with other users of its node but uses them: which
    # of the two probes fails first depends on that, the refusal does not.
    assert r.returncode != 0 and '"write" lock. Is another process using the image' in r.stderr, r.stderr
    r = cli.mirror(img, workdir / "c.img", "--create")
    assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr, r.stderr


def test_lock_blockdev_add_and_locking_off(qmp, nbd_server, images):
    img = images.dense("a.img", MiB)
    nbd_server(img)
    cls, desc = qmp.error("blockdev-add", driver="file", node_name="a", filename=str(img))
    assert 'Failed to get "write" lock' in desc and str(img) in desc, desc
    cls, desc = qmp.error("blockdev-add", driver="file", node_name="a", filename=str(img), read_only=True)
    assert 'Failed to get shared "write" lock' in desc, desc
    qmp.cmd("blockdev-add", driver="file", node_name="a", filename=str(img), read_only=True,
            force_share=True)
    qmp.cmd("blockdev-add", driver="file", node_name="b", filename=str(img), locking="off")
    cls, desc = qmp.error("blockdev-add", driver="file", node_name="c", filename=str(img),
                          force_share=True)
    assert desc == "force-share=on can only be used with read-only images"


# ---------------------------------------------------------------- item 13


def test_fifo_source_refused_at_once(cli, workdir):
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    r = cli.mirror(fifo, workdir / "c.img", timeout=20)
    assert r.returncode != 0
    assert f"{fifo}: not a regular file or block device" in r.stderr, r.stderr


def test_fifo_blockdev_add_refused_daemon_alive(qmp, workdir):
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    for ro in (False, True):
        cls, desc = qmp.error("blockdev-add", driver="file", node_name="f", filename=str(fifo), read_only=ro)
        assert "not a regular file or block device" in desc, desc
    assert qmp.cmd("query-named-block-nodes") == []


def slow_mirror(cli, src, dst, *extra):
    # 4 MiB/s over 16 MiB: about four seconds to change things under it.
    return cli.start_mirror(src, dst, "--speed", "4M", "--json", "--progress-interval", "0.2", *extra)


def wait_progress(run, timeout=20):
    run.wait_for_line('"PROGRESS"', timeout, stream="stdout")


def test_source_truncated_mid_copy_says_it_shrank(cli, images, workdir):
    src = images.dense("src.img", SIZE)
    run = slow_mirror(cli, src, workdir / "c.img", "--create")
    wait_progress(run)
    os.truncate(src, 4 * MiB)
    res = run.finish(60)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert f"shrank from {SIZE} to {4 * MiB} bytes" in out, out


def test_source_grown_mid_copy_fails(cli, images, workdir):
    src = images.dense("src.img", SIZE)
    run = slow_mirror(cli, src, workdir / "c.img", "--create")
    wait_progress(run)
    with open(src, "ab") as f:
        f.write(os.urandom(MiB))
    res = run.finish(60)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert f"source {src} grew from {SIZE} to {SIZE + MiB} bytes" in out, out
    assert "mirror completed" not in out


@pytest.mark.parametrize("how", ["unlink", "rename"])
def test_target_moved_mid_copy_fails(cli, images, workdir, how):
    src = images.dense("src.img", SIZE)
    dst = workdir / "c.img"
    run = slow_mirror(cli, src, dst, "--create")
    wait_progress(run)
    if how == "unlink":
        dst.unlink()
    else:
        dst.rename(workdir / "elsewhere.img")
    res = run.finish(60)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert f"target {dst} was removed (unlinked or renamed) while in use" in out, out
    assert "mirror completed" not in out


# ---------------------------------------------------------------- item 15


def test_restarted_empty_target_refused(qmp, images, peers, workdir, check):
    src = images.dense("src.img", SIZE)
    srv = peers.nbdkit("memory", SIZE)
    add_file(qmp, "src", src)
    sock = srv.uri.split("socket=")[1]
    qmp.cmd("blockdev-add", driver="nbd", node_name="remote", server={"type": "unix", "path": sock})
    qmp.cmd("blockdev-mirror", job_id="j", device="src", target="remote", sync="full",
            on_target_error="stop")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    # The target's server restarts with an empty disk of the same size.
    peers.restart(srv)
    qmp.cmd("block-job-complete", device="j")
    deadline = time.monotonic() + 60
    while True:
        # With on-target-error=stop the lost connection pauses the job; resuming
        # reconnects to whatever answers now.
        job = qmp.job("j")
        if job is None or job["status"] == "concluded":
            break
        if job["paused"] and job["io-status"] != "ok":
            qmp.cmd("block-job-resume", device="j")
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert "is not the disk this job was writing" in ev["data"].get("error", ""), ev
