"""`blkmirror mirror SRC DST` on real files: the copy is exact, holes are
kept, options change what they should, and --json reports the job's life."""

import os
import random
import time

import pytest

from conftest import KiB, MiB

# 1 MiB random extents at 64 KiB-aligned offsets of a 64 MiB image.
SMALL_LAYOUT = [(0, MiB), (3 * MiB + 64 * KiB, MiB), (17 * MiB, 2 * MiB),
                (40 * MiB + 192 * KiB, MiB), (63 * MiB, MiB)]
SMALL_SIZE = 64 * MiB
SMALL_DATA = sum(length for _, length in SMALL_LAYOUT)


def random_layout(seed, size, count, length, align):
    """`count` non-overlapping, non-adjacent extents of `length` bytes at
    `align`-aligned offsets in [0, size)."""
    rnd = random.Random(seed)
    slots = size // align
    span = -(-length // align) + 1  # the extent plus at least one hole slot after it
    chosen = []
    while len(chosen) < count:
        s = rnd.randrange(0, slots - span)
        if all(abs(s - c) >= span for c in chosen):
            chosen.append(s)
    return sorted((s * align, length) for s in chosen)


def mirror_ok(cli, check, src, dst, *opts, **kw):
    res = cli.mirror(src, dst, *opts, **kw)
    assert res.returncode == 0, check.describe(res)
    return res


# --------------------------------------------------------------------------
# Basic copies


def test_create_target_is_identical_and_source_unchanged(cli, check, images):
    src = images.sparse("src.img", SMALL_SIZE, SMALL_LAYOUT)
    dst = images.path("dst.img")
    before = check.digest(src)
    mirror_ok(cli, check, src, dst, "--create", "--no-progress")
    assert dst.is_file()
    check.assert_identical(src, dst)
    assert check.digest(src) == before


def test_dense_source_to_create_target_is_identical(cli, check, images):
    src = images.dense("src.img", 16 * MiB)
    dst = images.path("dst.img")
    mirror_ok(cli, check, src, dst, "--create", "--no-progress")
    check.assert_identical(src, dst)


def test_existing_empty_sparse_target_becomes_identical(cli, check, images):
    src = images.sparse("src.img", SMALL_SIZE, SMALL_LAYOUT)
    dst = images.sparse("dst.img", SMALL_SIZE)  # truncate: all hole
    mirror_ok(cli, check, src, dst, "--no-progress")
    check.assert_identical(src, dst)


def test_target_full_of_other_data_ends_equal_with_holes_punched(cli, check, images):
    src = images.sparse("src.img", SMALL_SIZE, SMALL_LAYOUT)
    dst = images.dense("dst.img", SMALL_SIZE)
    assert check.allocated(dst) >= SMALL_SIZE
    mirror_ok(cli, check, src, dst, "--no-progress")
    check.assert_identical(src, dst)
    # The zero ranges were punched out, not written as zero data.
    slack = 64 * KiB
    assert check.allocated(dst) <= check.allocated(src) + slack, \
        (check.allocated(src), check.allocated(dst))
    assert check.data_extents(dst) == check.data_extents(src)


def test_zero_data_in_source_over_existing_target_is_zeroed(cli, check, images):
    # Source regions of written zeroes must read as zeroes in the target too.
    src = images.dense("src.img", 8 * MiB)
    with open(src, "r+b") as f:
        f.seek(2 * MiB)
        f.write(bytes(3 * MiB))
    dst = images.dense("dst.img", 8 * MiB)
    mirror_ok(cli, check, src, dst, "--no-progress")
    check.assert_identical(src, dst)


def test_symlinked_source_and_target_are_followed(cli, check, images):
    src = images.sparse("src.img", 8 * MiB, [(MiB, MiB)])
    dst = images.dense("dst.img", 8 * MiB)
    os.symlink(src, images.path("src-link"))
    os.symlink(dst, images.path("dst-link"))
    mirror_ok(cli, check, images.path("src-link"), images.path("dst-link"), "--no-progress")
    assert images.path("dst-link").is_symlink()
    check.assert_identical(src, dst)


# --------------------------------------------------------------------------
# Sparse preservation


@pytest.mark.parametrize("target", ["create", "existing-hole"])
def test_holes_in_source_stay_holes_in_target(cli, check, images, sparse_files_supported,
                                              target):
    size = 256 * MiB
    layout = random_layout(seed=1234, size=size, count=8, length=MiB, align=64 * KiB)
    src = images.sparse("src.img", size, layout)
    dst = images.path("dst.img")
    opts = ["--no-progress"]
    if target == "create":
        opts.append("--create")
    else:
        images.sparse("dst.img", size)
    mirror_ok(cli, check, src, dst, *opts)
    check.assert_identical(src, dst)
    src_data = check.data_extents(src)
    assert sum(length for _, length in src_data) == 8 * MiB  # the fixture is what we think
    assert check.data_extents(dst) == src_data
    a_src, a_dst = check.allocated(src), check.allocated(dst)
    assert abs(a_dst - a_src) <= max(a_src // 100, 64 * KiB), (a_src, a_dst)


def test_holes_at_4k_offsets_stay_holes_with_large_granularity(cli, check, images,
                                                               sparse_files_supported):
    # Chunks of 1 MiB hold both data and holes: the holes inside a copied
    # chunk must not be filled.
    size = 32 * MiB
    layout = random_layout(seed=99, size=size, count=30, length=8 * KiB, align=4 * KiB)
    src = images.sparse("src.img", size, layout)
    dst = images.path("dst.img")
    mirror_ok(cli, check, src, dst, "--create", "--granularity", "1M", "--no-progress")
    check.assert_identical(src, dst)
    assert check.data_extents(dst) == check.data_extents(src)


def test_all_hole_source_leaves_create_target_unallocated(cli, check, images,
                                                          sparse_files_supported):
    src = images.sparse("src.img", 128 * MiB)
    dst = images.path("dst.img")
    mirror_ok(cli, check, src, dst, "--create", "--no-progress")
    check.assert_identical(src, dst)
    assert check.data_extents(dst) == []
    assert check.allocated(dst) == 0


@pytest.mark.parametrize("size", [
    pytest.param(8 * MiB, id="aligned-size"),
    pytest.param(1025 * KiB, id="unaligned-size"),  # regression: EOF tail block stayed allocated
])
def test_zero_tail_over_existing_data_becomes_hole(cli, check, images, sparse_files_supported,
                                                   size):
    src = images.sparse("src.img", size, [(0, 4 * KiB)])
    dst = images.dense("dst.img", size)
    mirror_ok(cli, check, src, dst, "--no-progress")
    check.assert_identical(src, dst)
    assert check.data_extents(dst) == check.data_extents(src) == [(0, 4 * KiB)]


# --------------------------------------------------------------------------
# Sizes and options


@pytest.mark.parametrize("target", ["create", "existing-data"])
def test_unaligned_length_1025k(cli, check, images, target):
    size = 1025 * KiB
    src = images.dense("src.img", size)
    dst = images.path("dst.img")
    opts = ["--no-progress"]
    if target == "create":
        opts.append("--create")
    else:
        images.dense("dst.img", size)
    mirror_ok(cli, check, src, dst, *opts)
    assert os.path.getsize(dst) == size
    check.assert_identical(src, dst)


def test_unaligned_length_sparse_with_data_in_last_partial_block(cli, check, images):
    size = 3 * MiB + 123
    src = images.sparse("src.img", size, [(777, 5000), (3 * MiB, 123)])
    dst = images.path("dst.img")
    mirror_ok(cli, check, src, dst, "--create", "--granularity", "512", "--no-progress")
    check.assert_identical(src, dst)


@pytest.mark.parametrize("target", ["create", "existing"])
def test_zero_length_file(cli, check, images, target):
    src = images.sparse("src.img", 0)
    dst = images.path("dst.img")
    opts = ["--json"]
    if target == "create":
        opts.append("--create")
    else:
        images.sparse("dst.img", 0)
    res = mirror_ok(cli, check, src, dst, *opts)
    assert dst.is_file() and os.path.getsize(dst) == 0
    done = [e for e in check.json_events(res.stdout) if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert len(done) == 1 and "error" not in done[0]["data"], res.stdout
    assert done[0]["data"]["len"] == 0 and done[0]["data"]["offset"] == 0


def test_granularity_8k(cli, check, images):
    size = 16 * MiB
    layout = random_layout(seed=8, size=size, count=20, length=12 * KiB, align=4 * KiB)
    src = images.sparse("src.img", size, layout)
    dst = images.dense("dst.img", size)
    mirror_ok(cli, check, src, dst, "--granularity", "8K", "--no-progress")
    check.assert_identical(src, dst)


@pytest.mark.parametrize("gran", ["512", "64M"])
def test_granularity_range_limits_are_accepted(cli, check, images, gran):
    src = images.sparse("src.img", 4 * MiB + 512, [(100 * KiB, 300 * KiB), (4 * MiB, 512)])
    dst = images.dense("dst.img", 4 * MiB + 512)
    mirror_ok(cli, check, src, dst, "--granularity", gran, "--no-progress")
    check.assert_identical(src, dst)


def test_buf_size_4k_is_rounded_up_and_still_correct(cli, check, images):
    src = images.sparse("src.img", 16 * MiB, [(0, 5 * MiB), (9 * MiB + 4 * KiB, 3 * MiB)])
    dst = images.dense("dst.img", 16 * MiB)
    mirror_ok(cli, check, src, dst, "--buf-size", "4K", "--no-progress")
    check.assert_identical(src, dst)


def test_sync_none_copies_nothing_into_empty_target(cli, check, images,
                                                    sparse_files_supported):
    src = images.sparse("src.img", SMALL_SIZE, SMALL_LAYOUT)
    dst = images.sparse("dst.img", SMALL_SIZE)
    res = mirror_ok(cli, check, src, dst, "--sync", "none", "--json")
    assert check.data_extents(dst) == []
    assert check.allocated(dst) == 0
    assert check.is_all_zero(dst)
    rc, _ = check.cmp(src, dst)
    assert rc == 1  # the source's data really is absent
    done = [e for e in check.json_events(res.stdout) if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert len(done) == 1 and done[0]["data"]["len"] == 0, res.stdout


def test_sync_top_on_raw_file_copies_everything(cli, check, images):
    # A raw file has no backing chain: its top layer is the whole image.
    src = images.sparse("src.img", SMALL_SIZE, SMALL_LAYOUT)
    dst = images.dense("dst.img", SMALL_SIZE)
    mirror_ok(cli, check, src, dst, "--sync", "top", "--no-progress")
    check.assert_identical(src, dst)


@pytest.mark.parametrize("size", [8 * MiB, 1025 * KiB], ids=["aligned", "unaligned"])
def test_direct_io_mirror_is_identical(cli, check, images, size):
    src = images.sparse("src.img", size, [(0, 512 * KiB), (size - 1000, 1000)])
    dst = images.path("dst.img")
    res = cli.mirror(src, dst, "--create", "--direct", "--no-progress")
    if res.returncode == 2 and "Invalid argument" in res.stderr:
        pytest.skip(f"O_DIRECT not supported here: {res.stderr.strip()}")
    assert res.returncode == 0, check.describe(res)
    check.assert_identical(src, dst)


def test_speed_limit_is_honoured(cli, check, images):
    # 8 MiB at 4 MiB/s: about 2 s. Only a lower bound; a slow machine may take longer.
    src = images.dense("src.img", 8 * MiB)
    dst = images.path("dst.img")
    t0 = time.monotonic()
    res = mirror_ok(cli, check, src, dst, "--create", "--speed", "4M", "--json")
    elapsed = time.monotonic() - t0
    assert elapsed >= 1.5, f"8 MiB at --speed 4M took only {elapsed:.2f}s"
    check.assert_identical(src, dst)
    events = check.json_events(res.stdout)
    progress = [e["data"] for e in events if e["event"] == "PROGRESS"]
    assert progress, "a run of more than a second prints PROGRESS events"
    offsets = [p["offset"] for p in progress]
    assert offsets == sorted(offsets)
    assert all(0 <= p["offset"] <= p["len"] <= 8 * MiB for p in progress), progress
    ready = [e["data"] for e in events if e["event"] == "BLOCK_JOB_READY"]
    assert ready and ready[0]["speed"] == 4 * MiB, ready


# --------------------------------------------------------------------------
# --json


def test_json_reports_ready_then_completed_with_full_progress(cli, check, images,
                                                              sparse_files_supported):
    src = images.sparse("src.img", SMALL_SIZE, SMALL_LAYOUT)
    dst = images.path("dst.img")
    res = mirror_ok(cli, check, src, dst, "--create", "--json")
    check.assert_identical(src, dst)
    events = check.json_events(res.stdout)
    names = [e["event"] for e in events]
    assert names.count("BLOCK_JOB_READY") == 1, names
    assert names.count("BLOCK_JOB_COMPLETED") == 1, names
    assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED"), names
    assert not {"BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED"} & set(names), names

    done = events[names.index("BLOCK_JOB_COMPLETED")]["data"]
    assert "error" not in done, done
    assert done["offset"] == done["len"] == SMALL_DATA, done
    ready = events[names.index("BLOCK_JOB_READY")]["data"]
    assert ready["offset"] == ready["len"] == SMALL_DATA, ready

    statuses = [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"]
    expected = ["running", "ready", "waiting", "pending", "concluded", "null"]
    it = iter(statuses)
    assert all(s in it for s in expected), f"{expected} not in order in {statuses}"
    assert statuses[-1] == "null", statuses
    # READY comes while the job is ready, COMPLETED after pending.
    def status_at(status):
        return next(i for i, e in enumerate(events)
                    if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == status)
    assert status_at("ready") < names.index("BLOCK_JOB_READY") < status_at("waiting"), names
    assert status_at("pending") < names.index("BLOCK_JOB_COMPLETED") < status_at("concluded"), \
        names


def test_json_dense_copy_len_is_image_size(cli, check, images):
    src = images.dense("src.img", 4 * MiB + 4 * KiB)
    dst = images.path("dst.img")
    res = mirror_ok(cli, check, src, dst, "--create", "--json")
    check.assert_identical(src, dst)
    done = [e["data"] for e in check.json_events(res.stdout)
            if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert len(done) == 1
    assert done[0]["offset"] == done[0]["len"] == 4 * MiB + 4 * KiB, done
