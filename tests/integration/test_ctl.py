"""`blkmirror ctl` against a running daemon: tables, JSON for scripts, job
verbs, and the daemon's error text with a non-zero exit."""

import json
import subprocess
import time

import pytest

from conftest import MiB


@pytest.fixture
def ctl(blkmirror_bin, daemon):
    argv = [blkmirror_bin, "ctl", "--qmp", daemon.path]

    def run(*args, check_rc=None, env=None):
        r = subprocess.run([blkmirror_bin, "ctl", "--qmp", daemon.path, *args],
                           capture_output=True, text=True, timeout=120, env=env)
        if check_rc is not None:
            assert r.returncode == check_rc, (r.returncode, r.stdout, r.stderr)
        return r
    run.argv = argv
    return run


def add_pair(ctl, images, size):
    src = images.dense("src.img", size)
    dst = images.sparse("dst.img", size)
    for name, p in (("src", src), ("dst", dst)):
        ctl("raw", json.dumps({"execute": "blockdev-add",
                               "arguments": {"driver": "file", "node-name": name, "filename": str(p)}}),
            check_rc=0)
    return src, dst


def test_nodes_exports_and_jobs_tables(ctl, images, workdir):
    add_pair(ctl, images, 2 * MiB)
    r = ctl("nodes", check_rc=0)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["NODE", "DRIVER"]
    assert any(l.startswith("src") and "2.0 MiB" in l for l in lines), r.stdout
    nodes = json.loads(ctl("--json", "nodes", check_rc=0).stdout)
    assert {n["node-name"] for n in nodes} == {"src", "dst"}
    assert ctl("jobs", check_rc=0).stdout.strip() == "no jobs"
    ctl("raw", json.dumps({"execute": "nbd-server-start",
                           "arguments": {"addr": {"type": "unix", "data": {"path": str(workdir / "n.sock")}}}}),
        check_rc=0)
    ctl("raw", '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "src"}}',
        check_rc=0)
    out = ctl("exports", check_rc=0).stdout.splitlines()
    assert out[1].split() == ["e0", "src"]


def test_mirror_complete_end_to_end(ctl, images, check):
    src, dst = add_pair(ctl, images, 4 * MiB)
    r = ctl("mirror", "src", "dst", "--complete", check_rc=0)
    assert "started mirror job 'src'" in r.stderr
    assert "job src: concluded" in r.stdout, r.stdout
    check.assert_identical(src, dst)
    assert ctl("jobs", check_rc=0).stdout.strip() == "no jobs"


def test_job_verbs_and_progress_table(ctl, images, check):
    src, dst = add_pair(ctl, images, 32 * MiB)
    ctl("mirror", "src", "dst", "--job-id", "m", "--speed", "1M", check_rc=0)
    ctl("pause", "m", check_rc=0)
    time.sleep(0.2)
    jobs = json.loads(ctl("--json", "jobs", check_rc=0).stdout)
    assert jobs[0]["device"] == "m" and jobs[0]["paused"] and jobs[0]["speed"] == MiB
    table = ctl("jobs", check_rc=0).stdout
    assert "m " in table and "[" in table and "%" in table and "1.0 MiB/s" in table, table
    r = ctl("cancel", "m", check_rc=1)
    assert r.stderr.strip() == "blkmirror: The block job for device 'm' is currently paused"
    ctl("resume", "m", check_rc=0)
    ctl("speed", "m", "0", check_rc=0)
    # watch follows the job to its end: it returns only after complete.
    watcher = subprocess.Popen(ctl.argv + ["watch", "m"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while json.loads(ctl("--json", "jobs", check_rc=0).stdout)[0]["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.3)
    assert watcher.poll() is None, "watch ended before the job did"
    ctl("complete", "m", check_rc=0)
    out, _ = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, out
    assert "ready" in out and "100.0%" in out
    check.assert_identical(src, dst)


def test_errors_print_daemon_desc_and_exit_nonzero(ctl, images):
    add_pair(ctl, images, MiB)
    r = ctl("mirror", "src", "nope", check_rc=1)
    assert r.stderr.strip() == "blkmirror: Cannot find device='nope' nor node-name='nope'"
    r = ctl("complete", "nojob", check_rc=1)
    assert r.stderr.strip() == "blkmirror: Block job 'nojob' not found"
    r = ctl("change", "nojob", "--copy-mode", "write-blocking", check_rc=1)
    assert r.stderr.strip() == "blkmirror: Block job 'nojob' not found"
    r = ctl("speed", "nojob", "fast", check_rc=2)
    assert "speed" in r.stderr
    r = ctl("raw", "not json", check_rc=2)
    r = ctl("raw", '{"execute": "nosuch"}', check_rc=1)
    assert r.stderr.strip() == "blkmirror: The command nosuch has not been found"


def test_unreachable_daemon(blkmirror_bin, workdir):
    r = subprocess.run([blkmirror_bin, "ctl", "--qmp", str(workdir / "none.sock"), "jobs"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot connect to the daemon" in r.stderr
    r = subprocess.run([blkmirror_bin, "ctl", "jobs"], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--qmp" in r.stderr


# --------------------------------------------------------------------------
# One table of mirror options (issue 15): the CLI, QMP and ctl agree


def test_ctl_mirror_takes_adaptive_window(ctl, daemon, images, check):
    # `ctl mirror` lacked --adaptive-window. At 64 KiB/s in 64 KiB operations
    # the dirty count falls once a second, so a 100 ms window switches the job
    # to write-blocking at the first look after a second; the reason names the
    # window the daemon got.
    src, dst = add_pair(ctl, images, 4 * MiB)
    with daemon.client() as qmp:
        ctl("mirror", "src", "dst", "--job-id", "m", "--speed", "64K", "--granularity", "64K",
            "--buf-size", "64K", "--copy-mode", "adaptive", "--adaptive-window", "100", check_rc=0)
        ev = qmp.wait_event("BLOCK_JOB_COPY_MODE_CHANGED", match={"device": "m"}, timeout=30)
        assert ev["data"]["copy-mode"] == "write-blocking", ev
        assert "for 100 ms" in ev["data"]["reason"], ev
        ctl("speed", "m", "0", check_rc=0)
        qmp.wait_event("BLOCK_JOB_READY", match={"device": "m"}, timeout=60)
        ctl("complete", "m", check_rc=0)
        qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "m"}, timeout=60)
    check.assert_identical(src, dst)
    r = ctl("mirror", "src", "dst", "--adaptive-window", "0", check_rc=2)
    assert r.stderr.strip() == \
        "blkmirror: Parameter 'adaptive-window' expects a value in range [1, 3600000]", r.stderr


@pytest.mark.parametrize("value, text", [
    ("256", "Parameter 'granularity' expects a value in range [512B, 64MB]"),
    ("128M", "Parameter 'granularity' expects a value in range [512B, 64MB]"),
    ("3000", "Parameter 'granularity' expects a power of 2"),
])
def test_bad_granularity_gets_one_text_from_cli_qmp_and_ctl(ctl, daemon, blkmirror_bin, images,
                                                            value, text):
    src, dst = add_pair(ctl, images, MiB)
    cli = subprocess.run([blkmirror_bin, "mirror", str(src), str(dst), "--granularity", value],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.strip() == f"blkmirror: {text}", cli
    r = ctl("mirror", "src", "dst", "--granularity", value, check_rc=2)
    assert r.stderr.strip() == f"blkmirror: {text}", r.stderr
    with daemon.client() as qmp:
        g = int(value[:-1]) * MiB if value.endswith("M") else int(value)
        assert qmp.error("blockdev-mirror", device="src", target="dst", sync="full",
                         granularity=g) == ("GenericError", text)
        assert qmp.cmd("query-block-jobs") == []
