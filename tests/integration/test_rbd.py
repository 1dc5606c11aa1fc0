"""Ceph RBD images as mirror sources and targets, on a real one-OSD cluster (the
session fixture `ceph`, ceph_helpers.py). Judges: `rbd export` + cmp, and
`qemu-img compare` through QEMU's own rbd driver (qemu-block-extra)."""

import subprocess

import pytest

from conftest import KiB, MiB

SIZE = 32 * MiB
LAYOUT = [(0, MiB), (5 * MiB + 64 * KiB, MiB), (17 * MiB, 2 * MiB), (31 * MiB, MiB)]


def mirror_ok(cli, check, src, dst, *opts):
    res = cli.mirror(src, dst, "--no-progress", *opts)
    assert res.returncode == 0, check.describe(res)
    return res


def qemu_compare(a, b):
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def assert_rbd_equals(ceph, check, name, path, workdir):
    out = ceph.export(name, workdir / "export.img")
    check.cmp(path, out)
    qemu_compare(path, ceph.spec(name))


# --------------------------------------------------------------------------
# Copies


def test_file_to_existing_rbd_image(ceph, cli, check, images, workdir):
    src = images.sparse("src.img", SIZE, LAYOUT)
    name = ceph.create(SIZE)
    mirror_ok(cli, check, src, ceph.spec(name))
    assert_rbd_equals(ceph, check, name, src, workdir)


def test_file_to_created_rbd_image(ceph, cli, check, images, workdir):
    src = images.sparse("src.img", SIZE, LAYOUT)
    name = ceph.image()
    mirror_ok(cli, check, src, ceph.spec(name), "--create")
    assert ceph.info(name)["size"] == SIZE
    assert_rbd_equals(ceph, check, name, src, workdir)
    # Only the source's data was written: holes stay unallocated objects.
    assert ceph.du(name) <= 4 * 4 * MiB + 4 * MiB


def test_create_refuses_an_existing_image(ceph, cli, images):
    src = images.dense("src.img", 4 * MiB)
    name = ceph.create(4 * MiB)
    res = cli.mirror(src, ceph.spec(name), "--create", "--no-progress")
    assert res.returncode != 0
    assert "exists" in res.stderr and "drop --create" in res.stderr


def test_rbd_to_file(ceph, cli, check, images, workdir):
    seed = images.sparse("seed.img", SIZE, LAYOUT)
    name = ceph.create(SIZE)
    ceph.rbd("import", "--no-progress", seed, name + "-x")
    dst = images.path("dst.img")
    mirror_ok(cli, check, ceph.spec(name + "-x"), dst, "--create")
    check.cmp(seed, dst)
    # The target keeps the source's holes (block status from the object map).
    assert check.allocated(dst) <= sum(length for _, length in LAYOUT) + 8 * MiB


def test_qcow2_to_rbd(ceph, cli, check, images, workdir):
    raw = images.sparse("raw.img", SIZE, LAYOUT)
    qcow = images.path("src.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True, timeout=60)
    name = ceph.create(SIZE)
    mirror_ok(cli, check, qcow, ceph.spec(name), "--src-format", "qcow2")
    assert_rbd_equals(ceph, check, name, raw, workdir)


def test_snapshot_source_is_read_only_and_frozen(ceph, cli, check, images, workdir):
    seed = images.sparse("seed.img", 8 * MiB, [(0, MiB)])
    name = ceph.image()
    ceph.rbd("import", "--no-progress", seed, name)
    ceph.rbd("snap", "create", name + "@s1")
    other = images.dense("other.img", 8 * MiB)
    mirror_ok(cli, check, other, ceph.spec(name))  # the image moves on, the snapshot not
    dst = images.path("dst.img")
    mirror_ok(cli, check, ceph.spec(name + "@s1"), dst, "--create")
    check.cmp(seed, dst)
    res = cli.mirror(other, ceph.spec(name + "@s1"), "--no-progress")
    assert res.returncode != 0


# --------------------------------------------------------------------------
# Bad input: one line, nothing written


@pytest.mark.parametrize("mangle, needle", [
    (lambda c, n: f"rbd:nopool/{n.split('/')[1]}:conf={c.conf}", "pool 'nopool' does not exist"),
    (lambda c, n: f"rbd:rbd/missing-image:conf={c.conf}", "image 'missing-image' does not exist"),
    (lambda c, n: f"rbd:{n}:conf=/nonexistent/ceph.conf", "cannot read Ceph config"),
    # No monitor there (the test cluster has no auth: a wrong keyring is not an error on it).
    (lambda c, n: f"rbd:{n}:conf={c.conf}:mon_host=v2\\:127.0.0.1\\:1:client_mount_timeout=3",
     "cannot connect to the Ceph cluster"),
    (lambda c, n: "rbd:just-a-pool", "expected rbd:POOL/"),
    (lambda c, n: f"rbd:{n}:conf", "not KEY=VALUE"),
])
def test_bad_rbd_target_is_one_clear_line(ceph, cli, images, mangle, needle):
    src = images.dense("src.img", 4 * MiB)
    name = ceph.create(4 * MiB)
    before = ceph.du(name)
    res = cli.mirror(src, mangle(ceph, name), "--no-progress", timeout=90)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0], res.stderr
    assert ceph.du(name) == before


def test_second_writer_is_refused_by_the_exclusive_lock(ceph, cli, images, workdir):
    name = ceph.create(8 * MiB)
    sock = workdir / "serve.sock"
    served = cli.start("serve", ceph.spec(name), "--socket", sock)
    served.wait_for_line("serving", 60)
    src = images.dense("src.img", 8 * MiB)
    before = ceph.du(name)
    res = cli.mirror(src, ceph.spec(name), "--no-progress")
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "exclusive lock" in lines[0], res.stderr
    assert ceph.du(name) == before
