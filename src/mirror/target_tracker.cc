#include "mirror/target_tracker.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/align.h"
#include "io/buffer.h"

namespace blkmirror {

namespace {

uint64_t fnv1a(std::span<const std::byte> data) {
  uint64_t h = 1469598103934665603ull;
  for (std::byte b : data) {
    h ^= static_cast<uint8_t>(b);
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t tracked_chunks(const BlockDevice& target, uint64_t length, uint64_t granularity) {
  if (!target.can_reconnect()) return 0;
  return div_round_up(std::max(length, target.length()), granularity);
}

}  // namespace

TargetTracker::TargetTracker(BlockDevicePtr inner, uint64_t granularity, Redirty redirty,
                             std::chrono::milliseconds checkpoint, uint64_t length)
    : BlockDeviceWrapper(std::move(inner)),
      gran_(granularity),
      checkpoint_(checkpoint),
      redirty_(std::move(redirty)),
      // A target that never reconnects never loses what it acknowledged, so
      // there is nothing to hand back: no bitmaps (one bit per chunk, twice,
      // was 256 MiB for a 64 TiB copy). Set and reset clip to an empty bitmap.
      unflushed_(tracked_chunks(*this->inner(), length, granularity)),
      flushing_(tracked_chunks(*this->inner(), length, granularity)),
      generation_(this->inner()->generation()) {}

size_t TargetTracker::durable_samples() const {
  return std::count_if(samples_.begin(), samples_.end(), [](const Sample& s) { return s.durable; });
}

void TargetTracker::mark_written(uint64_t off, uint64_t len) {
  if (len == 0) return;
  uint64_t first = off / gran_;
  unflushed_.set(first, div_round_up(off + len, gran_) - first);
}

void TargetTracker::forget_samples(uint64_t off, uint64_t len) {
  std::erase_if(samples_,
                [&](const Sample& s) { return s.off < off + len && off < s.off + s.len; });
}

void TargetTracker::add_sample(uint64_t off, std::span<const std::byte> data) {
  Sample s;
  s.off = off;
  s.len = std::min<uint64_t>(data.size(), kSampleBytes);
  s.hash = fnv1a(data.first(s.len));
  s.written_before_flush = flushes_started_;
  // Keep the newest pending samples; the oldest pending one makes room.
  auto pending =
      std::count_if(samples_.begin(), samples_.end(), [](const Sample& x) { return !x.durable; });
  if (static_cast<size_t>(pending) >= kMaxSamples) {
    auto oldest =
        std::find_if(samples_.begin(), samples_.end(), [](const Sample& x) { return !x.durable; });
    samples_.erase(oldest);
  }
  samples_.push_back(s);
}

Task<Result<void>> TargetTracker::verify() {
  // Durable samples only: what was not flushed may be lost by an honest
  // restart, and is handed back as dirty instead.
  std::vector<Sample> check;
  for (const Sample& s : samples_)
    if (s.durable) check.push_back(s);
  AlignedBuffer buf(kSampleBytes);
  for (const Sample& s : check) {
    std::span<std::byte> view{buf.data(), s.len};
    auto r = co_await inner()->read(s.off, view);
    if (!r) co_return r;  // still unreachable: the job's error policy decides
    if (fnv1a(view) != s.hash) {
      fatal_ = Error{
          std::error_code(ESTALE, std::generic_category()),
          fmt::format("{} is not the disk this job was writing: the {} bytes at offset {} that "
                      "the job wrote and flushed read back differently after the connection "
                      "was re-established (a restarted or different export?); refusing to "
                      "write to it",
                      describe(), s.len, s.off),
          true};
      co_return make_error(*fatal_);
    }
  }
  co_return Result<void>{};
}

Task<Result<void>> TargetTracker::settle(bool before) {
  while (verifying_) co_await verified_.wait();
  if (fatal_) co_return make_error(*fatal_);
  bool reconnected = inner()->generation() != generation_;
  if (!reconnected && (!before || inner()->connected())) co_return Result<void>{};
  verifying_ = true;
  auto r = co_await verify();
  if (r && inner()->generation() != generation_) {
    // Same disk, new connection: whatever it had not flushed may be gone.
    generation_ = inner()->generation();
    for (DirtyBitmap* b : {&unflushed_, &flushing_}) {
      for (auto first = b->next_set(0); first;) {
        uint64_t end = b->next_clear(*first).value_or(b->size());
        redirty_(*first * gran_, (end - *first) * gran_);
        first = end < b->size() ? b->next_set(end) : std::nullopt;
      }
      b->reset_all();
    }
    // Pending samples describe data that may be gone too.
    std::erase_if(samples_, [](const Sample& s) { return !s.durable; });
  }
  verifying_ = false;
  verified_.notify_all();
  co_return r;
}

Task<Result<void>> TargetTracker::read(uint64_t off, std::span<std::byte> buf, ReadFlags f) {
  if (auto s = co_await settle(true); !s) co_return s;
  auto r = co_await inner()->read(off, buf, f);
  if (auto s = co_await settle(false); !s) co_return s;
  co_return r;
}

Task<Result<Extent>> TargetTracker::block_status(uint64_t off, uint64_t len) {
  if (auto s = co_await settle(true); !s) co_return make_error(s.error());
  auto r = co_await inner()->block_status(off, len);
  if (auto s = co_await settle(false); !s) co_return make_error(s.error());
  co_return r;
}

Task<Result<void>> TargetTracker::write(uint64_t off, std::span<const std::byte> buf,
                                        WriteFlags f) {
  if (auto s = co_await settle(true); !s) co_return s;
  forget_samples(off, buf.size());
  auto r = co_await inner()->write(off, buf, f);
  // Even a failed write may have changed part of the range.
  if (!f.fua || !r) mark_written(off, buf.size());
  if (r) add_sample(off, buf);
  if (auto s = co_await settle(false); !s) co_return s;
  if (r && !fingerprint_flushed_) {
    // One flush early, so the target has a durable sample to be recognised by
    // from the start of the job rather than from its first ready.
    fingerprint_flushed_ = true;
    co_return co_await flush();
  }
  if (r && checkpoint_due()) co_return co_await flush();
  co_return r;
}

bool TargetTracker::checkpoint_due() const {
  return inner()->can_reconnect() && flushes_running_ == 0 && unflushed_.count() > 0 &&
         std::chrono::steady_clock::now() - last_flush_start_ >= checkpoint_;
}

Task<Result<void>> TargetTracker::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  if (auto s = co_await settle(true); !s) co_return s;
  forget_samples(off, len);
  auto r = co_await inner()->write_zeroes(off, len, f);
  if (!f.fua || !r) mark_written(off, len);
  if (auto s = co_await settle(false); !s) co_return s;
  if (r && checkpoint_due()) co_return co_await flush();
  co_return r;
}

Task<Result<void>> TargetTracker::discard(uint64_t off, uint64_t len) {
  if (auto s = co_await settle(true); !s) co_return s;
  forget_samples(off, len);
  auto r = co_await inner()->discard(off, len);
  mark_written(off, len);
  if (auto s = co_await settle(false); !s) co_return s;
  co_return r;
}

Task<Result<void>> TargetTracker::flush() {
  if (auto s = co_await settle(true); !s) co_return s;
  // This flush covers every write that completed before it starts.
  for (auto first = unflushed_.next_set(0); first;) {
    uint64_t end = unflushed_.next_clear(*first).value_or(unflushed_.size());
    flushing_.set(*first, end - *first);
    first = end < unflushed_.size() ? unflushed_.next_set(end) : std::nullopt;
  }
  unflushed_.reset_all();
  uint64_t seq = ++flushes_started_;
  uint64_t gen = inner()->generation();
  last_flush_start_ = std::chrono::steady_clock::now();
  ++flushes_running_;
  auto r = co_await inner()->flush();
  --flushes_running_;
  if (auto s = co_await settle(false); !s) co_return s;
  if (!r || inner()->generation() != gen) co_return r;
  // A later flush, still running, covers marks this one did not: leave them.
  if (seq == flushes_started_) flushing_.reset_all();
  for (Sample& s : samples_)
    if (s.written_before_flush < seq) s.durable = true;
  // Keep the newest durable samples.
  while (durable_samples() > kMaxSamples)
    samples_.erase(
        std::find_if(samples_.begin(), samples_.end(), [](const Sample& x) { return x.durable; }));
  co_return r;
}

}  // namespace blkmirror
