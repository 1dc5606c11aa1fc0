#include "base/rate_limit.h"

#include <algorithm>

namespace blkmirror {

uint64_t RateLimiter::quota() const {
  // Bytes per slice; at least one so a tiny speed still makes progress.
  return std::max<uint64_t>(1, speed_ / (std::chrono::seconds(1) / kSlice));
}

void RateLimiter::advance(Clock::time_point now) {
  if (now < slice_start_ + kSlice) return;
  auto slices = static_cast<uint64_t>((now - slice_start_) / kSlice);
  if (slices > 1000) {  // long idle (or first use): nothing is owed any more
    dispatched_ = 0;
    slice_start_ = now;
    return;
  }
  uint64_t paid = slices * quota();
  dispatched_ = dispatched_ > paid ? dispatched_ - paid : 0;
  slice_start_ += slices * kSlice;
}

void RateLimiter::set_speed(uint64_t bytes_per_sec, Clock::time_point now) {
  advance(now);
  speed_ = bytes_per_sec;
  if (speed_ == 0) {
    dispatched_ = 0;
    return;
  }
  dispatched_ = std::min(dispatched_, quota());
}

RateLimiter::Clock::duration RateLimiter::delay(Clock::time_point now) {
  if (speed_ == 0) return Clock::duration::zero();
  advance(now);
  if (dispatched_ < quota()) return Clock::duration::zero();
  // dispatched_/quota slices are spent, counting the current one: wait for the
  // first slice after them.
  auto until = slice_start_ + static_cast<int64_t>(dispatched_ / quota()) * kSlice;
  return until > now ? until - now : Clock::duration::zero();
}

void RateLimiter::charge(uint64_t bytes, Clock::time_point now) {
  if (speed_ == 0) return;
  advance(now);
  dispatched_ += bytes;
}

}  // namespace blkmirror
