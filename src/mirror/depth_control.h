// DepthControl: how many bytes of copies a mirror job keeps in flight when the
// user left buf-size to the job (docs/design/data-path.md, "A target far away").
//
// With B bytes in flight and a round trip of T, a copy moves at most B / T bytes a
// second, whatever the link: 16 MiB (the default) over a 100 ms round trip is
// 160 MiB/s. The controller watches the job's own target writes, whose latency is
// the only place a server that delays writes shows it (a read or block-status
// probe would not), and once per epoch (from one decision until four writes
// sent after it are back, at least 20 ms: a budget is judged by its own writes):
//  - tries a larger budget (doubling, up to the cap) when the copy loop was held
//    back by the budget during the epoch, writes sent under the current budget
//    are back, and the writes came back about as fast as the fastest ever seen
//    (mean under 1.5x the base round trip): nothing queues, so the round trip,
//    not the link, looks like what limits the copy (the mean of all the epoch's
//    writes, not only the fresh ones: those back early are the fast ones);
//  - keeps a larger budget only if it paid: the epoch after the one that moved
//    to it (a whole epoch of writes sent under it) must carry at least 1.1x the
//    bytes a second of the epoch that decided. Otherwise the budget goes back
//    and that size is the ceiling for kCeilingLifetime. Latency alone misleads
//    where the server, not the link, is the limit: an nbdkit behind a 5 ms
//    delay filter on two shared CPUs answered 1 MiB writes in ~5.5 ms at 16 MiB
//    in flight and went *slower* as more arrived (1 GiB: 1.07 s at 16 MiB,
//    1.3-1.6 s at the 32 MiB the latency rule chose, 2.4 s at 64 MiB);
//  - shrinks it (never below the floor) to twice the bytes the link carried per
//    base round trip when writes queue (mean over 2x the base): the link or the
//    server is the limit, and more in flight would only wait in its queues,
//    holding memory. Every write completed in the epoch counts here: one that
//    waited behind an older, larger budget shows the queue just as well.
// The floor is the derived default budget, so a local target, whose writes queue
// behind each other from the start, keeps exactly the default. The base round
// trip is the fastest write of the whole job: a path that turns slower for good
// then reads as queueing and the budget falls back to the floor (never
// oscillates upward on its own inflated latency).
//
// Pure: time is passed in (tests drive it with a fake clock).
// Threading rule: not thread-safe; owned by one job on its loop thread.
#pragma once

#include <chrono>
#include <cstdint>

namespace blkmirror {

class DepthControl {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr auto kMinEpoch = std::chrono::milliseconds(20);
  static constexpr unsigned kMinSamples = 4;  // writes sent in an epoch that end it
  // A larger budget is kept when it carries at least this much more.
  static constexpr double kTrialGain = 1.1;
  // A size that did not pay is tried again after this long (the path may change).
  static constexpr auto kCeilingLifetime = std::chrono::seconds(10);

  // floor: the budget to start with and never go below; cap: the most it may
  // reach (max_buf_size()); step: the budget is a multiple of it (the largest
  // operation). REQUIRES: 0 < step <= floor <= cap.
  DepthControl(uint64_t floor, uint64_t cap, uint64_t step);

  uint64_t budget() const { return budget_; }
  uint64_t peak() const { return peak_; }
  // The largest budget still worth trying (the cap until a growth did not pay).
  uint64_t ceiling() const { return ceiling_; }
  // The fastest target write seen (zero before the first), and the mean of the
  // last epoch that decided.
  Clock::duration base_rtt() const { return base_; }
  Clock::duration rtt() const { return rtt_; }

  // A data write of `bytes` to the target, issued at `issued`, completed at `done`.
  void on_write(Clock::time_point issued, Clock::time_point done, uint64_t bytes);
  // The copy loop had dirty chunks to launch and the budget held them back.
  void note_limited() { limited_ = true; }
  // Ends the epoch when it is due and decides; true when budget() changed.
  bool tick(Clock::time_point now);

 private:
  void start_epoch(Clock::time_point now);
  uint64_t clamp(uint64_t bytes) const;

  const uint64_t floor_, cap_, step_;
  uint64_t budget_, peak_;
  Clock::duration base_ = Clock::duration::zero();
  Clock::duration rtt_ = Clock::duration::zero();
  bool started_ = false;
  Clock::time_point epoch_start_{};
  // This epoch: bytes and latency of the writes completed, and how many of them
  // were issued since it started (fresh: sent under the current budget).
  uint64_t bytes_ = 0;
  unsigned samples_ = 0, fresh_ = 0;
  Clock::duration latency_sum_ = Clock::duration::zero();
  bool limited_ = false;
  // A larger budget on trial: the one it came from (0: none on trial), the rate
  // that budget carried, and how many epochs have ended since the change (the
  // first mixes writes sent under both).
  unsigned epochs_ = 0;  // epochs that ended with a decision
  uint64_t trial_from_ = 0;
  double trial_base_rate_ = 0;
  unsigned trial_epochs_ = 0;
  uint64_t ceiling_;  // no growth past this: a size that did not pay
  Clock::time_point ceiling_set_{};
};

}  // namespace blkmirror
