// Phase 1: marking what must be copied before the copy loop starts.
#include <fmt/format.h>

#include <chrono>

#include "mirror/mirror_job.h"

namespace blkmirror {

// True when the target reads as zeroes over [off, off+len).
Task<Result<bool>> MirrorJob::target_reads_zero(uint64_t off, uint64_t len) {
  if (!tgt_.caps().has_block_status) co_return false;
  uint64_t pos = off;
  while (pos < off + len) {
    auto e = co_await tgt_.block_status(pos, off + len - pos);
    if (!e) co_return make_error(e.error());
    if (!e->zero) co_return false;
    pos += e->length;
  }
  co_return true;
}

// A source region that reads as zeroes needs work only where the target may hold
// something else; there it is marked dirty, and the copy loop writes zeroes that
// keep holes. Never a full-disk zeroing pass, never the target written twice.
Task<Result<void>> MirrorJob::mark_zero_region(uint64_t off, uint64_t len) {
  if (!tgt_.caps().has_block_status) {
    mark_dirty(off, len);
    co_return Result<void>{};
  }
  uint64_t pos = off;
  while (pos < off + len) {
    auto e = co_await tgt_.block_status(pos, off + len - pos);
    if (!e) co_return make_error(e.error());
    if (!e->zero) mark_dirty(pos, e->length);
    pos += e->length;
  }
  co_return Result<void>{};
}

Task<Result<void>> MirrorJob::dirty_init() {
  if (journal_ && p_.resume) {
    // A run before this one left its state: where it says the target may
    // differ is all there is to copy (the caller checked it is this mirror's).
    const uint64_t ext = journal_->extent_size();
    for (auto x = journal_->next_dirty(0); x; x = journal_->next_dirty(*x + 1))
      mark_dirty(*x * ext, ext);
    update_len();
    co_return Result<void>{};
  }
  if (p_.sync == SyncMode::kNone || length_ == 0) co_return Result<void>{};
  if (p_.sync == SyncMode::kBitmap) {
    // Only what the bitmap marks: the rest is already on the target (the
    // user's promise: the target was a copy of the source when the bitmap
    // started recording). Its granules map onto the job's chunks, whatever
    // either granularity.
    for (auto r = sync_bitmap_->next_dirty(0); r;
         r = sync_bitmap_->next_dirty(r->first + r->second))
      mark_dirty(r->first, r->second);
    update_len();
    co_return Result<void>{};
  }
  // sync=top: only what the source's top layer holds (depth 1; a device
  // without a chain holds everything itself). The rest the target is expected
  // to read from a backing chain with the same contents.
  const bool top_only = p_.sync == SyncMode::kTop;
  bool target_zero = p_.target_is_zero || tgt_.caps().zero_init;
  if (!target_zero) {
    auto z = co_await target_reads_zero(0, length_);
    if (!z) co_return make_error(z.error());
    target_zero = *z;
  }
  using Clock = std::chrono::steady_clock;
  auto last_yield = Clock::now();
  uint64_t pos = 0;
  while (pos < length_) {
    if (cancel_requested()) co_return Result<void>{};
    // Stay responsive on huge sparse disks: yield every 50 ms (the pause
    // itself happens in the copy loop).
    if (Clock::now() - last_yield > std::chrono::milliseconds(50)) {
      co_await yield_now();
      last_yield = Clock::now();
      update_len();
    }
    auto e = co_await src_.block_status(pos, length_ - pos);
    if (!e) co_return make_error(e.error());
    if (e->length == 0) co_return make_error(EIO, fmt::format("{}: empty extent", src_.describe()));
    if (top_only && e->depth != 1) {
      // Below the top layer (or nowhere): not copied.
    } else if (base_depth_ && (e->depth == 0 || e->depth >= base_depth_)) {
      // Active commit: the base's own data (or nothing, which the base reads
      // as zeroes too): it is already where it belongs.
    } else if (!e->zero) {
      mark_dirty(pos, e->length);
    } else if (!target_zero) {
      if (auto r = co_await mark_zero_region(pos, e->length); !r) co_return r;
    }
    pos += e->length;
  }
  update_len();
  co_return Result<void>{};
}

}  // namespace blkmirror
