"""Small helpers: sizes and their formatting, logging, test data (dense and
sparse files), allocation and fdatasync of paths."""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time


KiB = 1 << 10


MiB = 1 << 20


GiB = 1 << 30


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


RUN_TIMEOUT = 900.0  # seconds; one contestant run longer than this is a failure


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (examples: 256M, 2G, 64G)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def fmt_size(n: float) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def fmt_s(t: float | None) -> str:
    return "-" if t is None else f"{t:.3f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loud_failure(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! FAILURE: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def fresh_sparse(path: str, size: int) -> None:
    """An existing, empty, sparse file of `size` bytes (the copy target)."""
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class RandomStream:
    """Deterministic pseudo-random bytes: AES-CTR from openssl when present
    (fast), else os.urandom (not reproducible, ~180 MB/s here)."""

    def __init__(self, seed: int):
        self.proc = None
        if shutil.which("openssl"):
            key = f"{seed:032x}"[-32:]
            self.proc = subprocess.Popen(
                ["openssl", "enc", "-aes-128-ctr", "-nosalt", "-K", key, "-iv", "0" * 32,
                 "-in", "/dev/zero"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def read(self, n: int) -> bytes:
        if self.proc is None:
            return os.urandom(n)
        buf = self.proc.stdout.read(n)
        if len(buf) != n:
            raise RuntimeError("openssl random stream ended early")
        return buf

    def close(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()


def make_dense(path: str, size: int, seed: int) -> None:
    rs = RandomStream(seed)
    try:
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(rs.read(n))
                left -= n
            f.flush()
            os.fdatasync(f.fileno())
    finally:
        rs.close()


def make_sparse(path: str, virtual: int, data: int, seed: int, extent: int = MiB) -> int:
    """`virtual` bytes with `data` bytes of random data in `extent`-sized
    extents at random extent-aligned offsets (fixed seed). Returns the extent count."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, virtual)
    finally:
        os.close(fd)
    return write_extents(path, virtual, data, seed, extent)


def write_extents(path: str, span: int, data: int, seed: int, extent: int = MiB) -> int:
    """Overwrites `data` bytes of an existing file with random data in
    `extent`-sized extents at random extent-aligned offsets below `span`
    (fixed seed). Returns the extent count."""
    slots = span // extent
    n = max(1, data // extent)
    if n > slots:
        raise SystemExit(f"sparse data {fmt_size(data)} does not fit in {fmt_size(span)}")
    offsets = sorted(random.Random(seed).sample(range(slots), n))
    rs = RandomStream(seed + 1)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            for slot in offsets:
                os.pwrite(fd, rs.read(extent), slot * extent)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    finally:
        rs.close()
    return n
