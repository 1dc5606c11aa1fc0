#include "blockdev/memory_device.h"

#include <algorithm>
#include <cstring>

#include <asio.hpp>
#include <fmt/format.h>

#include "base/align.h"

namespace blkmirror {

BlockCaps MemoryDevice::defaults() {
  BlockCaps c;
  c.zero_init = true;
  c.can_zero = true;
  c.can_zero_unmap = true;
  c.can_trim = true;
  c.can_fua = true;
  c.has_block_status = true;
  return c;
}

MemoryDevice::MemoryDevice(uint64_t length, Options opts)
    : length_(length), opts_(opts), rng_(opts.seed) {}

Task<void> MemoryDevice::maybe_yield() {
  if (!opts_.yield) co_return;
  unsigned n = 1 + (opts_.jitter ? static_cast<unsigned>(rng_() % (opts_.jitter + 1)) : 0);
  auto ex = co_await asio::this_coro::executor;
  for (unsigned i = 0; i < n; ++i) co_await asio::post(ex, asio::use_awaitable);
}

Result<void> MemoryDevice::check(uint64_t off, uint64_t len, bool writing) const {
  if (!range_within(off, len, length_))
    return make_error(EINVAL, fmt::format("memory: range {}+{} past end {}", off, len, length_));
  if (writing && opts_.caps.read_only) return make_error(EROFS, "memory: read-only");
  return {};
}

void MemoryDevice::read_now(uint64_t off, std::span<std::byte> buf) const {
  uint64_t pos = off;
  size_t done = 0;
  while (done < buf.size()) {
    uint64_t page = pos / kPage, in = pos % kPage;
    size_t n = std::min<uint64_t>(kPage - in, buf.size() - done);
    auto it = pages_.find(page);
    if (it == pages_.end())
      std::memset(buf.data() + done, 0, n);
    else
      std::memcpy(buf.data() + done, it->second->data() + in, n);
    done += n;
    pos += n;
  }
}

void MemoryDevice::write_now(uint64_t off, std::span<const std::byte> buf) {
  uint64_t pos = off;
  size_t done = 0;
  while (done < buf.size()) {
    uint64_t page = pos / kPage, in = pos % kPage;
    size_t n = std::min<uint64_t>(kPage - in, buf.size() - done);
    auto& p = pages_[page];
    if (!p) {
      p = std::make_unique<Page>();
      p->fill(std::byte{0});
    }
    std::memcpy(p->data() + in, buf.data() + done, n);
    done += n;
    pos += n;
  }
  ++writes_;
  bytes_written_ += buf.size();
}

void MemoryDevice::zero_now(uint64_t off, uint64_t len, bool unmap) {
  uint64_t pos = off, end = off + len;
  while (pos < end) {
    uint64_t page = pos / kPage, in = pos % kPage;
    uint64_t n = std::min<uint64_t>(kPage - in, end - pos);
    auto it = pages_.find(page);
    if (n == kPage && unmap) {
      if (it != pages_.end()) pages_.erase(it);
    } else if (it != pages_.end()) {
      std::memset(it->second->data() + in, 0, n);
    } else if (!unmap) {
      auto& p = pages_[page];
      p = std::make_unique<Page>();
      p->fill(std::byte{0});
    }
    pos += n;
  }
}

Task<Result<void>> MemoryDevice::read(uint64_t off, std::span<std::byte> buf, ReadFlags) {
  if (auto r = check(off, buf.size(), false); !r) co_return r;
  co_await maybe_yield();
  read_now(off, buf);
  co_await maybe_yield();
  co_return Result<void>{};
}

Task<Result<void>> MemoryDevice::write(uint64_t off, std::span<const std::byte> buf,
                                       WriteFlags) {
  if (auto r = check(off, buf.size(), true); !r) co_return r;
  co_await maybe_yield();
  write_now(off, buf);
  co_await maybe_yield();
  co_return Result<void>{};
}

Task<Result<void>> MemoryDevice::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  if (auto r = check(off, len, true); !r) co_return r;
  co_await maybe_yield();
  zero_now(off, len, f.may_unmap);
  co_await maybe_yield();
  co_return Result<void>{};
}

Task<Result<void>> MemoryDevice::discard(uint64_t off, uint64_t len) {
  if (auto r = check(off, len, true); !r) co_return r;
  co_await maybe_yield();
  // Only whole pages are dropped; partial pages keep their data (allowed: discard
  // leaves contents unspecified).
  uint64_t first = align_up(off, kPage), last = align_down(off + len, kPage);
  for (uint64_t p = first; p < last; p += kPage) pages_.erase(p / kPage);
  co_return Result<void>{};
}

Task<Result<void>> MemoryDevice::flush() {
  co_await maybe_yield();
  co_return Result<void>{};
}

Task<Result<Extent>> MemoryDevice::block_status(uint64_t off, uint64_t len) {
  if (auto r = check(off, len, false); !r) co_return make_error(r.error());
  if (len == 0) co_return make_error(EINVAL, "memory: empty block status query");
  co_await maybe_yield();
  uint64_t end = off + len;
  uint64_t page = off / kPage;
  auto it = pages_.lower_bound(page);
  bool first_alloc = it != pages_.end() && it->first == page;
  uint64_t pos;  // first byte whose allocation state differs
  if (first_alloc) {
    uint64_t next = page;
    while (it != pages_.end() && it->first == next && next * kPage < end) {
      ++it;
      ++next;
    }
    pos = next * kPage;
  } else {
    pos = it == pages_.end() ? end : it->first * kPage;
  }
  Extent e;
  e.length = std::min(pos, end) - off;
  e.allocated = first_alloc;
  e.zero = !first_alloc;
  co_return e;
}

Task<Result<void>> MemoryDevice::resize(uint64_t new_length) {
  if (opts_.caps.read_only) co_return make_error(EROFS, "memory: read-only");
  co_await maybe_yield();
  if (new_length < length_) {
    // Drop whole pages past the end and zero the tail of the last one, so growing
    // again reads zeroes there.
    pages_.erase(pages_.lower_bound(div_round_up(new_length, kPage)), pages_.end());
    if (new_length % kPage) {
      auto it = pages_.find(new_length / kPage);
      if (it != pages_.end())
        std::memset(it->second->data() + new_length % kPage, 0, kPage - new_length % kPage);
    }
  }
  length_ = new_length;
  co_return Result<void>{};
}

}  // namespace blkmirror
