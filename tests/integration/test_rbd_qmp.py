"""blockdev-add / blockdev-create driver rbd as qemu-storage-daemon takes them, on
the session's real Ceph cluster (ceph_helpers.py), and mirror jobs to and from
rbd nodes. Judges: `rbd export` + cmp, `rbd info`."""

import pytest

from conftest import KiB, MiB
from qcow2_helpers import mirror_to_completion

SIZE = 16 * MiB
LAYOUT = [(0, MiB), (6 * MiB + 4 * KiB, 3 * MiB), (15 * MiB, MiB)]


def location(ceph, name, **more):
    pool, image = name.split("/")
    return {"pool": pool, "image": image, "conf": ceph.conf, **more}


def test_blockdev_create_then_mirror_into_it(ceph, qmp, check, images, workdir):
    src = images.sparse("src.img", SIZE, LAYOUT)
    name = ceph.image()
    qmp.cmd("blockdev-create", job_id="c1",
            options={"driver": "rbd", "location": location(ceph, name), "size": SIZE,
                     "cluster-size": 1 * MiB})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c1", "status": "concluded"})
    [job] = [j for j in qmp.cmd("query-jobs") if j["id"] == "c1"]
    assert "error" not in job, job
    qmp.cmd("job-dismiss", id="c1")
    info = ceph.info(name)
    assert info["size"] == SIZE and info["object_size"] == MiB
    qmp.cmd("blockdev-add", driver="rbd", node_name="dst", **location(ceph, name))
    qmp.cmd("blockdev-add", driver="raw", node_name="src",
            file={"driver": "file", "filename": str(src)})
    mirror_to_completion(qmp, device="src", target="dst", sync="full")
    qmp.cmd("blockdev-del", node_name="dst")
    check.cmp(src, ceph.export(name, workdir / "out.img"))


def test_blockdev_create_refuses_existing_image(ceph, qmp):
    name = ceph.create(MiB)
    qmp.cmd("blockdev-create", job_id="c1",
            options={"driver": "rbd", "location": location(ceph, name), "size": 2 * MiB})
    qmp.wait_event("JOB_STATUS_CHANGE", match={"id": "c1", "status": "concluded"})
    [job] = [j for j in qmp.cmd("query-jobs") if j["id"] == "c1"]
    assert "exists" in job.get("error", ""), job
    assert ceph.info(name)["size"] == MiB


def test_mirror_rbd_node_to_file(ceph, qmp, check, images, workdir):
    seed = images.sparse("seed.img", SIZE, LAYOUT)
    name = ceph.image()
    ceph.rbd("import", "--no-progress", seed, name)
    dst = images.zeros("dst.img", SIZE)
    qmp.cmd("blockdev-add", driver="rbd", node_name="src", read_only=True,
            **location(ceph, name))
    qmp.cmd("blockdev-add", driver="raw", node_name="dst",
            file={"driver": "file", "filename": str(dst)})
    mirror_to_completion(qmp, device="src", target="dst", sync="full")
    qmp.cmd("blockdev-del", node_name="dst")
    check.cmp(seed, dst)
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
    assert nodes["src"]["drv"] == "rbd", nodes["src"]


@pytest.mark.parametrize("change, needle", [
    ({"pool": "nopool"}, "pool 'nopool' does not exist"),
    ({"image": "nosuch"}, "image 'nosuch' does not exist"),
    ({"conf": "/nonexistent.conf"}, "cannot read Ceph config"),
    ({"snapshot": "s"}, "read-only=true"),
    ({"auth-client-required": ["kerberos"]}, "auth-client-required"),
    ({"key-secret": "sec0"}, "key-secret"),
])
def test_blockdev_add_bad_rbd_is_refused(ceph, qmp, change, needle):
    name = ceph.create(MiB)
    args = {**location(ceph, name), **change}
    _, desc = qmp.error("blockdev-add", driver="rbd", node_name="n", **args)
    assert needle in desc, desc
    assert "n" not in {n["node-name"] for n in qmp.cmd("query-named-block-nodes")}


def mapped_ceph_libraries(pid):
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f
                       if "/librbd.so" in line or "/librados.so" in line})


def test_ceph_libraries_are_loaded_only_for_an_rbd_node(ceph, daemon, qmp):
    # Linked, librbd and librados cost every process ~50 ms at start-up
    # (librbd_loader.h); a daemon that never opens an rbd image has neither.
    assert mapped_ceph_libraries(daemon.proc.pid) == []
    name = ceph.create(MiB)
    qmp.cmd("blockdev-add", driver="rbd", node_name="r", **location(ceph, name))
    assert [lib.split(".so")[0] for lib in mapped_ceph_libraries(daemon.proc.pid)] == \
        ["librados", "librbd"]
    qmp.cmd("blockdev-del", node_name="r")
