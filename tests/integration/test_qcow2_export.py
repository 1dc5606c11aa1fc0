"""qcow2 images and backing chains served by `blkmirror serve`, judged by QEMU's
tools: images made by qemu-img and written by qemu-io read through our export
exactly as qemu-img reads them (qemu-img compare); chains base <- mid <- top read
through top, with the qemu:allocation-depth map qemu-nbd shows; writes to top
leave base and mid byte-identical; a randomized differential test of our
writes against a raw model; kill -9 while a client writes and flushes."""

import os
import random
import shutil
import signal
import subprocess
import threading
import time

import nbd
import pytest

from nbd_helpers import nbd_server, run_tool  # noqa: F401
from qcow2_helpers import (KiB, MiB, QemuNbd, check_image, compare_with_export, create,
                           depth_map, qemu_img, qemu_io, sha)

SIZE = 8 * MiB


def writes_for(cs, extended_l2, version):
    """qemu-io commands touching every kind of cluster the format has."""
    # Compressed writes need an unallocated cluster: nothing else touches
    # [6M, 6M + cs) before the write -c.
    cmds = [f"write -P 0x11 0 {min(3 * cs, 2 * MiB) + 1000}",
            "write -P 0x22 1M 4k",
            f"write -P 0x44 4M {max(512 * KiB, min(2 * cs, 2 * MiB))}",
            f"discard 4M {max(256 * KiB, cs)}",
            f"write -c -P 0x55 6M {cs}",
            f"write -P 0x66 {SIZE - 5000} 5000"]
    cmds += ["write -z 2M 128k", "write -P 0x33 3M 256k", "write -z -u 3M 64k"]
    if extended_l2:
        cmds += [f"write -P 0x77 {7 * MiB + cs // 32} {cs // 32}"]  # one subcluster
    return cmds


IMAGES = [  # version, cluster size, refcount bits, extended L2
    (2, 64 * KiB, 16, False),
    (3, 512, 16, False),
    (3, 4 * KiB, 1, False),
    (3, 64 * KiB, 16, False),
    (3, 2 * MiB, 16, False),
    (3, 64 * KiB, 1, True),
    (3, 2 * MiB, 16, True),
]


@pytest.mark.parametrize("version,cs,rb,l2", IMAGES,
                         ids=[f"v{v}-c{c}-r{r}{'-xl2' if x else ''}" for v, c, r, x in IMAGES])
def test_qemu_written_images_read_as_qemu_reads_them(tmp_path, nbd_server, version, cs, rb, l2):
    img = create(tmp_path / "img.qcow2", SIZE, compat="0.10" if version == 2 else "1.1",
                 cluster_size=cs, refcount_bits=rb, **({"extended_l2": "on"} if l2 else {}))
    qemu_io(img, *writes_for(cs, l2, version))
    before = sha(img)
    srv = nbd_server(img, "--format", "qcow2", "--read-only")
    compare_with_export(img, srv.uri)
    srv.stop()
    assert sha(img) == before, "a read-only export changed the image"


def test_compressed_image_from_convert(tmp_path, nbd_server, images):
    raw = images.sparse("src.raw", SIZE, [(0, 1 * MiB), (3 * MiB, 64 * KiB), (5 * MiB + 4096, 300 * KiB)])
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    srv = nbd_server(img, "--read-only")  # detected by magic
    compare_with_export(img, srv.uri)
    assert "detected format qcow2" in srv.stop()


def make_chain(d, base_fmt):
    """base (raw or qcow2) <- mid <- top, each written at different places;
    relative backing names, as qemu-img writes them."""
    base = d / f"base.{base_fmt}"
    if base_fmt == "raw":
        qemu_img("create", "-q", "-f", "raw", str(base), str(SIZE))
    else:
        create(base, SIZE)
    qemu_io(base, "write -P 0xb1 0 2M", "write -P 0xb2 5M 1M", fmt=base_fmt)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        create("mid.qcow2", SIZE, backing=base.name, backing_fmt=base_fmt)
        create("top.qcow2", SIZE, backing="mid.qcow2", backing_fmt="qcow2", cluster_size=4096)
    finally:
        os.chdir(cwd)
    mid, top = d / "mid.qcow2", d / "top.qcow2"
    qemu_io(mid, "write -P 0xc1 1M 1536k", "write -z 5M 64k", "write -P 0xc2 7M 100k")
    qemu_io(top, "write -P 0xd1 1536k 8k", "write -P 0xd2 6M 12k", "write -z -u 7M 4k",
            "discard 0 4k")
    return base, mid, top


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_chain_reads_and_depths_as_qemu(tmp_path, nbd_server, base_fmt):
    base, mid, top = make_chain(tmp_path, base_fmt)
    srv = nbd_server(top, "--read-only")
    compare_with_export(top, srv.uri)
    ref = QemuNbd(top, tmp_path / "qemu.sock")
    try:
        assert depth_map(srv.uri) == depth_map(ref.uri)
    finally:
        ref.stop()
    srv.stop()


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_writes_to_top_leave_backing_files_alone(tmp_path, nbd_server, base_fmt):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    base, mid, top = make_chain(a, base_fmt)
    for p in (base, mid, top):
        shutil.copy2(p, b / p.name)
    sums = {p: sha(p) for p in (base, mid)}
    cmds = ["write -P 0xe1 4092 9000", "write -z 1M 64k", "write -P 0xe2 5M 3k",
            "discard 6M 64k", "write -P 0xe3 8388000 608", "write -z -u 0 1M"]
    srv = nbd_server(top)
    run_tool(["qemu-io", "-f", "raw", srv.uri, *sum((["-c", c] for c in cmds), [])])
    srv.stop()
    for p, s in sums.items():
        assert sha(p) == s, f"{p.name} changed"
    qemu_io(b / "top.qcow2", *cmds)  # the same writes by qemu-io, directly
    check_image(top)
    r = qemu_img("compare", str(top), str(b / "top.qcow2"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------
# Randomized differential test: our qcow2 writes against a raw model.



class Unknown:
    """Byte ranges whose contents a discard left unspecified."""

    def __init__(self):
        self.ranges = []

    def add(self, a, b):
        self.ranges.append((a, b))

    def clear(self, a, b):
        out = []
        for x, y in self.ranges:
            if y <= a or x >= b:
                out.append((x, y))
            else:
                if x < a:
                    out.append((x, a))
                if y > b:
                    out.append((b, y))
        self.ranges = out

    def mask(self, actual, model):
        got = bytearray(actual)
        for x, y in self.ranges:
            got[x:y] = model[x:y]
        return bytes(got)


def random_ops(rnd, size, n):
    """A batch of byte-disjoint requests, packed so several share clusters."""
    ops = []
    taken = []
    while len(ops) < n:
        length = rnd.choice([1, 511, 512, 4096, 5000, 65536, 70000, 200000])
        align = rnd.choice([1, 512, 4096, 65536])
        off = rnd.randrange(0, size - length) // align * align
        if any(off < b and a < off + length for a, b in taken):
            continue
        taken.append((off, off + length))
        kind = rnd.choices(["write", "zero", "zero-unmap", "trim", "flush"], [6, 2, 2, 1, 1])[0]
        ops.append((kind, off, length))
    return ops


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_differential_against_raw_model(tmp_path, nbd_server, seed):
    rnd = random.Random(seed)
    size = 4 * MiB
    cs = rnd.choice([4096, 65536])
    img = create(tmp_path / "d.qcow2", size, cluster_size=cs)
    model = bytearray(size)
    unknown = Unknown()
    srv = nbd_server(img, "--format", "qcow2")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    for batch in range(12):
        ops = random_ops(rnd, size, 16)
        cookies = []
        for kind, off, length in ops:
            if kind == "write":
                data = rnd.randbytes(length)
                model[off:off + length] = data
                unknown.clear(off, off + length)
                cookies.append(h.aio_pwrite(data, off, flags=nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0))
            elif kind in ("zero", "zero-unmap"):
                model[off:off + length] = bytes(length)
                unknown.clear(off, off + length)
                cookies.append(h.aio_zero(length, off, flags=0 if kind == "zero-unmap" else nbd.CMD_FLAG_NO_HOLE))
            elif kind == "trim":
                unknown.add(off, off + length)
                cookies.append(h.aio_trim(length, off))
            else:
                cookies.append(h.aio_flush())
        # aio_command_completed retires a cookie: asked again it says False,
        # so wait for nothing in flight, then ask each once (raises on error).
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        got = b"".join(h.pread(min(1 * MiB, size - o), o) for o in range(0, size, 1 * MiB))
        assert unknown.mask(got, model) == bytes(model), f"seed {seed} batch {batch}: contents differ"
    h.flush()
    h.shutdown()
    srv.stop()
    check_image(img)
    got = subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={img}",
                          f"of={tmp_path / 'out.raw'}", "bs=1M"], capture_output=True)
    assert got.returncode == 0, got.stderr
    assert unknown.mask((tmp_path / "out.raw").read_bytes(), model) == bytes(model)


# --------------------------------------------------------------------------
# Crash safety: kill -9 while a client writes and flushes.


def writer(uri, size, rnd, flushed, since, stop):
    """Writes 4 KiB..128 KiB blocks, flushing every few. After each completed
    flush, moves the writes acknowledged before it to `flushed`; `since` holds
    the writes sent after the last completed flush (their bytes may or may not
    have reached the disk)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        while not stop.is_set():
            for _ in range(rnd.randrange(1, 6)):
                length = rnd.choice([4096, 8192, 65536, 131072, 3000])
                off = rnd.randrange(0, size - length) // 512 * 512
                data = rnd.randbytes(length)
                since.append((off, data))
                h.pwrite(data, off)
            h.flush()
            flushed.extend(since)
            since.clear()
    except nbd.Error:
        pass  # the server died under us: the point of the test


@pytest.mark.parametrize("with_backing", [False, True])
def test_kill9_keeps_flushed_writes_and_a_consistent_image(tmp_path, blkmirror_bin, with_backing):
    size = 8 * MiB
    rnd = random.Random(7 + with_backing)
    kills = 6
    for k in range(kills):
        d = tmp_path / f"k{k}"
        d.mkdir()
        if with_backing:
            create(d / "base.qcow2", size)
            qemu_io(d / "base.qcow2", "write -P 0x5a 0 8M")
            create(d / "img.qcow2", size, backing="base.qcow2", backing_fmt="qcow2")
        else:
            create(d / "img.qcow2", size, cluster_size=rnd.choice([4096, 65536]))
        sock = d / "s.sock"
        proc = subprocess.Popen([blkmirror_bin, "serve", str(d / "img.qcow2"), "--socket", str(sock)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.02)
        time.sleep(0.1)
        flushed, since, stop = [], [], threading.Event()
        t = threading.Thread(target=writer, args=(f"nbd+unix:///?socket={sock}", size, random.Random(k),
                                                  flushed, since, stop))
        t.start()
        time.sleep(0.2 + rnd.random() * 1.5)  # a different kill point each round
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        t.join(30)
        check_image(d / "img.qcow2", leaks_ok=True)
        out = d / "out.raw"
        qemu_img("convert", "-O", "raw", str(d / "img.qcow2"), str(out))
        disk = bytearray(out.read_bytes())
        # Replay the flushed writes in order into a model of what must be there;
        # bytes a later, unflushed write touched may hold either version.
        model, known = bytearray(size), bytearray(size)
        for off, data in flushed:
            model[off:off + len(data)] = data
            known[off:off + len(data)] = b"\x01" * len(data)
        for off, data in since:
            known[off:off + len(data)] = bytes(len(data))
        assert flushed, f"round {k}: no flush completed before the kill (too early)"
        for i in range(0, size, 4096):
            if any(known[i:i + 4096]):
                sel = [j for j in range(i, i + 4096) if known[j]] if not all(known[i:i + 4096]) else None
                if sel is None:
                    assert disk[i:i + 4096] == model[i:i + 4096], f"round {k}: flushed data at {i} lost"
                else:
                    assert all(disk[j] == model[j] for j in sel), f"round {k}: flushed data near {i} lost"
