"""Man pages (issue 16): the build makes blkmirror.1 and blkmirror-SUB.1 from the
binary's own --help (scripts/gen-man, help2man); every option --help lists is in
its page, `man -l` renders each without warnings, and `cmake --install` puts
them, the binary and the service unit where a package would."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SUBS = ["mirror", "serve", "commit", "daemon", "ctl", "demo", "bitmap"]


@pytest.fixture(scope="module")
def man_dir(blkmirror_bin):
    d = Path(blkmirror_bin).parent / "man"
    if not (d / "blkmirror.1").exists():
        pytest.skip("no man pages in the build (help2man missing)")
    return d


def options(text):
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", text))


@pytest.mark.parametrize("sub", [None] + SUBS)
def test_page_lists_every_option_of_help(blkmirror_bin, man_dir, sub):
    page = man_dir / ("blkmirror.1" if sub is None else f"blkmirror-{sub}.1")
    helptext = subprocess.run([blkmirror_bin, *([sub] if sub else []), "--help"],
                              capture_output=True, text=True, timeout=30).stdout
    r = subprocess.run(["man", "-l", "--warnings", str(page)], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8"))
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    rendered = r.stdout.replace("\u2010", "-").replace("\u2212", "-")
    missing = options(helptext) - options(rendered)
    assert not missing, f"{page.name} lacks {sorted(missing)}"
    if sub:
        assert f"blkmirror-{sub}" in rendered.splitlines()[0].lower()


def test_cmake_install_lays_out_binary_pages_and_unit(blkmirror_bin, man_dir, tmp_path):
    build = Path(blkmirror_bin).parent
    r = subprocess.run(["cmake", "--install", str(build), "--prefix", str(tmp_path / "usr")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "usr"
    assert os.access(root / "bin" / "blkmirror", os.X_OK)
    for sub in SUBS:
        assert (root / "share" / "man" / "man1" / f"blkmirror-{sub}.1").exists()
    assert (root / "lib" / "systemd" / "system" / "blkmirror@.service").exists()
    v = subprocess.run([root / "bin" / "blkmirror", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("blkmirror ")
