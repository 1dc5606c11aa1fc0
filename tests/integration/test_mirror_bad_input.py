"""Bad input to `blkmirror mirror`: exit code 2, one "blkmirror: " line on
stderr that names the file or parameter, the source untouched and the
target neither created nor modified."""

import os

import pytest

from conftest import KiB, MiB
SIZE = 4 * MiB


@pytest.fixture
def scene(images, check):
    """A source with data and holes, and a same-size target full of other data
    (a run that wrongly went ahead would change it)."""

    class Scene:
        src = images.sparse("src.img", SIZE, [(0, MiB), (2 * MiB + 64 * KiB, 512 * KiB)])
        dst = images.dense("dst.img", SIZE)
        missing = images.path("missing.img")

        def __init__(self):
            self.watched = {}

        def watch(self, *paths):
            for p in paths:
                self.watched[str(p)] = check.snapshot(p)

        def assert_unchanged(self):
            for p, before in self.watched.items():
                assert check.snapshot(p) == before, f"{p} changed"

    s = Scene()
    s.watch(s.src, s.dst, s.missing)
    return s


def assert_bad_input(res, check, *needles):
    assert res.returncode == 2, check.describe(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("blkmirror: "), lines
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    assert res.stdout == "", res.stdout
    return lines[0]


# --------------------------------------------------------------------------
# Files


def test_missing_source(cli, check, scene):
    res = cli.mirror(scene.missing, scene.dst)
    assert_bad_input(res, check, scene.missing, "No such file or directory")
    scene.assert_unchanged()


def test_missing_source_with_create_does_not_create_target(cli, check, scene, images):
    dst = images.path("new.img")
    scene.watch(dst)
    res = cli.mirror(scene.missing, dst, "--create")
    assert_bad_input(res, check, scene.missing, "No such file or directory")
    assert not os.path.lexists(dst)
    scene.assert_unchanged()


def test_missing_target_without_create(cli, check, scene):
    res = cli.mirror(scene.src, scene.missing)
    assert_bad_input(res, check, scene.missing, "No such file or directory")
    assert not os.path.lexists(scene.missing)
    scene.assert_unchanged()


def test_create_when_target_exists(cli, check, scene):
    res = cli.mirror(scene.src, scene.dst, "--create")
    assert_bad_input(res, check, scene.dst, "exists")
    scene.assert_unchanged()


def test_create_when_target_is_dangling_symlink(cli, check, scene, images):
    link = images.path("dangling")
    os.symlink(images.path("nowhere.img"), link)
    scene.watch(link, images.path("nowhere.img"))
    res = cli.mirror(scene.src, link, "--create")
    assert_bad_input(res, check, link)
    scene.assert_unchanged()


def test_create_in_missing_directory(cli, check, scene, images):
    dst = images.path("no-such-dir") / "dst.img"
    res = cli.mirror(scene.src, dst, "--create")
    assert_bad_input(res, check, dst, "No such file or directory")
    assert not os.path.lexists(dst.parent)
    scene.assert_unchanged()


@pytest.mark.parametrize("how", ["same-path", "hard-link", "symlink-as-target",
                                 "symlink-as-source", "relative-path"])
def test_source_and_target_are_the_same_file(cli, check, scene, images, how):
    src = scene.src
    if how == "same-path":
        dst = src
    elif how == "hard-link":
        dst = images.path("hardlink.img")
        os.link(src, dst)
    elif how == "symlink-as-target":
        dst = images.path("symlink.img")
        os.symlink(src, dst)
    elif how == "symlink-as-source":
        dst = src
        src = images.path("symlink.img")
        os.symlink(dst, src)
    else:  # the CLI runs in the images directory
        dst = os.path.basename(src)
    scene.watch(dst)
    res = cli.mirror(src, dst)
    assert_bad_input(res, check, "same file")
    scene.assert_unchanged()


@pytest.mark.parametrize("dst_size", [SIZE - 512, SIZE + 4 * KiB, 0],
                         ids=["smaller", "larger", "empty"])
def test_size_mismatch(cli, check, scene, images, dst_size):
    dst = images.dense("other.img", dst_size)
    scene.watch(dst)
    res = cli.mirror(scene.src, dst)
    line = assert_bad_input(res, check, dst, str(dst_size), str(SIZE))
    assert "size" in line
    scene.assert_unchanged()


def test_directory_as_target(cli, check, scene, images):
    d = images.path("a-directory")
    d.mkdir()
    (d / "keep").write_bytes(b"x")
    scene.watch(d)
    res = cli.mirror(scene.src, d)
    assert_bad_input(res, check, d, "Is a directory")
    assert (d / "keep").read_bytes() == b"x"
    scene.assert_unchanged()


def test_directory_as_source(cli, check, scene, images):
    d = images.path("a-directory")
    d.mkdir()
    res = cli.mirror(d, scene.dst)
    assert_bad_input(res, check, d, "Is a directory")
    scene.assert_unchanged()


def test_fifo_as_target(cli, check, scene, images):
    fifo = images.path("a-fifo")
    os.mkfifo(fifo)
    res = cli.mirror(scene.src, fifo, timeout=10)
    assert_bad_input(res, check, fifo)
    scene.assert_unchanged()


def test_unreadable_source_permission_denied(cli, check, scene, is_root):
    if is_root:
        pytest.skip("root bypasses file permissions")
    os.chmod(scene.src, 0)
    try:
        res = cli.mirror(scene.src, scene.dst)
        assert_bad_input(res, check, scene.src, "Permission denied")
    finally:
        os.chmod(scene.src, 0o644)
    scene.assert_unchanged()


def test_read_only_target_permission_denied(cli, check, scene, is_root):
    if is_root:
        pytest.skip("root bypasses file permissions")
    os.chmod(scene.dst, 0o444)
    try:
        res = cli.mirror(scene.src, scene.dst)
        assert_bad_input(res, check, scene.dst, "Permission denied")
    finally:
        os.chmod(scene.dst, 0o644)
    scene.assert_unchanged()


# --------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("opts, needles", [
    (["--granularity", "3000"], ["granularity", "power of 2"]),
    (["--granularity", "256"], ["granularity", "range"]),
    (["--granularity", "128M"], ["granularity", "range"]),
    (["--granularity", "0"], ["granularity"]),
    (["--granularity", "4Q"], ["granularity", "4Q"]),
    (["--speed=-1"], ["speed"]),
    (["--speed", "fast"], ["speed", "fast"]),
    (["--buf-size=-1"], ["buf-size"]),
    (["--buf-size", "1X"], ["buf-size", "1X"]),
    (["--sync", "bogus"], ["sync", "bogus"]),
    (["--sync", "incremental"], ["Sync mode 'incremental' not supported"]),
    (["--on-source-error", "panic"], ["on-source-error", "panic"]),
    (["--on-target-error", "panic"], ["on-target-error", "panic"]),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("target", ["existing", "create"])
def test_bad_parameter(cli, check, scene, images, opts, needles, target):
    if target == "create":
        dst = images.path("new.img")
        opts = [*opts, "--create"]
    else:
        dst = scene.dst
    scene.watch(dst)
    res = cli.mirror(scene.src, dst, *opts)
    assert_bad_input(res, check, *needles)
    scene.assert_unchanged()


@pytest.mark.parametrize("rule", ["bogus", "src:read:x:4096", "dst:sideways:0:4096",
                                  "src:read:0:4096:EWHAT"])
def test_bad_fault_injection_rule_is_bad_input(cli, check, scene, rule):
    res = cli.mirror(scene.src, scene.dst, env={"BLKMIRROR_INJECT_FAULTS": rule})
    assert_bad_input(res, check, "BLKMIRROR_INJECT_FAULTS", rule)
    scene.assert_unchanged()


def test_bad_fault_injection_rule_with_create_does_not_create_target(cli, check, scene,
                                                                     images):
    dst = images.path("new.img")
    res = cli.mirror(scene.src, dst, "--create", env={"BLKMIRROR_INJECT_FAULTS": "bogus"})
    assert_bad_input(res, check, "BLKMIRROR_INJECT_FAULTS")
    assert not os.path.lexists(dst)
    scene.assert_unchanged()


@pytest.mark.parametrize("args", [
    pytest.param(["SRC"], id="missing-dst-argument"),
    pytest.param(["SRC", "DST", "--no-such-option"], id="unknown-option"),
    pytest.param(["SRC", "DST", "--granularity"], id="option-without-value"),
])
def test_command_line_syntax_error_is_one_blkmirror_line(cli, check, scene, args):
    args = [str(scene.src) if a == "SRC" else str(scene.dst) if a == "DST" else a for a in args]
    res = cli.run("mirror", *args)
    assert_bad_input(res, check)
    scene.assert_unchanged()


@pytest.mark.parametrize("args", [
    pytest.param(["SRC"], id="missing-dst-argument"),
    pytest.param(["SRC", "DST", "--no-such-option"], id="unknown-option"),
    pytest.param(["SRC", "DST", "--granularity"], id="option-without-value"),
])
def test_command_line_syntax_error_exits_2(cli, check, scene, args):
    args = [str(scene.src) if a == "SRC" else str(scene.dst) if a == "DST" else a for a in args]
    res = cli.run("mirror", *args)
    assert res.returncode == 2, check.describe(res)
    assert res.stderr.strip(), "an explanation on stderr"
    scene.assert_unchanged()
