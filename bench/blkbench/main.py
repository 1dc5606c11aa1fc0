"""bench/compare's entry point: options, the scenario registry, the report's
head, results.md and results.json. A scenario is a module in blkbench/scenarios
with KEY, TITLE, run(ctx) -> list[Table] and, optionally, add_arguments(group)
and resolve_arguments(args) -> error text or None; main() finds it by itself."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from types import ModuleType

from . import scenarios
from .core import Ctx, Table
from .guest_memory import HeldMemory
from .util import GiB, REPO, log, loud_failure, parse_size


def discover() -> dict[str, ModuleType]:
    """Every module in blkbench/scenarios that defines KEY, TITLE and run(ctx),
    by KEY in a natural order (1, 2, ..., then named ones)."""
    found = {}
    for info in pkgutil.iter_modules(scenarios.__path__):
        mod = importlib.import_module(f"{scenarios.__name__}.{info.name}")
        if hasattr(mod, "KEY") and hasattr(mod, "run"):
            found[mod.KEY] = mod
    return dict(sorted(found.items(), key=lambda kv: (not kv[0].isdigit(), kv[0].zfill(4))))


def tool_versions() -> list[str]:
    out = []
    for cmd in (["qemu-storage-daemon", "--version"], ["nbdcopy", "--version"],
                ["qemu-img", "--version"], ["fio", "--version"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            out.append(r.stdout.strip().splitlines()[0])
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out.append(f"{cmd[0]}: not available")
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


def main() -> int:
    SCENARIOS = discover()
    ap = argparse.ArgumentParser(
        prog="bench/compare",
        description="blkmirror vs qemu-storage-daemon, nbdcopy and the device limit, "
                    "side by side (docs/measuring.md scenarios). Prints markdown tables and writes "
                    "them to DIR/results.md.")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma list of {','.join(SCENARIOS)} (default all)")
    ap.add_argument("--runs", type=int, default=None, help="repetitions per contestant (default 3)")
    ap.add_argument("--dir", default=os.path.join(REPO, "bench", "out"),
                    help="on-disk work directory and results (default bench/out)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs work directory (default /dev/shm)")
    ap.add_argument("--contestants", default=None,
                    help="peers to run besides blkmirror: qsd,nbdcopy,qemu-img,cp,fio "
                         "(default all available)")
    ap.add_argument("--blkmirror", default=os.path.join(REPO, "build", "release", "blkmirror"),
                    help="blkmirror binary (default build/release/blkmirror)")
    ap.add_argument("--blkmirror-args", default="",
                    help="extra arguments for blkmirror mirror; write it with '=', e.g. "
                         "--blkmirror-args='--buf-size 64M --direct'")
    ap.add_argument("--build", action="store_true", help="run scripts/build release first")
    ap.add_argument("--fio-engine", default="io_uring", help="fio ioengine (default io_uring)")
    ap.add_argument("--seed", type=int, default=20240501, help="data seed")
    ap.add_argument("--warm-memory", type=parse_size, default=None,
                    help="memory to touch once before the runs, with free page reporting "
                         "paused for the benchmark (bench/blkbench/guest_memory.py; default 8G, "
                         "1G with --quick)")
    ap.add_argument("--keep-page-reporting", action="store_true",
                    help="leave the VM's free page reporting on (runs after an idle spell then "
                         "fault their memory in from the host)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small sizes and short fio runs, 1 run (explicit options win)")
    for mod in SCENARIOS.values():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(ap.add_argument_group(f"scenario {mod.KEY}: {mod.TITLE}"))
    a = ap.parse_args()

    quick = a.quick
    a.runs = a.runs or (1 if quick else 3)
    if a.warm_memory is None:
        a.warm_memory = (1 if quick else 8) * GiB
    a.contestants = [x for x in a.contestants.split(",") if x] if a.contestants else None
    scen = [x.strip() for x in a.scenarios.split(",") if x.strip()]
    for s in scen:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    for mod in SCENARIOS.values():
        if hasattr(mod, "resolve_arguments"):
            if err := mod.resolve_arguments(a):
                ap.error(err)
    a.dir = os.path.abspath(a.dir)
    os.makedirs(a.dir, exist_ok=True)

    if a.build:
        log("building: scripts/build release")
        subprocess.run([os.path.join(REPO, "scripts", "build"), "release"], check=True,
                       stdout=sys.stderr)
    if not os.access(a.blkmirror, os.X_OK):
        ap.error(f"{a.blkmirror} not found: build it with scripts/build release (or --build)")

    can_drop = True
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        can_drop = False
    ctx = Ctx(a, a.blkmirror, can_drop)
    ctx.have = {t: shutil.which(t) is not None
                for t in ("qemu-storage-daemon", "nbdcopy", "qemu-img", "fio")}
    for t, ok in ctx.have.items():
        if not ok:
            ctx.notes.append(f"{t} not installed: its contestant is skipped")
    if not can_drop:
        ctx.notes.append("cannot write /proc/sys/vm/drop_caches (not root?): on-disk runs are WARM")
    if not shutil.which("openssl"):
        ctx.notes.append("openssl missing: data from os.urandom (not reproducible)")

    started = datetime.datetime.now()
    t_start = time.monotonic()
    rev = git_rev()
    load0 = os.getloadavg()
    tables: list[Table] = []

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt  # unwinds through the scenarios' cleanup (kills the servers)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        memory = None if a.keep_page_reporting else HeldMemory(a.warm_memory)
        with memory or contextlib.nullcontext():
            if memory:
                ctx.notes += memory.notes
            for s in scen:
                log(f"=== scenario {s}: {SCENARIOS[s].TITLE}")
                tables += SCENARIOS[s].run(ctx)
    except KeyboardInterrupt:
        loud_failure("interrupted")
        ctx.failures.append("interrupted by the user")

    cmdline = shlex.join(["bench/compare"] + sys.argv[1:])
    head = [
        "## blkmirror vs peers (bench/compare)",
        "",
        f"Command: `{cmdline}`",
        "",
        f"- started {started:%Y-%m-%d %H:%M:%S}, took {time.monotonic() - t_start:.0f} s; "
        f"blkmirror git {rev}; {a.blkmirror}"
        + (f" with `{a.blkmirror_args}`" if a.blkmirror_args else ""),
        f"- host: {os.cpu_count()} CPUs, {platform.release()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM; "
        + "; ".join(tool_versions()),
        f"- load average (1 min) {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"({os.cpu_count()} CPUs): other work on the machine makes single runs noisy",
        f"- {a.runs} run(s) per contestant, contestants alternating within each repetition; "
        "'median s' is the median; 'peer / blkmirror' is the peer's median over blkmirror's "
        "(> 1: blkmirror faster); scenarios 3 and 4 report medians of fio's IOPS and p99 "
        "latency instead. Every copy is verified (cmp or qemu-img compare).",
    ]
    head += [f"- {n}" for n in ctx.notes]
    if ctx.failures:
        head += ["", f"**{len(ctx.failures)} FAILURE(S):**", ""]
        head += [f"- {f}" for f in ctx.failures]
    report = "\n".join(head) + "\n\n" + "\n".join(t.markdown() for t in tables)
    print(report)
    with open(os.path.join(a.dir, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(a.dir, "results.json"), "w") as f:
        json.dump({"command": cmdline, "runs": ctx.raw, "failures": ctx.failures}, f, indent=1)
    if ctx.failures:
        loud_failure(f"{len(ctx.failures)} failure(s), see above")
        return 1
    return 0
