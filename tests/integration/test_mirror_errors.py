"""I/O errors (through the BLKMIRROR_INJECT_FAULTS test hook) and signals
during `blkmirror mirror`: the right exit code, a message naming the file
and the error, and the source never touched."""

import signal
import time

import pytest

from conftest import KiB, MiB
SIZE = 16 * MiB
# Data at [0, 4M) and [8M, 12M); the rest is hole.
LAYOUT = [(0, 4 * MiB), (8 * MiB, 4 * MiB)]
FAULT_AT = 8 * MiB + 64 * KiB  # inside the second data extent


def faults(*rules):
    return {"BLKMIRROR_INJECT_FAULTS": ",".join(rules)}


@pytest.fixture
def pair(images, check):
    src = images.sparse("src.img", SIZE, LAYOUT)
    return src, images.path("dst.img"), check.digest(src)


def events_named(check, res, name):
    return [e["data"] for e in check.json_events(res.stdout) if e["event"] == name]


# --------------------------------------------------------------------------
# Source read errors


def test_source_read_error_fails_job_with_exit_1(cli, check, pair):
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--no-progress",
                     env=faults(f"src:read:{FAULT_AT}:4096"))
    assert res.returncode == 1, check.describe(res)
    assert str(src) in res.stderr, res.stderr
    assert "Input/output error" in res.stderr, res.stderr
    assert check.digest(src) == digest


def test_source_read_error_json_events(cli, check, pair):
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--json", env=faults(f"src:read:{FAULT_AT}:4096"))
    assert res.returncode == 1, check.describe(res)
    errors = events_named(check, res, "BLOCK_JOB_ERROR")
    assert errors, res.stdout
    assert errors[0]["operation"] == "read" and errors[0]["action"] == "report", errors
    assert events_named(check, res, "BLOCK_JOB_READY") == [], "a failed job never got ready"
    done = events_named(check, res, "BLOCK_JOB_COMPLETED")
    assert len(done) == 1, res.stdout
    assert "Input/output error" in done[0].get("error", ""), done
    assert done[0]["offset"] < done[0]["len"], done
    statuses = [d["status"] for d in events_named(check, res, "JOB_STATUS_CHANGE")]
    assert "aborting" in statuses and statuses[-2:] == ["concluded", "null"], statuses
    assert check.digest(src) == digest


def test_source_read_error_with_numeric_errno(cli, check, pair):
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--no-progress",
                     env=faults(f"src:read:{FAULT_AT}:4096:61"))  # ENODATA
    assert res.returncode == 1, check.describe(res)
    assert "No data available" in res.stderr, res.stderr
    assert check.digest(src) == digest


def test_source_read_error_outside_the_rule_range_is_not_raised(cli, check, pair):
    # A rule for the destination's role never fires on the source, and a rule
    # past the image end never fires at all.
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--no-progress",
                     env=faults(f"dst:read:{FAULT_AT}:4096", f"src:read:{SIZE}:4096"))
    assert res.returncode == 0, check.describe(res)
    check.assert_identical(src, dst)


# --------------------------------------------------------------------------
# Target write errors


def test_target_enospc_with_report_policy_fails_with_exit_1(cli, check, pair):
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--no-progress", "--on-target-error", "report",
                     env=faults(f"dst:write:{FAULT_AT}:4096:ENOSPC"))
    assert res.returncode == 1, check.describe(res)
    assert "No space left on device" in res.stderr, res.stderr
    assert str(dst) in res.stderr, res.stderr
    assert check.digest(src) == digest


def test_target_write_error_json_names_write_operation(cli, check, pair):
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--json", "--on-target-error", "report",
                     env=faults(f"dst:write:{FAULT_AT}:4096:ENOSPC"))
    assert res.returncode == 1, check.describe(res)
    errors = events_named(check, res, "BLOCK_JOB_ERROR")
    assert errors and errors[0]["operation"] == "write" and errors[0]["action"] == "report", \
        errors
    done = events_named(check, res, "BLOCK_JOB_COMPLETED")
    assert len(done) == 1 and "No space left on device" in done[0].get("error", ""), done


def test_enospc_policy_reports_other_errors(cli, check, pair):
    # --on-target-error enospc stops only on ENOSPC; EIO is reported.
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--no-progress", "--on-target-error", "enospc",
                     env=faults(f"dst:write:{FAULT_AT}:4096:EIO"))
    assert res.returncode == 1, check.describe(res)
    assert "Input/output error" in res.stderr, res.stderr
    assert check.digest(src) == digest


def test_target_flush_error_fails_job(cli, check, pair):
    src, dst, digest = pair
    res = cli.mirror(src, dst, "--create", "--no-progress", env=faults("dst:flush:0:1"))
    assert res.returncode == 1, check.describe(res)
    assert "Input/output error" in res.stderr and str(dst) in res.stderr, res.stderr
    assert check.digest(src) == digest


@pytest.mark.parametrize("policy, rule", [
    ("stop", f"dst:write:{FAULT_AT}:4096:EIO"),
    ("enospc", f"dst:write:{FAULT_AT}:4096:ENOSPC"),
])
def test_stopped_job_can_be_cancelled_with_sigterm(cli, check, pair, policy, rule):
    # A "stop" action pauses the job; a signal still ends it, with exit 3.
    src, dst, digest = pair
    run = cli.start_mirror(src, dst, "--create", "--json", "--on-target-error", policy,
                           env=faults(rule))
    run.wait_for_line('"action":"stop"', timeout=20, stream="stdout")
    run.wait_for_line('"status":"paused"', timeout=20, stream="stdout")
    run.send_signal(signal.SIGTERM)
    res = run.finish(timeout=20)
    assert res.returncode == 3, check.describe(res)
    assert events_named(check, res, "BLOCK_JOB_CANCELLED"), res.stdout
    notes = " ".join(d["message"] for d in events_named(check, res, "NOTE"))
    assert "NOT a consistent copy" in notes, notes
    assert check.digest(src) == digest


@pytest.mark.parametrize("policy, rule", [
    ("stop", f"dst:write:{FAULT_AT}:4096:EIO"),
    ("enospc", f"dst:write:{FAULT_AT}:4096:ENOSPC"),
])
def test_paused_job_says_once_per_pause_how_to_resume(cli, check, pair, policy, rule):
    # Issue 17 item 14: the CLI printed error lines but never said the job was
    # paused or how to resume it. The fault persists, so a resume pauses again:
    # one line per pause, not per error.
    src, dst, digest = pair
    run = cli.start_mirror(src, dst, "--create", "--no-progress", "--on-target-error", policy,
                           env=faults(rule))
    said = "job paused by the on-target-error error policy after a write error"
    run.wait_for_line(said, timeout=20)
    time.sleep(0.5)
    paused = [line for line in list(run.stderr_lines) if "job paused" in line]
    assert len(paused) == 1, run.stderr_lines
    assert f"resume with SIGUSR2 (kill -USR2 {run.pid})" in paused[0], paused
    assert "SIGINT/SIGTERM" in paused[0], paused
    run.send_signal(signal.SIGUSR2)  # the fault is still there: paused again
    deadline = time.monotonic() + 20
    while len([line for line in list(run.stderr_lines) if "job paused" in line]) < 2:
        assert time.monotonic() < deadline, run.stderr_lines
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    res = run.finish(timeout=20)
    assert res.returncode == 3, check.describe(res)
    assert res.stderr.count("job paused") == 2, res.stderr
    assert "resumed" in res.stderr, res.stderr
    assert check.digest(src) == digest


def test_paused_job_json_says_it_once_as_a_note(cli, check, pair):
    src, dst, digest = pair
    run = cli.start_mirror(src, dst, "--create", "--json", "--on-target-error", "stop",
                           env=faults(f"dst:write:{FAULT_AT}:4096:EIO"))
    run.wait_for_line('"status":"paused"', timeout=20, stream="stdout")
    time.sleep(0.3)
    run.send_signal(signal.SIGTERM)
    res = run.finish(timeout=20)
    assert res.returncode == 3, check.describe(res)
    events = check.json_events(res.stdout)
    notes = [i for i, e in enumerate(events)
             if e["event"] == "NOTE" and "job paused" in e["data"]["message"]]
    assert len(notes) == 1, res.stdout
    note = events[notes[0]]["data"]["message"]
    assert "on-target-error" in note and f"kill -USR2 {run.pid}" in note, note
    error = next(i for i, e in enumerate(events) if e["event"] == "BLOCK_JOB_ERROR")
    assert events[error]["data"]["action"] == "stop" and error < notes[0], res.stdout
    assert check.digest(src) == digest


# --------------------------------------------------------------------------
# Signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_copy_cancels_with_exit_3(cli, check, images, sig):
    src = images.dense("src.img", 64 * MiB)
    digest = check.digest(src)
    dst = images.path("dst.img")
    run = cli.start_mirror(src, dst, "--create", "--speed", "1M")
    run.wait_for_line("mirroring", timeout=20)
    time.sleep(0.5)
    assert run.popen.poll() is None, "at 1 MiB/s a 64 MiB copy is still running"
    run.send_signal(sig)
    res = run.finish(timeout=20)
    assert res.returncode == 3, check.describe(res)
    assert "NOT a consistent copy" in res.stderr, res.stderr
    assert check.digest(src) == digest
    rc, _ = check.cmp(src, dst)
    assert rc == 1, "the target cannot be complete after about half a second at 1 MiB/s"


def test_sigint_json_reports_cancelled(cli, check, images):
    src = images.dense("src.img", 32 * MiB)
    digest = check.digest(src)
    dst = images.path("dst.img")
    run = cli.start_mirror(src, dst, "--create", "--speed", "1M", "--json")
    run.wait_for_line('"status":"running"', timeout=20, stream="stdout")
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)
    res = run.finish(timeout=20)
    assert res.returncode == 3, check.describe(res)
    cancelled = events_named(check, res, "BLOCK_JOB_CANCELLED")
    assert len(cancelled) == 1, res.stdout
    assert cancelled[0]["offset"] < cancelled[0]["len"] == 32 * MiB, cancelled
    assert events_named(check, res, "BLOCK_JOB_COMPLETED") == [], res.stdout
    statuses = [d["status"] for d in events_named(check, res, "JOB_STATUS_CHANGE")]
    assert statuses[-3:] == ["aborting", "concluded", "null"], statuses
    assert check.digest(src) == digest
