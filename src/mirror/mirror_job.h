// MirrorJob: copies a live source node to a target node and, on complete, swaps
// the target in for the source. Behaviour and design: docs/design/mirror-job.md.
//
// The job puts itself in the source node's write path as its WriteInterceptor
// (active_write.cc). In background mode a client write marks the dirty bitmap
// after it finished. In write-blocking mode (active mirroring) the write also
// goes to the target before the client's reply, for the chunks it can make
// clean; adaptive mode starts as background and switches itself to
// write-blocking when the dirty count stops falling.
// The copy loop takes the next dirty run, clears its bits *before* reading (a
// write that lands during the copy dirties the chunk again), asks the source's
// block status, and copies, zeroes or discards. Ready = nothing dirty, nothing in
// flight, target flushed. Complete drains the source, copies what is left,
// flushes, and moves the source's parents to the target.
//
// Threading rule: loop thread only; create, verbs and events all on the loop.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <chrono>
#include <optional>
#include <vector>

#include "base/align.h"
#include "base/event_throttle.h"
#include "bitmap/dirty_bitmap.h"
#include "blockdev/graph.h"
#include "io/buffer.h"
#include "io/loop.h"
#include "job/job.h"
#include "journal/journal.h"
#include "mirror/adaptive.h"
#include "mirror/depth_control.h"
#include "mirror/mirror_op.h"
#include "mirror/mirror_params.h"
#include "mirror/retry_backoff.h"
#include "mirror/target_tracker.h"

namespace blkmirror {

struct MirrorStats {
  uint64_t bytes_copied = 0;  // data read from the source and written to the target
  uint64_t bytes_zeroed = 0;  // made zero on the target without sending data
  uint64_t bytes_active = 0;  // client writes mirrored synchronously (write-blocking)
  uint64_t bytes_offloaded = 0;  // of bytes_copied, copied by the kernel (copy offload)
  uint64_t kernel_streams_peak = 0;  // most data-moving kernel copies running at once
  uint64_t ops = 0;
  uint64_t errors = 0;
  uint64_t errors_unreported = 0;  // error events left out by the rate limit
  uint64_t mode_switches = 0;      // copy mode changes (adaptive or block-job-change)
  // Failed operations by side (true: target) and errno, for the metrics.
  std::map<std::pair<bool, int>, uint64_t> errors_by;
};

class MirrorJob : public Job, public WriteInterceptor {
 public:
  // BLOCK_JOB_ERROR events with the ignore action sent per second at most; the
  // next one sent says how many were left out (JobEvent::suppressed).
  static constexpr unsigned kErrorEventsPerSecond = 3;
  // Data-moving kernel copies (copy offload without reflink) running at once:
  // every one writes the same target file, whose inode lock serializes the
  // writes, so more streams only add lock spinning (tmpfs, 2 GiB, 32 MiB calls:
  // 4 threads 1.24-1.57 s and 0.80-1.01 s CPU, 2 threads 0.99-1.10 s and
  // 0.65-0.71 s; docs/design/data-path.md). Two let one read the source while
  // the other writes. A reflink moves no data and is not limited.
  static constexpr unsigned kKernelCopyStreams = 2;
  // Adaptive also switches once the job has copied more than the disk by this
  // share (percent): clients keep rewriting what it copied, and each such write
  // costs the background copy a source read and a target write later, where
  // mirroring it costs one target write now. So an adaptive job's own copies
  // stay within 1.05x the disk (scenario 3 measured 1.25-2.2x without it).
  static constexpr uint64_t kAdaptiveRecopyPercent = 5;
  // A data-moving kernel copy smaller than this goes through a buffer instead:
  // the hand-off to a pool thread costs more than copying it on the loop (the
  // chunks a client dirties one write at a time; docs/design/data-path.md).
  static constexpr uint64_t kMinKernelCopy = 1 << 20;

  // Checks everything (parameters, nodes, sizes, busy nodes) and attaches to the
  // nodes; nothing is read or written until start(). Errors carry QEMU's texts.
  static Result<std::shared_ptr<MirrorJob>> create(Loop& loop, Graph& graph, MirrorParams p);
  ~MirrorJob() override;

  const MirrorParams& params() const { return p_; }
  uint64_t granularity() const { return gran_; }
  uint64_t buf_size() const { return buf_size_; }
  // The buffer budget copies may hold now: buf_size() when the user set
  // buf-size, else what the depth control chose (at least buf_size()).
  uint64_t budget() const { return depth_ ? depth_->budget() : buf_size_; }
  // The depth control when the job chooses its own budget (no buf-size given).
  const DepthControl* depth() const { return depth_ ? &*depth_ : nullptr; }
  uint64_t max_op() const { return max_op_; }
  const MirrorStats& stats() const { return stats_; }
  uint64_t dirty_bytes() const;
  // True once source and target converged (cleared again by an error).
  bool synced() const { return synced_; }
  // True when the swap happened (complete, not a soft cancel).
  bool switched() const { return switched_; }

  JobInfo info() const override;

  // The copy mode in effect: background, write-blocking, or adaptive until it
  // switched itself (then write-blocking).
  CopyMode copy_mode() const { return mode_; }
  // block-job-change: switches background or adaptive -> write-blocking while the
  // job runs (running, paused, ready, standby). Asking for the current mode is a
  // no-op. Errors (QEMU's texts): "Change to copy mode '<m>' is not implemented",
  // or the verb-table text for other states.
  Result<void> change_copy_mode(CopyMode m);
  // Every client write reaches the target before its reply and nothing else is
  // left to copy (QEMU's actively-synced).
  bool actively_synced() const;

  Node* source_node() const { return src_node_; }
  Node* target_node() const { return tgt_node_; }
  // Whether [off, off+len) of the target may still differ from the source
  // through work this job has yet to finish: dirty chunks, copies in flight,
  // client writes not yet mirrored. False once the job concluded (it then
  // keeps the target in step no more). Verify asks (verify/verify_job.h).
  bool copy_pending(uint64_t off, uint64_t len) const;

  // WriteInterceptor: every client write to the source passes through here.
  Task<Result<void>> intercept(Node& node, const WriteRequest& req) override;

 protected:
  Task<Result<void>> run() override;
  Task<Result<void>> prepare() override;
  Task<void> commit() override;
  Task<void> abort() override;
  Result<void> on_complete() override;
  bool on_soft_cancel() override;

 private:
  struct Edges {
    std::unique_ptr<Child> src, tgt, replaces;
    std::vector<std::unique_ptr<Child>> between;  // commit: the layers above the base
  };
  MirrorJob(Loop& loop, Graph& graph, MirrorParams p, MirrorSizes sizes, Node* src, Node* tgt,
            Node* replaces, uint32_t base_depth, Edges edges);
  // Active commit: grows the base to the source's length when it is shorter.
  Task<Result<void>> grow_base();

  // Phase 1 (dirty_init.cc).
  Task<Result<void>> dirty_init();
  Task<Result<bool>> target_reads_zero(uint64_t off, uint64_t len);
  Task<Result<void>> mark_zero_region(uint64_t off, uint64_t len);

  // Phase 2 (mirror_ops.cc).
  struct Run {
    uint64_t first_chunk, end_chunk;
  };
  std::optional<Run> pick_run();
  // Operations that may run at once: max_in_flight for buf_size_, and as many
  // more max_op_-long ones as the depth control added to the budget.
  uint64_t max_ops() const;
  // The depth control's epoch: resizes the pool's cache when the budget moved.
  void adjust_depth();
  // Loop thread: in_flight_bytes_ is the sum of the operations' reserved.
  void check_budget() const;
  const ByteRange* in_flight_at(uint64_t chunk) const;
  bool launch_next();
  // COW alignment: widens a run's bytes to whole target clusters not yet
  // written once; nullopt when a widened chunk is busy or the buffer is short
  // (the run waits). bytes unchanged when no widening is needed.
  std::optional<ByteRange> cow_align(ByteRange bytes) const;
  // Every target cluster touching [off, end) was written whole once.
  bool cow_done(uint64_t off, uint64_t end) const;
  void mark_cow_done(const ByteRange& r);
  Task<void> run_op(std::list<MirrorOp>::iterator op, std::shared_ptr<MirrorJob> self);
  // Sets the buffer budget op holds to bytes (never more than it held): the one
  // place in_flight_bytes_ goes down.
  void set_reserved(MirrorOp& op, uint64_t bytes);
  // An op launched as a kernel copy (nothing reserved) that goes through a
  // buffer after all takes the buffer's share of the budget now; the budget may
  // be exceeded until it is back, and pick_run launches nothing meanwhile.
  void reserve_late(MirrorOp& op, uint64_t bytes);
  // Copies op's range: by copy offload when it works, else through a buffer
  // (max_op_ bytes at a time); records a source failure and the bytes written
  // as holes in op.
  Task<Result<void>> copy_range(MirrorOp& op);
  Task<Result<void>> copy_through_buffer(MirrorOp& op);
  Task<Result<void>> write_keeping_holes(uint64_t off, std::span<const std::byte> data,
                                         uint64_t& zeroed);
  // An operation failed: the event (rate-limited under `ignore`), then the
  // policy's action; `ignore` also holds new operations back (backoff_).
  void on_op_error(const Error& e, bool is_read);
  // A target or source operation succeeded: retries need no holding back.
  void on_op_success() { backoff_.on_success(); }
  Task<void> wait_idle();

  // Active mirroring (active_write.cc).
  // A client write holding whole chunks [chunks) against the copy loop and
  // other active writes; redirtied when a write that started in background
  // mode marked one of them meanwhile (its bits must then stay set).
  struct ActiveOp {
    ByteRange chunks;
    bool redirtied = false;
  };
  bool write_blocking() const { return mode_ == CopyMode::kWriteBlocking; }
  bool copy_to_target() const;
  bool overlaps_any_op(const ByteRange& r) const;
  Task<Result<void>> passive_write(Node& node, const WriteRequest& req);
  Task<Result<void>> active_write(Node& node, const WriteRequest& req);
  // Writes [off, off+len) of req to the target; data is req's data at off.
  Task<Result<void>> target_write(const WriteRequest& req, uint64_t off, uint64_t len);
  // The target half of an active write, run beside the source half
  // (active_write.cc). req by value: coroutine parameters are copied, never
  // referenced; req's data outlives it (active_write waits for it).
  struct TargetHalf;
  Task<void> run_target_half(WriteRequest req, uint64_t off, uint64_t len,
                             std::shared_ptr<TargetHalf> half);
  void switch_to_write_blocking(const std::string& why, bool emit_event);
  void check_adaptive();
  void note_synced_state();

  // Phase 5.
  // complete and prepare: `replaces` still shows the source's data.
  Result<void> check_still_replaceable() const;
  // Ready and complete: source and target are still the disks opened, at the
  // length copied (BlockDevice::check_unchanged); errors say which and how.
  Task<Result<void>> check_devices();
  Task<void> drain_sources();
  void undrain_sources();
  void detach();
  // commit() and abort(): every edge of the job needs nothing and shares all.
  void release_permissions();
  void on_dismissed() override;

  ByteRange chunk_bytes(uint64_t first, uint64_t end) const;
  // The whole chunks covering [off, off+len), clipped to the device.
  ByteRange chunks_covering(uint64_t off, uint64_t len) const;
  void mark_dirty(uint64_t off, uint64_t len);
  // Unmarks the sync=bitmap bitmap busy; in_sync: the job ended with source
  // and target equal and the source drained (commit), so on-success clears it.
  void release_sync_bitmap(bool in_sync);

  // Crash-safe state (checkpoint.cc; docs/design/journal.md).
  // Client writes and dirty marks since the last checkpoint, per journal extent.
  void touch(uint64_t off, uint64_t len);
  // Nothing of the extent is dirty, copied or written by a client right now.
  bool extent_idle(uint64_t extent) const;
  // Every checkpoint_interval: clears the journal's extents untouched for a
  // whole interval and idle, after flushing source and target.
  Task<void> run_checkpoints(std::shared_ptr<MirrorJob> self);
  Task<void> checkpoint();
  Task<void> stop_checkpoints();
  // The journal's end state (completed, cancelled); failures are reported,
  // never fatal: the copy itself is done.
  Task<void> record_end(JournalState s);
  void journal_failed(const Error& e);
  void update_len();
  // len = offset + dirty + in flight (docs/design/mirror-job.md, "Progress").
  uint64_t progress_len() const;

  Loop& loop_;
  Graph& graph_;
  MirrorParams p_;
  Node* src_node_;
  NamedBitmap* sync_bitmap_ = nullptr;  // sync=bitmap: busy until commit or abort
  Node* tgt_node_;
  Node* replaces_node_;
  // Source: consistent read, shares all but resize. Target: write, shares
  // only reads and unchanging writes (docs/design/permissions.md). Replaced
  // node (when not the source): no permissions, keeps it alive and busy.
  std::unique_ptr<Child> src_edge_, tgt_edge_, replaces_edge_;
  // Active commit: the layers between the source and the base, held busy.
  std::vector<std::unique_ptr<Child>> between_edges_;
  // Every target request goes through it: unflushed writes are handed back
  // after a reconnect, and another disk answering is refused (target_tracker.h).
  std::shared_ptr<TargetTracker> tracker_;
  BlockDevice& src_;
  BlockDevice& tgt_;  // *tracker_
  const uint64_t length_;
  const uint64_t gran_;      // derive_sizes(): fixed for the job's life
  const uint64_t buf_size_;  // the budget given, or the one the depth control starts from
  const uint64_t max_op_;
  // Active commit: the base's depth in the source's chain (block_status depth;
  // the source is 1), so extents of depth 1..base_depth_-1 are copied. 0: not
  // a commit.
  const uint32_t base_depth_;
  // COW alignment (MIRROR.md phase 3): the target's cluster size when it has a
  // backing node and its clusters are larger than a chunk, else 0. A partial
  // first write into such a cluster would have the format fill the rest from
  // the target's backing node, which need not hold the source's data yet (a
  // base still being copied), so the first copy into each one covers it whole.
  const uint64_t cow_cluster_;
  DirtyBitmap cow_written_;  // per target cluster: written whole once
  DirtyBitmap dirty_;
  std::list<MirrorOp> in_flight_;   // background operations
  std::list<ActiveOp> active_ops_;  // client writes in write-blocking mode
  uint64_t active_bytes_ = 0;       // bytes those writes still owe the target
  uint64_t intercepts_ = 0;         // client writes inside intercept() now
  uint64_t passive_writes_ = 0;     // of those, the ones only marking dirty
  Notifier intercepts_done_;        // intercepts_ reached 0
  CopyMode mode_;                   // see copy_mode(); write-blocking = active mirroring
  bool actively_synced_ = false;
  // The target is as long as the source (an active commit's base grows in
  // run()): until then client writes only mark chunks dirty, never reach it.
  bool target_sized_;
  AdaptiveController adaptive_;     // consulted while mode_ is adaptive
  // Under the ignore policy a failed range is dirty again at once: without a
  // hold, a persistent error would be retried as fast as the loop spins, with
  // an event each time. Both clocked by the loop (retry_backoff.h).
  RetryBackoff backoff_;
  EventThrottle error_events_{kErrorEventsPerSecond, std::chrono::seconds(1)};
  uint64_t in_flight_bytes_ = 0;  // sum of in_flight_'s reserved: buffer budget in use
  // No buf-size given: the budget follows the target's round trip (depth_control.h),
  // from buf_size_ up to max_buf_size(). Given: nullopt, the budget is buf_size_.
  std::optional<DepthControl> depth_;
  // Copy offload: both ends' files while the kernel can copy between them;
  // reset at the first failure (the job then reads and writes).
  struct Offload {
    FileSpan src, tgt;
  };
  std::optional<Offload> offload_;
  // Background operations are kernel copies where they can be: runs are sized
  // for the kernel, not the buffer budget.
  bool kernel_copies() const { return offload_.has_value(); }
  // Another parent of the source (an export, a client, a format above it) may
  // write to it. The copy then reads the source uncached: a buffered read's
  // readahead leaves large page-cache folios, and each small client write into
  // one costs ext4 several times a write into a small one (write-blocking fio
  // IOPS 26k -> 57k, docs/design/data-path.md). A source nobody can write is
  // read buffered, which is faster (readahead) and costs no client anything.
  // Asked per operation: permissions change as exports come and go. Asking
  // "did a client write lately" instead would read buffered until the first
  // write and leave those folios under every later one.
  bool clients_may_write() const;
  // The one test of whether op is copied by the kernel (no buffer, reserves
  // nothing) or through a buffer: at launch, to reserve, and in copy_range, to
  // copy. Block status may turn a kernel copy into a buffered one later (a chunk
  // that is partly hole, a failed offload): copy_range then reserves late.
  bool copies_in_kernel(const MirrorOp& op) const;
  // Its size half, which pick_run also asks: a reflink always, a data-moving
  // copy from kMinKernelCopy on. REQUIRES: offload_.
  bool kernel_copy_pays(uint64_t length) const;
  // Chunks in one kernel copy: the largest requests (a call's cost is mostly
  // fixed: docs/design/data-path.md), except under a speed limit, and where
  // the copy moves data and a client write may wait for it (write-blocking).
  uint64_t kernel_copy_chunks() const;
  // Data-moving kernel copies (no reflink) running at once: kKernelCopyStreams.
  unsigned kernel_streams_ = 0;
  Notifier kernel_stream_free_;  // kernel_streams_ went down
  uint64_t cursor_ = 0;           // chunk where the next search starts
  bool synced_ = false;
  bool should_complete_ = false;
  bool swap_on_finish_ = true;
  bool drained_ = false;
  bool switched_ = false;
  bool attached_ = true;
  std::optional<Error> fatal_;
  BufferPool pool_;
  MirrorStats stats_;
  std::shared_ptr<Journal> journal_;  // p_.journal
  DirtyBitmap touched_;               // per journal extent (empty without one)
  std::vector<ByteRange> intercepting_;  // client writes inside intercept() now
  bool checkpoints_running_ = false;
  bool stop_checkpoints_ = false;
  Notifier checkpoint_wake_;
};

}  // namespace blkmirror
