"""`blkmirror serve` against real NBD clients that are not ours: nbdinfo,
nbdsh and the libnbd Python binding, qemu-img, qemu-io, nbdcopy and fio's
nbd engine. Results are judged on the served image file itself (read
directly, SEEK_DATA/SEEK_HOLE, st_blocks), never through our own code."""

import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time

import nbd
import pytest

from conftest import KiB, MiB
from nbd_helpers import (assert_serves, connect, file_layout, make_sparse, read_file, run_tool,
                         uri_for)

SIZE = 16 * MiB
# Data extents (4 KiB aligned, so ext4 keeps exactly these as data) with holes
# between them, the first hole at 0.
LAYOUT = [(192 * KiB, 128 * KiB), (1 * MiB, 1 * MiB), (3 * MiB + 4 * KiB, 60 * KiB),
          (8 * MiB, 2 * MiB + 512 * KiB), (15 * MiB, 1 * MiB)]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def sparse_img(tmp_path, sparse_files_supported):
    path = make_sparse(tmp_path / "disk.img", SIZE, LAYOUT, random.Random(1))
    assert file_layout(path) == LAYOUT, "test file system did not keep the layout"
    return path


@pytest.fixture
def dense_img(tmp_path):
    path = tmp_path / "dense.img"
    path.write_bytes(random.Random(2).randbytes(SIZE))
    return path


def map_data_ranges(entries, size):
    """nbdinfo --map --json entries -> merged data ranges; also checks that
    the entries tile [0, size) in order."""
    pos = 0
    data = []
    for e in entries:
        assert e["offset"] == pos, f"map not contiguous at {pos}: {entries}"
        pos += e["length"]
        if e["type"] & 1:  # NBD_STATE_HOLE
            continue
        if data and data[-1][0] + data[-1][1] == e["offset"]:
            data[-1] = (data[-1][0], data[-1][1] + e["length"])
        else:
            data.append((e["offset"], e["length"]))
    assert pos == size, f"map covers {pos} of {size} bytes"
    return data


# --------------------------------------------------------------------------
# nbdinfo


@pytest.mark.parametrize("name", ["", "disk-a"])
def test_nbdinfo_list_size_and_flags(nbd_server, sparse_img, name):
    args = ("--name", name) if name else ()
    srv = nbd_server(sparse_img, *args)
    out = run_tool(["nbdinfo", "--list", "--json", uri_for(srv.sock)], timeout=30).stdout
    info = json.loads(out)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    assert [e["export-name"] for e in info["exports"]] == [name]
    e = info["exports"][0]
    assert e["export-size"] == SIZE
    assert e["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                "can_multi_conn", "can_df"):
        assert e[cap] is True, (cap, e)
    assert "base:allocation" in e["contexts"]
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == \
        (1, 4096, 32 * MiB)

    size = run_tool(["nbdinfo", "--size", srv.uri], timeout=30).stdout.strip()
    assert int(size) == SIZE
    # An export name that is not served is refused.
    r = run_tool(["nbdinfo", "--size", uri_for(srv.sock, name + "-nope")], timeout=30, check=False)
    assert r.returncode != 0, r.stdout
    srv.stop()


def test_nbdinfo_map_matches_file_holes(nbd_server, tmp_path, sparse_files_supported):
    # Odd size, with data running up to the unaligned end of the file.
    size = 12 * MiB + 1234
    layout = [(64 * KiB, 4 * KiB), (200 * KiB, 300 * KiB), (5 * MiB, 1 * MiB),
              (12 * MiB - 8 * KiB, 8 * KiB + 1234)]
    img = make_sparse(tmp_path / "odd.img", size, layout, random.Random(3))
    expected = file_layout(img)
    assert expected == layout
    srv = nbd_server(img)

    def nbd_map():
        out = run_tool(["nbdinfo", "--map", "--json", srv.uri], timeout=30).stdout
        return map_data_ranges(json.loads(out), size)

    assert nbd_map() == expected

    # Change the layout through the export: punch a hole into data, write data
    # into a hole; the map still follows the file.
    h = connect(srv.uri)
    h.trim(100 * KiB, 300 * KiB)
    h.pwrite(random.Random(4).randbytes(64 * KiB), 8 * MiB)
    h.flush()
    h.shutdown()
    after = file_layout(img)
    assert after != expected
    assert (8 * MiB, 64 * KiB) in after
    assert nbd_map() == after
    srv.stop()


# --------------------------------------------------------------------------
# libnbd (Python binding) and nbdsh


def test_pread_pwrite_fua_flush_shutdown(nbd_server, sparse_img):
    srv = nbd_server(sparse_img)
    h = connect(srv.uri)
    assert h.get_size() == SIZE
    assert h.can_fua() and h.can_flush() and h.can_multi_conn()
    assert not h.is_read_only()
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

    original = read_file(sparse_img, 0, SIZE)
    assert h.pread(SIZE // 2, 0) == original[:SIZE // 2]
    assert h.pread(8 * MiB, SIZE - 8 * MiB) == original[SIZE - 8 * MiB:]

    rnd = random.Random(5)
    model = bytearray(original)
    for i in range(200):
        length = rnd.choice([1, 511, 4096, 4097, 65536, 200_000])
        off = rnd.randrange(0, SIZE - length)
        data = rnd.randbytes(length)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
        model[off:off + length] = data
        if i % 17 == 0:
            assert h.pread(length, off) == data
    # Last byte of the export and a write covering the whole export's tail.
    h.pwrite(b"\xee", SIZE - 1)
    model[SIZE - 1] = 0xEE
    h.flush()
    assert h.pread(SIZE // 2, SIZE // 2) == bytes(model[SIZE // 2:])
    h.shutdown()

    assert read_file(sparse_img, 0, SIZE) == bytes(model), "file differs from acknowledged writes"
    assert_serves(srv)
    srv.stop(signal.SIGINT)
    assert read_file(sparse_img, 0, SIZE) == bytes(model)


def test_two_connections_see_each_others_writes(nbd_server, sparse_img):
    srv = nbd_server(sparse_img)
    a, b = connect(srv.uri), connect(srv.uri)
    assert a.can_multi_conn()
    data = random.Random(6).randbytes(256 * KiB)
    a.pwrite(data, 5 * MiB)
    a.flush()
    assert b.pread(len(data), 5 * MiB) == data
    b.zero(4 * KiB, 5 * MiB + 4 * KiB)
    b.flush()
    assert a.pread(12 * KiB, 5 * MiB) == data[:4 * KiB] + bytes(4 * KiB) + data[8 * KiB:12 * KiB]
    a.shutdown()
    b.shutdown()
    srv.stop()


def test_trim_and_zero_variants(nbd_server, dense_img):
    srv = nbd_server(dense_img)
    h = connect(srv.uri)
    assert h.can_trim() and h.can_zero() and h.can_fast_zero()
    original = read_file(dense_img, 0, SIZE)
    allocated0 = os.stat(dense_img).st_blocks * 512
    assert allocated0 >= SIZE

    # NO_HOLE: reads as zero and the space stays allocated.
    h.zero(1 * MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert read_file(dense_img, 2 * MiB, 1 * MiB) == bytes(1 * MiB)
    assert os.stat(dense_img).st_blocks * 512 >= allocated0, "NO_HOLE zero deallocated space"

    # Plain zero (holes allowed), unaligned at both ends.
    h.zero(100_000, 4 * MiB + 777)
    # FUA on zero.
    h.zero(8 * KiB, 5 * MiB, nbd.CMD_FLAG_FUA)
    # FAST_ZERO: either done (fast) or refused with ENOTSUP leaving the data.
    fast_ok = True
    try:
        h.zero(64 * KiB, 6 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, e
        fast_ok = False
    # FAST_ZERO | NO_HOLE together.
    try:
        h.zero(64 * KiB, 6 * MiB + 128 * KiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        fast2_ok = True
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, e
        fast2_ok = False

    # Trim 1 MiB aligned: a file-backed export punches it out.
    h.trim(1 * MiB, 10 * MiB)
    # Trim with FUA, unaligned.
    h.trim(3000, 12 * MiB + 100, nbd.CMD_FLAG_FUA)
    h.flush()
    h.shutdown()

    got = read_file(dense_img, 0, SIZE)
    expect = bytearray(original)
    expect[2 * MiB:3 * MiB] = bytes(1 * MiB)
    expect[4 * MiB + 777:4 * MiB + 777 + 100_000] = bytes(100_000)
    expect[5 * MiB:5 * MiB + 8 * KiB] = bytes(8 * KiB)
    if fast_ok:
        expect[6 * MiB:6 * MiB + 64 * KiB] = bytes(64 * KiB)
    if fast2_ok:
        expect[6 * MiB + 128 * KiB:6 * MiB + 192 * KiB] = bytes(64 * KiB)
    expect[10 * MiB:11 * MiB] = bytes(1 * MiB)
    # Trimmed content is unspecified by the protocol except that untouched
    # bytes around it keep their data; our file device punches holes, so the
    # range reads zero and the middle of it is a hole.
    trimmed = got[12 * MiB + 100:12 * MiB + 3100]
    expect[12 * MiB + 100:12 * MiB + 3100] = trimmed
    assert got[:10 * MiB] == bytes(expect[:10 * MiB])
    assert got[10 * MiB:11 * MiB] == bytes(1 * MiB), "trimmed range does not read zero"
    assert got == bytes(expect), "bytes outside the zeroed/trimmed ranges changed"
    layout = file_layout(dense_img)
    assert not any(s <= 10 * MiB < s + n for s, n in layout), \
        f"trimmed 1 MiB at 10M is not a hole: {layout}"
    srv.stop()


def test_block_status_with_and_without_req_one(nbd_server, sparse_img):
    srv = nbd_server(sparse_img)
    h = connect(srv.uri)

    def status(length, offset, flags=0):
        got = []

        def cb(metacontext, off, entries, err):
            assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
            got.append((off, list(entries)))
            return 0

        h.block_status(length, offset, cb, flags)
        assert len(got) == 1, got
        assert got[0][0] == offset
        return list(zip(got[0][1][0::2], got[0][1][1::2]))

    # Whole disk: the extents are the file's holes and data, in order.
    pos = 0
    data = []
    for length, flags in status(SIZE, 0):
        assert length > 0
        assert flags in (0, nbd.STATE_HOLE | nbd.STATE_ZERO), flags
        if flags == 0:
            data.append((pos, length))
        pos += length
    assert pos <= SIZE
    # A server may stop early; ask again from where it stopped.
    while pos < SIZE:
        for length, flags in status(SIZE - pos, pos):
            if flags == 0:
                if data and data[-1][0] + data[-1][1] == pos:
                    data[-1] = (data[-1][0], data[-1][1] + length)
                else:
                    data.append((pos, length))
            pos += length
    assert data == LAYOUT

    # REQ_ONE from inside a data extent: one extent, data, not past the data.
    start, length = LAYOUT[1]
    ext = status(SIZE - start - 4096, start + 4096, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1, ext
    assert ext[0][1] == 0 and 0 < ext[0][0] <= length - 4096, ext
    # REQ_ONE from a hole: one extent, hole+zero, ending at or before the next data.
    ext = status(SIZE, 0, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1, ext
    assert ext[0][1] == nbd.STATE_HOLE | nbd.STATE_ZERO and 0 < ext[0][0] <= LAYOUT[0][0], ext
    # REQ_ONE with a short request: the extent does not exceed the request.
    ext = status(1000, 5 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert ext == [(1000, nbd.STATE_HOLE | nbd.STATE_ZERO)], ext
    h.shutdown()
    srv.stop()


def test_cache_command(nbd_server, sparse_img):
    srv = nbd_server(sparse_img)
    h = connect(srv.uri)
    assert h.can_cache()
    h.cache(SIZE, 0)
    h.cache(4096, 1 * MiB)
    h.cache(1, SIZE - 1)
    h.shutdown()
    # Beyond the end: libnbd's own checks off so the server answers.
    h = connect(srv.uri, strict=False)
    with pytest.raises(nbd.Error) as ei:
        h.cache(8192, SIZE - 4096)
    assert ei.value.errnum == errno.EINVAL
    assert h.pread(4096, 1 * MiB) == read_file(sparse_img, 1 * MiB, 4096)
    h.shutdown()
    srv.stop()


def test_structured_read_returns_hole_chunks(nbd_server, sparse_img):
    srv = nbd_server(sparse_img)
    h = connect(srv.uri)
    # 0 .. 2 MiB: hole [0,192K) data [192K,320K) hole [320K,1M) data [1M,2M)
    chunks = []

    def cb(subbuf, offset, status, error):
        chunks.append((offset, len(subbuf), status, bytes(subbuf)))
        return 0

    buf = h.pread_structured(2 * MiB, 0, cb)
    assert buf == read_file(sparse_img, 0, 2 * MiB)
    chunks.sort()
    pos = 0
    for off, n, st, data in chunks:
        assert off == pos, f"chunks overlap or leave a gap at {pos}: {chunks[:10]}"
        assert st in (nbd.READ_DATA, nbd.READ_HOLE), st
        if st == nbd.READ_HOLE:
            assert data == bytes(n)
        pos += n
    assert pos == 2 * MiB
    holes = [(off, n) for off, n, st, _ in chunks if st == nbd.READ_HOLE]
    assert holes, "no hole chunk for a read over holes"
    hole_bytes = sum(n for _, n in holes)
    # Both holes of the range arrive as hole chunks, no data for them on the wire.
    assert hole_bytes == 192 * KiB + (1 * MiB - 320 * KiB), holes
    assert (0, 192 * KiB) in holes

    # A read entirely inside a hole: hole chunks only.
    chunks.clear()
    assert h.pread_structured(64 * KiB, 5 * MiB, cb) == bytes(64 * KiB)
    assert {st for _, _, st, _ in chunks} == {nbd.READ_HOLE}

    # DF (don't fragment): one data chunk for the whole request.
    chunks.clear()
    assert h.pread_structured(2 * MiB, 0, cb, nbd.CMD_FLAG_DF) == read_file(sparse_img, 0, 2 * MiB)
    assert [(off, n) for off, n, _, _ in chunks] == [(0, 2 * MiB)], \
        [(off, n, st) for off, n, st, _ in chunks]
    h.shutdown()
    srv.stop()


def test_nbdsh_script(nbd_server, sparse_img, tool_env):
    srv = nbd_server(sparse_img)
    script = (
        "import nbd\n"
        "assert h.get_size() == %d\n"
        "h.pwrite(b'nbdsh!' * 1000, 300000, nbd.CMD_FLAG_FUA)\n"
        "h.zero(4096, 1048576, nbd.CMD_FLAG_NO_HOLE)\n"
        "h.trim(65536, 8388608)\n"
        "h.flush()\n"
        "h.cache(65536, 0)\n"
        "print('readback', h.pread(6000, 300000) == b'nbdsh!' * 1000)\n"
        "print('zero', h.pread(4096, 1048576) == bytes(4096))\n"
    ) % SIZE
    r = run_tool(["nbdsh", "-u", srv.uri, "-c", script], timeout=60, env=tool_env)
    assert "readback True" in r.stdout and "zero True" in r.stdout, r.stdout + r.stderr
    assert read_file(sparse_img, 300000, 6000) == b"nbdsh!" * 1000
    assert read_file(sparse_img, 1 * MiB, 4096) == bytes(4096)
    assert read_file(sparse_img, 8 * MiB, 64 * KiB) == bytes(64 * KiB)
    assert read_file(sparse_img, 1 * MiB + 4096, 4096) != bytes(4096)  # neighbour kept
    srv.stop()


# --------------------------------------------------------------------------
# qemu tools


def test_qemu_img_info_convert_compare(nbd_server, sparse_img, tmp_path):
    srv = nbd_server(sparse_img)
    info = json.loads(run_tool(["qemu-img", "info", "--output=json", srv.uri]).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"

    copy = tmp_path / "copy.img"
    run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, copy])
    assert read_file(copy, 0, SIZE + 1) == read_file(sparse_img, 0, SIZE + 1)
    # qemu-img keeps the holes it was told about (it always writes the first
    # 4 KiB of a raw target, to probe alignment).
    assert [e for e in file_layout(copy) if e != (0, 4096)] == LAYOUT
    for a, b in ((srv.uri, copy), (copy, srv.uri)):
        r = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])
        assert "Images are identical" in r.stdout
    # A one-byte difference is found, both ways (qemu-img names its sector).
    diff_at = 9 * MiB + 4096
    with open(copy, "r+b") as f:
        f.seek(diff_at)
        f.write(b"\x00" if read_file(sparse_img, diff_at, 1) != b"\x00" else b"\x01")
    for a, b in ((srv.uri, copy), (copy, srv.uri)):
        r = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b], check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"offset {diff_at}" in r.stdout, r.stdout

    # Convert a new image into the export (-n: the target exists).
    other = make_sparse(tmp_path / "other.img", SIZE, [(0, 1 * MiB), (7 * MiB, 3 * MiB)],
                        random.Random(7))
    run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", other, srv.uri])
    r = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", other, srv.uri])
    assert "Images are identical" in r.stdout
    srv.stop()
    assert read_file(sparse_img, 0, SIZE) == read_file(other, 0, SIZE)


def test_qemu_io_write_and_read_pattern(nbd_server, sparse_img):
    srv = nbd_server(sparse_img)
    r = run_tool(["qemu-io", "-f", "raw", srv.uri,
                  "-c", "write -P 0xab 1M 64k", "-c", "read -P 0xab 1M 64k",
                  "-c", "write -z 1536k 8k", "-c", "read -P 0 1536k 8k",
                  "-c", "aio_write -P 0x5c 4M 128k", "-c", "aio_flush",
                  "-c", "read -P 0x5c 4M 128k"])
    assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout
    assert "wrote 65536/65536 bytes at offset 1048576" in r.stdout
    assert "read 65536/65536 bytes at offset 1048576" in r.stdout
    # A wrong expected pattern is caught, so the read really compared.
    r = run_tool(["qemu-io", "-f", "raw", srv.uri, "-c", "read -P 0xac 1M 64k"], check=False)
    assert "Pattern verification failed" in r.stdout + r.stderr, r.stdout
    srv.stop()
    assert read_file(sparse_img, 1 * MiB, 64 * KiB) == b"\xab" * (64 * KiB)
    assert read_file(sparse_img, 1536 * KiB, 8 * KiB) == bytes(8 * KiB)
    assert read_file(sparse_img, 4 * MiB, 128 * KiB) == b"\x5c" * (128 * KiB)
    assert read_file(sparse_img, 1 * MiB + 64 * KiB, 4096) not in (bytes(4096), b"\xab" * 4096)


def test_nbdcopy_from_and_to_export(nbd_server, sparse_img, tmp_path):
    srv = nbd_server(sparse_img)
    out = tmp_path / "out.img"
    run_tool(["nbdcopy", srv.uri, out])
    r = subprocess.run(["cmp", sparse_img, out], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    newdata = tmp_path / "new.img"
    newdata.write_bytes(random.Random(8).randbytes(SIZE))
    run_tool(["nbdcopy", "--flush", "--connections=2", newdata, srv.uri])
    srv.stop()
    r = subprocess.run(["cmp", newdata, sparse_img], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fio_randwrite_then_verify(nbd_server, tmp_path):
    img = tmp_path / "fio.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    srv = nbd_server(img)
    common = ["fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={srv.uri}",
              "--bs=4k", "--iodepth=16", f"--size={SIZE}", "--verify=crc32c",
              "--randseed=4242", "--output-format=json", "--verify_state_save=0"]
    w = run_tool(common + ["--rw=randwrite", "--do_verify=1"], timeout=120, cwd=tmp_path)
    job = json.loads(w.stdout[w.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == SIZE
    assert job["read"]["io_bytes"] == SIZE  # the do_verify pass read it all back
    # A second, verify-only pass over the same workload.
    v = run_tool(common + ["--rw=randwrite", "--verify_only"], timeout=120, cwd=tmp_path)
    job = json.loads(v.stdout[v.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] == SIZE
    assert "verify" not in v.stderr.lower(), v.stderr
    # The file is full of fio's blocks: no hole, no zero block left.
    srv.stop()
    data = read_file(img, 0, SIZE)
    assert all(data[i:i + 4096] != bytes(4096) for i in range(0, SIZE, 4096))


def test_fio_verify_detects_corruption(nbd_server, tmp_path):
    """Sanity check for the fio verify used above and in the switch-over
    tests: a block changed behind fio's back makes the verify pass fail."""
    img = tmp_path / "fio.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    srv = nbd_server(img)
    common = ["fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={srv.uri}",
              "--bs=4k", "--iodepth=4", "--size=4M", "--verify=crc32c", "--randseed=7",
              "--verify_state_save=0"]
    run_tool(common + ["--rw=randwrite", "--do_verify=0"], timeout=60, cwd=tmp_path)
    h = connect(srv.uri)
    h.pwrite(b"\x55" * 4096, 2 * MiB)
    h.shutdown()
    r = run_tool(common + ["--rw=randwrite", "--verify_only"], timeout=60, check=False,
                 cwd=tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "verify" in (r.stdout + r.stderr).lower()
    srv.stop()


# --------------------------------------------------------------------------
# Read-only export, TCP


def test_read_only_export_refuses_writes(nbd_server, sparse_img, tool_env):
    before = digest(sparse_img)
    srv = nbd_server(sparse_img, "--read-only")
    info = json.loads(run_tool(["nbdinfo", "--json", srv.uri]).stdout)
    assert info["exports"][0]["is_read_only"] is True

    h = connect(srv.uri, strict=False)  # send the writes; let the server refuse
    assert h.is_read_only()
    assert h.pread(128 * KiB, 192 * KiB) == read_file(sparse_img, 192 * KiB, 128 * KiB)
    for name, op in [("pwrite", lambda: h.pwrite(b"x" * 4096, 1 * MiB)),
                     ("pwrite FUA", lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_FUA)),
                     ("trim", lambda: h.trim(1 * MiB, 1 * MiB)),
                     ("zero", lambda: h.zero(4096, 1 * MiB)),
                     ("zero NO_HOLE", lambda: h.zero(4096, 1 * MiB, nbd.CMD_FLAG_NO_HOLE))]:
        with pytest.raises(nbd.Error) as ei:
            op()
        assert ei.value.errnum == errno.EPERM, (name, ei.value)
    # The connection is still good after the refusals.
    h.flush()
    assert h.pread(4096, 1 * MiB) == read_file(sparse_img, 1 * MiB, 4096)
    h.shutdown()

    r = run_tool(["qemu-io", "-f", "raw", srv.uri, "-c", "write -P 0xab 1M 64k"], check=False)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert "wrote 65536" not in r.stdout
    srv.stop()
    assert digest(sparse_img) == before


def test_tcp_listen_serves_same_image(blkmirror_bin, sparse_img, tmp_path):
    err = open(tmp_path / "tcp.stderr", "w+")
    p = subprocess.Popen([blkmirror_bin, "serve", str(sparse_img), "--listen", "127.0.0.1:0"],
                         stdin=subprocess.DEVNULL, stdout=err, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 15
        m = None
        while m is None and time.monotonic() < deadline and p.poll() is None:
            m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", (tmp_path / "tcp.stderr").read_text())
            time.sleep(0.02)
        assert m, (tmp_path / "tcp.stderr").read_text()
        port = int(m.group(1))
        assert port != 0
        size = run_tool(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/"], timeout=30).stdout
        assert int(size) == SIZE
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/")
        assert h.pread(128 * KiB, 192 * KiB) == read_file(sparse_img, 192 * KiB, 128 * KiB)
        h.shutdown()
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        err.close()
