// The transmission phase: read, validate, dispatch, reply.
#include "nbd/server/connection.h"

#include <array>
#include <cstring>

#include <asio/experimental/as_tuple.hpp>
#include <spdlog/spdlog.h>

#include "base/assert.h"

namespace blkmirror::nbd {

namespace {

constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
// A write payload beyond the advertised maximum is read and dropped up to this
// size (so the stream stays in sync and the client gets an error); beyond it
// the connection is closed.
constexpr uint32_t kPayloadDiscardLimit = 2 * NbdServer::kMaxPayload;
constexpr size_t kMaxBlockStatusDescriptors = 1024;

uint32_t wire_error(const Result<void>& r) { return r ? 0 : errno_to_wire(r.error().errnum()); }

}  // namespace

Connection::Connection(NbdServer& server, asio::generic::stream_protocol::socket sock)
    : server_(server), sock_(std::move(sock)), deadline_(sock_.get_executor()) {
  disarm();
}

Task<bool> Connection::read_exact(void* data, size_t len, bool guard_stall) {
  auto* out = static_cast<std::byte*>(data);
  while (len > 0) {
    if (closed_) co_return false;
    if (in_pos_ < in_end_) {
      size_t n = std::min(len, in_end_ - in_pos_);
      std::memcpy(out, in_buf_.data() + in_pos_, n);
      in_pos_ += n;
      out += n;
      len -= n;
      continue;
    }
    if (guard_stall) arm(server_.limits().payload_stall_limit);
    if (len >= in_buf_.size()) {  // a large read goes straight to its buffer
      size_t n = co_await recv_some({out, len});
      if (n == 0) co_return false;
      out += n;
      len -= n;
      continue;
    }
    size_t n = co_await recv_some(in_buf_);
    if (n == 0) co_return false;
    in_pos_ = 0;
    in_end_ = n;
  }
  co_return true;
}

Task<size_t> Connection::recv_some(std::span<std::byte> buf) {
  if (tls_) co_return co_await tls_->read_some(buf);
  auto [ec, n] = co_await sock_.async_read_some(asio::buffer(buf.data(), buf.size()), use_tuple);
  co_return ec ? 0 : n;
}

Task<bool> Connection::skip(uint64_t len, bool guard_stall) {
  std::array<std::byte, 4096> sink;
  while (len > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, sink.size()));
    if (!co_await read_exact(sink.data(), n, guard_stall)) co_return false;
    len -= n;
  }
  co_return true;
}

void Connection::arm(std::chrono::milliseconds limit) {
  if (limit.count() <= 0) return disarm();
  deadline_.expires_after(limit);
}

void Connection::disarm() { deadline_.expires_at(asio::steady_timer::time_point::max()); }

Task<void> Connection::watchdog(std::shared_ptr<Connection> self) {
  // Re-arming or disarming cancels the wait; only a deadline that really
  // passed closes the connection.
  while (!closed_) {
    std::error_code ec;  // cancelled: re-armed, disarmed or closed; look again
    co_await deadline_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (closed_) break;
    if (deadline_.expiry() <= asio::steady_timer::clock_type::now()) {
      spdlog::debug("nbd: closing a client that {}", negotiated_
                                                         ? "stalled in a write payload"
                                                         : "did not finish the handshake in time");
      close();
    }
  }
}

Task<bool> Connection::write_all(std::span<const std::byte> data) {
  if (closed_) co_return false;
  if (tls_) co_return co_await tls_->write_all(data);
  auto [ec, n] =
      co_await asio::async_write(sock_, asio::buffer(data.data(), data.size()), use_tuple);
  co_return !ec;
}

void Connection::close() {
  if (closed_) return;
  closed_ = true;
  std::error_code ec;
  sock_.shutdown(asio::socket_base::shutdown_both, ec);
  sock_.close(ec);
  deadline_.cancel();
  slot_free_.notify_all();
}

Task<void> Connection::run(std::shared_ptr<Connection> self) {
  asio::co_spawn(sock_.get_executor(), watchdog(self), asio::detached);
  arm(server_.limits().handshake_limit);
  bool chosen = co_await handshake();
  disarm();
  if (chosen) {
    ++export_->connections_total;
    co_await transmission();
  }
  close();
  // Handlers still running keep using the socket's state. transmission() closed
  // the gate already when it ran.
  if (!requests_.closed()) co_await requests_.close();
  export_ = {};  // nothing refers to the export any more
}

void Connection::queue(std::vector<std::byte> buf) {
  if (closed_) return;
  out_bytes_ += buf.size();
  out_.push_back(std::move(buf));
  if (!writing_) {
    writing_ = true;
    asio::co_spawn(sock_.get_executor(), writer(shared_from_this()), asio::detached);
  }
}

Task<void> Connection::writer(std::shared_ptr<Connection> self) {
  // Replies queued while a write is on the wire go out together in one gather
  // write: fewer syscalls at high queue depth.
  while (!out_.empty() && !closed_) {
    std::vector<std::vector<std::byte>> batch;
    std::vector<asio::const_buffer> bufs;
    uint64_t bytes = 0;
    while (!out_.empty() && batch.size() < 64) {
      batch.push_back(std::move(out_.front()));
      out_.pop_front();
      bufs.emplace_back(batch.back().data(), batch.back().size());
      bytes += batch.back().size();
    }
    bool ok;
    if (tls_) {
      // TLS records are made from one buffer: the batch is joined first.
      std::vector<std::byte> joined;
      joined.reserve(bytes);
      for (auto& b : batch) joined.insert(joined.end(), b.begin(), b.end());
      ok = co_await tls_->write_all(joined);
    } else {
      auto [ec, n] = co_await asio::async_write(sock_, bufs, use_tuple);
      ok = !ec;
    }
    BLKMIRROR_ASSERT(out_bytes_ >= bytes, "queued reply bytes below zero");
    out_bytes_ -= bytes;
    slot_free_.notify_all();
    if (!ok) {
      close();
      break;
    }
  }
  out_.clear();
  out_bytes_ = 0;
  writing_ = false;
}

void Connection::send_simple(uint64_t cookie, uint32_t error) {
  std::vector<std::byte> buf;
  encode_simple_reply(error, cookie, buf);
  queue(std::move(buf));
}

void Connection::send_error(const Request& r, uint32_t error) {
  if (structured_ && (r.type == kCmdRead || r.type == kCmdBlockStatus)) {
    std::vector<std::byte> buf;
    encode_structured_header(kReplyFlagDone, kReplyError, r.cookie, 6, buf);
    Writer(buf).u32(error).u16(0);
    queue(std::move(buf));
    return;
  }
  send_simple(r.cookie, error);
}

Task<void> Connection::transmission() {
  const Export* exp = export_.get();
  negotiated_ = true;
  limits_.size = exp->edge->length();
  limits_.read_only = !exp->writable;
  limits_.structured = structured_;
  limits_.meta_base_allocation = meta_base_allocation_ && meta_export_ == exp->name;
  limits_.meta_allocation_depth = meta_allocation_depth_ && meta_export_ == exp->name;
  if (meta_export_ != exp->name) meta_bitmaps_.clear();
  limits_.meta_dirty_bitmap = !meta_bitmaps_.empty();
  limits_.max_payload = NbdServer::kMaxPayload;
  in_buf_.resize(NbdServer::kTransmissionReadBuffer);  // past the handshake: buffer for throughput

  std::array<std::byte, kRequestSize> raw;
  while (!closed_) {
    while ((in_flight_ >= NbdServer::kMaxInFlightPerConn ||
            out_bytes_ > NbdServer::kMaxQueuedReplyBytes) &&
           !closed_)
      co_await slot_free_.wait();
    if (!co_await read_exact(raw.data(), raw.size())) break;
    auto req = decode_request(raw);
    if (!req) break;  // bad magic: the stream is lost, hang up
    Payload payload;
    if (req->type == kCmdWrite && req->length > 0) {
      // Over the limit, or no memory for it: read and drop (the stream stays in
      // sync) and answer with an error.
      uint32_t refuse = 0;
      if (req->length > NbdServer::kMaxPayload) {
        if (req->length > kPayloadDiscardLimit) break;
        refuse = structured_ ? kEoverflow : kEinval;
      } else {
        payload = Payload(req->length);  // committed as the bytes arrive
        if (!payload.ok()) refuse = kEnomem;
      }
      if (refuse) {
        if (!co_await skip(req->length, true)) break;
        disarm();
        send_error(*req, refuse);
        continue;
      }
      if (!co_await read_exact(payload.data(), payload.size(), true)) break;
      disarm();
    }
    if (req->type == kCmdDisc) break;
    if (uint32_t err = validate_request(*req, limits_)) {
      send_error(*req, err);
      continue;
    }
    auto hold = requests_.try_enter();
    if (!hold) break;
    ++in_flight_;
    asio::co_spawn(
        sock_.get_executor(),
        [](Connection* c, Request r, Payload p, Gate::Holder h,
           std::shared_ptr<Connection> self) -> Task<void> {
          co_await c->handle(r, std::move(p), self);
        }(this, *req, std::move(payload), std::move(hold), shared_from_this()),
        asio::detached);
  }
  // NBD_CMD_DISC or a lost stream: finish what is in flight, then close.
  co_await requests_.close();
}

Task<void> Connection::handle(Request r, Payload payload, std::shared_ptr<Connection> self) {
  Export& exp = *export_;
  Child& edge = *exp.edge;
  const auto start = std::chrono::steady_clock::now();
  ++exp.in_flight;
  bool fua = r.flags & kCmdFlagFua;
  uint32_t err = 0;
  switch (r.type) {
    case kCmdRead:
      err = co_await do_read(r);
      break;
    case kCmdWrite:
      err = wire_error(co_await edge.write(r.offset, payload.span(), WriteFlags{fua}));
      send_simple(r.cookie, err);
      break;
    case kCmdFlush:
      err = wire_error(co_await edge.flush());
      send_simple(r.cookie, err);
      break;
    case kCmdTrim: {
      auto res = co_await edge.discard(r.offset, r.length);
      if (res && fua) res = co_await edge.flush();
      err = wire_error(res);
      send_simple(r.cookie, err);
      break;
    }
    case kCmdWriteZeroes: {
      ZeroFlags zf{.may_unmap = !(r.flags & kCmdFlagNoHole),
                   .no_fallback = (r.flags & kCmdFlagFastZero) != 0,
                   .fua = fua};
      err = wire_error(co_await edge.write_zeroes(r.offset, r.length, zf));
      send_simple(r.cookie, err);
      break;
    }
    case kCmdCache:
      send_simple(r.cookie, 0);  // advisory; the page cache does its own read-ahead
      break;
    case kCmdBlockStatus:
      err = co_await do_block_status(r);
      break;
  }
  --exp.in_flight;
  if (auto* st = exp.stats_for(r.type))
    st->record(r.type == kCmdFlush ? 0 : r.length, std::chrono::steady_clock::now() - start,
               err == 0);
  BLKMIRROR_ASSERT(in_flight_ > 0, "requests in flight below zero");
  --in_flight_;
  slot_free_.notify_all();
}

Task<uint32_t> Connection::do_read(const Request& r) {
  Child& edge = *export_->edge;
  if (!structured_) {
    std::vector<std::byte> buf;
    encode_simple_reply(0, r.cookie, buf);
    size_t head = buf.size();
    buf.resize(head + r.length);
    auto res = co_await edge.read(r.offset, {buf.data() + head, r.length});
    if (!res) {
      send_simple(r.cookie, wire_error(res));  // no payload after an error
      co_return wire_error(res);
    }
    queue(std::move(buf));
    co_return 0;
  }
  // Structured: holes go out as hole chunks (no data on the wire), unless the
  // client asked for one unfragmented chunk (DF).
  std::vector<std::byte> out;
  uint64_t pos = r.offset, end = r.offset + r.length;
  bool sparse = !(r.flags & kCmdFlagDf) && edge.caps().has_block_status;
  while (pos < end) {
    Extent e{end - pos, true, false};
    if (sparse) {
      auto st = co_await edge.block_status(pos, end - pos);
      if (!st) {
        send_error(r, errno_to_wire(st.error().errnum()));
        co_return errno_to_wire(st.error().errnum());
      }
      e = *st;
    }
    bool last = pos + e.length >= end;
    uint16_t flags = last ? kReplyFlagDone : 0;
    if (e.zero) {
      encode_structured_header(flags, kReplyOffsetHole, r.cookie, 12, out);
      Writer(out).u64(pos).u32(static_cast<uint32_t>(e.length));
    } else {
      encode_structured_header(flags, kReplyOffsetData, r.cookie,
                               static_cast<uint32_t>(8 + e.length), out);
      Writer(out).u64(pos);
      size_t at = out.size();
      out.resize(at + e.length);
      auto res = co_await edge.read(pos, {out.data() + at, e.length});
      if (!res) {
        send_error(r, wire_error(res));
        co_return wire_error(res);
      }
    }
    pos += e.length;
  }
  queue(std::move(out));
  co_return 0;
}

namespace {

// One NBD_REPLY_TYPE_BLOCK_STATUS chunk's descriptors; adjacent extents with the
// same value merge.
struct Descriptors {
  struct Desc {
    uint32_t length, flags;
  };
  std::vector<Desc> list;
  void add(uint64_t length, uint32_t flags) {
    if (!list.empty() && list.back().flags == flags)
      list.back().length += static_cast<uint32_t>(length);
    else
      list.push_back({static_cast<uint32_t>(length), flags});
  }
  void encode(uint16_t reply_flags, uint64_t cookie, uint32_t context_id,
              std::vector<std::byte>& out) const {
    encode_structured_header(reply_flags, kReplyBlockStatus, cookie,
                             static_cast<uint32_t>(4 + 8 * list.size()), out);
    Writer w(out);
    w.u32(context_id);
    for (auto& d : list) w.u32(d.length).u32(d.flags);
  }
};

// The dirty extents of one exported bitmap over [off, end): at most
// kMaxBlockStatusDescriptors descriptors (one with REQ_ONE). A request's length
// is 32-bit, so descriptor lengths fit theirs.
Descriptors bitmap_extents(const NamedBitmap& b, uint64_t off, uint64_t end, bool one) {
  Descriptors d;
  uint64_t pos = off;
  while (pos < end && d.list.size() < kMaxBlockStatusDescriptors) {
    auto dirty = b.next_dirty(pos);
    uint64_t run_end, flags;
    if (dirty && dirty->first <= pos) {
      run_end = std::min(end, dirty->first + dirty->second);
      flags = kStateDirty;
    } else {
      run_end = dirty ? std::min(end, dirty->first) : end;
      flags = 0;
    }
    d.add(run_end - pos, static_cast<uint32_t>(flags));
    pos = run_end;
    if (one) break;
  }
  return d;
}

}  // namespace

Task<uint32_t> Connection::do_block_status(const Request& r) {
  // One walk over the device's extents feeds both allocation contexts; each
  // gets its own chunk (base:allocation first), then one chunk per dirty
  // bitmap context; the last chunk is flagged done. The allocation chunks
  // describe the same prefix of the request, which may end early at the
  // descriptor cap.
  Child& edge = *export_->edge;
  Descriptors alloc, depth;
  uint64_t pos = r.offset, end = r.offset + r.length;
  const bool walk = limits_.meta_base_allocation || limits_.meta_allocation_depth;
  while (walk && pos < end && alloc.list.size() < kMaxBlockStatusDescriptors &&
         depth.list.size() < kMaxBlockStatusDescriptors) {
    auto st = co_await edge.block_status(pos, end - pos);
    if (!st) {
      send_error(r, errno_to_wire(st.error().errnum()));
      co_return errno_to_wire(st.error().errnum());
    }
    alloc.add(st->length, (st->allocated ? 0 : kStateHole) | (st->zero ? kStateZero : 0));
    depth.add(st->length, st->depth);
    pos += st->length;
    if (r.flags & kCmdFlagReqOne) break;
  }
  std::vector<std::pair<uint32_t, Descriptors>> chunks;
  if (limits_.meta_base_allocation) chunks.emplace_back(kMetaIdBaseAllocation, std::move(alloc));
  if (limits_.meta_allocation_depth) chunks.emplace_back(kMetaIdAllocationDepth, std::move(depth));
  for (size_t i : meta_bitmaps_)
    chunks.emplace_back(kMetaIdFirstBitmap + i,
                        bitmap_extents(*export_->bitmaps[i], r.offset, end,
                                       (r.flags & kCmdFlagReqOne) != 0));
  std::vector<std::byte> out;
  for (size_t i = 0; i < chunks.size(); ++i)
    chunks[i].second.encode(i + 1 == chunks.size() ? kReplyFlagDone : 0, r.cookie,
                            chunks[i].first, out);
  queue(std::move(out));
  co_return 0;
}

}  // namespace blkmirror::nbd
