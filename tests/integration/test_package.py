"""The Debian package (issue 16): scripts/package builds it from the build under
test (--prebuilt, so the suite does not compile twice), lintian reports no
errors, and dpkg installs it into an empty directory of its own (its own
admin database), where the installed binary runs, and removes it again."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_package_builds_passes_lintian_installs_and_removes(blkmirror_bin, tmp_path):
    for tool in ("dpkg-buildpackage", "dh", "lintian"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/deps installs it)")
    build = Path(blkmirror_bin).parent
    if not (build / "man" / "blkmirror.1").exists():
        pytest.skip("the build has no man pages")
    out = tmp_path / "pkg"
    env = dict(os.environ, DEB_BUILD_OPTIONS="noddebs")
    r = subprocess.run([REPO / "scripts" / "package", "--prebuilt", build, out],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    debs = list(out.glob("blkmirror_*.deb"))
    assert len(debs) == 1, r.stdout
    deb = debs[0]
    lint = subprocess.run(["lintian", "--allow-root", str(deb)], capture_output=True, text=True,
                          timeout=300)
    errors = [l for l in lint.stdout.splitlines() if l.startswith("E:")]
    assert not errors, lint.stdout
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "updates").mkdir()
    (admin / "status").write_text("")
    dpkg = ["dpkg", f"--instdir={root}", f"--admindir={admin}", "--force-depends",
            "--force-not-root", "--force-script-chrootless", "--log=/dev/null"]
    r = subprocess.run([*dpkg, "-i", str(deb)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    binary = root / "usr" / "bin" / "blkmirror"
    v = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    assert v.returncode == 0 and v.stdout.startswith("blkmirror "), v
    assert (root / "usr" / "share" / "man" / "man1" / "blkmirror-serve.1.gz").exists()
    assert (root / "usr" / "lib" / "systemd" / "system" / "blkmirror@.service").exists()
    r = subprocess.run([*dpkg, "-r", "blkmirror"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not binary.exists()
