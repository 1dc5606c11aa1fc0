"""Cross-host mirroring: two network namespaces joined by a veth pair made by
the test stand for two hosts. The receiving host runs `blkmirror serve` on
TCP (TLS with a pre-shared key, or plain with --insecure); the sending host serves the disk to a live fio client over a UNIX socket
and mirrors it to the receiver, switching fio over to the remote copy. Needs
root (ip netns add); skipped with the reason otherwise."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import Check, Cli, MiB, stop_process
from nbd_helpers import MirrorServer, run_tool
from nbd_peers import make_psk

ADDR_A, ADDR_B, PORT = "10.231.77.1", "10.231.77.2", 10809


def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def hosts(tmp_path):
    """(ns_a, ns_b): namespaces with a veth link between them; removed after."""
    if os.geteuid() != 0:
        pytest.skip("cross-host test needs root to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    a, b = f"bmA{tag}", f"bmB{tag}"
    r = ip("netns", "add", a)
    if r.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (ip netns add: {r.stderr.strip()})")
    try:
        steps = [("netns", "add", b),
                 ("link", "add", f"vA{tag}", "type", "veth", "peer", "name", f"vB{tag}"),
                 ("link", "set", f"vA{tag}", "netns", a), ("link", "set", f"vB{tag}", "netns", b),
                 ("-n", a, "addr", "add", f"{ADDR_A}/24", "dev", f"vA{tag}"),
                 ("-n", b, "addr", "add", f"{ADDR_B}/24", "dev", f"vB{tag}"),
                 ("-n", a, "link", "set", f"vA{tag}", "up"), ("-n", b, "link", "set", f"vB{tag}", "up"),
                 ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
        for s in steps:
            r = ip(*s)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (ip {' '.join(s)}: {r.stderr.strip()})")
        yield a, b
    finally:
        ip("netns", "del", a)
        ip("netns", "del", b)  # takes the veth pair with it


def in_ns(ns, blkmirror_bin, tmp_path):
    """A wrapper script running blkmirror inside namespace ns."""
    w = tmp_path / f"blkmirror-{ns}"
    w.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {blkmirror_bin} "$@"\n')
    w.chmod(0o755)
    return str(w)


class Receiver:
    """`blkmirror serve IMAGE --listen ADDR_B:PORT` in the receiving namespace."""

    def __init__(self, ns_a, ns_b, blkmirror_bin, image, log, psk=None):
        self.ns_a, self.ns_b, self.bin, self.image, self.log = ns_a, ns_b, blkmirror_bin, image, log
        # Plain NBD across hosts only when asked for (--insecure); with a PSK
        # file, TLS: the URI names the user and the key file (libnbd's form).
        if psk:
            self.uri = f"nbds://alice@{ADDR_B}:{PORT}/?tls-psk-file={psk}"
            self.args = ["--tls-psk", str(psk), "--tls-authz", "alice"]
        else:
            self.uri = f"nbd://{ADDR_B}:{PORT}/"
            self.args = ["--insecure"]
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns_b, self.bin, "serve",
                                      str(self.image), "--listen", f"{ADDR_B}:{PORT}", *self.args],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        # Reachable from the other host, through the veth link.
        while subprocess.run(["ip", "netns", "exec", self.ns_a, "nbdinfo", "--size", self.uri],
                             capture_output=True).returncode != 0:
            assert self.proc.poll() is None, open(self.log).read()
            assert time.monotonic() < deadline, "receiver not reachable across the veth pair"
            time.sleep(0.05)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc:
            stop_process(self.proc, sig, 20)


@pytest.fixture
def receiver(hosts, blkmirror_bin, tmp_path):
    made = []

    def make(image, psk=None):
        r = Receiver(*hosts, blkmirror_bin, image, tmp_path / "receiver.log", psk)
        made.append(r)
        return r.start()

    yield make
    for r in made:
        r.stop(signal.SIGKILL)


def test_cross_host_mirror_with_live_fio_ends_in_verified_switchover(hosts, receiver, images,
                                                                     blkmirror_bin, tmp_path):
    size = 32 * MiB
    src = images.dense("src.img", size)
    dst = images.sparse("dst.img", size)
    # Between hosts the copy travels over TLS (PSK: no host names to certify).
    rcv = receiver(dst, psk=make_psk(tmp_path / "keys.psk", "alice"))
    m = MirrorServer(in_ns(hosts[0], blkmirror_bin, tmp_path), src, rcv.uri, tmp_path / "a.sock",
                     ["--speed", "20M", "--granularity", "4K", "--no-progress"], tmp_path)
    common = ["--name=live", "--bs=4k", f"--size={size}", "--verify=crc32c", "--randseed=7",
              "--rw=randwrite", "--verify_state_save=0"]
    out = tmp_path / "fio.json"
    try:
        t0 = time.monotonic()
        fio = subprocess.Popen(["fio", "--ioengine=nbd", f"--uri={m.uri}", "--iodepth=16",
                                "--do_verify=1", "--rate_iops=,1500", "--output-format=json",
                                f"--output={out}", *common], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            t_done = m.wait_event("BLOCK_JOB_COMPLETED", 60)
            assert fio.poll() is None, "fio finished before the switch-over; nothing spanned it"
            rc = fio.wait(120)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        text = out.read_text()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        # fio's verify pass read every block back through the sender, by then
        # from the remote copy.
        assert rc == 0 and job["error"] == 0 and job["read"]["io_bytes"] == size, job
        assert t_done - t0 < job["write"]["runtime"] / 1000.0
        m.stop()
    finally:
        m.kill()
    rcv.stop()  # flushes
    # The receiving host's file itself holds every write fio made.
    r = run_tool(["fio", "--ioengine=psync", f"--filename={dst}", "--verify_only",
                  "--output-format=json", *common], timeout=120, cwd=tmp_path)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == size, job


def test_receiver_killed_mid_copy_stop_resume_verify(hosts, receiver, images, blkmirror_bin,
                                                     tmp_path):
    size = 64 * MiB
    src = images.dense("src.img", size)
    dst = images.sparse("dst.img", size)
    rcv = receiver(dst)
    cli = Cli(in_ns(hosts[0], blkmirror_bin, tmp_path), tmp_path)
    try:
        run = cli.start_mirror(src, rcv.uri, "--no-progress", "--on-target-error", "stop",
                               "--speed", "32M", "--buf-size", "4M")
        time.sleep(1.0)
        rcv.stop(signal.SIGKILL)  # the receiving host dies mid-copy
        run.wait_for_line("action stop", timeout=30)
        rcv.start()
        time.sleep(1.2)  # past the client's reconnect backoff
        run.send_signal(signal.SIGUSR2)
        res = run.finish(60)
        assert res.returncode == 0, Check.describe(res)
    finally:
        cli.cleanup()
    rcv.stop()
    Check.assert_identical(src, dst)
