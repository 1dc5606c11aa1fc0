"""The run context, contestants, the A B C rotation of repetitions, and the
Table every scenario returns."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
from dataclasses import dataclass
from dataclasses import field
from typing import Callable

from .procs import RunFailed
from .util import MiB, log, loud_failure


@dataclass
class Ctx:
    args: argparse.Namespace
    blkmirror: str
    can_drop_caches: bool
    notes: list[str] = field(default_factory=list)  # global notes for the report
    failures: list[str] = field(default_factory=list)
    raw: list[dict] = field(default_factory=list)  # every run, for results.json
    have: dict[str, bool] = field(default_factory=dict)  # peer tools installed

    def drop_caches(self) -> None:
        os.sync()
        if self.can_drop_caches:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")


@dataclass
class Variant:
    """Where and on what a set of contestants runs."""
    name: str
    workdir: str
    cold: bool  # drop the page cache before every run
    src: str
    size: int
    extra: dict = field(default_factory=dict)


@dataclass
class Measure:
    times: dict[str, float]  # row key -> seconds (the main one under "")
    rss_kib: int | None = None
    alloc: int | None = None  # target's allocated bytes afterwards
    info: dict = field(default_factory=dict)


@dataclass
class Contestant:
    key: str
    label: str
    run: Callable[[Ctx, Variant], Measure]
    rows: dict[str, str] = field(default_factory=lambda: {"": ""})  # time key -> label suffix
    kind: str = "copy"  # copy | limit | reference


def run_rotation(ctx: Ctx, scenario: str, variant: Variant,
                 contestants: list[Contestant]) -> dict[str, list[Measure | None]]:
    results: dict[str, list[Measure | None]] = {c.key: [] for c in contestants}
    runs = ctx.args.runs
    for rep in range(runs):
        for c in contestants:
            if variant.cold:
                ctx.drop_caches()
            log(f"{scenario}/{variant.name} run {rep + 1}/{runs}: {c.label}")
            try:
                m = c.run(ctx, variant)
            except (RunFailed, OSError, EOFError, json.JSONDecodeError, socket.timeout) as e:
                msg = f"scenario {scenario}/{variant.name}, {c.label}, run {rep + 1}: {e}"
                loud_failure(msg)
                ctx.failures.append(msg)
                results[c.key].append(None)
                continue
            results[c.key].append(m)
            ctx.raw.append({"scenario": scenario, "variant": variant.name, "contestant": c.key,
                            "rep": rep + 1, "times": m.times, "rss_kib": m.rss_kib,
                            "alloc": m.alloc, "info": m.info})
            shown = ", ".join(f"{k or 'time'} {v:.3f}s" for k, v in m.times.items())
            log(f"  -> {shown}")
    return results


def median_of(ms: list[Measure | None], key: str = "") -> float | None:
    vals = [m.times[key] for m in ms if m is not None and key in m.times]
    return statistics.median(vals) if vals else None


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        out.append("| " + " | ".join(self.header) + " |")
        out.append("|" + "|".join("---" for _ in self.header) + "|")
        for r in self.rows:
            out.append("| " + " | ".join(r) + " |")
        if self.notes:
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        return "\n".join(out) + "\n"


def failed_runs(ms: list[Measure | None]) -> str:
    bad = sum(1 for m in ms if m is None)
    return f" ({bad} FAILED)" if bad else ""


def warm_cache(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass


def want_peer(ctx: Ctx, key: str) -> bool:
    return not ctx.args.contestants or key in ctx.args.contestants


def fio_nbd_available(ctx: Ctx, scenario: str) -> bool:
    ok = ctx.have.get("fio", False)
    if ok:
        r = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
        ok = r.returncode == 0
    if not ok:
        msg = f"scenario {scenario}: skipped, fio with the nbd ioengine is not available"
        log(msg)
        ctx.notes.append(msg)
    return ok
