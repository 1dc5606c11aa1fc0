// VerifyJob: proves a target equal to its source, chunk by chunk, while both
// stay in use: reads the two nodes side by side, compares each chunk's XXH3-128
// checksum (verify/checksum.h), reports the chunks that differ, and with repair
// copies them from the source. Design: docs/design/verify.md.
//
// Live disks: a chunk may change while it is being compared (a client writing
// the source through an export, a mirror copying into the target). The job
// watches both nodes (WriteObserver, blockdev/graph.h) and, when a chunk
// compares unequal, reports it only when nothing could explain the difference:
// no write to either node touched it since its reads began, none is in flight
// on it, and no copy into the target still owes it (VerifyParams::copy_pending:
// a mirror between the same nodes that has it dirty or in flight). Otherwise
// the chunk is compared again later. A chunk that keeps changing for longer
// than settle_timeout is reported as unverified, never as different.
//
// The lifecycle is the generic job's (job/job.h): it runs to the end and
// concludes; it has no ready state. Pause, cancel and speed work as for a
// mirror. A read error fails the job (verify has nothing to retry into).
//
// Threading rule: loop thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/align.h"
#include "base/event_throttle.h"
#include "bitmap/dirty_bitmap.h"
#include "blockdev/graph.h"
#include "io/buffer.h"
#include "io/loop.h"
#include "job/job.h"

namespace blkmirror {

struct VerifyParams {
  std::string job_id = "verify";
  std::string source, target;  // node names
  // Bytes compared (and reported) as one unit; a power of two, 512 B-64 MiB.
  // 0: 64 KiB.
  uint64_t granularity = 0;
  int64_t speed = 0;  // bytes/s of each side read; 0: unlimited
  bool repair = false;
  bool auto_finalize = true, auto_dismiss = true;
  // How long a chunk that keeps changing is retried before it is reported as
  // unverified.
  std::chrono::milliseconds settle_timeout{30000};
  // Whether a copy into the target still owes [offset, offset+length) (a mirror
  // job between the same nodes: MirrorJob::copy_pending). Empty: none does.
  std::function<bool(uint64_t offset, uint64_t length)> copy_pending;
};

struct VerifyReport {
  uint64_t length = 0;                 // bytes of each device
  uint64_t compared = 0;               // bytes settled: found equal or different
  uint64_t differing = 0;              // bytes in `differences`
  uint64_t repaired = 0;               // of those, bytes copied from the source (repair)
  uint64_t zero_skipped = 0;           // bytes both sides reported as zeroes: not read
  uint64_t bytes_read = 0;             // both sides together
  uint64_t rechecks = 0;               // chunk comparisons repeated because of live writes
  std::vector<ByteRange> differences;  // ascending, adjacent ranges merged
  std::vector<ByteRange> unverified;   // still changing after settle_timeout
  bool equal() const { return differences.empty() && unverified.empty(); }
};

class VerifyJob : public Job, public WriteObserver {
 public:
  // Segments read at once from each side, and their size (at least one
  // chunk): 8 x 1 MiB keeps a file or an NBD connection busy
  // (docs/design/verify.md, "Speed").
  static constexpr unsigned kDepth = 8;
  static constexpr uint64_t kSegment = 1 << 20;

  // Checks the parameters and nodes (QEMU's texts where QEMU has one) and
  // attaches to both nodes; nothing is read until start().
  static Result<std::shared_ptr<VerifyJob>> create(Loop& loop, Graph& graph, VerifyParams p);
  ~VerifyJob() override;

  const VerifyParams& params() const { return p_; }
  uint64_t granularity() const { return gran_; }
  // The counts so far; differences and unverified are filled in at the end
  // (differences_so_far() lists them while the job runs).
  const VerifyReport& report() const { return report_; }
  std::vector<ByteRange> differences_so_far() const;

  // WriteObserver: writes to either node through its edges.
  void write_started(const Node& node, uint64_t offset, uint64_t length) override;
  void write_ended(const Node& node, uint64_t offset, uint64_t length) override;

 protected:
  Task<Result<void>> run() override;
  void on_dismissed() override { detach(); }

 private:
  VerifyJob(Loop& loop, VerifyParams p, uint64_t gran, Node* src, Node* tgt,
            std::unique_ptr<Child> src_edge, std::unique_ptr<Child> tgt_edge);
  // Launches one range's comparison (co_spawned; wakes the body when done).
  void launch(ByteRange r);
  Task<void> check_range(ByteRange r, std::shared_ptr<VerifyJob> self);
  Task<Result<void>> compare(ByteRange r);
  // True when [r) cannot be compared now: written right now, or owed by a copy.
  bool unsettled(const ByteRange& r) const;
  bool written_since_reset(const ByteRange& r) const;
  // Written since its reads began, or busy now: a difference there may be the
  // moment's, not the copy's.
  bool moved(const ByteRange& r) const;
  void defer(const ByteRange& r);
  void settle(const ByteRange& r);
  // A difference found in r (whole chunks, nothing explains it): reported,
  // or repaired from data (the source's bytes of r).
  Task<Result<void>> found(ByteRange r, std::span<const std::byte> data);
  Task<Result<void>> repair(ByteRange r, std::span<const std::byte> data);
  void add_difference(const ByteRange& r, bool repaired);
  Task<void> wait_idle();
  void detach();
  ByteRange chunk_range(uint64_t first, uint64_t end) const;

  Loop& loop_;
  VerifyParams p_;
  const uint64_t gran_;
  const uint64_t length_;
  Node* src_node_;
  Node* tgt_node_;
  // Source: consistent read; target: nothing (a mirror's target is not
  // consistent while it copies), or write to repair. Both share all but resize.
  std::unique_ptr<Child> src_edge_, tgt_edge_;
  bool observing_ = false;
  // Chunks written (through either node) since their comparison began.
  DirtyBitmap written_;
  // Writes in flight on either node, and the job's own repairs (not counted
  // as foreign writes).
  std::vector<ByteRange> writes_in_flight_;
  std::vector<ByteRange> own_writes_;
  DirtyBitmap recheck_;    // chunks to compare again (deferred)
  DirtyBitmap different_;  // chunks found different (counted once)
  // The source holds data (not zeroes) below this offset, as its block status
  // last said: segments there are read without asking again.
  uint64_t src_data_until_ = 0;
  bool status_busy_ = false;  // a source block-status question is out
  Notifier status_done_;
  EventThrottle mismatch_events_;
  std::chrono::steady_clock::time_point last_settled_;  // a chunk last settled
  unsigned in_flight_ = 0;
  std::optional<Error> fatal_;
  const uint64_t seg_;  // bytes per read: kSegment, or one chunk when larger
  BufferPool pool_;
  VerifyReport report_;
};

}  // namespace blkmirror
