"""Measuring a live process from outside: CPU seconds and peak RSS from /proc,
and the time limits the live scenarios allow."""

from __future__ import annotations

import os


FIO_GRACE = 120.0  # s beyond fio's runtime before a fio run counts as hung


JOB_TIMEOUT = 300.0  # s after fio ends for a mirror to reach ready, then complete


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds a live child has used so far (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_hwm_kib(pid: int) -> int | None:
    """Peak RSS of a live child (VmHWM; after exec it is the child's own)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
