#include "mirror/adaptive.h"

#include <fmt/format.h>

namespace blkmirror {

std::optional<std::string> AdaptiveController::observe(uint64_t d, Clock::time_point now) {
  if (d == 0) {
    watching_ = false;
    return std::nullopt;
  }
  if (!watching_) {
    watching_ = true;
    low_ = d;
    low_at_ = now;
    window_start_ = now;
    window_dirty_ = d;
    eta_ms_ = 0;
    eta_growth_ = 0;
    return std::nullopt;
  }
  if (d < low_) {
    low_ = d;
    low_at_ = now;
  }
  if (now - low_at_ >= window())
    return fmt::format("dirty count has not fallen below {} bytes for {} ms", low_, window_ms_);
  if (now - window_start_ < window()) return std::nullopt;
  // One window passed: how long would the rest take at this window's pace?
  uint64_t fell = window_dirty_ > d ? window_dirty_ - d : 0;
  uint64_t eta_ms =
      fell ? static_cast<uint64_t>(static_cast<double>(d) / fell * static_cast<double>(window_ms_))
           : UINT64_MAX;
  eta_growth_ = (eta_ms_ && eta_ms > eta_ms_) ? eta_growth_ + 1 : 0;
  uint64_t prev = eta_ms_;
  eta_ms_ = eta_ms;
  window_start_ = now;
  window_dirty_ = d;
  if (eta_growth_ >= 2 && eta_ms > 2 * window_ms_)
    return fmt::format("estimated time to converge keeps growing ({} ms -> {} ms, {} bytes dirty)",
                       prev, eta_ms, d);
  return std::nullopt;
}

}  // namespace blkmirror
