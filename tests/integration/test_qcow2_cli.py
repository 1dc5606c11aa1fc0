"""The CLI with qcow2 images: --format / --src-format, detection by magic (and
the one line saying so), a raw file that begins with qcow2's magic served as
raw when told, `mirror --create --format qcow2 [--backing]`, qcow2 -> raw, and
bad images refused with one line, exit code 2 and nothing written."""

import json

import pytest

from nbd_helpers import nbd_server  # noqa: F401
from qcow2_helpers import BAD, KiB, MiB, check_image, compare_with_export, create, qemu_img, qemu_io, sha

SIZE = 4 * MiB


def test_raw_file_with_qcow2_magic_stays_raw(tmp_path, nbd_server):
    # A guest disk whose first bytes happen to be a qcow2 header (say, the
    # guest stores an image on a raw partition) must be served as those bytes.
    q = create(tmp_path / "inner.qcow2", SIZE)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(q.read_bytes() + bytes(SIZE - q.stat().st_size))
    srv = nbd_server(raw, "--format", "raw", "--read-only")
    compare_with_export(raw, srv.uri, image_fmt="raw")
    assert "detected" not in srv.stop()


def test_serve_detects_and_says_so(tmp_path, nbd_server, images):
    q = create(tmp_path / "a.qcow2", SIZE)
    qemu_io(q, "write -P 0x42 1M 64k")
    srv = nbd_server(q, "--read-only")
    compare_with_export(q, srv.uri)
    log = srv.stop()
    assert [l for l in log.splitlines() if "detected format qcow2" in l], log
    r = images.sparse("b.raw", SIZE, [(0, 64 * KiB)])
    srv = nbd_server(r, "--read-only")
    assert "detected" not in srv.stop()  # raw, as always: nothing to say


def test_mirror_raw_to_new_qcow2_and_back(cli, check, images, workdir):
    src = images.sparse("src.raw", SIZE, [(0, 300 * KiB), (1 * MiB, 1 * MiB), (SIZE - 4096, 4096)])
    res = cli.mirror(src, "dst.qcow2", "--create", "--format", "qcow2", "--no-progress")
    assert res.returncode == 0, check.describe(res)
    dst = workdir / "dst.qcow2"
    check_image(dst)
    info = json.loads(qemu_img("info", "--output=json", str(dst)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE
    r = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(dst), check=False)
    assert r.returncode == 0, r.stdout
    res = cli.mirror(dst, "back.raw", "--create", "--no-progress")
    assert res.returncode == 0, check.describe(res)
    assert "SRC" in res.stderr and "detected format qcow2" in res.stderr
    check.assert_identical(src, workdir / "back.raw")
    check_image(dst)


def test_mirror_create_qcow2_with_backing(cli, check, workdir):
    base = create(workdir / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 4M")
    top = create(workdir / "top.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x22 1M 64k")
    res = cli.mirror(top, "copy.qcow2", "--create", "--format", "qcow2", "--backing", "base.qcow2",
                     "--no-progress")
    assert res.returncode == 0, check.describe(res)
    info = json.loads(qemu_img("info", "--output=json", str(workdir / "copy.qcow2")).stdout)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    check_image(workdir / "copy.qcow2")
    r = qemu_img("compare", str(top), str(workdir / "copy.qcow2"), check=False)
    assert r.returncode == 0, r.stdout


def test_backing_needs_create_qcow2(cli, images, workdir):
    src = images.sparse("s.raw", SIZE)
    res = cli.mirror(src, "d.raw", "--create", "--backing", "x.qcow2")
    assert res.returncode == 2 and "--backing" in res.stderr
    assert not (workdir / "d.raw").exists()


def test_unknown_format_is_one_line(cli, images):
    src = images.sparse("s.raw", SIZE)
    res = cli.mirror(src, "d.raw", "--create", "--format", "vmdk")
    assert res.returncode == 2 and "unknown image format 'vmdk'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_images_refused_by_the_cli(cli, images, workdir, make):
    p, words = make(workdir)
    dst = images.sparse("dst.raw", SIZE)
    files = {f: sha(f) for f in workdir.iterdir() if f.is_file()}
    res = cli.mirror(p, dst, "--src-format", "qcow2", "--no-progress")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words.lower() in lines[0].lower(), res.stderr
    for f, s in files.items():
        assert sha(f) == s, f"{f.name} was written"
