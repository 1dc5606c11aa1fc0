"""Copy offload: when source and target are regular files on one file system,
the mirror lets the kernel copy the data extents (copy_file_range). On XFS with
reflink the target then shares the source's extents; everywhere the result must
be the same bytes, with the source's holes kept.

The XFS tests make a small XFS (reflink=1) in a file, loop-mount it, and skip
when that is impossible here (not root, no mkfs.xfs, no loop device)."""
import os
import random
import shutil
import subprocess

import pytest

MiB = 1 << 20


def write_layout(path, size, extents, seed):
    """A sparse file of `size` bytes with random data at [(offset, length)]."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            f.seek(off)
            f.write(rnd.randbytes(length))


# Data in whole 64 KiB chunks (the default granularity): every data chunk goes to the
# kernel. A chunk holding data and holes is copied through a buffer instead, so its
# holes stay holes (test_mirror_cli.py's hole tests); UNALIGNED has one.
LAYOUT = [(0, 3 * MiB), (8 * MiB, 1 * MiB + 64 * 1024), (20 * MiB, 5 * MiB), (63 * MiB, MiB)]
UNALIGNED = [(0, 3 * MiB), (8 * MiB, 1 * MiB + 4096), (20 * MiB, 5 * MiB)]
SIZE = 64 * MiB


def allocated(path):
    return os.stat(path).st_blocks * 512


def fiemap_flags(path):
    """Flags of every extent `xfs_io -c 'fiemap -v'` reports, as ints."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap -v", str(path)], capture_output=True,
                         text=True, check=True).stdout
    flags = []
    for line in out.splitlines():
        cols = line.split()
        # "  0: [0..6143]:  1234..7377  6144  0x2000" ; holes have no flags column
        if len(cols) >= 5 and cols[0].rstrip(":").isdigit() and cols[-1].startswith("0x"):
            flags.append(int(cols[-1], 16))
    return flags


SHARED = 0x2000  # FIEMAP_EXTENT_SHARED


@pytest.fixture
def xfs_dir(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a loop XFS needs root")
    if not shutil.which("mkfs.xfs") or not shutil.which("xfs_io"):
        pytest.skip("xfsprogs not installed")
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    r = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {r.stderr.strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount XFS here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_xfs_target_shares_source_extents_and_keeps_holes(cli, xfs_dir):
    src, dst = xfs_dir / "src.img", xfs_dir / "dst.img"
    write_layout(src, SIZE, LAYOUT, 1)
    r = cli.mirror(src, dst, "--create", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "copy offload" in r.stderr, r.stderr
    assert src.read_bytes() == dst.read_bytes()
    flags = fiemap_flags(dst)
    assert flags and all(f & SHARED for f in flags), flags
    # Holes stay holes: nothing allocated beyond what the source has.
    assert allocated(dst) <= allocated(src), (allocated(dst), allocated(src))


def test_xfs_no_copy_offload_writes_its_own_extents(cli, xfs_dir):
    src, dst = xfs_dir / "src.img", xfs_dir / "dst.img"
    write_layout(src, SIZE, LAYOUT, 2)
    r = cli.mirror(src, dst, "--create", "--no-progress", "--no-copy-offload")
    assert r.returncode == 0, r.stderr
    assert "copy offload" not in r.stderr, r.stderr
    assert src.read_bytes() == dst.read_bytes()
    flags = fiemap_flags(dst)
    assert flags and not any(f & SHARED for f in flags), flags


def test_xfs_chunk_with_data_and_holes_keeps_its_holes(cli, xfs_dir):
    """The 4 KiB past 9 MiB shares a 64 KiB chunk with a hole: that chunk is
    read and written (not shared), the rest shared, and nothing is filled."""
    src, dst = xfs_dir / "src.img", xfs_dir / "dst.img"
    write_layout(src, SIZE, UNALIGNED, 6)
    r = cli.mirror(src, dst, "--create", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == dst.read_bytes()
    assert allocated(dst) <= allocated(src), (allocated(dst), allocated(src))
    flags = fiemap_flags(dst)
    assert sum(1 for f in flags if f & SHARED) >= 3, flags


def test_xfs_offload_over_existing_target_data(cli, xfs_dir):
    """A target full of other data ends equal: the offload overwrites data
    extents, the copy loop zeroes or punches the rest."""
    src, dst = xfs_dir / "src.img", xfs_dir / "dst.img"
    write_layout(src, SIZE, LAYOUT, 3)
    write_layout(dst, SIZE, [(0, SIZE)], 4)
    r = cli.mirror(src, dst, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == dst.read_bytes()


def test_same_fs_without_reflink_is_exact(cli, tmp_path):
    """Wherever tmp_path is: on tmpfs the kernel copies (copy_file_range, or it
    refuses and the job reads and writes); on ext4 and the like the job reads
    and writes around the page cache. Same bytes either way."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, SIZE, LAYOUT, 5)
    r = cli.mirror(src, dst, "--create", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == dst.read_bytes()
