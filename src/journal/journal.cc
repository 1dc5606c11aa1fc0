#include "journal/journal.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>

#include "io/buffer.h"

namespace blkmirror {

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kBitsPerPage = kPage * 8;
constexpr uint64_t kWordsPerPage = kPage / 8;
constexpr uint64_t kMaxBitmapBits = uint64_t{8} << 23;  // 8 MiB of bitmap
static_assert(std::endian::native == std::endian::little,
              "the bitmap is written as the host's words: little-endian hosts only");

uint64_t now_unix() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

uint64_t Journal::default_extent_size(uint64_t length, uint64_t granularity) {
  uint64_t e = std::max<uint64_t>(uint64_t{1} << 20, granularity);
  while (e < (uint64_t{1} << 40) && (length + e - 1) / e > kMaxBitmapBits) e *= 2;
  return e;
}

Journal::Journal(BlockDevicePtr file, JournalHeader h)
    : file_(std::move(file)),
      h_(std::move(h)),
      words_(h_.bitmap_bytes() / 8),
      page_batch_(h_.bitmap_bytes() / kPage) {}

std::pair<uint64_t, uint64_t> Journal::extents_of(uint64_t off, uint64_t len) const {
  if (len == 0 || off >= h_.length) return {0, 0};
  uint64_t end = std::min(off + len, h_.length);
  return {off / h_.extent_size, (end + h_.extent_size - 1) / h_.extent_size};
}

uint64_t Journal::dirty_count() const {
  uint64_t n = 0;
  for (uint64_t w : words_) n += static_cast<uint64_t>(std::popcount(w));
  return n;
}

std::optional<uint64_t> Journal::next_dirty(uint64_t from) const {
  const uint64_t n = extents();
  for (uint64_t w = from / 64; w < words_.size() && w * 64 < n; ++w) {
    uint64_t bits = words_[w];
    if (w == from / 64) bits &= ~uint64_t{0} << (from % 64);
    if (!bits) continue;
    uint64_t x = w * 64 + static_cast<uint64_t>(std::countr_zero(bits));
    return x < n ? std::optional<uint64_t>(x) : std::nullopt;
  }
  return std::nullopt;
}

Task<Result<std::unique_ptr<Journal>>> Journal::create(BlockDevicePtr file, JournalHeader h) {
  h.seq = 0;
  h.created_unix = h.updated_unix = now_unix();
  std::unique_ptr<Journal> j(new Journal(file, h));
  if (file->length() < h.file_size()) {
    if (auto r = co_await file->resize(h.file_size()); !r) co_return make_error(r.error());
  }
  // Everything may differ until a checkpoint says otherwise.
  const uint64_t n = h.extents();
  for (uint64_t i = 0; i < n; ++i) j->words_[i / 64] |= uint64_t{1} << (i % 64);
  AlignedBuffer buf(std::max<uint64_t>(h.bitmap_bytes(), kPage));
  std::memcpy(buf.data(), j->words_.data(), h.bitmap_bytes());
  if (h.bitmap_bytes() > 0) {
    auto w = co_await file->write(kJournalBitmapOffset, buf.span(h.bitmap_bytes()));
    if (!w) co_return make_error(w.error());
  }
  // Both slots, so that neither holds an older state file's header.
  for (int i = 0; i < 2; ++i)
    if (auto w = co_await j->write_header(); !w) co_return make_error(w.error());
  if (auto f = co_await file->flush(); !f) co_return make_error(f.error());
  co_return j;
}

Task<Result<std::unique_ptr<Journal>>> Journal::open(BlockDevicePtr file) {
  if (file->length() < kJournalBitmapOffset)
    co_return make_plain_error(EINVAL, fmt::format("truncated: {} bytes", file->length()));
  AlignedBuffer slots(kJournalBitmapOffset);
  if (auto r = co_await file->read(0, slots.span()); !r) co_return make_error(r.error());
  auto h = pick_journal_header(std::span<const std::byte>(slots.data(), kJournalBitmapOffset));
  if (!h) co_return make_error(h.error());
  if (file->length() < h->file_size())
    co_return make_plain_error(EINVAL, fmt::format("truncated: {} bytes, the state needs {}",
                                                   file->length(), h->file_size()));
  std::unique_ptr<Journal> j(new Journal(file, *h));
  if (h->bitmap_bytes() > 0) {
    AlignedBuffer buf(h->bitmap_bytes());
    if (auto r = co_await file->read(kJournalBitmapOffset, buf.span()); !r)
      co_return make_error(r.error());
    std::memcpy(j->words_.data(), buf.data(), h->bitmap_bytes());
  }
  // Bits past the last extent mean nothing.
  const uint64_t n = h->extents();
  for (uint64_t i = n; i < j->words_.size() * 64; ++i)
    j->words_[i / 64] &= ~(uint64_t{1} << (i % 64));
  co_return j;
}

Task<Result<void>> Journal::write_header() {
  ++h_.seq;
  h_.updated_unix = now_unix();
  auto bytes = encode_journal_header(h_);
  AlignedBuffer buf(kJournalSlotSize);
  std::memcpy(buf.data(), bytes.data(), kJournalSlotSize);
  co_return co_await file_->write((h_.seq % 2) * kJournalSlotSize, buf.span());
}

Task<Result<void>> Journal::set_state(JournalState s) {
  if (failed_) co_return make_error(*failed_);
  h_.state = s;
  if (auto w = co_await write_header(); !w) co_return w;
  ++flushes_;
  co_return co_await file_->flush();
}

Task<void> Journal::flush_pages() {
  flushing_ = true;
  const uint64_t batch = open_batch_++;
  std::vector<uint64_t> pages(pages_.begin(), pages_.end());
  pages_.clear();
  Result<void> r;
  // One write per run of adjacent pages; the bytes as they are now (a later
  // change goes into the next batch, which writes its page again).
  for (size_t i = 0; i < pages.size() && r;) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
    const uint64_t first = pages[i], count = j - i;
    AlignedBuffer buf(count * kPage);
    std::memcpy(buf.data(), words_.data() + first * kWordsPerPage, count * kPage);
    r = co_await file_->write(kJournalBitmapOffset + first * kPage, buf.span());
    i = j;
  }
  if (r) r = co_await file_->flush();
  ++flushes_;
  if (!r && !failed_) failed_ = r.error();
  done_batch_ = batch;
  flushing_ = false;
  batch_done_.notify_all();
}

Task<Result<void>> Journal::wait_durable(uint64_t batch) {
  // The first waiter writes the batch; the others wait for it (group commit).
  while (done_batch_ < batch && !failed_) {
    if (!flushing_)
      co_await flush_pages();
    else
      co_await batch_done_.wait();
  }
  if (failed_) co_return make_plain_error(failed_->errnum(), "state file: " + failed_->message());
  co_return Result<void>{};
}

bool Journal::durable(uint64_t off, uint64_t len) const {
  if (failed_) return false;
  auto [first, end] = extents_of(off, len);
  for (uint64_t x = first; x < end; ++x)
    if (!dirty(x) || page_batch_[x / kBitsPerPage] > done_batch_) return false;
  return true;
}

Task<Result<void>> Journal::mark(uint64_t off, uint64_t len) {
  if (failed_) co_return make_plain_error(failed_->errnum(), "state file: " + failed_->message());
  auto [first, end] = extents_of(off, len);
  uint64_t need = 0;  // the batch that makes the last of these bits durable
  for (uint64_t x = first; x < end; ++x) {
    const uint64_t p = x / kBitsPerPage;
    if (!dirty(x)) {
      words_[x / 64] |= uint64_t{1} << (x % 64);
      pages_.insert(p);
      page_batch_[p] = open_batch_;
    }
    need = std::max(need, page_batch_[p]);
  }
  // Already on stable storage (the activity log's hot extents): no I/O.
  if (need <= done_batch_) co_return Result<void>{};
  co_return co_await wait_durable(need);
}

Task<Result<void>> Journal::clear(const std::vector<uint64_t>& which) {
  if (failed_) co_return make_plain_error(failed_->errnum(), "state file: " + failed_->message());
  bool changed = false;
  for (uint64_t x : which) {
    if (x >= extents() || !dirty(x)) continue;
    words_[x / 64] &= ~(uint64_t{1} << (x % 64));
    pages_.insert(x / kBitsPerPage);
    page_batch_[x / kBitsPerPage] = open_batch_;
    changed = true;
  }
  if (!changed) co_return Result<void>{};
  co_return co_await wait_durable(open_batch_);
}

}  // namespace blkmirror
