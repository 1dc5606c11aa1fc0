"""Online verify: `blkmirror verify SRC DST` on files, qcow2 images and NBD
exports, and the daemon's x-blockdev-verify job beside a running mirror with a
python-libnbd client writing through the export. A single flipped byte is
reported as exactly its chunk and repaired; a correct copy under a live writer
is never reported as different (issue 12, "Online verify")."""

import json
import os
import subprocess
import time

import pytest

from conftest import MiB
from qcow2_helpers import ModelWriter

SIZE = 16 * MiB
GRAN = 64 * 1024


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def verify(cli, src, dst, *args):
    return cli.run("verify", str(src), str(dst), "--no-progress", *args)


def differ_lines(stdout):
    return [ln for ln in stdout.splitlines() if ln.startswith(("differ", "repaired"))]


def test_equal_files_and_a_flipped_byte(cli, images, workdir):
    src = images.sparse("src.img", SIZE, [(0, 3 * MiB), (9 * MiB, 2 * MiB)])
    dst = workdir / "dst.img"
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    r = verify(cli, src, dst)
    assert r.returncode == 0, r.stderr
    assert differ_lines(r.stdout) == []
    assert "equal:" in r.stderr
    off = 9 * MiB + 123457
    flip(dst, off)
    r = verify(cli, src, dst)
    assert r.returncode == 4, r.stderr
    assert differ_lines(r.stdout) == [f"differ offset {off // GRAN * GRAN} length {GRAN}"]
    # Reporting wrote nothing; --repair copies that chunk and nothing else.
    r = verify(cli, src, dst, "--repair", "--json")
    assert r.returncode == 0, r.stderr
    result = [json.loads(ln) for ln in r.stdout.splitlines()
              if ln.startswith("{") and "VERIFY_RESULT" in ln][0]["data"]
    assert result["differences"] == [{"offset": off // GRAN * GRAN, "length": GRAN}]
    assert result["repaired"] == GRAN and result["target-equal"] and not result["equal"]
    subprocess.run(["cmp", str(src), str(dst)], check=True)


def test_granularity_and_a_flip_in_the_last_chunk(cli, images, workdir):
    src = images.dense("src.img", 4 * MiB)
    dst = workdir / "dst.img"
    subprocess.run(["cp", str(src), str(dst)], check=True)
    flip(dst, 4 * MiB - 1)
    r = verify(cli, src, dst, "--granularity", "4K")
    assert r.returncode == 4, r.stderr
    assert differ_lines(r.stdout) == [f"differ offset {4 * MiB - 4096} length 4096"]


def test_qcow2_target_flip_found_and_repaired(cli, images, workdir):
    src = images.dense("src.img", SIZE)
    dst = workdir / "dst.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(dst)], check=True)
    off = 5 * MiB + 777
    # A byte of the guest's disk changed inside the qcow2 (through QEMU's driver).
    with open(src, "rb") as f:
        f.seek(off)
        b = f.read(1)[0] ^ 0xFF
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {b} {off} 1", str(dst)],
                   check=True, capture_output=True)
    r = verify(cli, src, dst)
    assert r.returncode == 4, r.stderr
    assert "detected format qcow2" in r.stderr
    assert differ_lines(r.stdout) == [f"differ offset {off // GRAN * GRAN} length {GRAN}"]
    r = verify(cli, src, dst, "--repair")
    assert r.returncode == 0, r.stderr
    subprocess.run(["qemu-img", "check", str(dst)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst)],
                   check=True, capture_output=True)


def test_nbd_target_flip_found(cli, images, workdir, peers):
    src = images.dense("src.img", SIZE)
    dst = workdir / "dst.img"
    subprocess.run(["cp", str(src), str(dst)], check=True)
    off = 11 * MiB + 5
    flip(dst, off)
    srv = peers.qemu_nbd(dst, "raw")
    r = verify(cli, src, srv.uri)
    assert r.returncode == 4, r.stderr
    assert differ_lines(r.stdout) == [f"differ offset {off // GRAN * GRAN} length {GRAN}"]
    r = verify(cli, src, srv.uri, "--repair")
    assert r.returncode == 0, r.stderr
    r = verify(cli, srv.uri, src)
    assert r.returncode == 0, r.stderr


def test_bad_input_is_one_line_and_writes_nothing(cli, images, workdir):
    src = images.dense("src.img", 2 * MiB)
    other = images.dense("other.img", 3 * MiB)
    before = open(other, "rb").read()
    for args, text in [
        ((src, other, "--repair"), "Source and target image have different sizes"),
        ((src, workdir / "missing.img"), "missing.img"),
        ((src, src), "are the same file"),
        ((src, other, "--granularity", "1000"), "Granularity must be a power of 2"),
    ]:
        r = verify(cli, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(other, "rb").read() == before


def test_qmp_bad_input(qmp, images):
    a = images.dense("a.img", MiB)
    b = images.dense("b.img", 2 * MiB)
    qmp.cmd("blockdev-add", driver="file", node_name="a", filename=str(a))
    qmp.cmd("blockdev-add", driver="file", node_name="b", filename=str(b))
    _, desc = qmp.error("x-blockdev-verify", device="a", target="nosuch")
    assert desc == "Cannot find device='' nor node-name='nosuch'"
    _, desc = qmp.error("x-blockdev-verify", device="a", target="b")
    assert desc.startswith("Source and target image have different sizes"), desc
    _, desc = qmp.error("x-query-verify", id="nope")
    assert desc == "No verify job with id 'nope'"
    names = {c["name"] for c in qmp.cmd("query-commands")}
    assert {"x-blockdev-verify", "x-query-verify"} <= names


def start_live_mirror(qmp, workdir, src, dst, copy_mode):
    qmp.cmd("blockdev-add", driver="file", node_name="src", filename=str(src))
    qmp.cmd("blockdev-add", driver="file", node_name="dst", filename=str(dst))
    sock = workdir / "nbd.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="e", node_name="src", writable=True)
    qmp.cmd("blockdev-mirror", job_id="m", device="src", target="dst", sync="full",
            copy_mode=copy_mode)
    return f"nbd+unix:///src?socket={sock}"


@pytest.mark.parametrize("seed,copy_mode", [(1, "background"), (2, "write-blocking"),
                                            (3, "background")])
def test_live_verify_beside_a_mirror(qmp, images, workdir, seed, copy_mode):
    """A correct copy under a live writer has no differences; a byte broken behind
    the mirror's back, where the client never writes, is exactly one chunk."""
    src = images.dense("src.img", SIZE)
    dst = images.zeros("dst.img", SIZE)
    uri = start_live_mirror(qmp, workdir, src, dst, copy_mode)
    model = bytearray(open(src, "rb").read())
    # The client writes the first SIZE - 1 MiB only.
    w = ModelWriter(uri, model, seed, SIZE - MiB, pace=0.001 if copy_mode == "background" else 0)
    try:
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=90)
        broken = SIZE - MiB // 2 + seed * 1000
        flip(dst, broken)  # behind everyone's back: the mirror will not see it
        # The mirror lags behind the writer from now on: the verify meets chunks
        # the copy still owes (it must wait for them, not report them).
        qmp.cmd("block-job-set-speed", device="m", speed=4 * MiB)
        qmp.cmd("x-blockdev-verify", job_id="v", device="src", target="dst",
                speed=16 * MiB)
        time.sleep(0.6)
    finally:
        w.finish()
    assert w.writes > 0
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "v"}, timeout=90)
    assert "error" not in ev["data"], ev
    rep = qmp.cmd("x-query-verify", id="v")
    assert rep["status"] == "concluded"
    assert rep["unverified"] == [], rep
    assert rep["differences"] == [{"offset": broken // GRAN * GRAN, "length": GRAN}], rep
    assert rep["equal"] is False and rep["compared"] == SIZE
    qmp.cmd("job-dismiss", id="v")
    with pytest.raises(Exception):
        qmp.cmd("x-query-verify", id="v")


def test_repair_refused_while_a_mirror_writes_the_target(qmp, images, workdir):
    src = images.dense("src.img", SIZE)
    dst = images.zeros("dst.img", SIZE)
    start_live_mirror(qmp, workdir, src, dst, "background")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=90)
    _, desc = qmp.error("x-blockdev-verify", job_id="v", device="src", target="dst", repair=True)
    assert "Permission conflict" in desc, desc
    # Without repair it runs beside the mirror.
    qmp.cmd("x-blockdev-verify", job_id="v", device="src", target="dst")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "v"}, timeout=60)
    assert "error" not in ev["data"], ev
    assert qmp.cmd("x-query-verify", id="v")["equal"] is True
