"""The Prometheus endpoint (--metrics, issue 16), scraped and parsed with the
Prometheus project's own text parser (python3-prometheus-client) while a live
mirror runs with a client writing through its export: the numbers must move
as the job runs (bytes copied, progress, export requests and bytes, node
requests, a latency histogram that adds up), and the endpoint answers bad
requests with HTTP errors without disturbing anything."""

import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import MiB

prom = pytest.importorskip("prometheus_client.parser")


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for fam in prom.text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def port_of(run):
    line = run.wait_for_line("metrics at http://", 30)
    return int(line.strip().rsplit(":", 1)[1].split("/")[0])


def test_live_mirror_metrics_move_as_the_job_runs(cli, workdir):
    import nbd
    size = 64 * MiB
    src, dst = workdir / "src.img", workdir / "dst.img"
    src.write_bytes(b"\x11" * size)
    run = cli.start("mirror", src, dst, "--create", "--socket", workdir / "s.sock", "--speed",
                    "16M", "--metrics", "127.0.0.1:0", "--no-progress", "--no-auto-complete")
    port = port_of(run)
    run.wait_for_line("serving", 30)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={workdir / 's.sock'}")
    first = scrape(port)
    for i in range(64):
        h.pwrite(bytes([i]) * 4096, i * 65536)
        h.pread(4096, i * 65536)
    time.sleep(1.0)
    second = scrape(port)
    job = {"job": "mirror"}
    assert value(second, "blkmirror_job_state", job="mirror", type="mirror", state="running") == 1 or \
        value(second, "blkmirror_job_state", job="mirror", type="mirror", state="ready") == 1
    assert value(second, "blkmirror_job_copied_bytes_total", **job) > \
        value(first, "blkmirror_job_copied_bytes_total", **job)
    assert value(second, "blkmirror_job_progress_bytes", **job) > \
        value(first, "blkmirror_job_progress_bytes", **job)
    assert value(second, "blkmirror_job_total_bytes", **job) >= size
    assert value(second, "blkmirror_job_speed_limit_bytes_per_second", **job) == 16 * MiB
    rate = value(second, "blkmirror_job_copy_rate_bytes_per_second", **job)
    assert 0 < rate < 64 * MiB, rate  # 16 MiB/s limit, one scrape interval
    modes = [dict(k[1])["mode"] for k, v in second.items()
             if k[0] == "blkmirror_job_copy_mode" and v == 1]
    assert len(modes) == 1 and modes[0] in ("background", "write-blocking", "adaptive"), modes
    assert value(second, "blkmirror_job_dirty_bytes", **job) > 0
    ex = {"export": ""}
    assert value(second, "blkmirror_export_connections", **ex) == 1
    assert value(second, "blkmirror_export_requests_total", export="", command="write") >= 64
    assert value(second, "blkmirror_export_bytes_total", export="", command="write") >= 64 * 4096
    reads = value(second, "blkmirror_export_requests_total", export="", command="read")
    assert reads >= 64
    # The histogram adds up: +Inf bucket == count, buckets never decrease.
    hist = "blkmirror_export_request_duration_seconds"
    assert value(second, f"{hist}_count", export="", command="read") == reads
    assert value(second, f"{hist}_bucket", export="", command="read", le="+Inf") == reads
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in second.items()
                     if k[0] == f"{hist}_bucket" and dict(k[1]).get("command") == "read")
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert value(second, f"{hist}_sum", export="", command="read") > 0
    assert value(second, "blkmirror_node_requests_total", node="src", op="write") >= 64
    h.shutdown()
    run.send_signal(2)
    run.finish(60)


def test_daemon_metrics_and_http_errors(blkmirror_bin, workdir):
    import subprocess
    from qmp_client import QmpClient
    disk = workdir / "d.img"
    disk.write_bytes(bytes(8 * MiB))
    qmp_sock = workdir / "q.sock"
    p = subprocess.Popen([blkmirror_bin, "daemon", "--qmp", str(qmp_sock), "--metrics",
                          "127.0.0.1:0", "--blockdev",
                          f"driver=file,node-name=disk,filename={disk}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert "metrics at http://" in line, line
        port = int(line.strip().rsplit(":", 1)[1].split("/")[0])
        deadline = time.monotonic() + 20
        while not qmp_sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with QmpClient(str(qmp_sock)) as c:
            (workdir / "t.img").write_bytes(bytes(8 * MiB))
            c.cmd("blockdev-add", driver="file", node_name="t", filename=str(workdir / "t.img"))
            c.cmd("blockdev-mirror", job_id="j", device="disk", target="t", sync="full",
                  speed=1)  # stays running
            s = scrape(port)
            assert value(s, "blkmirror_job_state", job="j", type="mirror", state="running") == 1
            assert value(s, "blkmirror_job_time_in_state_seconds", job="j") >= 0
            c.cmd("job-cancel", id="j")
            c.wait_event("JOB_STATUS_CHANGE", match={"id": "j", "status": "null"})
            s = scrape(port)
            assert not any(k[0] == "blkmirror_job_state" for k in s)
        for method, path, code in (("GET", "/nope", 404), ("POST", "/metrics", 405)):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == code
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"garbage\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 400")
        # Still serving.
        assert "blkmirror_node_requests_in_flight" in urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        p.terminate()
        p.wait(30)
