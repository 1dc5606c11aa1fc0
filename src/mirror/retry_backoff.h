// RetryBackoff: how long the mirror's copy loop holds off after operations
// failed and the error policy said to retry (ignore). Without it a persistent
// error (a target that refuses every write) is retried as fast as the loop
// spins: thousands of times a second at full CPU. The hold is capped
// exponential: kFirst after the first failure, doubled by each failure that
// comes after the previous hold ended (the retries it let through failed too;
// operations that were already running when a hold began do not double it
// again), at most kCap. Any success ends the hold and resets it at once, so
// when the error clears, the first retry that succeeds brings back full speed.
// Time is passed in, so tests drive it without sleeping.
//
// Threading rule: not thread-safe; owned by one job on the loop thread.
#pragma once

#include <algorithm>
#include <chrono>

namespace blkmirror {

class RetryBackoff {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr Clock::duration kFirst = std::chrono::milliseconds(1);
  static constexpr Clock::duration kCap = std::chrono::seconds(1);

  // An operation failed at `now` and will be retried.
  void on_failure(Clock::time_point now) {
    if (holding_ && now < until_) return;  // a failure of the round already held
    step_ = holding_ ? std::min<Clock::duration>(step_ * 2, kCap) : kFirst;
    holding_ = true;
    until_ = now + step_;
  }
  // An operation succeeded: the error is gone, at least there.
  void on_success() {
    holding_ = false;
    step_ = Clock::duration::zero();
  }
  // How long, from `now`, no new operation should start; zero when free.
  Clock::duration hold(Clock::time_point now) const {
    return holding_ && now < until_ ? until_ - now : Clock::duration::zero();
  }
  // The length of the current (or last) hold; zero after a success.
  Clock::duration step() const { return step_; }

 private:
  bool holding_ = false;  // failures since the last success
  Clock::duration step_ = Clock::duration::zero();
  Clock::time_point until_{};
};

}  // namespace blkmirror
