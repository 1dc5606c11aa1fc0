// AdaptiveController: decides when a mirror in copy-mode adaptive stops
// converging and should switch itself to write-blocking. It watches the dirty
// byte count the copy loop reports and answers with a reason to switch. Two signs:
//   - the count has not reached a new low for a whole window (clients dirty
//     chunks as fast as the copy loop cleans them);
//   - it still falls, but so slowly that the estimated time to converge grew
//     over two windows in a row (and is longer than two windows).
// Reaching zero restarts the watch: a ready job that briefly lags behind a burst
// is converging, not stuck. Time is passed in, so tests drive it without sleeping.
//
// Threading rule: not thread-safe; owned by one job on the loop thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace blkmirror {

class AdaptiveController {
 public:
  using Clock = std::chrono::steady_clock;

  explicit AdaptiveController(uint64_t window_ms) : window_ms_(window_ms) {}

  // One observation of the dirty byte count at `now`. Returns why the job should
  // switch to write-blocking (the text of its COPY_MODE_CHANGE event), or nothing.
  std::optional<std::string> observe(uint64_t dirty, Clock::time_point now);
  // Forget what was seen: the next observation starts a new watch (after a
  // pause, which is not a failure to converge).
  void restart() { watching_ = false; }

 private:
  std::chrono::milliseconds window() const { return std::chrono::milliseconds(window_ms_); }

  uint64_t window_ms_;
  bool watching_ = false;
  // The lowest dirty count seen since the watch began, and when.
  uint64_t low_ = 0;
  Clock::time_point low_at_{};
  // The dirty count at the start of the current window, and the estimated time
  // to converge at the end of the last one (0: none yet).
  Clock::time_point window_start_{};
  uint64_t window_dirty_ = 0;
  uint64_t eta_ms_ = 0;
  unsigned eta_growth_ = 0;  // windows in a row the estimate grew
};

}  // namespace blkmirror
