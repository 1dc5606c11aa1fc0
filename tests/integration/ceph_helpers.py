"""A real Ceph cluster for the rbd tests: the session fixture `ceph` starts one
(scripts/ceph-cluster: one monitor, one memstore OSD, pool `rbd`, no auth, loopback)
the first time a test asks for it and stops it when the session ends. Under xdist
each worker is its own session; to share one cluster between all workers (as
scripts/test does, to start it once and hold one memstore in memory), start it
beforehand and name its directory in BLKMIRROR_CEPH_DIR. A test that disturbs the
cluster itself (stops its OSD) takes `private_ceph`: a cluster of its own.

Tests name images with ceph.image(): unique per call, so tests sharing the cluster
never see each other's images. Judges: ceph.export() (`rbd export`), ceph.du()
(`rbd du`, bytes used), ceph.qemu() (the `rbd:` filename QEMU's own driver opens).
A machine without the Ceph packages fails these tests (scripts/deps installs them):
they never skip silently.
"""

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, free_port

SCRIPT = REPO / "scripts" / "ceph-cluster"


class Ceph:
    def __init__(self, root: Path):
        self.root = root
        self.conf = str(root / "ceph.conf")
        self.pool = "rbd"
        self._ids = itertools.count()

    def start(self):
        last = None
        for _ in range(3):  # the free port may be taken by another worker meanwhile
            r = subprocess.run([str(SCRIPT), "start", str(self.root), str(free_port())],
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                return
            last = r.stderr
        pytest.fail(f"scripts/ceph-cluster start failed: {last}")

    def stop(self):
        subprocess.run([str(SCRIPT), "stop", str(self.root)], capture_output=True, timeout=60)

    def rbd(self, *args, check=True, timeout=120):
        r = subprocess.run(["rbd", "-c", self.conf, *map(str, args)], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            pytest.fail(f"rbd {' '.join(map(str, args))}: {r.stderr.strip()}")
        return r

    def image(self, prefix="img"):
        """A fresh image name (not created) in the pool: pool/name."""
        return f"{self.pool}/{prefix}-{os.getpid()}-{next(self._ids)}"

    def create(self, size, prefix="img", *opts):
        name = self.image(prefix)
        self.rbd("create", "--size", f"{size}B", *opts, name)
        return name

    def spec(self, name, **extra):
        """blkmirror's / QEMU's `rbd:` filename for pool/name on this cluster."""
        s = f"rbd:{name}:conf={self.conf}"
        for k, v in extra.items():
            s += f":{k}={v}"
        return s

    def export(self, name, path):
        self.rbd("export", "--no-progress", name, str(path))
        return Path(path)

    def du(self, name):
        """Bytes `rbd du` reports used by the image (object-map granularity)."""
        out = self.rbd("du", "--format", "json", name).stdout
        images = json.loads(out)["images"]
        return sum(i["used_size"] for i in images if i.get("snapshot") is None)

    def info(self, name):
        return json.loads(self.rbd("info", "--format", "json", name).stdout)

    def osd_pid(self):
        return int((self.root / "run" / "osd.0.pid").read_text())


def _need_ceph():
    missing = [t for t in ("ceph-mon", "ceph-osd", "ceph", "rbd") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the rbd tests need Ceph ({', '.join(missing)} missing): run scripts/deps")


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    _need_ceph()
    shared = os.environ.get("BLKMIRROR_CEPH_DIR")
    if shared:
        c = Ceph(Path(shared))
        if not Path(c.conf).exists():
            pytest.fail(f"BLKMIRROR_CEPH_DIR={shared} holds no cluster (no ceph.conf)")
        yield c  # started and stopped by whoever set the variable
        return
    # A short path: the daemons' admin sockets live under it (UNIX paths are limited).
    c = Ceph(tmp_path_factory.mktemp("ceph"))
    c.start()
    yield c
    c.stop()


@pytest.fixture
def private_ceph(tmp_path_factory):
    """A cluster of the test's own, for tests that stop or break the cluster: on the
    shared one they would stall every other worker's rbd tests."""
    _need_ceph()
    c = Ceph(tmp_path_factory.mktemp("pceph"))
    c.start()
    yield c
    c.stop()
