#!/usr/bin/python3
"""Writes the seed corpus for qmp_fuzz: QMP conversations that reach every
command, in the scratch directory the fuzz target confines files to."""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "qmp")
os.makedirs(out, exist_ok=True)


def conv(*cmds):
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    for c in cmds:
        if isinstance(c, str):
            lines.append(c)
        else:
            name, args = c
            lines.append(json.dumps({"execute": name, "arguments": args, "id": len(lines)}))
    return ("\n".join(lines) + "\n").encode()


null = lambda n, size=1 << 20: ("blockdev-add", {"driver": "null-co", "node-name": n, "size": size})
seeds = {
    "version": conv(("query-version", {}), ("query-commands", {})),
    "mirror": conv(null("a"), null("b"), ("blockdev-mirror", {"job-id": "j", "device": "a", "target": "b",
                                                              "sync": "full", "speed": 65536}),
                   ("query-block-jobs", {}), ("block-job-pause", {"device": "j"}),
                   ("block-job-resume", {"device": "j"}), ("block-job-set-speed", {"device": "j", "speed": 0}),
                   ("block-job-complete", {"device": "j"}), ("query-jobs", {}),
                   ("block-job-cancel", {"device": "j", "force": True})),
    "finalize": conv(null("a"), null("b"), ("blockdev-mirror", {"device": "a", "target": "b", "sync": "none",
                                                                "auto-finalize": False, "auto-dismiss": False}),
                     ("job-complete", {"id": "a"}), ("job-finalize", {"id": "a"}), ("job-dismiss", {"id": "a"})),
    "create": conv(("blockdev-create", {"job-id": "c", "options": {"driver": "file", "filename": "x.img",
                                                                   "size": 65536}}),
                   ("query-jobs", {}), ("job-dismiss", {"id": "c"}),
                   ("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "x.img"}}),
                   ("blockdev-add", {"driver": "blkdebug", "node-name": "d", "image": "r",
                                     "inject-error": [{"iotype": "read", "sector": 1, "once": True}]}),
                   ("query-named-block-nodes", {}), ("blockdev-del", {"node-name": "d"})),
    "nbd": conv(null("a"), ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "n.sock"}}}),
                ("block-export-add", {"type": "nbd", "id": "e", "node-name": "a", "writable": True}),
                ("query-block-exports", {}), ("block-export-del", {"id": "e", "mode": "hard"}),
                ("nbd-server-stop", {})),
    "bad": conv("{bad", "[1]", '{"execute": 1}', ("blockdev-add", {"driver": "file"}),
                ("blockdev-mirror", {"device": 1}), ("nosuch", {})),
    "prenegotiation": b'{"execute": "query-version"}\n{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
}
# Deep nesting inside every field: qmp_fuzz expands \x01 / \x02 / \x03 into
# arrays nested 1023 / 1025 / 60,000 deep, before and after negotiation, and
# numbers beyond double range in the same places.
def deep(marker):
    m = marker.decode()
    lines = ['{"execute": "query-version", "id": %s}' % m,
             '{"execute": %s}' % m,
             '{"execute": "query-version", "arguments": %s}' % m,
             '{"execute": "query-version", "arguments": {"x": %s}}' % m,
             '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"x": %s}}}' % m,
             '{"execute": "blockdev-mirror", "arguments": {"device": %s, "target": "b", "sync": "full"}}' % m,
             m]
    return ("\n".join(lines) + "\n").encode()


for marker in (b"\x01", b"\x02", b"\x03"):
    n = marker[0]
    seeds[f"deep{n}-prenegotiation"] = deep(marker)
    seeds[f"deep{n}"] = b'{"execute": "qmp_capabilities"}\n' + deep(marker)
big = '1e400'
seeds["overflow"] = conv('{"execute": "query-version", "id": %s}' % big,
                         '{"execute": "query-version", "arguments": {"x": [%s]}}' % big,
                         ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1}),
                         '{"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": %s}}' % big,
                         ("query-version", {}))
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
