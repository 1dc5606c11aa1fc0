"""`blkmirror serve` fed malformed, hostile or unusual NBD traffic from a raw
socket client: the server answers with the protocol's error replies where the
protocol has them, hangs up where it has none, never dies, and keeps serving
every other client correctly."""

import os
import random
import socket
import struct
import time

import nbd
import pytest

from conftest import KiB, MiB
from nbd_helpers import (
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO_BLOCK_SIZE, INFO_EXPORT, INFO_NAME,
    NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC, STATE_HOLE, STATE_ZERO, TF_HAS_FLAGS, TF_READ_ONLY,
    Closed, RawNbd, assert_serves, connect, make_sparse, read_file)

SIZE = 64 * MiB
LAYOUT = [(0, 1 * MiB), (8 * MiB, 4 * MiB), (40 * MiB, 1 * MiB), (SIZE - 1 * MiB, 1 * MiB)]
U64 = 1 << 64


@pytest.fixture
def image(tmp_path, sparse_files_supported):
    return make_sparse(tmp_path / "disk.img", SIZE, LAYOUT, random.Random(11))


@pytest.fixture
def srv(nbd_server, image):
    return nbd_server(image)


def healthy(srv):
    """The server process lives and serves a new client correctly."""
    for off in (0, 8 * MiB + 12345, SIZE - 64 * KiB):
        assert_serves(srv, off, 64 * KiB)


def finish(srv):
    healthy(srv)
    srv.stop()


def raw(srv):
    return RawNbd(srv.sock)


def ready(srv, structured=False, meta=False):
    """A raw client past NBD_OPT_GO."""
    c = raw(srv)
    c.start()
    if structured:
        final, _ = c.option(OPT_STRUCTURED_REPLY)
        assert final == REP_ACK
        c.structured = True
    if meta:
        final, replies = c.option(OPT_SET_META_CONTEXT, meta_data("", ["base:allocation"]))
        assert final == REP_ACK and [t for t, _ in replies] == [REP_META_CONTEXT, REP_ACK], replies
    final, replies = c.go()
    assert final == REP_ACK, replies
    assert c.size == SIZE
    return c


def meta_data(name, queries):
    nb = name.encode()
    out = struct.pack(">I", len(nb)) + nb + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def assert_usable(c, image, offset=8 * MiB, length=64 * KiB):
    r = c.read(offset, length)
    assert r.error == 0, r
    assert r.data == read_file(image, offset, length)


# --------------------------------------------------------------------------
# Handshake


def test_greeting_is_fixed_newstyle(srv):
    c = raw(srv)
    flags = c.read_greeting()
    assert flags & FLAG_FIXED_NEWSTYLE
    assert flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) == 0, hex(flags)
    c.close()
    finish(srv)


def test_bad_option_magic_closes(srv):
    c = raw(srv)
    c.start()
    c.send_option(OPT_GO, RawNbd.go_data(""), magic=0x49484156454F5055)
    assert c.closed_by_server(), "server kept a connection with a bad IHAVEOPT magic"
    c.close()
    finish(srv)


@pytest.mark.parametrize("flags", [FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 4,
                                   FLAG_FIXED_NEWSTYLE | (1 << 31)])
def test_unknown_client_flags_close(srv, flags):
    c = raw(srv)
    c.read_greeting()
    c.send_client_flags(flags)
    try:
        c.send_option(OPT_GO, RawNbd.go_data(""))
    except OSError:
        pass
    assert c.closed_by_server(), f"server accepted client flags {flags:#x}"
    c.close()
    finish(srv)


@pytest.mark.parametrize("opt", [0x1234, 0xFFFFFFFF, 4])
def test_unknown_option_unsupported_then_go_works(srv, image, opt):
    c = raw(srv)
    c.start()
    final, replies = c.option(opt, b"some payload")
    assert final == REP_ERR_UNSUP, replies
    assert len(replies) == 1
    # Negotiation continues on the same connection.
    final, _ = c.option(opt)
    assert final == REP_ERR_UNSUP
    final, _ = c.go()
    assert final == REP_ACK
    assert_usable(c, image)
    c.disconnect()
    c.close()
    finish(srv)


def test_starttls_refused_without_tls(srv, image):
    c = raw(srv)
    c.start()
    final, _ = c.option(OPT_STARTTLS)
    assert final in (REP_ERR_UNSUP, REP_ERR_POLICY), hex(final)
    final, _ = c.go()
    assert final == REP_ACK
    assert_usable(c, image)
    finish(srv)


@pytest.mark.parametrize("opt", [OPT_GO, OPT_LIST, OPT_SET_META_CONTEXT, 0x4321])
@pytest.mark.parametrize("size", [12 * KiB + 1, 64 * KiB + 1])
def test_option_payload_over_12k_is_too_big(srv, image, opt, size):
    """Options over 12 KiB are not buffered (a connection holds at most 16 KiB
    before its handshake completes): skipped, answered ERR_TOO_BIG."""
    c = raw(srv)
    c.start()
    final, _ = c.option(0x4321, bytes(12 * KiB))  # at the limit: read, then unsupported
    assert final == REP_ERR_UNSUP, hex(final)
    payload = bytes(size)
    c.send_option(opt, payload)
    ropt, rtype, _ = c.read_option_reply()
    assert ropt == opt
    assert rtype == REP_ERR_TOO_BIG, hex(rtype)
    # The payload was skipped: the stream is still in sync.
    final, _ = c.go()
    assert final == REP_ACK
    assert_usable(c, image)
    finish(srv)


def test_huge_option_length_does_not_hurt_server(srv):
    c = raw(srv)
    c.start()
    c.send_option(OPT_GO, length=0xFFFFFFFF)
    try:
        c.send(os.urandom(256 * KiB))
    except OSError:
        pass  # the server may hang up at once
    c.close()
    finish(srv)


def test_go_for_missing_export_is_unknown(srv, image):
    c = raw(srv)
    c.start()
    for opt in (OPT_GO, OPT_INFO):
        final, replies = c.go("no-such-export", opt=opt)
        assert final == REP_ERR_UNKNOWN, (opt, replies)
    final, _ = c.option(OPT_LIST_META_CONTEXT, meta_data("no-such-export", []))
    assert final == REP_ERR_UNKNOWN
    final, _ = c.go("")
    assert final == REP_ACK
    assert_usable(c, image)
    finish(srv)


def test_malformed_go_payload_is_invalid(srv, image):
    c = raw(srv)
    c.start()
    bad = [
        b"",                                             # nothing
        struct.pack(">I", 100) + b"abc",                 # name longer than payload
        struct.pack(">I", 0) + struct.pack(">H", 2) + struct.pack(">H", 1),  # info list short
        struct.pack(">I", 0) + struct.pack(">H", 0) + b"junk",               # trailing bytes
    ]
    for data in bad:
        final, replies = c.option(OPT_GO, data)
        assert final == REP_ERR_INVALID, (data, replies)
    final, _ = c.option(OPT_STRUCTURED_REPLY, b"x")  # must be empty
    assert final == REP_ERR_INVALID
    final, _ = c.option(OPT_LIST, b"x")  # must be empty
    assert final == REP_ERR_INVALID
    final, _ = c.go()
    assert final == REP_ACK
    assert_usable(c, image)
    finish(srv)


def test_list_info_and_meta_context_options(nbd_server, image):
    srv = nbd_server(image, "--name", "disk0")
    c = raw(srv)
    c.start()
    final, replies = c.option(OPT_LIST)
    assert final == REP_ACK
    servers = [d for t, d in replies if t == REP_SERVER]
    assert len(servers) == 1
    n = struct.unpack(">I", servers[0][:4])[0]
    assert servers[0][4:4 + n] == b"disk0"

    final, replies = c.go("disk0", infos=(INFO_NAME, INFO_BLOCK_SIZE), opt=OPT_INFO)
    assert final == REP_ACK
    infos = {struct.unpack(">H", d[:2])[0]: d for t, d in replies if t == REP_INFO}
    assert struct.unpack(">HQH", infos[INFO_EXPORT])[1] == SIZE
    tflags = struct.unpack(">HQH", infos[INFO_EXPORT])[2]
    assert tflags & TF_HAS_FLAGS and not tflags & TF_READ_ONLY
    assert struct.unpack(">HIII", infos[INFO_BLOCK_SIZE])[1:] == (1, 4096, 32 * MiB)
    assert infos[INFO_NAME][2:] == b"disk0"

    final, replies = c.option(OPT_LIST_META_CONTEXT, meta_data("disk0", []))
    assert final == REP_ACK
    ctx = [d[4:] for t, d in replies if t == REP_META_CONTEXT]
    assert ctx == [b"base:allocation", b"qemu:allocation-depth"]  # serve offers both
    final, replies = c.option(OPT_LIST_META_CONTEXT, meta_data("disk0", ["qemu:"]))
    assert final == REP_ACK
    assert [d[4:] for t, d in replies if t == REP_META_CONTEXT] == [b"qemu:allocation-depth"]
    final, replies = c.option(OPT_LIST_META_CONTEXT, meta_data("disk0", ["qemu:dirty-bitmap:x"]))
    assert final == REP_ACK and [t for t, _ in replies] == [REP_ACK]

    # SET_META_CONTEXT before STRUCTURED_REPLY is an error; after, it works.
    final, _ = c.option(OPT_SET_META_CONTEXT, meta_data("disk0", ["base:allocation"]))
    assert final != REP_ACK and final & (1 << 31)
    assert c.option(OPT_STRUCTURED_REPLY)[0] == REP_ACK
    c.structured = True
    final, replies = c.option(OPT_SET_META_CONTEXT, meta_data("disk0", ["base:allocation"]))
    assert final == REP_ACK
    ctx_id = [struct.unpack(">I", d[:4])[0] for t, d in replies if t == REP_META_CONTEXT]
    assert len(ctx_id) == 1
    final, _ = c.go("disk0")
    assert final == REP_ACK

    r = c.cmd(CMD_BLOCK_STATUS, 0, 12 * MiB)
    assert r.error == 0
    (rtype, rflags, payload), = r.chunks
    assert struct.unpack(">I", payload[:4])[0] == ctx_id[0]
    ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
    assert ext[0] == (1 * MiB, 0), ext
    assert ext[1] == (7 * MiB, STATE_HOLE | STATE_ZERO), ext
    assert ext[2][1] == 0 and ext[2][0] <= 4 * MiB, ext
    finish(srv)


def test_export_name_option_and_abort(srv, image):
    # Old-style NBD_OPT_EXPORT_NAME: no reply header, just size and flags.
    c = raw(srv)
    c.start()
    c.send_option(OPT_EXPORT_NAME, b"")
    size, tflags = struct.unpack(">QH", c.recv_exact(10))
    assert size == SIZE and tflags & TF_HAS_FLAGS
    assert_usable(c, image)
    c.close()
    # Unknown name: no error reply exists for this option, so the server hangs up.
    c = raw(srv)
    c.start()
    c.send_option(OPT_EXPORT_NAME, b"nope")
    assert c.closed_by_server()
    c.close()
    # NBD_OPT_ABORT: acknowledged (or not), then closed.
    c = raw(srv)
    c.start()
    c.send_option(OPT_ABORT)
    try:
        ropt, rtype, _ = c.read_option_reply()
        assert (ropt, rtype) == (OPT_ABORT, REP_ACK)
    except Closed:
        pass
    assert c.closed_by_server()
    c.close()
    finish(srv)


def test_endless_options_do_not_hurt_server(srv):
    c = raw(srv)
    c.start()
    c.s.settimeout(20)
    try:
        for _ in range(3000):
            c.send_option(0x7777)
            _, rtype, _ = c.read_option_reply()
            assert rtype == REP_ERR_UNSUP
    except (Closed, OSError):
        pass  # a server may cut off a client that never finishes negotiating
    c.close()
    finish(srv)


# --------------------------------------------------------------------------
# Transmission


def test_bad_request_magic_closes(srv, image):
    c = ready(srv)
    assert_usable(c, image)
    c.request(CMD_READ, 0, 4096, magic=0x25609514)
    assert c.closed_by_server(), "server kept a connection after a bad request magic"
    c.close()
    finish(srv)


@pytest.mark.parametrize("structured", [False, True])
def test_unknown_command_is_einval(srv, image, structured):
    c = ready(srv, structured)
    for cmd_type in (8, 0x55, 0xFFFF):
        r = c.cmd(cmd_type, 0, 4096)
        assert r.error == NBD_EINVAL, (cmd_type, r)
        assert_usable(c, image)
    # Unknown command flag bits, and flags that mean nothing for the command.
    r = c.cmd(CMD_READ, 0, 4096, flags=1 << 12)
    assert r.error == NBD_EINVAL, r
    r = c.cmd(CMD_FLUSH, 4096, 0)
    assert r.error == NBD_EINVAL, r
    r = c.cmd(CMD_READ, 0, 4096, flags=CMD_FLAG_REQ_ONE)
    assert r.error == NBD_EINVAL, r
    # BLOCK_STATUS without a negotiated metadata context.
    r = c.cmd(CMD_BLOCK_STATUS, 0, 4096)
    assert r.error == NBD_EINVAL, r
    assert_usable(c, image)
    c.disconnect()
    finish(srv)


def _past_end_cases():
    s = SIZE
    return [
        # (id, cmd, offset, length, expected error)
        ("read-crosses-end", CMD_READ, s - 512, 1024, NBD_EINVAL),
        ("read-at-end", CMD_READ, s, 1, NBD_EINVAL),
        ("read-far", CMD_READ, 1 << 50, 4096, NBD_EINVAL),
        ("read-overflow", CMD_READ, U64 - 512, 1024, NBD_EINVAL),
        ("read-overflow-max", CMD_READ, U64 - 1, 2, NBD_EINVAL),
        ("write-crosses-end", CMD_WRITE, s - 512, 1024, NBD_ENOSPC),
        ("write-at-end", CMD_WRITE, s, 1, NBD_ENOSPC),
        ("write-overflow", CMD_WRITE, U64 - 512, 1024, NBD_EINVAL),
        ("zeroes-crosses-end", CMD_WRITE_ZEROES, s - 4096, 8192, NBD_ENOSPC),
        ("zeroes-overflow", CMD_WRITE_ZEROES, U64 - 4096, 8192, NBD_EINVAL),
        ("trim-crosses-end", CMD_TRIM, s - 4096, 8192, NBD_EINVAL),
        ("trim-overflow", CMD_TRIM, U64 - 4096, 8192, NBD_EINVAL),
        ("cache-crosses-end", CMD_CACHE, s - 4096, 8192, NBD_EINVAL),
        ("block-status-crosses-end", CMD_BLOCK_STATUS, s - 4096, 8192, NBD_EINVAL),
        ("block-status-overflow", CMD_BLOCK_STATUS, U64 - 4096, 8192, NBD_EINVAL),
    ]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_out_of_range_requests(srv, image, structured):
    c = ready(srv, structured, meta=structured)
    tail_before = read_file(image, SIZE - 1 * MiB, 1 * MiB)
    for name, cmd, off, length, err in _past_end_cases():
        if cmd == CMD_BLOCK_STATUS and not structured:
            continue
        payload = os.urandom(length) if cmd == CMD_WRITE else b""
        r = c.cmd(cmd, off, length, payload=payload)
        assert r.error == err, (name, r)
        if structured and cmd in (CMD_READ, CMD_BLOCK_STATUS):
            assert r.chunks[-1][0] == REPLY_TYPE_ERROR, (name, r)
        # The connection stays in sync: a good read right after works.
        assert_usable(c, image, SIZE - 64 * KiB)
    assert read_file(image, SIZE - 1 * MiB, 1 * MiB) == tail_before
    assert os.path.getsize(image) == SIZE
    c.disconnect()
    finish(srv)


def test_read_over_32mib(srv, image):
    c = ready(srv, structured=True)
    r = c.read(0, 33 * MiB)
    assert r.error == NBD_EOVERFLOW, r
    assert r.chunks and r.chunks[-1][0] == REPLY_TYPE_ERROR
    # Exactly the maximum is fine.
    r = c.read(0, 32 * MiB)
    assert r.error == 0 and r.data == read_file(image, 0, 32 * MiB)
    c.disconnect()
    c = ready(srv, structured=False)
    r = c.read(0, 33 * MiB)
    assert r.error == NBD_EINVAL, r
    assert_usable(c, image)
    finish(srv)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_write_over_32mib_is_refused(srv, image, structured):
    before = read_file(image, 0, 34 * MiB)
    c = ready(srv, structured)
    r = c.write(0, os.urandom(33 * MiB))
    assert r.error in (NBD_EOVERFLOW, NBD_EINVAL), r
    assert_usable(c, image)
    assert read_file(image, 0, 34 * MiB) == before
    finish(srv)


def test_zero_length_requests(srv, image):
    c = ready(srv)
    for cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        r = c.cmd(cmd, 4096, 0)
        assert r.error in (0, NBD_EINVAL), (cmd, r)
        assert_usable(c, image)
    finish(srv)


def test_read_only_export_refuses_writes_with_eperm(nbd_server, image):
    before = read_file(image, 0, SIZE)
    srv = nbd_server(image, "--read-only")
    c = ready(srv)
    assert c.tflags & TF_READ_ONLY
    for cmd, flags, payload in [(CMD_WRITE, 0, os.urandom(4096)),
                                (CMD_WRITE, CMD_FLAG_FUA, os.urandom(4096)),
                                (CMD_TRIM, 0, b""),
                                (CMD_WRITE_ZEROES, 0, b""),
                                (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, b"")]:
        r = c.cmd(cmd, 8 * MiB, 4096, flags, payload)
        assert r.error == NBD_EPERM, (cmd, flags, r)
        assert_usable(c, image)
    r = c.cmd(CMD_FLUSH)
    assert r.error == 0
    c.disconnect()
    finish(srv)
    assert read_file(image, 0, SIZE) == before


# --------------------------------------------------------------------------
# Clients that vanish


def test_disconnect_mid_handshake(srv):
    for step in range(5):
        c = raw(srv)
        if step >= 1:
            c.read_greeting()
        if step == 2:
            c.send(b"\x00\x00")  # half of the client flags
        if step >= 3:
            c.send_client_flags()
        if step == 3:
            c.send(struct.pack(">Q", 0x49484156454F5054) + b"\x00\x00")  # half an option header
        if step == 4:
            c.send_option(OPT_GO, length=100)
            c.send(b"\x00" * 10)  # part of the option data
        c.close()
    finish(srv)


def test_disconnect_mid_request_header(srv, image):
    c = ready(srv)
    c.send(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_WRITE) + b"\x00\x00")
    c.close()
    finish(srv)


def test_disconnect_mid_write_payload(srv, image):
    before = read_file(image, 0, 2 * MiB)
    c = ready(srv)
    c.request(CMD_WRITE, 0, 1 * MiB)  # header only
    c.send(b"\xaa" * (100 * KiB))
    c.close()
    # The incomplete write was never acknowledged; it must not land half-done.
    time.sleep(0.2)
    finish(srv)
    assert read_file(image, 0, 2 * MiB) == before


def test_disconnect_with_replies_outstanding(srv, image):
    for _ in range(3):
        c = ready(srv)
        for i in range(32):
            c.request(CMD_READ, (i % 8) * MiB, 1 * MiB)
        c.close()  # never reads the 32 MiB of replies
    healthy(srv)
    c = ready(srv, structured=True)
    for i in range(16):
        c.request(CMD_READ, 8 * MiB, 4 * MiB)
    c.s.shutdown(socket.SHUT_RDWR)
    c.close()
    finish(srv)


def test_disc_finishes_outstanding_writes(srv, image):
    c = ready(srv)
    blocks = {i: os.urandom(4096) for i in range(16)}
    for i, data in blocks.items():
        c.request(CMD_WRITE, 20 * MiB + i * 64 * KiB, 4096, payload=data)
    c.disconnect()
    # Replies to the writes may still come; then the server closes.
    assert c.closed_by_server(), "server did not close after NBD_CMD_DISC"
    c.close()
    for i, data in blocks.items():
        assert read_file(image, 20 * MiB + i * 64 * KiB, 4096) == data, i
    finish(srv)


# --------------------------------------------------------------------------
# Many clients, pipelining


def test_pipelined_requests_all_answered(srv, image):
    c = ready(srv, structured=True)
    rnd = random.Random(12)
    expect = {}
    for i in range(64):
        if i % 2:
            off = 30 * MiB + i * 64 * KiB
            data = rnd.randbytes(64 * KiB)
            ck = c.request(CMD_WRITE, off, len(data), payload=data)
            expect[ck] = ("w", off, data)
        else:
            off = rnd.choice([0, 8 * MiB, 9 * MiB + 4096, 20 * MiB, 40 * MiB - 4096])
            ck = c.request(CMD_READ, off, 256 * KiB)
            expect[ck] = ("r", off, read_file(image, off, 256 * KiB))
    seen = set()
    for _ in range(64):
        r = c.read_reply()
        assert r.cookie not in seen, f"two replies for cookie {r.cookie}"
        seen.add(r.cookie)
        kind, off, data = expect[r.cookie]
        assert r.error == 0, r
        if kind == "r":
            assert r.data == data, f"read at {off} returned wrong data"
    assert seen == set(expect)
    assert c.cmd(CMD_FLUSH).error == 0
    for kind, off, data in expect.values():
        if kind == "w":
            assert read_file(image, off, len(data)) == data
    # A structured read over a hole comes back with hole chunks.
    r = c.read(5 * MiB, 1 * MiB)
    assert r.error == 0 and r.data == bytes(1 * MiB)
    assert {t for t, _, _ in r.chunks} == {REPLY_TYPE_OFFSET_HOLE}
    # DF: a single chunk even across data and hole.
    r = c.read(12 * MiB - 64 * KiB, 128 * KiB, flags=CMD_FLAG_DF)
    assert r.error == 0 and len(r.chunks) == 1
    assert r.data == read_file(image, 12 * MiB - 64 * KiB, 128 * KiB)
    c.disconnect()
    finish(srv)


def test_hundred_idle_connections_and_an_active_one(srv, image):
    idle = []
    try:
        for i in range(100):
            # Half are past NBD_OPT_GO, half wait in negotiation.
            if i % 2 == 0:
                idle.append(ready(srv))
            else:
                c = raw(srv)
                c.start()
                idle.append(c)
        h = connect(srv.uri)
        rnd = random.Random(13)
        model = {}
        t0 = time.monotonic()
        for i in range(300):
            blk = rnd.randrange(0, SIZE // 4096)
            if i % 3 and model:
                b = rnd.choice(list(model))
                assert h.pread(4096, b * 4096) == model[b]
            else:
                data = rnd.randbytes(4096)
                h.pwrite(data, blk * 4096)
                model[blk] = data
        assert time.monotonic() - t0 < 30, "active client starved by idle ones"
        h.flush()
        h.shutdown()
        # The idle ones still work.
        for c in idle[0:100:10]:
            assert_usable(c, image)
    finally:
        for c in idle:
            c.close()
    for b, data in model.items():
        assert read_file(image, b * 4096, 4096) == data
    finish(srv)


def test_libnbd_client_after_garbage_clients(srv, image):
    # Random bytes from many clients at once, then a real client.
    rnd = random.Random(14)
    socks = []
    for i in range(20):
        c = raw(srv)
        if i % 2:
            c.start()
        try:
            c.send(rnd.randbytes(rnd.randrange(1, 4096)))
        except OSError:
            pass
        socks.append(c)
    for c in socks:
        c.close()
    h = connect(srv.uri)
    assert h.pread(1 * MiB, 8 * MiB) == read_file(image, 8 * MiB, 1 * MiB)
    h.shutdown()
    finish(srv)


# --------------------------------------------------------------------------
# Resource bounds, stopping


def _rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def test_client_not_reading_replies_cannot_exhaust_memory(nbd_server, tmp_path):
    """A client pipelines many 1 MiB reads and never reads a reply. The
    server may keep a bounded number of requests in flight per connection
    (it says 64); it must not keep reading requests and queueing their
    replies without bound. Stops as soon as the server passes the limit."""
    img = tmp_path / "dense.img"
    img.write_bytes(random.Random(15).randbytes(64 * MiB))
    srv = nbd_server(img)
    pid = srv.proc.pid
    base = _rss_mib(pid)
    limit = base + 512  # 64 in flight x 1 MiB, plus generous slack
    c = ready(srv)
    c.s.settimeout(0.5)
    peak = base
    try:
        sent = 0
        blocked = False
        while sent < 3000 and not blocked:
            try:
                for _ in range(16):
                    c.request(CMD_READ, (sent % 64) * MiB, 1 * MiB)
                    sent += 1
            except socket.timeout:
                blocked = True  # back-pressure: the server stopped reading
            time.sleep(0.005)
            peak = max(peak, _rss_mib(pid))
            if peak > limit:
                break
        deadline = time.monotonic() + 3
        while peak <= limit and time.monotonic() < deadline:
            peak = max(peak, _rss_mib(pid))
            time.sleep(0.05)
    finally:
        c.close()
    assert peak <= limit, (f"server RSS grew from {base} MiB to {peak} MiB after {sent} 1 MiB "
                           f"reads whose replies the client never read: replies are queued "
                           f"without bound")
    time.sleep(0.5)
    finish(srv)


def test_stop_with_clients_connected(srv, image):
    """SIGTERM while clients are idle, mid-handshake, mid-I/O and flooding:
    the server closes them all and exits 0 promptly."""
    clients = []
    for i in range(20):
        c = raw(srv)
        if i % 2:
            c.handshake()
        else:
            c.read_greeting()
        clients.append(c)
    flood = ready(srv)
    for i in range(32):
        flood.request(CMD_READ, (i % 16) * MiB, 1 * MiB)
    h = connect(srv.uri)
    h.pwrite(b"\x42" * 4096, 33 * MiB)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    # Acknowledged data is on disk after the flush at exit.
    assert read_file(image, 33 * MiB, 4096) == b"\x42" * 4096
    for c in clients[1::2]:
        assert c.closed_by_server(5)
    for c in clients:
        c.close()
    flood.close()
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
