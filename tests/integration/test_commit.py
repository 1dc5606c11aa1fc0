"""block-commit (issue 11): active commit (the mirror engine with the base as
its target: ready, complete, clients moved to the base) and intermediate
commit (one pass, then the overlay's backing link names the base), driven over
QMP with a python-libnbd client writing through the export and checked against
a model; the images judged by qemu-img (check, compare, info) afterwards."""

import json
import os
import time

import pytest

from qcow2_helpers import (KiB, MiB, ModelWriter, check_image, create, in_dir, qemu_img, qemu_io,
                           read_raw)

SIZE = 8 * MiB


def three_layers(d, base_size=SIZE, base_fmt="qcow2"):
    """base (0xb1 everywhere) <- mid (writes) <- top (writes), relative links."""
    if base_fmt == "qcow2":
        create(d / "base.qcow2", base_size)
        qemu_io(d / "base.qcow2", f"write -P 0xb1 0 {base_size}")
        base = d / "base.qcow2"
    else:
        base = d / "base.raw"
        base.write_bytes(b"\xb1" * base_size)
    in_dir(d, lambda: create("mid.qcow2", SIZE, backing=base.name, backing_fmt=base_fmt))
    in_dir(d, lambda: create("top.qcow2", SIZE, backing="mid.qcow2", backing_fmt="qcow2"))
    qemu_io(d / "mid.qcow2", "write -P 0x21 1M 256k", "write -P 0x22 5M 64k", "write -z 6M 128k")
    qemu_io(d / "top.qcow2", "write -P 0x31 1088k 64k", "write -P 0x32 3M 512k")
    return base, d / "mid.qcow2", d / "top.qcow2"


def add_chain(qmp, base, mid, top, base_fmt="qcow2", base_ro=False):
    """The chain as libvirt adds it: every layer a named node, base writable."""
    qmp.cmd("blockdev-add", driver=base_fmt, node_name="base", read_only=base_ro,
            file={"driver": "file", "filename": str(base)})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="mid", backing="base", read_only=True,
            file={"driver": "file", "filename": str(mid)})
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top", backing="mid",
            file={"driver": "file", "filename": str(top)})


def Writer(uri, model, seed, pace=0.0):
    return ModelWriter(uri, model, seed, SIZE, pace)


def export(qmp, workdir, node):
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name=node, writable=True)
    return f"nbd+unix:///{node}?socket={sock}"


def export_node(qmp):
    return next(e["node-name"] for e in qmp.cmd("query-block-exports") if e["id"] == "e")


def node_names(qmp):
    return {n["node-name"] for n in qmp.cmd("query-named-block-nodes")}


def close_all(qmp, writer, nodes):
    writer.h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    for n in nodes:
        qmp.cmd("blockdev-del", node_name=n)


@pytest.mark.parametrize("seed,copy_mode", [(1, "background"), (2, "write-blocking"),
                                            (3, "adaptive"), (4, "adaptive")])
def test_active_commit_with_a_writing_client_matches_the_model(qmp, workdir, seed, copy_mode):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    w = Writer(export(qmp, workdir, "top"), model, seed, pace=0.002 if copy_mode == "background" else 0)
    try:
        qmp.cmd("block-commit", job_id="c", device="top", copy_mode=copy_mode, speed=32 * MiB)
        ev = qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"}, timeout=90)
        assert ev["data"]["type"] == "commit"
        jobs = qmp.cmd("query-block-jobs")
        assert jobs[0]["type"] == "commit" and jobs[0]["ready"], jobs
        time.sleep(0.2)  # ready while the client keeps writing
        qmp.cmd("block-job-complete", device="c")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=90)
        assert "error" not in ev["data"], ev
        time.sleep(0.1)  # writes after the switch land on the base
    finally:
        w.finish()
    assert w.writes > 0
    # The export now serves the base itself.
    assert export_node(qmp) == "base"
    assert w.read_all() == bytes(model), "the export after complete differs from the model"
    close_all(qmp, w, ["top", "mid", "base"])
    check_image(base)
    assert read_raw(base, workdir / "base.raw") == model, "the base does not hold every write"


def test_active_commit_into_a_raw_base_grows_it(qmp, workdir):
    base, mid, top = three_layers(workdir, base_size=2 * MiB, base_fmt="raw")
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top, base_fmt="raw")
    w = Writer(export(qmp, workdir, "top"), model, 7, pace=0.002)
    try:
        qmp.cmd("block-commit", job_id="c", device="top", base_node="base")
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"}, timeout=60)
        qmp.cmd("job-complete", id="c")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
        assert "error" not in ev["data"], ev
    finally:
        w.finish()
    assert os.path.getsize(base) == SIZE
    assert w.read_all() == bytes(model)
    close_all(qmp, w, ["top", "mid", "base"])
    assert base.read_bytes() == bytes(model)


def test_active_commit_grows_a_smaller_qcow2_base(qmp, workdir):
    base, mid, top = three_layers(workdir, base_size=4 * MiB)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    qmp.cmd("block-commit", job_id="c", device="top")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"}, timeout=60)
    qmp.cmd("job-complete", id="c")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
    assert "error" not in ev["data"], ev
    for n in ("top", "mid", "base"):
        qmp.cmd("blockdev-del", node_name=n)
    info = json.loads(qemu_img("info", "--output=json", str(base)).stdout)
    assert info["virtual-size"] == SIZE
    check_image(base)
    assert read_raw(base, workdir / "b.raw") == model


def test_cancel_after_ready_leaves_the_chain_and_a_consistent_base(qmp, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    uri = export(qmp, workdir, "top")
    qmp.cmd("block-commit", job_id="c", device="top")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"}, timeout=60)
    w = Writer(uri, model, 11)
    time.sleep(0.3)
    w.stop.set()
    w.t.join(30)
    qmp.cmd("block-job-cancel", device="c")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
    assert "error" not in ev["data"], ev
    assert export_node(qmp) == "top"  # clients stay on the top
    assert w.read_all() == bytes(model)
    close_all(qmp, w, ["top", "mid", "base"])
    # The base is a copy of the chain as it was when the job finished.
    assert read_raw(base, workdir / "b.raw") == model
    # And the chain still reads the same, top first.
    assert read_raw(top, workdir / "t.raw") == model
    check_image(base)


def test_intermediate_commit_with_a_writer_on_the_active_layer(qmp, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    w = Writer(export(qmp, workdir, "top"), model, 5, pace=0.001)
    try:
        qmp.cmd("block-commit", job_id="c", device="top", top_node="mid", base_node="base")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
        assert "error" not in ev["data"], ev
        assert not any(e["event"] == "BLOCK_JOB_READY" for e in qmp.events)
        time.sleep(0.1)
    finally:
        w.finish()
    assert export_node(qmp) == "top"
    assert w.read_all() == bytes(model), "the writer's view changed during the commit"
    top_node = next(n for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == "top")
    assert top_node["backing_file"] == str(base)
    assert top_node["image"]["backing-filename"] == str(base)
    close_all(qmp, w, ["top", "mid", "base"])
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", str(top)).stdout)
    assert [os.path.basename(i["filename"]) for i in chain] == ["top.qcow2", "base.qcow2"]
    check_image(top)
    check_image(base)
    assert read_raw(top, workdir / "after.raw") == model


def test_refusals_have_qemus_texts_and_change_nothing(qmp, workdir):
    base, mid, top = three_layers(workdir)
    add_chain(qmp, base, mid, top)
    create(workdir / "lone.qcow2", SIZE)
    qmp.cmd("blockdev-add", driver="qcow2", node_name="lone",
            file={"driver": "file", "filename": str(workdir / "lone.qcow2")})
    before = qmp.cmd("query-named-block-nodes")
    cases = [
        (dict(device="nope"), "DeviceNotFound", "Device 'nope' not found"),
        (dict(device="mid"), "GenericError", "Need a root block node"),
        (dict(device="top", top_node="mid", top="x"), "GenericError",
         "'top-node' and 'top' are mutually exclusive"),
        (dict(device="top", base_node="base", base="x"), "GenericError",
         "'base-node' and 'base' are mutually exclusive"),
        (dict(device="top", top_node="lone"), "GenericError", "'lone' is not in this backing file chain"),
        (dict(device="top", base_node="lone"), "GenericError", "'lone' is not in this backing file chain"),
        (dict(device="top", top_node="mid", base_node="mid"), "GenericError",
         "cannot commit an image into itself"),
        (dict(device="lone"), "GenericError", "cannot commit an image into itself"),
        (dict(device="top", base="nope.qcow2"), "GenericError", "Can't find 'nope.qcow2' in the backing chain"),
        (dict(device="top", top="nope.qcow2"), "GenericError", "Top image file nope.qcow2 not found"),
        (dict(device="top", backing_file="x"), "GenericError",
         "'backing-file' specified, but 'top' is the active layer"),
        (dict(device="top", speed=-1), "GenericError", "Parameter 'speed' expects a non-negative value"),
        (dict(device="top", job_id="1bad"), "GenericError", "Invalid job ID '1bad'"),
    ]
    for args, cls, text in cases:
        assert qmp.error("block-commit", **args) == (cls, text), args
    assert qmp.cmd("query-jobs") == []
    assert qmp.cmd("query-named-block-nodes") == before
    # A node another job holds is busy.
    qmp.cmd("block-commit", job_id="c", device="top", speed=1)
    cls, text = qmp.error("block-commit", job_id="c2", device="top")
    assert cls == "GenericError" and text.startswith("Node 'top' is busy"), text
    qmp.cmd("job-cancel", id="c")
    qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "c"}, timeout=30)


def test_commit_by_file_names(qmp, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    qmp.cmd("block-commit", job_id="c", device="top", top=str(mid), base=str(base))
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
    assert "error" not in ev["data"], ev
    for n in ("top", "mid", "base"):
        qmp.cmd("blockdev-del", node_name=n)
    assert read_raw(top, workdir / "after.raw") == model


def test_libvirt_active_commit_sequence(qmp, workdir):
    # The sequence libvirt sends for `virsh blockcommit --active --pivot`
    # (docs/qmp.md), while a client writes: ready may come and go.
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    w = Writer(export(qmp, workdir, "top"), model, 21, pace=0.001)
    try:
        qmp.cmd("block-commit", job_id="commit-vda", device="top", top_node="top",
                base_node="base", auto_finalize=True, auto_dismiss=False)
        qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "commit-vda", "status": "ready"}, timeout=60)
        qmp.cmd("job-complete", id="commit-vda")
        qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "commit-vda", "status": "concluded"},
                       timeout=60)
    finally:
        w.finish()
    jobs = qmp.cmd("query-jobs")
    assert len(jobs) == 1 and jobs[0]["id"] == "commit-vda" and "error" not in jobs[0], jobs
    assert jobs[0]["type"] == "commit" and jobs[0]["current-progress"] == jobs[0]["total-progress"]
    qmp.cmd("job-dismiss", id="commit-vda")
    assert qmp.cmd("query-jobs") == []
    assert export_node(qmp) == "base"
    qmp.cmd("blockdev-del", node_name="top")
    qmp.cmd("blockdev-del", node_name="mid")
    assert node_names(qmp) >= {"base"} and not node_names(qmp) & {"top", "mid"}
    assert w.read_all() == bytes(model)
    close_all(qmp, w, ["base"])
    check_image(base)
    assert read_raw(base, workdir / "b.raw") == model


# --- blkmirror commit IMAGE (the CLI over the same daemon code)

def test_cli_commit_offline_into_the_bottom_of_the_chain(cli, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    res = cli.run("commit", top, "--no-progress")
    assert res.returncode == 0, res.stderr
    check_image(base)
    check_image(top)
    assert read_raw(base, workdir / "b.raw") == model
    # The chain IMAGE heads reads as before; the files' links are unchanged.
    assert read_raw(top, workdir / "t.raw") == model
    info = json.loads(qemu_img("info", "--output=json", str(base)).stdout)
    assert info["format"] == "qcow2" and not info.get("dirty-flag")


def test_cli_commit_into_a_named_base_leaves_the_layers_below(cli, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    base_before = base.read_bytes()
    res = cli.run("commit", top, "--base", mid, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert base.read_bytes() == base_before, "the image below --base was written"
    assert read_raw(mid, workdir / "m.raw") == model
    check_image(mid)


def test_cli_commit_while_serving_switches_clients_to_the_base(cli, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    sock = workdir / "c.sock"
    run = cli.start("commit", top, "--socket", sock, "--name", "disk", "--no-auto-complete")
    run.wait_for_line("serving", 30)
    w = Writer(f"nbd+unix:///disk?socket={sock}", model, 31, pace=0.001)
    try:
        run.wait_for_line("ready", 60)
        time.sleep(0.2)
        run.popen.send_signal(10)  # SIGUSR1: complete
        run.wait_for_line("serving the base now", 60)
        time.sleep(0.2)  # writes after the switch land on the base
    finally:
        w.finish()
    assert w.read_all() == bytes(model)
    w.h.shutdown()
    run.popen.terminate()
    assert run.popen.wait(30) == 0, run.stderr_lines
    check_image(base)
    assert read_raw(base, workdir / "b.raw") == model


def test_cli_commit_refuses_an_image_without_backing(cli, workdir):
    create(workdir / "lone.qcow2", SIZE)
    before = (workdir / "lone.qcow2").read_bytes()
    res = cli.run("commit", workdir / "lone.qcow2")
    assert res.returncode == 2
    assert res.stderr.strip() == f"blkmirror: {workdir / 'lone.qcow2'} has no backing file: nothing to commit"
    assert (workdir / "lone.qcow2").read_bytes() == before
    res = cli.run("commit", workdir / "missing.qcow2")
    assert res.returncode == 2 and "missing.qcow2" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.parametrize("kill_after", ["running", "ready"])
def test_kill_9_during_an_active_commit_leaves_every_image_consistent(daemon, qmp, workdir,
                                                                      kill_after):
    # The base is written only under data the layers above it hold, so the
    # chain reads the same whenever the process dies; the images are clean or
    # at worst leak clusters.
    base, mid, top = three_layers(workdir)
    qemu_io(top, "write -P 0x44 0 2M")  # enough that a throttled job is mid-copy
    model = read_raw(top, workdir / "start.raw")
    add_chain(qmp, base, mid, top)
    qmp.cmd("block-commit", job_id="c", device="top",
            speed=(1 * MiB if kill_after == "running" else 0))
    if kill_after == "ready":
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"}, timeout=60)
    else:
        time.sleep(0.5)
        assert qmp.cmd("query-block-jobs")[0]["status"] == "running"
    daemon.proc.kill()
    daemon.proc.wait(10)
    for img in (base, mid, top):
        check_image(img, leaks_ok=True)
    assert read_raw(top, workdir / "after.raw") == model
    if kill_after == "ready":  # ready = everything copied and flushed
        assert read_raw(base, workdir / "base.raw") == model


# --- chains opened from their headers: read-only implicit layers, reopened for the job

def nodes_by_file(qmp):
    return {n["file"]: n for n in qmp.cmd("query-named-block-nodes") if n["drv"] == "qcow2"}


def test_active_commit_of_a_chain_opened_from_its_headers(daemon, qmp, workdir):
    base, mid, top = three_layers(workdir)
    model = read_raw(top, workdir / "start.raw")
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top",
            file={"driver": "file", "filename": str(top)})
    base_node = nodes_by_file(qmp)[str(base)]
    assert base_node["ro"]
    w = Writer(export(qmp, workdir, "top"), model, 41, pace=0.001)
    try:
        qmp.cmd("block-commit", job_id="c", device="top")
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "c"}, timeout=60)
        qmp.cmd("job-complete", id="c")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
        assert "error" not in ev["data"], ev
        time.sleep(0.1)
    finally:
        w.finish()
    assert export_node(qmp) == base_node["node-name"]
    # The base took the top's place, read-write as the top was (QEMU).
    assert not nodes_by_file(qmp)[str(base)]["ro"]
    assert w.read_all() == bytes(model)
    qmp.cmd("blockdev-del", node_name="top")  # its implicit mid goes with it
    assert set(nodes_by_file(qmp)) == {str(base)}
    w.h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    qmp.cmd("quit")
    daemon.proc.wait(30)
    check_image(base)
    assert read_raw(base, workdir / "b.raw") == model


def test_cancelled_commit_puts_the_base_back_read_only(qmp, workdir):
    base, mid, top = three_layers(workdir)
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top",
            file={"driver": "file", "filename": str(top)})
    qmp.cmd("block-commit", job_id="c", device="top", speed=1)
    assert not nodes_by_file(qmp)[str(base)]["ro"]  # reopened for the job
    qmp.cmd("job-cancel", id="c")
    qmp.wait_event("BLOCK_JOB_CANCELLED", match={"device": "c"}, timeout=30)
    deadline = time.monotonic() + 10
    while not nodes_by_file(qmp)[str(base)]["ro"]:
        assert time.monotonic() < deadline, "the base stayed read-write after the cancel"
        time.sleep(0.05)


def test_intermediate_commit_of_implicit_layers_relinks_a_read_only_overlay(qmp, workdir):
    # base <- a <- b <- top, all but top opened from headers (read-only). Commit
    # a into base: the overlay b is read-only and gets its new link all the same.
    create(workdir / "base.qcow2", SIZE)
    qemu_io(workdir / "base.qcow2", f"write -P 0xb1 0 {SIZE}")
    in_dir(workdir, lambda: create("a.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2"))
    in_dir(workdir, lambda: create("b.qcow2", SIZE, backing="a.qcow2", backing_fmt="qcow2"))
    in_dir(workdir, lambda: create("top.qcow2", SIZE, backing="b.qcow2", backing_fmt="qcow2"))
    qemu_io(workdir / "a.qcow2", "write -P 0xa1 0 1M", "write -z 4M 64k")
    qemu_io(workdir / "b.qcow2", "write -P 0xb2 512k 1M")
    qemu_io(workdir / "top.qcow2", "write -P 0x77 3M 64k")
    top = workdir / "top.qcow2"
    model = read_raw(top, workdir / "start.raw")
    qmp.cmd("blockdev-add", driver="qcow2", node_name="top",
            file={"driver": "file", "filename": str(top)})
    w = Writer(export(qmp, workdir, "top"), model, 43, pace=0.001)
    try:
        qmp.cmd("block-commit", job_id="c", device="top", top=str(workdir / "a.qcow2"),
                base=str(workdir / "base.qcow2"))
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "c"}, timeout=60)
        assert "error" not in ev["data"], ev
        time.sleep(0.1)
    finally:
        w.finish()
    assert w.read_all() == bytes(model)
    nodes = nodes_by_file(qmp)
    assert str(workdir / "a.qcow2") not in nodes, "the committed layer is still a node"
    assert nodes[str(workdir / "b.qcow2")]["ro"] and nodes[str(workdir / "base.qcow2")]["ro"]
    assert nodes[str(workdir / "b.qcow2")]["image"]["backing-filename"] == str(workdir / "base.qcow2")
    w.h.shutdown()
    qmp.cmd("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e"})
    qmp.cmd("blockdev-del", node_name="top")
    assert nodes_by_file(qmp) == {}, "blockdev-del of top left nodes of its chain behind"
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", str(top)).stdout)
    assert [os.path.basename(i["filename"]) for i in chain] == ["top.qcow2", "b.qcow2", "base.qcow2"]
    for img in ("top", "b", "base"):
        check_image(workdir / f"{img}.qcow2")
    assert read_raw(top, workdir / "after.raw") == model
