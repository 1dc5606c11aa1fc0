// InlineWrites: decides whether a small buffered write runs as a plain pwrite
// on the loop thread instead of through io_uring, and guards the loop against
// the writes that block.
//
// Why: ext4 and tmpfs have no non-blocking buffered write (RWF_NOWAIT fails
// with EOPNOTSUPP), so io_uring hands every buffered write to one of its io-wq
// worker threads (one per file: writes to a file are hashed to a worker) and
// wakes the loop again when it is done. For a 4 KiB write that hand-off costs
// several times the write itself: measured with `serve` and fio 4 KiB random
// write QD16 over NBD on a 1 GiB ext4 file, 16-38 us of server CPU per write
// through io-wq against 9-10 us with the write done in place, and 29-39k
// against 45-47k IOPS (docs/design/data-path.md, "Small writes").
//
// The risk of writing in place is a write that sleeps (dirty-page throttling,
// a page lock, a journal wait): it would stall every client of the loop, not
// one io-wq worker. So a write that took longer than kStallLimit turns
// in-place writing off for kBackoff, during which writes go through io_uring
// again; one stall costs the loop at most one such write per back-off.
//
// Threading rule: loop thread only.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace blkmirror {

class InlineWrites {
 public:
  using Clock = std::chrono::steady_clock;
  // Larger writes go through io_uring: their copy is worth a thread's time, and
  // a bulk copy's writes must not hold the loop.
  static constexpr size_t kMaxBytes = 64 << 10;
  static constexpr auto kStallLimit = std::chrono::milliseconds(5);
  static constexpr auto kBackoff = std::chrono::seconds(1);

  // A write of len bytes may run in place now.
  bool allowed(size_t len, Clock::time_point now) const {
    return len <= kMaxBytes && now >= off_until_;
  }
  // Writes in place with pwrite: bytes written or -errno. Times the call and
  // backs off when it stalled.
  int write(int fd, const void* buf, size_t len, uint64_t off);
  // Accounts one in-place write that ran from start to end (write() calls it).
  void record(Clock::time_point start, Clock::time_point end);

  uint64_t stalls() const { return stalls_; }

 private:
  Clock::time_point off_until_{};
  uint64_t stalls_ = 0;
};

}  // namespace blkmirror
