// TargetTracker: the mirror job's view of its target. It wraps the target
// device and remembers what the job wrote to it that the target has not yet
// made durable, so that nothing acknowledged-but-unflushed is trusted after the
// target's connection changed, and it refuses a target that is no longer the
// disk the job was writing (docs/design/mirror-job.md "Remote target identity").
//
// - Only a target that can reconnect (BlockDevice::can_reconnect(): a remote
//   disk) is tracked; a local one keeps what it acknowledged.
// - Writes, write-zeroes and discards mark their chunks in `unflushed_` once
//   done. A flush moves those marks to `flushing_` as it starts and drops them
//   when it succeeds: only then are they on stable storage.
// - When the target reconnected (BlockDevice::generation() moved: its server
//   restarted, or its host crashed and lost what it had not flushed), every
//   chunk still in unflushed_ or flushing_ goes back to the job as dirty.
//   So that a reconnect costs at most about a second of copying, a target that
//   can reconnect is flushed after a write once kCheckpoint passed since the
//   last flush started (local targets are not: fsync would slow the copy and
//   they never reconnect).
// - Identity: the tracker keeps a few samples (offset, length, hash) of data
//   the job wrote, and marks them durable once a flush covering them
//   succeeded. Before the first request after the connection was lost, it
//   re-reads the durable samples; a mismatch means another disk answers (an
//   empty export of the same size, say), and the tracker fails every request
//   from then on. The first data write is followed by one flush, so a sample
//   exists from the start. Nothing is written to the target for this: user
//   data is never touched, only what the job wrote anyway is read back.
//
// Threading rule: loop thread only, as BlockDevice.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "base/notifier.h"
#include "bitmap/dirty_bitmap.h"
#include "blockdev/wrapper.h"

namespace blkmirror {

class TargetTracker : public BlockDeviceWrapper {
 public:
  // Hands ranges the target may have lost back to the job.
  using Redirty = std::function<void(uint64_t off, uint64_t len)>;
  static constexpr size_t kMaxSamples = 8;   // of each kind: durable, pending
  static constexpr uint64_t kSampleBytes = 4096;
  static constexpr std::chrono::milliseconds kCheckpoint{1000};

  // length: the bytes the job will write, when more than the target holds now
  // (an active commit grows its base first); 0: the target's length.
  TargetTracker(BlockDevicePtr inner, uint64_t granularity, Redirty redirty,
                std::chrono::milliseconds checkpoint = kCheckpoint, uint64_t length = 0);

  // Set once another disk answered for the target: the job must fail with it.
  const std::optional<Error>& fatal() const { return fatal_; }
  // Chunks written but not yet known durable (tests, progress).
  uint64_t unflushed_chunks() const { return unflushed_.count() + flushing_.count(); }
  size_t durable_samples() const;

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override;
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override;
  Task<Result<void>> discard(uint64_t off, uint64_t len) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override;

 private:
  struct Sample {
    uint64_t off = 0, len = 0, hash = 0;
    uint64_t written_before_flush = 0;  // flushes_started_ when it was written
    bool durable = false;
  };
  // Before a request (before = true) and after one: waits out a verification
  // in progress, and verifies the target when its connection is gone or
  // changed; hands back unflushed chunks after a reconnect.
  Task<Result<void>> settle(bool before);
  Task<Result<void>> verify();
  void mark_written(uint64_t off, uint64_t len);
  bool checkpoint_due() const;
  void forget_samples(uint64_t off, uint64_t len);
  void add_sample(uint64_t off, std::span<const std::byte> data);

  uint64_t gran_;
  std::chrono::milliseconds checkpoint_;
  Redirty redirty_;
  DirtyBitmap unflushed_, flushing_;
  std::vector<Sample> samples_;
  uint64_t generation_;
  uint64_t flushes_started_ = 0;
  std::chrono::steady_clock::time_point last_flush_start_ = std::chrono::steady_clock::now();
  unsigned flushes_running_ = 0;
  bool fingerprint_flushed_ = false;
  bool verifying_ = false;
  Notifier verified_;
  std::optional<Error> fatal_;
};

}  // namespace blkmirror
