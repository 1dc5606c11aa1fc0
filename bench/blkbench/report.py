"""Turning measurements into table rows: medians, the worst repetition, ratios to
blkmirror, CPU per byte or per I/O, and the notes under each table."""

from __future__ import annotations

import html
import math
import os
import statistics
from typing import Callable

from .core import Contestant, Ctx, Measure, Table, Variant, failed_runs, median_of
from .peers import blkmirror_target_rss
from .util import GiB, KiB, fmt_ratio, fmt_s, fmt_size


def time_table(ctx: Ctx, title: str, v: Variant, contestants: list[Contestant],
               res: dict[str, list[Measure | None]], show_alloc: bool = False,
               base_key: str = "blkmirror") -> Table:
    base = median_of(res.get(base_key, []))
    header = ["contestant", "median s", "runs s", "worst s", "MB/s", "peer / blkmirror",
              "worst rep ratio", "cpu s", "cpu s / GiB", "peak RSS"]
    if show_alloc:
        header.append("target allocated")
    header.append("notes")
    rows = []
    for c in contestants:
        ms = res[c.key]
        for tkey, suffix in c.rows.items():
            med = median_of(ms, tkey)
            runs = " ".join(fmt_s(m.times.get(tkey)) if m else "FAIL" for m in ms)
            size = v.extra.get("data_size", v.size) if show_alloc else v.size
            mbs = f"{size / med / 1e6:.0f}" if med else "-"
            ratio = "1.00x (base)" if c.key == base_key and tkey == "" else (
                fmt_ratio(med / base) if med and base else "-")
            rss = [m.rss_kib for m in ms if m and m.rss_kib]
            rss_s = f"{max(rss) / 1024:.1f} MiB" if rss and tkey == "" else "-"
            notes = []
            if c.kind == "limit":
                bws = [m.info["bw"] for m in ms if m]
                if bws:
                    notes.append(f"fio bw {statistics.median(bws) / 1e6:.0f} MB/s")
            if c.key.startswith("blkmirror"):
                infos = [m.info for m in ms if m]
                if infos and "copied" in infos[-1]:
                    i = infos[-1]
                    notes.append(f"copied {fmt_size(i['copied'])}, zeroed {fmt_size(i['zeroed'])}, "
                                 f"{i['ops']} ops")
            if c.key == "qsd" and tkey == "":
                readies = [m.info["ready"] for m in ms if m]
                if readies:
                    notes.append(f"ready after {statistics.median(readies):.3f}s")
            if c.key == "qsd" and tkey == "total":
                notes.append("spawn .. daemon exit, like blkmirror's time")
            worst = max((m.times[tkey] for m in ms if m and tkey in m.times), default=None)
            # The repetition least favourable to blkmirror: the smallest
            # peer / blkmirror ratio of one A B pair (for blkmirror: its slowest run).
            pairs = [m.times[tkey] / b.times[""] for m, b in zip(ms, res.get(base_key, []))
                     if m and b and tkey in m.times and "" in b.times]
            worst_ratio = ("-" if c.key == base_key and tkey == "" or not pairs
                           else fmt_ratio(min(pairs)))
            cpus = [m.info["cpu"] for m in ms if m and m.info.get("cpu") is not None]
            cpu_med = statistics.median(cpus) if cpus and tkey == "" else None
            gib = (v.extra.get("data_size", v.size) if show_alloc else v.size) / GiB
            row = [c.label + suffix + failed_runs(ms), fmt_s(med), runs, fmt_s(worst), mbs, ratio,
                   worst_ratio, f"{cpu_med:.2f}" if cpu_med is not None else "-",
                   f"{cpu_med / gib:.2f}" if cpu_med is not None and gib else "-", rss_s]
            if show_alloc:
                allocs = [m.alloc for m in ms if m and m.alloc is not None]
                row.append(fmt_size(max(allocs)) if allocs and tkey == "" else "-")
            row.append("; ".join(notes))
            rows.append(row)
    return Table(title, header, rows)


def rss_note(ctx: Ctx, res: dict[str, list[Measure | None]], size: int) -> str | None:
    ms = [m for m in res.get("blkmirror", []) if m]
    if not ms:
        return None
    peak = max(m.rss_kib for m in ms) * KiB
    target, how = blkmirror_target_rss(ms[-1].info, size)
    verdict = "OK" if peak <= target else "OVER TARGET"
    return (f"blkmirror peak RSS {fmt_size(peak)} vs target {fmt_size(target)} ({how}): "
            f"**{verdict}**")


def speedup_notes(res: dict[str, list[Measure | None]], peers: list[tuple[str, str, str]]) -> list[str]:
    """peers: (key, time key, label). Speedup = peer median / blkmirror median."""
    base = median_of(res.get("blkmirror", []))
    out = []
    if base is None:
        return ["blkmirror has no successful run: no ratios"]
    for key, tkey, label in peers:
        med = median_of(res.get(key, []), tkey)
        if med is None:
            continue
        r = med / base
        word = "faster" if r >= 1 else "slower"
        pairs = [p.times[tkey] / b.times[""] for p, b in zip(res[key], res["blkmirror"])
                 if p is not None and b is not None and tkey in p.times]
        per_rep = (f"; per repetition {' '.join(f'{x:.2f}' for x in pairs)}"
                   if len(pairs) > 1 else "")
        out.append(f"blkmirror speedup vs {label}: **{r:.2f}x** "
                   f"(blkmirror {abs(r - 1) * 100:.0f}% {word}; {med:.3f}s vs {base:.3f}s{per_rep})")
    return out


def med(vals) -> float | None:
    vals = [x for x in vals if x is not None]
    return statistics.median(vals) if vals else None


def fmt_iops(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def pct_or_dash(a: float | None, b: float | None) -> str:
    return f"{100 * a / b:.0f}%" if a is not None and b else "-"


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def load_note(res: dict[str, list[Measure | None]]) -> str | None:
    loads = [m.info["load1"] for ms in res.values() for m in ms if m and "load1" in m.info]
    if not loads:
        return None
    return (f"load average (1 min) after each run: {min(loads):.1f} to {max(loads):.1f} on "
            f"{os.cpu_count()} CPUs (above the CPU count, fio and the servers compete with other "
            f"work: compare the per-repetition ratios, not absolute IOPS)")


def per_rep(xs: list[Measure | None], ys: list[Measure | None], get: Callable[[Measure], float | None]) -> str:
    pairs = []
    for x, y in zip(xs, ys):
        if x and y and get(x) is not None and get(y):
            pairs.append(get(x) / get(y))
    return f"; per repetition {' '.join(f'{p:.2f}' for p in pairs)}" if len(pairs) > 1 else ""


def svg_panels(panels: list[tuple[str, dict]], size: int, runtime: int) -> str:
    W, PH, L, R, T, B = 760, 200, 70, 20, 28, 30  # width, panel height, margins
    tmax = max(max((p[0] for p in i["series"]), default=1.0) for _, i in panels)
    tmax = max(tmax, runtime + 2.0)
    ymax = max(max((max(p[1], p[2]) for p in i["series"]), default=1) for _, i in panels)
    ymax = max(ymax, size)
    step = 0.5 * GiB if ymax <= 4 * GiB else GiB * 2 ** math.ceil(math.log2(ymax / (8 * GiB)))
    H = len(panels) * (PH + T + B) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="13" font-weight="bold">Scenario 3: dirty bytes '
           f'(red) and bytes copied (blue) over time, {fmt_size(size)} disk, fio 4 KiB random '
           f'writes</text>']
    for n, (label, info) in enumerate(panels):
        top = 40 + n * (PH + T + B) + T
        def X(t):
            return L + (W - L - R) * t / tmax
        def Y(b):
            return top + PH - PH * b / ymax
        out.append(f'<text x="{L}" y="{top - 8}" font-weight="bold">{html.escape(label)}</text>')
        out.append(f'<rect x="{L}" y="{top}" width="{W - L - R}" height="{PH}" fill="none" '
                   f'stroke="#888"/>')
        y = 0.0
        while y <= ymax + 1:
            out.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" '
                       f'stroke="#eee"/><text x="{L - 4}" y="{Y(y) + 4:.1f}" '
                       f'text-anchor="end">{fmt_size(y)}</text>')
            y += step
        for s in range(0, int(tmax) + 1, 5):
            out.append(f'<text x="{X(s):.1f}" y="{top + PH + 14}" text-anchor="middle">{s}s</text>')
        if info.get("fio_end_s") is not None:
            fx = X(info["fio_end_s"])
            out.append(f'<rect x="{L}" y="{top}" width="{fx - L:.1f}" height="{PH}" '
                       f'fill="#f5f0e0"/><text x="{fx - 3:.1f}" y="{top + 12}" '
                       f'text-anchor="end" fill="#886">fio writing</text>')
        for t, what in info.get("marks", []):
            mx = X(t)
            out.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + PH}" '
                       f'stroke="#3a3" stroke-dasharray="4,3"/><text x="{mx + 3:.1f}" '
                       f'y="{top + 24}" fill="#3a3">{html.escape(what)} {t:.1f}s</text>')
        for idx, color in ((1, "#d33"), (2, "#36c")):
            pts = " ".join(f"{X(p[0]):.1f},{Y(p[idx]):.1f}" for p in info["series"])
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    out.append(f'<text x="{L}" y="{H - 8}" fill="#555">red: dirty (len - offset); blue: copied '
               f'(offset: copies, re-copies and synchronously mirrored writes); green: events; '
               f'shaded: fio running. Time from the mirror start.</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
