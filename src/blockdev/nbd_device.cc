#include "blockdev/nbd_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "base/align.h"
#include "base/limits.h"

namespace blkmirror {

namespace {

// NBD's default maximum payload when the server states none.
constexpr uint64_t kDefaultMaxPayload = kMaxRequestBytes;
// Zero, trim and block status carry no payload; their length field is 32 bits.
constexpr uint64_t kMaxNoPayload = 1u << 30;
// Wait this long after a failed reconnect before trying again.
constexpr auto kReconnectBackoff = std::chrono::seconds(1);

using Issue = NbdConnection::Issue;

// Splits [off, off+len) into pieces of at most max bytes.
template <class F>
void for_pieces(uint64_t off, uint64_t len, uint64_t max, F f) {
  for (uint64_t pos = 0; pos < len;) {
    uint64_t n = std::min(max, len - pos);
    f(off + pos, pos, n);
    pos += n;
  }
}

// What one NBD_CMD_BLOCK_STATUS reply said about the first extents: the run of
// extents with the same flags that starts at the queried offset.
struct StatusRun {
  uint64_t end = 0;
  uint32_t flags = 0;
  bool any = false, done = false;
};

int on_extents(void* user_data, const char* context, uint64_t offset, uint32_t* entries, size_t nr,
               int* error) {
  auto* run = static_cast<StatusRun*>(user_data);
  if (std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || run->done) return 0;
  run->end = offset;
  for (size_t i = 0; i + 1 < nr; i += 2) {
    if (run->any && entries[i + 1] != run->flags) {
      run->done = true;
      break;
    }
    run->any = true;
    run->flags = entries[i + 1];
    run->end += entries[i];
  }
  run->done = true;
  return 0;
}

}  // namespace

NbdDevice::NbdDevice(Loop& loop, NbdConnectOptions opts)
    : loop_(loop), opts_(std::move(opts)), where_(opts_.display()) {}

Task<Result<NbdDevice::Conns>> NbdDevice::connect_all(Loop& loop, NbdConnectOptions opts) {
  Conns conns;
  auto first = co_await NbdConnection::open(loop, opts);
  if (!first) co_return make_error(first.error());
  nbd_handle* h = (*first)->handle();
  conns.push_back(std::move(*first));
  // Several connections only when the server promises they see one another's
  // writes and flushes (multi-conn); otherwise one connection keeps it correct.
  unsigned want = nbd_can_multi_conn(h) == 1 ? std::max(1u, opts.max_connections) : 1;
  while (conns.size() < want) {
    auto more = co_await NbdConnection::open(loop, opts);
    if (!more) break;  // fewer connections is slower, not wrong
    conns.push_back(std::move(*more));
  }
  co_return conns;
}

void NbdDevice::learn(nbd_handle* h) {
  length_ = static_cast<uint64_t>(std::max<int64_t>(nbd_get_size(h), 0));
  BlockCaps& c = caps_;
  c.read_only = nbd_is_read_only(h) == 1;
  c.can_fua = nbd_can_fua(h) == 1;
  c.can_trim = nbd_can_trim(h) == 1;
  c.can_zero = nbd_can_zero(h) == 1;
  // Without NO_HOLE the server may leave a hole behind a zeroed range.
  c.can_zero_unmap = c.can_zero;
  c.has_block_status = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  c.zero_init = false;  // unknown: the mirror asks block status instead
  int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  int64_t pref = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
  int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  c.min_block = min > 0 && is_pow2(static_cast<uint64_t>(min)) ? static_cast<uint32_t>(min) : 1;
  c.pref_block = pref > 0 ? static_cast<uint32_t>(pref) : std::max<uint32_t>(4096, c.min_block);
  uint64_t maxp = max > 0 ? std::min<uint64_t>(static_cast<uint64_t>(max), kDefaultMaxPayload)
                          : kDefaultMaxPayload;
  c.max_transfer =
      static_cast<uint32_t>(std::max<uint64_t>(align_down(maxp, c.min_block), c.min_block));
  can_flush_ = nbd_can_flush(h) == 1;
  can_fast_zero_ = nbd_can_fast_zero(h) == 1;
  multi_conn_ = nbd_can_multi_conn(h) == 1;
}

Task<Result<std::shared_ptr<NbdDevice>>> NbdDevice::open(Loop& loop, NbdConnectOptions opts) {
  std::shared_ptr<NbdDevice> dev(new NbdDevice(loop, opts));
  auto conns = co_await connect_all(loop, opts);
  if (!conns) co_return make_error(conns.error());
  dev->conns_ = std::move(*conns);
  dev->learn(dev->conns_.front()->handle());
  co_return dev;
}

Task<Result<BlockDevicePtr>> open_nbd(Loop& loop, NbdConnectOptions opts) {
  auto d = co_await NbdDevice::open(loop, std::move(opts));
  if (!d) co_return make_error(d.error());
  co_return BlockDevicePtr(*d);
}

size_t NbdDevice::connections() const {
  return std::count_if(conns_.begin(), conns_.end(), [](auto& c) { return !c->dead(); });
}

tl::unexpected<Error> NbdDevice::fail(const char* what, uint64_t off, int err,
                                      const std::string& why) const {
  return make_error(err, fmt::format("{} {} at offset {}{}", what, where_, off,
                                     why.empty() ? "" : " (" + why + ")"));
}

Task<Result<void>> NbdDevice::reconnect() {
  auto conns = co_await connect_all(loop_, opts_);
  if (!conns) co_return make_error(conns.error());
  nbd_handle* h = (*conns).front()->handle();
  uint64_t size = static_cast<uint64_t>(std::max<int64_t>(nbd_get_size(h), 0));
  // Another disk behind the same address must not receive the rest of a copy.
  if (size != length_)
    co_return make_plain_error(EIO, fmt::format("{}: export size changed from {} to {} while "
                                                "reconnecting; refusing to continue",
                                                where_, length_, size));
  if (nbd_is_read_only(h) == 1 && !caps_.read_only)
    co_return make_plain_error(EROFS, where_ + ": export became read-only while reconnecting");
  conns_ = std::move(*conns);
  ++reconnects_;
  co_return Result<void>{};
}

Task<Result<NbdConnection*>> NbdDevice::connection() {
  // Dead connections have failed all their requests; drop them.
  std::erase_if(conns_, [](auto& c) { return c->dead() && c->in_flight() == 0; });
  while (conns_.empty()) {
    if (reconnecting_) {
      co_await reconnected_.wait(std::chrono::milliseconds(100));
      continue;
    }
    if (reconnect_error_ && std::chrono::steady_clock::now() < retry_after_)
      co_return make_error(*reconnect_error_);
    reconnecting_ = true;
    auto r = co_await reconnect();
    reconnecting_ = false;
    reconnected_.notify_all();
    if (!r) {
      reconnect_error_ = r.error();
      reconnect_error_->context = "reconnect failed: " + r.error().message();
      reconnect_error_->plain = true;
      retry_after_ = std::chrono::steady_clock::now() + kReconnectBackoff;
      co_return make_error(*reconnect_error_);
    }
    reconnect_error_.reset();
  }
  NbdConnection* best = conns_.front().get();
  for (auto& c : conns_)
    if (c->in_flight() < best->in_flight()) best = c.get();
  co_return best;
}

Task<Result<void>> NbdDevice::run(const char* what, uint64_t off, std::vector<Issue> batch) {
  auto c = co_await connection();
  if (!c) {
    auto e = c.error();
    co_return make_plain_error(
        e.errnum() == EROFS ? EROFS : EIO,
        fmt::format("{} {} at offset {}: {}", what, where_, off, e.message()));
  }
  std::string why;
  int err = co_await (*c)->run(batch, &why);
  if (err) co_return fail(what, off, err, why);
  co_return Result<void>{};
}

Task<Result<void>> NbdDevice::read_aligned(uint64_t off, std::span<std::byte> buf) {
  std::vector<Issue> batch;
  for_pieces(off, buf.size(), caps_.max_transfer, [&](uint64_t pos, uint64_t rel, uint64_t n) {
    std::byte* p = buf.data() + rel;
    batch.push_back([p, pos, n](nbd_handle* h, nbd_completion_callback cb) {
      return nbd_aio_pread(h, p, n, pos, cb, 0);
    });
  });
  co_return co_await run("read", off, std::move(batch));
}

Task<Result<void>> NbdDevice::read(uint64_t off, std::span<std::byte> buf, ReadFlags) {
  if (!range_within(off, buf.size(), length_)) co_return fail("read", off, EINVAL, "out of range");
  if (buf.empty()) co_return Result<void>{};
  uint64_t a = caps_.min_block;
  if (is_aligned(off, a) && is_aligned(buf.size(), a)) co_return co_await read_aligned(off, buf);
  // Widen to whole server blocks through a bounce buffer.
  uint64_t start = align_down(off, a), end = std::min(align_up(off + buf.size(), a), length_);
  std::vector<std::byte> bounce(end - start);
  auto r = co_await read_aligned(start, bounce);
  if (r) std::memcpy(buf.data(), bounce.data() + (off - start), buf.size());
  co_return r;
}

Task<Result<void>> NbdDevice::write_aligned(uint64_t off, std::span<const std::byte> buf,
                                            bool fua) {
  uint32_t flags = fua && caps_.can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  std::vector<Issue> batch;
  for_pieces(off, buf.size(), caps_.max_transfer, [&](uint64_t pos, uint64_t rel, uint64_t n) {
    const std::byte* p = buf.data() + rel;
    batch.push_back([p, pos, n, flags](nbd_handle* h, nbd_completion_callback cb) {
      return nbd_aio_pwrite(h, p, n, pos, cb, flags);
    });
  });
  auto r = co_await run("write", off, std::move(batch));
  if (r && fua && !caps_.can_fua) co_return co_await flush();
  co_return r;
}

Task<Result<void>> NbdDevice::write_unaligned(uint64_t off, std::span<const std::byte> buf,
                                              bool fua) {
  // Read-modify-write of the partial edge blocks.
  uint64_t a = caps_.min_block;
  uint64_t start = align_down(off, a), end = std::min(align_up(off + buf.size(), a), length_);
  std::vector<std::byte> bounce(end - start);
  bool head = start < off;
  if (head) {
    auto r = co_await read_aligned(start, std::span(bounce).first(std::min(a, end - start)));
    if (!r) co_return r;
  }
  // The last block, unless it is the head block just read.
  uint64_t tail = align_down(off + buf.size(), a);
  if (off + buf.size() < end && !(head && tail == start)) {
    auto r = co_await read_aligned(tail, std::span(bounce).subspan(tail - start, end - tail));
    if (!r) co_return r;
  }
  std::memcpy(bounce.data() + (off - start), buf.data(), buf.size());
  co_return co_await write_aligned(start, bounce, fua);
}

Task<Result<void>> NbdDevice::write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) {
  if (caps_.read_only) co_return fail("write", off, EROFS);
  if (!range_within(off, buf.size(), length_)) co_return fail("write", off, EINVAL, "out of range");
  if (buf.empty()) co_return Result<void>{};
  uint64_t a = caps_.min_block;
  if (is_aligned(off, a) && is_aligned(buf.size(), a))
    co_return co_await write_aligned(off, buf, f.fua);
  co_return co_await write_unaligned(off, buf, f.fua);
}

Task<Result<void>> NbdDevice::write_zero_data(uint64_t off, uint64_t len, bool fua) {
  std::vector<std::byte> zeroes(std::min<uint64_t>(len, 1u << 20));
  for (uint64_t pos = off; pos < off + len;) {
    uint64_t n = std::min<uint64_t>(zeroes.size(), off + len - pos);
    auto r =
        co_await write(pos, std::span<const std::byte>(zeroes.data(), n), WriteFlags{.fua = fua});
    if (!r) co_return r;
    pos += n;
  }
  co_return Result<void>{};
}

Task<Result<void>> NbdDevice::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  if (caps_.read_only) co_return fail("write zeroes", off, EROFS);
  if (!range_within(off, len, length_)) co_return fail("write zeroes", off, EINVAL, "out of range");
  if (len == 0) co_return Result<void>{};
  // FAST_ZERO: the caller would rather do something else than wait for a slow
  // zeroing; say so without asking a server that cannot promise it.
  if (f.no_fallback && (!caps_.can_zero || !can_fast_zero_))
    co_return fail("write zeroes", off, ENOTSUP, "the server has no fast zero");
  if (!caps_.can_zero) co_return co_await write_zero_data(off, len, f.fua);
  uint64_t a = caps_.min_block;
  uint64_t start = align_up(off, a), end = align_down(off + len, a);
  if (start >= end) co_return co_await write_zero_data(off, len, f.fua);
  // Partial edge blocks are written as zero data (read-modify-write).
  if (off < start)
    if (auto r = co_await write_zero_data(off, start - off, f.fua); !r) co_return r;
  if (end < off + len)
    if (auto r = co_await write_zero_data(end, off + len - end, f.fua); !r) co_return r;
  uint32_t flags = (f.may_unmap ? 0 : LIBNBD_CMD_FLAG_NO_HOLE) |
                   (f.no_fallback ? LIBNBD_CMD_FLAG_FAST_ZERO : 0) |
                   (f.fua && caps_.can_fua ? LIBNBD_CMD_FLAG_FUA : 0);
  std::vector<Issue> batch;
  for_pieces(start, end - start, kMaxNoPayload, [&](uint64_t pos, uint64_t, uint64_t n) {
    batch.push_back([pos, n, flags](nbd_handle* h, nbd_completion_callback cb) {
      return nbd_aio_zero(h, n, pos, cb, flags);
    });
  });
  auto r = co_await run("write zeroes", start, std::move(batch));
  if (r && f.fua && !caps_.can_fua) co_return co_await flush();
  co_return r;
}

Task<Result<void>> NbdDevice::discard(uint64_t off, uint64_t len) {
  if (caps_.read_only) co_return fail("discard", off, EROFS);
  if (!range_within(off, len, length_)) co_return fail("discard", off, EINVAL, "out of range");
  // Advisory: without TRIM, or for the partial edge blocks, doing nothing is
  // a correct discard.
  uint64_t start = align_up(off, caps_.min_block), end = align_down(off + len, caps_.min_block);
  if (!caps_.can_trim || start >= end) co_return Result<void>{};
  std::vector<Issue> batch;
  for_pieces(start, end - start, kMaxNoPayload, [&](uint64_t pos, uint64_t, uint64_t n) {
    batch.push_back([pos, n](nbd_handle* h, nbd_completion_callback cb) {
      return nbd_aio_trim(h, n, pos, cb, 0);
    });
  });
  co_return co_await run("discard", start, std::move(batch));
}

Task<Result<void>> NbdDevice::flush() {
  if (!can_flush_) co_return Result<void>{};  // the server has nothing to flush
  std::vector<Issue> batch;
  batch.push_back(
      [](nbd_handle* h, nbd_completion_callback cb) { return nbd_aio_flush(h, cb, 0); });
  co_return co_await run("flush", 0, std::move(batch));
}

Task<Result<Extent>> NbdDevice::block_status(uint64_t off, uint64_t len) {
  if (len == 0 || !range_within(off, len, length_))
    co_return fail("block status", off, EINVAL, "out of range");
  if (!caps_.has_block_status) co_return Extent{len, true, false};
  uint64_t start = align_down(off, caps_.min_block);
  uint64_t count = std::min(align_up(off + len, caps_.min_block), length_) - start;
  count = std::min(count, kMaxNoPayload);
  StatusRun status;
  StatusRun* sp = &status;  // lives in this frame until the reply is in
  std::vector<Issue> batch;
  batch.push_back([sp, start, count](nbd_handle* h, nbd_completion_callback cb) {
    return nbd_aio_block_status(h, count, start, nbd_extent_callback{on_extents, sp, nullptr}, cb,
                                0);
  });
  auto r = co_await run("block status", off, std::move(batch));
  if (!r) co_return make_error(r.error());
  // A server that answered nothing useful: call it data, which is always safe.
  if (!status.any || status.end <= off) co_return Extent{len, true, false};
  bool hole = status.flags & LIBNBD_STATE_HOLE, zero = status.flags & LIBNBD_STATE_ZERO;
  co_return Extent{std::min(status.end, off + len) - off, !hole, zero};
}

}  // namespace blkmirror
