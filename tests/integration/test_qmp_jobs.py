"""The daemon driven over QMP: mirror jobs through their whole state machine,
against real files, each data-moving scenario judged by `qemu-img compare`.
The client is tests/integration/qmp_client.py (ours, written for the tests)."""

import os
import random
import subprocess
import threading
import time

import pytest

from conftest import KiB, MiB
from qmp_client import Daemon


def add_file(qmp, name, path, **opts):
    qmp.cmd("blockdev-add", driver="file", node_name=name, filename=str(path), **opts)


def pair(qmp, images, size, src_kind="dense"):
    src = images.dense("src.img", size) if src_kind == "dense" else images.sparse(
        "src.img", size, [(0, min(size, 256 * KiB)), (size // 2, min(size // 4, 512 * KiB))])
    dst = images.sparse("dst.img", size)
    add_file(qmp, "src", src)
    add_file(qmp, "dst", dst)
    return src, dst


def mirror(qmp, job="j", **kw):
    args = {"job-id": job, "device": "src", "target": "dst", "sync": "full"}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    r = qmp.request("blockdev-mirror", args, id=99)
    assert "return" in r, r
    return job


def finish(qmp, job="j"):
    qmp.wait_event("BLOCK_JOB_READY", match={"device": job})
    qmp.cmd("block-job-complete", device=job)
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": job})
    assert "error" not in ev["data"], ev
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": job, "status": "null"})
    return ev


def test_complete_runs_every_state_and_copies(qmp, images, check):
    src, dst = pair(qmp, images, 8 * MiB)
    mirror(qmp)
    ev = finish(qmp)
    assert ev["data"]["type"] == "mirror" and ev["data"]["len"] == ev["data"]["offset"] >= 8 * MiB
    assert qmp.statuses("j") == ["created", "running", "ready", "waiting", "pending", "concluded", "null"]
    assert qmp.cmd("query-block-jobs") == []
    check.assert_identical(src, dst)


def test_cancel_before_ready_is_cancelled(qmp, images):
    pair(qmp, images, 32 * MiB)
    mirror(qmp, speed=1 * MiB)
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "running"})
    qmp.cmd("block-job-cancel", device="j")
    ev = qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "j"})
    assert ev["data"]["offset"] < 32 * MiB
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "null"})
    assert "aborting" in qmp.statuses("j")
    assert not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in qmp.events)


def test_soft_cancel_after_ready_completes_without_swap(qmp, images, check):
    src, dst = pair(qmp, images, 4 * MiB)
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(images.path("nbd.sock"))}})
    qmp.cmd("block-export-add", type="nbd", id="e0", node_name="src", writable=True)
    mirror(qmp)
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-cancel", device="j")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert "error" not in ev["data"]
    assert not any(e["event"] == "BLOCK_JOB_CANCELLED" for e in qmp.events)
    # No swap: the export still serves the source node.
    assert qmp.cmd("query-block-exports")[0]["node-name"] == "src"
    check.assert_identical(src, dst)


def test_forced_cancel_after_ready_is_cancelled(qmp, images):
    pair(qmp, images, 2 * MiB)
    mirror(qmp)
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-cancel", device="j", force=True)
    qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "j"})


def test_pause_holds_offset_then_resume_completes(qmp, images, check):
    src, dst = pair(qmp, images, 16 * MiB)
    mirror(qmp, speed=2 * MiB)
    qmp.cmd("block-job-pause", device="j")
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "paused"})
    job = qmp.job("j")
    assert job["paused"] and job["status"] == "paused"
    before = job["offset"]
    time.sleep(0.5)
    assert qmp.job("j")["offset"] == before
    cls, desc = qmp.error("block-job-pause", device="j")
    assert desc == "Job is already paused"
    qmp.cmd("block-job-resume", device="j")
    qmp.cmd("block-job-set-speed", device="j", speed=0)
    finish(qmp)
    check.assert_identical(src, dst)


def test_set_speed_is_visible_and_honoured(qmp, images, check):
    src, dst = pair(qmp, images, 32 * MiB)
    mirror(qmp, speed=4 * MiB)
    assert qmp.job("j")["speed"] == 4 * MiB
    qmp.cmd("block-job-set-speed", device="j", speed=1 * MiB)
    assert qmp.job("j")["speed"] == 1 * MiB
    t0 = time.monotonic()
    time.sleep(1.5)
    offset = qmp.job("j")["offset"]
    elapsed = time.monotonic() - t0
    # At 1 MiB/s (plus the 4 MiB/s start and one slice of slack) far less than
    # the whole disk can have moved; a slower machine only moves less.
    assert offset <= (4 + 1 * elapsed + 2) * MiB, offset
    cls, desc = qmp.error("block-job-set-speed", device="j", speed=-1)
    assert (cls, desc) == ("GenericError", "Parameter 'speed' expects a non-negative value")
    qmp.cmd("block-job-set-speed", device="j", speed=0)
    finish(qmp)
    check.assert_identical(src, dst)


def test_negative_speed_refused_at_start(qmp, images):
    pair(qmp, images, 1 * MiB)
    r = qmp.request("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                        "sync": "full", "speed": -1})
    assert r["error"] == {"class": "GenericError", "desc": "Parameter 'speed' expects a non-negative value"}
    assert qmp.cmd("query-jobs") == []


@pytest.mark.parametrize("opts", [{"granularity": 8 * KiB}, {"granularity": 8 * KiB, "buf_size": 4096},
                                  {"buf_size": 4096}])
def test_granularity_and_small_buffer(qmp, images, check, opts):
    src, dst = pair(qmp, images, 3 * MiB, src_kind="sparse")
    mirror(qmp, **opts)
    finish(qmp)
    check.assert_identical(src, dst)


def test_bad_granularity_refused(qmp, images):
    pair(qmp, images, 1 * MiB)
    for g, msg in [(1000, "Parameter 'granularity' expects a power of 2"),
                   (256, "Parameter 'granularity' expects a value in range [512B, 64MB]")]:
        r = qmp.request("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full", "granularity": g})
        assert r["error"]["desc"] == msg
    r = qmp.request("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full", "buf-size": -1})
    assert r["error"]["desc"] == "Invalid parameter 'buf-size'"


@pytest.mark.parametrize("size", [1025 * KiB, 0])
def test_unaligned_and_zero_length(qmp, images, check, size):
    src, dst = pair(qmp, images, size)
    mirror(qmp)
    finish(qmp)
    check.assert_identical(src, dst)


def test_refusals(qmp, images):
    pair(qmp, images, 1 * MiB)
    add_file(qmp, "small", images.sparse("small.img", 512 * KiB))
    cases = [
        ({"device": "src", "target": "small"}, "GenericError", "Source and target image have different sizes"),
        ({"device": "src", "target": "src"}, "GenericError", "Can't mirror node into itself"),
        ({"device": "zz", "target": "dst"}, "GenericError", "Cannot find device='zz' nor node-name='zz'"),
        ({"device": "src", "target": "zz"}, "GenericError", "Cannot find device='zz' nor node-name='zz'"),
        ({"device": "src", "target": "dst", "sync": "incremental"}, "GenericError",
         "Sync mode 'incremental' not supported"),
        ({"device": "src", "target": "dst", "job-id": "1bad"}, "GenericError", "Invalid job ID '1bad'"),
    ]
    for args, cls, desc in cases:
        full = {"sync": "full", **args}
        r = qmp.request("blockdev-mirror", full)
        assert r["error"] == {"class": cls, "desc": desc}, (args, r)
    assert qmp.cmd("query-jobs") == []
    assert not any(e["event"] == "JOB_STATUS_CHANGE" for e in qmp.events)
    # Unknown jobs.
    assert qmp.error("block-job-complete", device="nope") == ("DeviceNotActive", "Block job 'nope' not found")
    assert qmp.error("block-job-cancel", device="nope") == ("DeviceNotActive", "Block job 'nope' not found")
    assert qmp.error("job-cancel", id="nope") == ("GenericError", "Job not found")


def test_duplicate_job_id_and_busy_node(qmp, images, check):
    src, dst = pair(qmp, images, 8 * MiB)
    add_file(qmp, "other", images.sparse("other.img", 8 * MiB))
    mirror(qmp, speed=1 * MiB)
    r = qmp.request("blockdev-mirror", {"job-id": "j", "device": "src", "target": "other", "sync": "full"})
    assert r["error"]["desc"] == "Job ID 'j' already in use"
    r = qmp.request("blockdev-mirror", {"job-id": "k", "device": "src", "target": "other", "sync": "full"})
    assert r["error"]["desc"].startswith("Node 'src' is busy")
    cls, desc = qmp.error("blockdev-del", node_name="src")
    assert desc.startswith("Node 'src' is busy"), desc
    cls, desc = qmp.error("blockdev-del", node_name="dst")
    assert desc.startswith("Node 'dst' is busy"), desc
    qmp.cmd("block-job-cancel", device="j", force=True)
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "null"})
    qmp.cmd("blockdev-del", node_name="dst")  # free again


def test_concurrent_jobs_on_different_nodes(qmp, images, check):
    pairs = []
    for i in range(3):
        s = images.dense(f"s{i}.img", (2 + i) * MiB)
        d = images.sparse(f"d{i}.img", (2 + i) * MiB)
        add_file(qmp, f"s{i}", s)
        add_file(qmp, f"d{i}", d)
        qmp.cmd("blockdev-mirror", job_id=f"j{i}", device=f"s{i}", target=f"d{i}", sync="full")
        pairs.append((s, d))
    for i in range(3):
        finish(qmp, f"j{i}")
    for s, d in pairs:
        check.assert_identical(s, d)


def test_auto_finalize_and_auto_dismiss_off(qmp, images, check):
    src, dst = pair(qmp, images, 2 * MiB)
    mirror(qmp, auto_finalize=False, auto_dismiss=False)
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    qmp.cmd("block-job-complete", device="j")
    ev = qmp.wait_event("BLOCK_JOB_PENDING", match={"id": "j"})
    assert ev["data"]["type"] == "mirror"
    time.sleep(0.3)
    assert qmp.job("j")["status"] == "pending"
    assert qmp.error("block-job-dismiss", id="j")[1] == \
        "Job 'j' in state 'pending' cannot accept command verb 'dismiss'"
    qmp.cmd("block-job-finalize", id="j")
    qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "concluded"})
    time.sleep(0.2)
    assert [j["status"] for j in qmp.cmd("query-jobs")] == ["concluded"]
    qmp.cmd("job-dismiss", id="j")
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "null"})
    assert qmp.cmd("query-jobs") == []
    check.assert_identical(src, dst)


def fault_node(qmp, name, image, iotype, once=True, sector=None):
    rule = {"iotype": iotype, "errno": 5, "once": once}
    if sector is not None:
        rule["sector"] = sector
    qmp.cmd("blockdev-add", driver="blkdebug", node_name=name, image=image, inject_error=[rule])


@pytest.mark.parametrize("side", ["source", "target"])
def test_error_policy_report(qmp, images, side):
    pair(qmp, images, 2 * MiB)
    fault_node(qmp, "bad", "src" if side == "source" else "dst",
               "read" if side == "source" else "write", once=False, sector=2048)
    dev, tgt = ("bad", "dst") if side == "source" else ("src", "bad")
    qmp.cmd("blockdev-mirror", job_id="j", device=dev, target=tgt, sync="full")
    err = qmp.wait_event("BLOCK_JOB_ERROR", match={"device": "j"})
    # QEMU's members, plus blkmirror's `message` (the same event the CLI's --json prints).
    assert err["data"] == {"device": "j", "operation": "read" if side == "source" else "write",
                           "action": "report", "message": err["data"]["message"]}
    assert "Input/output error" in err["data"]["message"]
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert ev["data"]["error"] == "Input/output error"
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "null"})


@pytest.mark.parametrize("side", ["source", "target"])
def test_error_policy_ignore_ends_exact(qmp, images, check, side):
    src, dst = pair(qmp, images, 2 * MiB)
    fault_node(qmp, "bad", "src" if side == "source" else "dst",
               "read" if side == "source" else "write", sector=1024)
    dev, tgt = ("bad", "dst") if side == "source" else ("src", "bad")
    policy = "on-source-error" if side == "source" else "on-target-error"
    qmp.cmd("blockdev-mirror", **{"job-id": "j", "device": dev, "target": tgt, "sync": "full", policy: "ignore"})
    err = qmp.wait_event("BLOCK_JOB_ERROR", match={"device": "j"})
    assert err["data"]["action"] == "ignore"
    finish(qmp)
    check.assert_identical(src, dst)


@pytest.mark.parametrize("side", ["source", "target"])
def test_error_policy_stop_then_resume(qmp, images, check, side):
    src, dst = pair(qmp, images, 2 * MiB)
    fault_node(qmp, "bad", "src" if side == "source" else "dst",
               "read" if side == "source" else "write", sector=0)
    dev, tgt = ("bad", "dst") if side == "source" else ("src", "bad")
    policy = "on-source-error" if side == "source" else "on-target-error"
    qmp.cmd("blockdev-mirror", **{"job-id": "j", "device": dev, "target": tgt, "sync": "full", policy: "stop"})
    err = qmp.wait_event("BLOCK_JOB_ERROR", match={"device": "j"})
    assert err["data"]["action"] == "stop"
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "paused"})
    job = qmp.job("j")
    assert job["io-status"] == "failed" and job["paused"]
    qmp.cmd("block-job-resume", device="j")
    finish(qmp)
    check.assert_identical(src, dst)


def test_blockdev_create_then_mirror_into_it(qmp, images, check):
    src = images.dense("src.img", 3 * MiB)
    add_file(qmp, "src", src)
    target = images.path("made.img")
    qmp.cmd("blockdev-create", job_id="c", options={"driver": "file", "filename": str(target), "size": 3 * MiB})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c", "status": "concluded"})
    assert [(j["id"], j["type"], j["status"]) for j in qmp.cmd("query-jobs")] == [("c", "create", "concluded")]
    qmp.cmd("job-dismiss", id="c")
    assert os.path.getsize(target) == 3 * MiB
    # An existing file is never overwritten.
    qmp.cmd("blockdev-create", job_id="c2", options={"driver": "file", "filename": str(src), "size": 1 * MiB})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c2", "status": "concluded"})
    [job] = qmp.cmd("query-jobs")
    assert "File exists" in job["error"]
    assert os.path.getsize(src) == 3 * MiB
    add_file(qmp, "dst", target)
    mirror(qmp)
    finish(qmp)
    check.assert_identical(src, target)


def test_raw_over_inline_file_and_null(qmp, images, check):
    src = images.dense("src.img", 1 * MiB)
    dst = images.sparse("dst.img", 1 * MiB)
    qmp.cmd("blockdev-add", driver="raw", node_name="src", file={"driver": "file", "filename": str(src)})
    qmp.cmd("blockdev-add", driver="raw", node_name="dst", file={"driver": "file", "filename": str(dst)})
    qmp.cmd("blockdev-add", driver="null-co", node_name="nul", size=1 * MiB)
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
    assert nodes["src"]["drv"] == "raw" and nodes["src"]["image"]["virtual-size"] == 1 * MiB
    assert nodes["nul"]["drv"] == "null-co"
    assert qmp.error("blockdev-del", node_name="src-file")[1].startswith("Node 'src-file' is busy")
    mirror(qmp)
    finish(qmp)
    check.assert_identical(src, dst)
    qmp.cmd("blockdev-mirror", job_id="n", device="src", target="nul", sync="full")
    finish(qmp, "n")


def nbd_writer(sock, size, stop, log, seed):
    """Writes random 4 KiB..64 KiB blocks at random places through the export
    until `stop` is set; records (offset, data) in `log`."""
    import nbd
    h = nbd.NBD()
    h.connect_unix(str(sock))
    rnd = random.Random(seed)
    while not stop.is_set():
        length = rnd.choice([4096, 8192, 65536])
        off = rnd.randrange(0, size - length) // 512 * 512
        data = rnd.randbytes(length)
        h.pwrite(data, off)
        log.append((off, data))
    h.flush()
    h.shutdown()


def test_client_writes_over_export_throughout(qmp, images, check, workdir):
    size = 16 * MiB
    src, dst = pair(qmp, images, size)
    model = bytearray(open(src, "rb").read())
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e0", node_name="src", writable=True)
    stop = threading.Event()
    log = []
    t = threading.Thread(target=nbd_writer, args=(sock, size, stop, log, 7))
    t.start()
    try:
        time.sleep(0.3)
        mirror(qmp)
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"}, timeout=120)
        time.sleep(0.3)  # keep writing while ready
        qmp.cmd("block-job-complete", device="j")
        qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
        time.sleep(0.3)  # and after the switch, now onto the target
    finally:
        stop.set()
        t.join(60)
    assert [e["node-name"] for e in qmp.cmd("query-block-exports")] == ["dst"]
    for off, data in log:
        model[off:off + len(data)] = data
    assert len(log) > 10
    with open(dst, "rb") as f:
        assert f.read() == bytes(model), "target differs from the model of every client write"


def test_quit_cancels_jobs_and_exits(daemon, images):
    with daemon.client() as qmp:
        pair(qmp, images, 32 * MiB)
        mirror(qmp, speed=1 * MiB)
        assert qmp.cmd("quit") == {}
        qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "j"}, timeout=30)
    assert daemon.proc.wait(30) == 0
    assert not os.path.exists(daemon.path)


def test_sigterm_shuts_down_cleanly(daemon, images):
    with daemon.client() as qmp:
        pair(qmp, images, 32 * MiB)
        mirror(qmp, speed=1 * MiB)
        daemon.proc.terminate()
        qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "j"}, timeout=30)
    assert daemon.proc.wait(30) == 0


def test_startup_options_bring_up_nodes_and_export(blkmirror_bin, images, workdir, check):
    src = images.dense("src.img", 2 * MiB)
    dst = images.sparse("dst.img", 2 * MiB)
    sock = workdir / "nbd.sock"
    d = Daemon(blkmirror_bin, workdir,
               "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", '{"driver": "file", "node-name": "dst", "filename": "%s"}' % dst,
               "--nbd-server", f"addr.type=unix,addr.path={sock}",
               "--export", "type=nbd,id=e0,node-name=src,writable=on")
    try:
        with d.client() as qmp:
            assert {n["node-name"] for n in qmp.cmd("query-named-block-nodes")} == {"src", "dst"}
            assert qmp.cmd("query-block-exports") == [
                {"type": "nbd", "id": "e0", "node-name": "src", "shutting-down": False}]
            out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///src?socket={sock}"],
                                 capture_output=True, text=True, timeout=30)
            assert out.stdout.strip() == str(2 * MiB), out
            mirror(qmp)
            finish(qmp)
    finally:
        d.stop()
    check.assert_identical(src, dst)


@pytest.mark.parametrize("opt,value,needle", [
    ("--blockdev", "driver=file,node-name=a", "Parameter 'filename' is missing"),
    ("--blockdev", "driver=file,node-name=a,filename=/nonexistent/x", "Could not open '/nonexistent/x'"),
    ("--blockdev", "driver=nope,node-name=a", "Parameter 'driver' does not accept value 'nope'"),
    ("--export", "type=nbd,id=e,node-name=a", "NBD server not running"),
    ("--nbd-server", "addr.type=tcp,addr.host=x", "Parameter 'addr.type' does not accept value 'tcp'"),
    ("--blockdev", "driver=file,node-name", "Expected '=' after parameter 'node-name'"),
])
def test_bad_startup_options(blkmirror_bin, workdir, opt, value, needle):
    r = subprocess.run([blkmirror_bin, "daemon", "--qmp", str(workdir / "q.sock"), opt, value],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (workdir / "q.sock").exists()


def test_write_blocking_reports_actively_synced(qmp, images, check):
    src, dst = pair(qmp, images, 4 * MiB)
    mirror(qmp, copy_mode="write-blocking")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"})
    deadline = time.monotonic() + 30
    while not qmp.job("j")["actively-synced"]:
        assert time.monotonic() < deadline, qmp.job("j")
        time.sleep(0.05)
    qmp.cmd("block-job-complete", device="j")
    qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    check.assert_identical(src, dst)


def test_block_job_change_to_write_blocking_while_running(qmp, images, check, workdir):
    size = 16 * MiB
    src, dst = pair(qmp, images, size)
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e0", node_name="src", writable=True)
    model = bytearray(open(src, "rb").read())
    mirror(qmp, speed=4 * MiB)
    assert qmp.job("j")["actively-synced"] is False
    stop, log = threading.Event(), []
    t = threading.Thread(target=nbd_writer, args=(sock, size, stop, log, 11))
    t.start()
    try:
        time.sleep(0.3)
        qmp.cmd("block-job-change", id="j", type="mirror", copy_mode="write-blocking")
        assert qmp.error("block-job-change", id="j", type="mirror", copy_mode="background") == \
            ("GenericError", "Change to copy mode 'background' is not implemented")
        assert qmp.error("block-job-change", id="nope", type="mirror", copy_mode="write-blocking") == \
            ("DeviceNotActive", "Block job 'nope' not found")
        qmp.cmd("block-job-set-speed", device="j", speed=0)
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"}, timeout=120)
        qmp.cmd("block-job-complete", device="j")
        qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    finally:
        stop.set()
        t.join(60)
    for off, data in log:
        model[off:off + len(data)] = data
    with open(dst, "rb") as f:
        assert f.read() == bytes(model)


def test_adaptive_window_parameter(qmp, images, check):
    src, dst = pair(qmp, images, 2 * MiB)
    r = qmp.request("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full",
                                        "copy-mode": "adaptive", "x-adaptive-window-ms": 0})
    assert r["error"]["desc"] == "Parameter 'x-adaptive-window-ms' expects a value in range [1, 3600000]"
    r = qmp.request("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full", "copy-mode": "fast"})
    assert r["error"]["desc"] == "Parameter 'copy-mode' does not accept value 'fast'"
    mirror(qmp, copy_mode="adaptive", x_adaptive_window_ms=500)
    finish(qmp)
    check.assert_identical(src, dst)
