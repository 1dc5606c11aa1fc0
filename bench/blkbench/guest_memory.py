"""The guest's memory, held still for the length of a benchmark.

Why: on a VM whose balloon driver reports free pages to the host (virtio-balloon
free page reporting, which Firecracker and QEMU offer), a page the guest frees is
soon handed back, and the next touch of it faults in the host. Measured here
(2 CPUs, Firecracker, `page_reporting_order` 9, `min_free_ms` 0): `cp` of a 2 GiB
tmpfs file into tmpfs took 5.7-6.0 s of system time into pages touched for the
first time or idle for 20 s, and 0.8-1.0 s into pages just freed by the previous
copy. Which contestant paid depended on how long the machine had idled before
its run (the first run of a series was the usual victim), not on the contestant.

So for the benchmark's length, page reporting is paused (its order set above the
largest the allocator has, so no free block qualifies) and restored at exit, and
some memory is touched once first, so the pages reported before the benchmark
started are backed again. Every contestant then copies into memory the host
already backs. Both are reported in the results' notes.
"""

from __future__ import annotations

import mmap
import time

from .util import GiB, MiB, fmt_size, log

ORDER_PARAM = "/sys/module/page_reporting/parameters/page_reporting_order"
# Above MAX_PAGE_ORDER (10 on x86-64): no free block is ever that large.
PAUSED_ORDER = 11


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def touch(nbytes: int) -> float:
    """Writes every page of nbytes of anonymous memory once, then frees it;
    returns the seconds it took."""
    t = time.monotonic()
    chunk = b"\1" * (16 * MiB)
    with mmap.mmap(-1, nbytes) as m:
        for _ in range(nbytes // len(chunk)):
            m.write(chunk)
    return time.monotonic() - t


class HeldMemory:
    """Pauses free page reporting and touches warm_bytes of memory on enter;
    restores the reporting order on exit. notes: lines for the report."""

    def __init__(self, warm_bytes: int):
        self.warm_bytes = warm_bytes
        self.saved: str | None = None
        self.notes: list[str] = []

    def __enter__(self) -> "HeldMemory":
        try:
            with open(ORDER_PARAM) as f:
                self.saved = f.read().strip()
        except OSError:
            self.notes.append("no free page reporting on this machine (no "
                              f"{ORDER_PARAM}): guest memory stays backed")
            return self
        if int(self.saved) < PAUSED_ORDER:
            try:
                with open(ORDER_PARAM, "w") as f:
                    f.write(f"{PAUSED_ORDER}\n")
            except OSError as e:
                self.notes.append(f"free page reporting could not be paused ({e}): a run "
                                  "that follows an idle spell may fault its memory in from "
                                  "the host (bench/blkbench/guest_memory.py)")
                self.saved = None
                return self
        else:
            self.saved = None  # already paused: leave it as we found it
        warm = min(self.warm_bytes, max(0, _mem_available() - GiB)) // (16 * MiB) * (16 * MiB)
        took = touch(warm) if warm else 0.0
        log(f"guest memory: free page reporting paused, {fmt_size(warm)} touched in {took:.1f}s")
        paused = (f"`page_reporting_order` {self.saved} -> {PAUSED_ORDER}, restored at exit"
                  if self.saved else "it already was")
        self.notes.append(
            f"free page reporting (virtio-balloon) paused for the benchmark "
            f"({paused}) after touching {fmt_size(warm)} of memory ({took:.1f} s): otherwise a run "
            "after an idle spell faults its memory in from the host, 6x slower for a tmpfs copy")
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            return
        try:
            with open(ORDER_PARAM, "w") as f:
                f.write(f"{self.saved}\n")
        except OSError as e:
            log(f"guest memory: could not restore page_reporting_order {self.saved}: {e}")
