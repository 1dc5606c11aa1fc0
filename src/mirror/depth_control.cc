#include "mirror/depth_control.h"

#include <algorithm>

#include "base/assert.h"

namespace blkmirror {

DepthControl::DepthControl(uint64_t floor, uint64_t cap, uint64_t step)
    : floor_(floor), cap_(std::max(floor, cap / step * step)), step_(step), budget_(floor),
      peak_(floor), ceiling_(cap_) {
  BLKMIRROR_ASSERT(step > 0 && step <= floor && floor <= cap, "depth control sizes");
}

uint64_t DepthControl::clamp(uint64_t bytes) const {
  uint64_t b = (bytes + step_ - 1) / step_ * step_;
  return std::clamp(b, floor_, cap_);
}

void DepthControl::start_epoch(Clock::time_point now) {
  epoch_start_ = now;
  bytes_ = 0;
  samples_ = fresh_ = 0;
  latency_sum_ = Clock::duration::zero();
  limited_ = false;
}

void DepthControl::on_write(Clock::time_point issued, Clock::time_point done, uint64_t bytes) {
  Clock::duration latency = done - issued;
  if (base_ == Clock::duration::zero() || latency < base_) base_ = latency;
  if (!started_) {
    started_ = true;
    start_epoch(issued);
  }
  bytes_ += bytes;
  ++samples_;
  latency_sum_ += latency;
  // A write issued before the epoch began went out under the old budget: it
  // shows queueing, but not whether the current budget still leaves none.
  if (issued >= epoch_start_) ++fresh_;
}

bool DepthControl::tick(Clock::time_point now) {
  if (!started_) return false;
  Clock::duration age = now - epoch_start_;
  // Idle (synced, paused, source-bound): a limit seen long ago is stale.
  if (samples_ == 0 && age > std::chrono::seconds(1) + 10 * base_) start_epoch(now);
  // Judge the budget by writes sent under it: until they are back the epoch goes
  // on (ending it would make them stale, and a deep queue would never decide).
  if (age < kMinEpoch || fresh_ < kMinSamples) return false;
  rtt_ = latency_sum_ / samples_;
  bool queueing = rtt_ > 2 * base_;
  double rate = static_cast<double>(bytes_) / std::chrono::duration<double>(age).count();
  uint64_t before = budget_;
  if (ceiling_ < cap_ && now - ceiling_set_ > kCeilingLifetime) ceiling_ = cap_;
  if (trial_from_ != 0) {
    // The first epoch under a larger budget still holds writes of the smaller
    // one and decides nothing; the second is judged on writes sent under it.
    if (++trial_epochs_ == 2) {
      if (rate < kTrialGain * trial_base_rate_) {
        ceiling_ = trial_from_;
        ceiling_set_ = now;
        budget_ = trial_from_;
      }
      trial_from_ = 0;
    }
  } else if (limited_ && 2 * rtt_ < 3 * base_ && budget_ < ceiling_ && epochs_ > 0) {
    // (Not from the first epoch: it ramps up from nothing in flight, and its rate
    // is no yardstick.)
    trial_from_ = budget_;
    trial_base_rate_ = rate;
    trial_epochs_ = 0;
    budget_ = std::min(clamp(budget_ * 2), ceiling_);
  } else if (queueing) {
    // Bytes per base round trip the link carried this epoch, twice over.
    double want = 2 * rate * std::chrono::duration<double>(base_).count();
    budget_ = std::min(budget_, clamp(static_cast<uint64_t>(want)));
  }
  peak_ = std::max(peak_, budget_);
  ++epochs_;
  start_epoch(now);
  return budget_ != before;
}

}  // namespace blkmirror
