"""The daemon's `nbd` driver over QMP: blockdev-add driver nbd to real peers
(nbdkit, qemu-nbd), with TLS credentials made by object-add, as a client of
qemu-storage-daemon would write them."""

import re
import subprocess

import pytest

from conftest import MiB
from nbd_peers import make_psk, make_x509, read_export

SIZE = 8 * MiB


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_x509(tmp_path_factory.mktemp("pki"))


def server_of(uri):
    m = re.match(r"nbd\+unix:///\?socket=(.*)$", uri)
    if m:
        return {"type": "unix", "path": m.group(1)}
    m = re.match(r"nbd://([^:/]+):(\d+)/", uri)
    return {"type": "inet", "host": m.group(1), "port": m.group(2)}


def mirror_and_complete(qmp, dev, tgt):
    qmp.cmd("blockdev-mirror", job_id="j", device=dev, target=tgt, sync="full")
    qmp.wait_event("BLOCK_JOB_READY", match={"device": "j"}, timeout=120)
    qmp.cmd("block-job-complete", device="j")
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match={"device": "j"})
    assert "error" not in ev["data"], ev


def test_mirror_to_nbdkit_memory(qmp, images, peers, check, workdir):
    src = images.sparse("src.img", SIZE, [(0, MiB), (5 * MiB, 512 * 1024)])
    srv = peers.nbdkit("memory", SIZE)
    qmp.cmd("blockdev-add", driver="file", node_name="src", filename=str(src))
    qmp.cmd("blockdev-add", driver="nbd", node_name="remote", server=server_of(srv.uri))
    node = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}["remote"]
    assert node["drv"] == "nbd" and node["image"]["virtual-size"] == SIZE
    mirror_and_complete(qmp, "src", "remote")
    check.assert_identical(src, read_export(srv.uri, workdir / "out.img"))


def test_mirror_from_qemu_nbd_source(qmp, images, peers, check):
    src = images.dense("src.img", SIZE)
    dst = images.sparse("dst.img", SIZE)
    srv = peers.qemu_nbd(src, "raw", "-r", tcp=True)
    qmp.cmd("blockdev-add", driver="nbd", node_name="remote", server=server_of(srv.uri), read_only=True)
    qmp.cmd("blockdev-add", driver="file", node_name="dst", filename=str(dst))
    mirror_and_complete(qmp, "remote", "dst")
    check.assert_identical(src, dst)


def test_read_only_export_needs_read_only_node(qmp, images, peers):
    src = images.dense("src.img", MiB)
    srv = peers.qemu_nbd(src, "raw", "-r")
    cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="r", server=server_of(srv.uri))
    assert "read-only" in desc
    assert qmp.cmd("query-named-block-nodes") == []


def test_x509_via_object_add(qmp, images, peers, check, certs, workdir):
    server_dir, client_dir = certs
    src = images.dense("src.img", SIZE)
    srv = peers.nbdkit("memory", SIZE, tcp=True,
                       tls_args=["--tls=require", f"--tls-certificates={server_dir}"])
    qmp.cmd("object-add", qom_type="tls-creds-x509", id="tls0", dir=str(client_dir), endpoint="client")
    # Without credentials the TLS-only server refuses us, with a clear error.
    cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="plain", server=server_of(srv.uri))
    assert desc and "\n" not in desc
    qmp.cmd("blockdev-add", driver="file", node_name="src", filename=str(src))
    qmp.cmd("blockdev-add", driver="nbd", node_name="remote", server=server_of(srv.uri), tls_creds="tls0")
    cls, desc = qmp.error("object-del", id="tls0")
    assert desc == "object 'tls0' is in use, can not be deleted"
    mirror_and_complete(qmp, "src", "remote")
    out = workdir / "out.img"
    r = subprocess.run(["nbdcopy", srv.uri.replace("nbd://", "nbds://") + f"?tls-certificates={client_dir}",
                        str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    check.assert_identical(src, out)


def test_psk_via_object_add(qmp, images, peers, check, workdir):
    keydir = workdir / "psk"
    keydir.mkdir()
    keys = make_psk(keydir / "keys.psk", user="alice")
    src = images.dense("src.img", SIZE)
    srv = peers.nbdkit("memory", SIZE, tcp=True, tls_args=["--tls=require", f"--tls-psk={keys}"])
    qmp.cmd("object-add", qom_type="tls-creds-psk", id="k", dir=str(keydir), username="alice", endpoint="client")
    qmp.cmd("blockdev-add", driver="file", node_name="src", filename=str(src))
    qmp.cmd("blockdev-add", driver="nbd", node_name="remote", server=server_of(srv.uri), tls_creds="k")
    mirror_and_complete(qmp, "src", "remote")
    out = workdir / "out.img"
    r = subprocess.run(["nbdcopy", srv.uri.replace("nbd://", "nbds://alice@") + f"?tls-psk-file={keys}",
                        str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    check.assert_identical(src, out)


@pytest.mark.parametrize("args,desc", [
    ({"server": {"type": "unix"}}, "Parameter 'server.path' is missing"),
    ({"server": {"type": "inet", "host": "127.0.0.1"}}, "Parameter 'server.port' is missing"),
    ({"server": {"type": "inet", "host": "127.0.0.1", "port": 10809}},
     "Invalid parameter type for 'server.port', expected: string"),
    ({"server": {"type": "inet", "host": "127.0.0.1", "port": "x"}},
     "Parameter 'server.port' does not accept value 'x'"),
    ({"server": {"type": "unix", "path": "/p", "host": "h"}}, "Parameter 'server.host' is unexpected"),
    ({"server": {"type": "vsock"}}, "Parameter 'server.type' does not accept value 'vsock'"),
    ({"server": {"type": "unix", "path": "/p"}, "tls-creds": "none"}, "No TLS credentials with id 'none'"),
])
def test_bad_nbd_arguments(qmp, args, desc):
    r = qmp.request("blockdev-add", {"driver": "nbd", "node-name": "n", **args})
    assert r["error"] == {"class": "GenericError", "desc": desc}
    assert qmp.cmd("query-named-block-nodes") == []


def test_unreachable_server_is_one_clear_line(qmp, workdir):
    cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="n",
                          server={"type": "unix", "path": str(workdir / "nobody.sock")})
    assert "nobody.sock" in desc and "\n" not in desc


def test_object_add_errors(qmp, workdir):
    assert qmp.error("object-add", qom_type="secret", id="s")[1] == "Parameter 'qom-type' does not accept value 'secret'"
    assert qmp.error("object-add", qom_type="tls-creds-x509", id="x", dir=str(workdir / "none"))[1] == \
        f"Unable to access credentials directory '{workdir / 'none'}'"
    qmp.cmd("object-add", qom_type="tls-creds-x509", id="srv", dir=str(workdir), endpoint="server")
    r = qmp.request("blockdev-add", {"driver": "nbd", "node-name": "n",
                                     "server": {"type": "unix", "path": "/p"}, "tls-creds": "srv"})
    assert r["error"]["desc"] == "Expecting TLS credentials with a client endpoint"
    assert qmp.error("object-del", id="nope")[1] == "object 'nope' not found"
    qmp.cmd("object-del", id="srv")
