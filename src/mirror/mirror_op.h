// MirrorOp: one background operation of the mirror's copy loop (QEMU's
// MirrorOp): the whole chunks it covers, what it turned out to be (copy, zero or
// discard, decided by the source's block status), how it ended, and the share of
// the job's buffer budget (buf-size) it holds. The budget is given back through
// MirrorJob::set_reserved() only, so the job's total always equals the sum over
// its operations.
//
// Threading rule: plain data owned by the job, on its loop thread.
#pragma once

#include <cstdint>

#include "base/align.h"

namespace blkmirror {

struct MirrorOp {
  enum class Kind { kCopy, kZero, kDiscard };

  ByteRange range;  // whole chunks, clipped to the device
  Kind kind = Kind::kCopy;
  bool read_failed = false;  // the failure (if any) was the source's, not the target's
  bool partly_hole = false;  // one chunk holding data and holes: copied through a buffer,
                             // whose all-zero blocks become holes (a kernel copy fills them)
  uint64_t zeroed = 0;       // bytes of a copy written as holes (all-zero blocks)
  uint64_t reserved = 0;     // buffer budget held: range.length while it may copy data
  bool cow_aligned = false;  // widened to whole target clusters (MirrorJob::cow_cluster_):
                             // copied whole through a buffer, never split by block status
};

}  // namespace blkmirror
