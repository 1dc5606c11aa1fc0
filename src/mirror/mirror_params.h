// MirrorParams: what a caller (CLI, QMP blockdev-mirror) asks of a mirror job,
// with QEMU's names and defaults, and the checks that refuse bad values before
// anything starts. The front ends fill it through the option table
// (option_table.h). Plain data; thread-safe.
#pragma once

#include <chrono>
#include <memory>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace blkmirror {

class Journal;

enum class SyncMode { kFull, kTop, kNone, kBitmap };
// What a sync=bitmap job does to its bitmap (QEMU's BitmapSyncMode): never
// touches it, or clears it when the job ends in sync (completed, or cancelled
// once ready). QEMU's `always` is refused.
enum class BitmapMode { kNever, kOnSuccess };
// background: client writes only mark chunks dirty; the copy loop catches up.
// write-blocking: a client write is also written to the target before its reply
//   (active mirroring), so the job converges whatever the write rate.
// adaptive: starts as background and switches itself to write-blocking when the
//   dirty count stops falling for adaptive_window_ms.
enum class CopyMode { kBackground, kWriteBlocking, kAdaptive };
enum class ErrorPolicy { kReport, kIgnore, kStop, kEnospc };
enum class ErrorAction { kReport, kIgnore, kStop };

Result<SyncMode> parse_sync_mode(std::string_view s);
Result<CopyMode> parse_copy_mode(std::string_view s);
Result<ErrorPolicy> parse_error_policy(std::string_view s, std::string_view param);
const char* to_string(SyncMode m);
const char* to_string(CopyMode m);
const char* to_string(ErrorAction a);
// What a policy does with one failure: `enospc` stops on ENOSPC, reports otherwise.
ErrorAction action_for(ErrorPolicy p, int errnum);

inline constexpr uint64_t kDefaultAdaptiveWindowMs = 3000;

struct MirrorParams {
  std::string job_id;
  std::string device;    // source node
  std::string target;    // target node
  SyncMode sync = SyncMode::kFull;
  // sync=bitmap: the source node's dirty bitmap whose dirty ranges are the
  // initial copy set (instead of the allocation map).
  std::string bitmap;
  BitmapMode bitmap_mode = BitmapMode::kNever;
  uint64_t granularity = 0;  // 0: default from the target
  int64_t buf_size = 0;      // 0: default (16 MiB)
  int64_t speed = 0;
  ErrorPolicy on_source_error = ErrorPolicy::kReport;
  ErrorPolicy on_target_error = ErrorPolicy::kReport;
  CopyMode copy_mode = CopyMode::kBackground;
  bool unmap = true;
  std::optional<std::string> replaces;
  bool target_is_zero = false;
  bool auto_finalize = true;
  bool auto_dismiss = true;
  unsigned max_in_flight = 16;
  // adaptive: switch to write-blocking when the dirty count has not reached a
  // new low for this long while not converged.
  uint64_t adaptive_window_ms = kDefaultAdaptiveWindowMs;
  // Let the kernel copy data extents (copy_file_range) when source and target
  // are regular files on one file system: on XFS/btrfs the target then shares
  // the source's extents (reflink). Off: every byte is read and written.
  bool copy_offload = true;
  // Active commit (block-commit of the node clients use): `target` is a node of
  // the source's own backing chain, the base. Only what the layers above the
  // base hold is copied, the base grows to the source's size first when it is
  // smaller, and the job's type is "commit". Not a user option: block-commit
  // and `blkmirror commit` set it.
  bool commit = false;
  // Crash-safe state (docs/design/journal.md): the job keeps `journal` a
  // superset of where the target may differ (extents marked before client
  // writes, cleared at checkpoints after flushing both devices). resume: the
  // journal was written by an earlier run of this mirror; its dirty extents
  // replace dirty init. Not options of the table: the CLI's --state and QMP's
  // x-persistent-state open the file.
  std::shared_ptr<Journal> journal;
  bool resume = false;
  // Short: a crash re-copies what was copied since the last checkpoint (a
  // quarter second of copying), and a client's extent stays marked (no state
  // write for its next writes) while it wrote there within the interval.
  std::chrono::milliseconds checkpoint_interval{250};
};

inline constexpr int64_t kDefaultBufSize = 16 << 20;
inline constexpr uint64_t kMinGranularity = 512;
inline constexpr uint64_t kMaxGranularity = 64 << 20;
// Largest dirty bitmap a job may allocate (16 TiB at 512 B, 2 PiB at 64 KiB).
inline constexpr uint64_t kMaxBitmapBytes = 4ull << 30;

// The largest buf-size a machine with `physical_memory` bytes can serve: a
// quarter of it, at most kMaxBufSize. The whole budget may be in flight at
// once, so a larger value would fail to allocate (or push the host into swap)
// mid-copy instead of being refused up front.
inline constexpr uint64_t kMaxBufSize = uint64_t{1} << 30;
uint64_t max_buf_size_for(uint64_t physical_memory);
// max_buf_size_for() this machine.
uint64_t max_buf_size();

// Checks values that need no device: the numbers of the option table
// (option_table.h: granularity, buf-size, speed, adaptive window) with its texts
// (QEMU's), buf-size against this machine's memory, in-flight.
Result<void> validate_params(const MirrorParams& p);

// Default granularity: the target's cluster size clamped to [4 KiB, 64 KiB], or
// 64 KiB when the target has none (QEMU's rule; dirty bitmaps use it).
uint64_t default_granularity(uint64_t target_cluster_size);
// A mirror's default: a target with clusters as above; without (raw), the
// finest power of two from 4 KiB to 64 KiB that keeps the dirty bitmap within
// kMirrorBitmapChunks bits (1 MiB): 4 KiB up to 32 GiB, 64 KiB from 512 GiB.
// Why finer than QEMU's 64 KiB: a background mirror re-copies a whole chunk for
// every client write into a copied area, 16 times a 4 KiB write at 64 KiB (fio
// 4 KiB random writes during a 2 GiB mirror: 5.3 GiB copied by the time it was
// ready at 64 KiB, 2.3 GiB at 4 KiB; docs/design/data-path.md).
inline constexpr uint64_t kMirrorBitmapChunks = uint64_t{1} << 23;
uint64_t default_mirror_granularity(uint64_t target_cluster_size, uint64_t length);

// The sizes a mirror job works with: derived once, from its parameters and the
// target's cluster size, and fixed for the job's life.
struct MirrorSizes {
  uint64_t granularity = 0;  // bytes per dirty bit (a chunk)
  uint64_t buf_size = 0;     // data all background operations together may hold
  uint64_t max_op = 0;       // largest single copy operation, whole chunks
};
// REQUIRES: validate_params(p) succeeded. Pure. length: the disk's.
MirrorSizes derive_sizes(const MirrorParams& p, uint64_t target_cluster_size, uint64_t length);

}  // namespace blkmirror
