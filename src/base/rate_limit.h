// RateLimiter: bytes-per-second budget in 100 ms slices, as the mirror's `speed`.
// Each dispatched operation charges its bytes; once a slice's quota is spent the
// caller waits until the slice that pays the debt. Speed 0 means unlimited.
// Time is passed in, so tests drive it without sleeping.
//
// Threading rule: not thread-safe; owned by one job on the loop thread.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace blkmirror {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr Clock::duration kSlice = std::chrono::milliseconds(100);

  // Takes effect at once; debt above one slice of the new quota is forgiven so a
  // raised speed is not held back by what the old one charged.
  void set_speed(uint64_t bytes_per_sec, Clock::time_point now = Clock::now());
  uint64_t speed() const { return speed_; }

  // How long to wait before dispatching more. Zero when allowed now.
  Clock::duration delay(Clock::time_point now = Clock::now());
  void charge(uint64_t bytes, Clock::time_point now = Clock::now());
  // Gives back a charge that turned out free (an operation the target did cheaply).
  void refund(uint64_t bytes) { dispatched_ -= std::min(dispatched_, bytes); }

 private:
  void advance(Clock::time_point now);
  uint64_t quota() const;

  uint64_t speed_ = 0;
  Clock::time_point slice_start_{};
  uint64_t dispatched_ = 0;  // bytes charged since slice_start_ not yet paid off
};

}  // namespace blkmirror
