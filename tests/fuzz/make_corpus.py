#!/usr/bin/python3
"""Writes the seed corpus for nbd_server_fuzz: valid client conversations."""
import os
import struct
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "nbd")
os.makedirs(out, exist_ok=True)
IHAVEOPT = 0x49484156454F5054


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go(name=b"", infos=(3,)):
    return opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) +
               b"".join(struct.pack(">H", i) for i in infos))


def meta(code, name=b"", queries=(b"base:allocation",)):
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    body += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return opt(code, body)


def req(typ, off=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, length) + payload


flags = struct.pack(">I", 3)
seeds = {
    "list": flags + opt(3) + opt(2),
    "go_read": flags + go() + req(0, 0, 4096) + req(2),
    "structured_status": flags + opt(8) + meta(10) + go() + req(7, 0, 1 << 20, 8) +
    req(0, 0, 65536) + req(2),
    "write_flush": flags + go() + req(1, 4096, 512, 1, payload=b"\xab" * 512) + req(3) +
    req(6, 0, 8192, 2) + req(4, 0, 4096) + req(5, 0, 4096) + req(2),
    "export_name": flags + opt(1, b"ro") + req(1, 0, 16, payload=b"x" * 16) + req(2),
    "info_unknown": flags + opt(6, struct.pack(">I", 3) + b"zzz" + struct.pack(">H", 0)) +
    opt(99) + meta(9, queries=()) + go(b"ro", (0, 1, 2, 3)),
    # Many options about an export, each repeating NBD_INFO_DESCRIPTION (the
    # fuzzer's scenario 1 removes the exports meanwhile).
    "info_flood": flags + b"".join(
        opt(6, struct.pack(">I", 2) + b"ro" + struct.pack(">H", 200) + struct.pack(">H", 2) * 200)
        for _ in range(40)) + go(b"ro", (2,) * 50),
    # A write whose payload stops short (scenario 2's stall limit), an
    # over-limit one, and an option over the 12 KiB limit.
    "write_stall": flags + go() + req(1, 0, 1 << 20, payload=b"\x11" * 300),
    "write_over_limit": flags + go() + req(1, 0, (32 << 20) + 1, payload=b"\x22" * 100),
    "option_too_big": flags + opt(7, b"\0" * (12 * 1024 + 1)) + go(),
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} seeds to {out}")
