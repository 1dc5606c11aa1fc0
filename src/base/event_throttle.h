// EventThrottle: lets at most `burst` events of one kind through per `window`
// and counts the rest, so a persistent error reported on every retry does not
// flood a QMP client, a --json reader or a terminal. The first event let through
// after some were held back says how many (take_suppressed()). Time is passed
// in, so tests drive it without sleeping.
//
// Threading rule: not thread-safe; owned by one job on the loop thread.
#pragma once

#include <chrono>
#include <cstdint>

namespace blkmirror {

class EventThrottle {
 public:
  using Clock = std::chrono::steady_clock;

  EventThrottle(unsigned burst, Clock::duration window) : burst_(burst), window_(window) {}

  // True when an event at `now` may be sent; false when it is to be counted as
  // suppressed instead.
  bool allow(Clock::time_point now) {
    if (sent_ == 0 || now - window_start_ >= window_) {
      window_start_ = now;
      sent_ = 0;
    }
    if (sent_ < burst_) {
      ++sent_;
      return true;
    }
    ++suppressed_;
    ++total_suppressed_;
    return false;
  }
  // Events held back since the last call; the caller reports them with the
  // next event it sends.
  uint64_t take_suppressed() {
    uint64_t n = suppressed_;
    suppressed_ = 0;
    return n;
  }
  uint64_t total_suppressed() const { return total_suppressed_; }

 private:
  unsigned burst_;
  Clock::duration window_;
  Clock::time_point window_start_{};
  unsigned sent_ = 0;  // events let through in the current window
  uint64_t suppressed_ = 0;
  uint64_t total_suppressed_ = 0;
};

}  // namespace blkmirror
