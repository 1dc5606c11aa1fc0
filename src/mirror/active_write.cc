// The mirror job in the source's write path: every client write, write-zeroes
// and discard to the source passes through MirrorJob::intercept().
//
// Background mode (and write-blocking while it cannot copy: before start, after
// an error stopped the job, on cancel) is *passive*: run the request on the
// source, then mark its chunks dirty. Marking after the write is what keeps the
// copy loop safe (it clears bits before reading; see mirror_ops.cc).
//
// Write-blocking mode is *active* (QEMU's active mirroring):
//   1. wait until no background operation and no other active write holds any
//      chunk the request touches, then hold those whole chunks (active_ops_), so
//      the copy loop skips them: no torn chunk, no lost update;
//   2. run the request on the source and, at the same time, write the same
//      bytes to the target, except an unaligned head or tail whose chunk is
//      dirty (the background copy owns that chunk anyway);
//   3. only when both succeeded, clear the bits of the chunks the request
//      covered whole. A failed target write re-dirties the range and goes to the
//      target error policy; a failed source write re-dirties it too (the target
//      may hold the new data). The client gets the source's result either way.
// Write-zeroes goes to the target as write-zeroes. A discard goes to the target
// as a discard, but since discarded contents are unspecified its chunks are
// left dirty: the copy loop reconciles them from block status.
//
// A write that started in background mode and finishes after a switch marks
// chunks a concurrent active write holds: that active write then leaves its bits
// set (ActiveOp::redirtied), because the source may hold the older write's data.
//
// Adaptive mode (check_adaptive, adaptive.h) watches the dirty count from the
// copy loop and switches to write-blocking when it stops falling.
//
// Threading rule: loop thread only, like the rest of the job.
#include <algorithm>

#include <fmt/format.h>

#include "base/assert.h"

#include "mirror/mirror_job.h"

namespace blkmirror {

ByteRange MirrorJob::chunks_covering(uint64_t off, uint64_t len) const {
  if (len == 0 || off >= length_) return {std::min(off, length_), 0};
  uint64_t end = std::min(off + len, length_);
  return chunk_bytes(off / gran_, div_round_up(end, gran_));
}

bool MirrorJob::copy_to_target() const {
  if (!write_blocking() || !attached_ || !target_sized_ || fatal_ || cancel_requested() ||
      io_status() != IoStatus::kOk)
    return false;
  switch (status()) {
    case JobStatus::kRunning:
    case JobStatus::kPaused:  // a user pause stops the copy loop, not the writes
    case JobStatus::kReady:
    case JobStatus::kStandby:
      return true;
    default:
      return false;
  }
}

bool MirrorJob::overlaps_any_op(const ByteRange& r) const {
  if (r.length == 0) return false;
  for (auto& op : in_flight_)
    if (op.range.overlaps(r)) return true;
  for (auto& a : active_ops_)
    if (a.chunks.overlaps(r)) return true;
  return false;
}

bool MirrorJob::copy_pending(uint64_t off, uint64_t len) const {
  if (concluded() || len == 0) return false;
  ByteRange chunks = chunks_covering(off, len);
  if (chunks.length == 0) return false;
  if (dirty_.count_range(chunks.offset / gran_, div_round_up(chunks.length, gran_)) > 0)
    return true;
  // A client write still inside intercept() is the caller's to see (a write
  // observer on the source: graph.h), not a pending copy.
  return overlaps_any_op(chunks);
}

Task<Result<void>> MirrorJob::intercept(Node& node, const WriteRequest& req) {
  // The job may conclude and be released while a write it saw is suspended.
  auto self = shared_from_this();
  ++intercepts_;
  ByteRange range{req.offset, req.length};
  if (journal_) {
    // Metadata before data: the extent is dirty on stable storage before the
    // write can change the source (checkpoint.cc).
    intercepting_.push_back(range);
    touch(req.offset, req.length);
    if (!journal_->durable(req.offset, req.length)) {
      if (auto m = co_await journal_->mark(req.offset, req.length); !m) journal_failed(m.error());
    }
  }
  Result<void> r;
  if (copy_to_target())
    r = co_await active_write(node, req);
  else
    r = co_await passive_write(node, req);
  if (journal_) {
    touch(req.offset, req.length);
    auto it = std::find_if(intercepting_.begin(), intercepting_.end(), [&](const ByteRange& b) {
      return b.offset == range.offset && b.length == range.length;
    });
    if (it != intercepting_.end()) intercepting_.erase(it);
  }
  BLKMIRROR_ASSERT(intercepts_ > 0, "intercepted writes below zero");
  if (--intercepts_ == 0) intercepts_done_.notify_all();
  co_return r;
}

Task<Result<void>> MirrorJob::passive_write(Node& node, const WriteRequest& req) {
  ++passive_writes_;
  auto r = co_await node.perform(req);
  BLKMIRROR_ASSERT(passive_writes_ > 0, "passive writes below zero");
  --passive_writes_;
  // Even a failed write may have changed part of the range.
  mark_dirty(req.offset, req.length);
  ByteRange written{req.offset, req.length};
  for (auto& a : active_ops_)
    if (a.chunks.overlaps(written)) a.redirtied = true;
  actively_synced_ = false;
  wake_.notify_all();
  co_return r;
}

Task<Result<void>> MirrorJob::target_write(const WriteRequest& req, uint64_t off, uint64_t len) {
  // The target's device directly: its node's bitmaps record it here (as launch_next() does).
  tgt_node_->bitmaps().record(off, len);
  switch (req.kind) {
    case WriteRequest::Kind::kWrite:
      co_return co_await tgt_.write(off, req.data.subspan(off - req.offset, len), WriteFlags{});
    case WriteRequest::Kind::kWriteZeroes: {
      // Durability and no-fallback were the client's asks of the source; the
      // target must read zero, however it gets there.
      ZeroFlags f;
      f.may_unmap = req.zflags.may_unmap && p_.unmap;
      co_return co_await tgt_.write_zeroes(off, len, f);
    }
    case WriteRequest::Kind::kDiscard:
      if (!p_.unmap) co_return Result<void>{};  // the copy loop writes zeroes instead
      co_return co_await tgt_.discard(off, len);
  }
  co_return make_plain_error(EINVAL, "unknown write request");
}

struct MirrorJob::TargetHalf {
  bool done = false;
  Result<void> result;
  Notifier finished;  // done became true
};

Task<void> MirrorJob::run_target_half(WriteRequest req, uint64_t off, uint64_t len,
                                      std::shared_ptr<TargetHalf> half) {
  half->result = co_await target_write(req, off, len);
  half->done = true;
  half->finished.notify_all();
}

Task<Result<void>> MirrorJob::active_write(Node& node, const WriteRequest& req) {
  ByteRange chunks = chunks_covering(req.offset, req.length);
  while (overlaps_any_op(chunks)) co_await wake_.wait();
  // The job may have stopped (error, cancel) while this write waited. A write
  // into a target cluster not yet written whole would have the target fill the
  // rest from its backing node (COW alignment, mirror_job.h): the copy loop
  // takes those chunks, widened.
  if (!copy_to_target() || !cow_done(req.offset, std::min(req.offset + req.length, length_)))
    co_return co_await passive_write(node, req);
  auto op = active_ops_.insert(active_ops_.end(), ActiveOp{chunks, false});

  // What goes to the target: all of it, except an unaligned head or tail whose
  // chunk is dirty. Copying that piece could not make the chunk clean (the rest
  // of it still differs), and the background copy will take it whole. Decided
  // now: nothing but this write can clean these chunks while it holds them.
  uint64_t off = std::min(req.offset, length_);
  uint64_t end = std::min(req.offset + req.length, length_);
  if (off % gran_ != 0 && off < end && dirty_.test(off / gran_))
    off = std::min(end, align_up(off, gran_));
  if (end % gran_ != 0 && end != length_ && off < end && dirty_.test((end - 1) / gran_))
    end = std::max(off, align_down(end, gran_));

  // Source and target writes run at the same time: the client waits for the
  // slower one, not for both in turn. Safe because this write holds its chunks
  // (no copy reads them, no other write touches them) and the bits are only
  // cleared once both sides succeeded; a failure on either side re-dirties.
  auto half = std::make_shared<TargetHalf>();
  if (off < end) {
    active_bytes_ += end - off;
    update_len();
    asio::co_spawn(loop_.executor(), run_target_half(req, off, end - off, half), asio::detached);
  } else {
    half->done = true;
  }
  auto r = co_await node.perform(req);
  while (!half->done) co_await half->finished.wait();
  if (off < end) {
    BLKMIRROR_ASSERT(active_bytes_ >= end - off, "active write bytes below zero");
    active_bytes_ -= end - off;
  }
  bool redirtied = op->redirtied;
  active_ops_.erase(op);

  if (!r) {
    // The source may hold part of the write, the target all of it: the copy
    // loop sorts it out, and until then the two may differ.
    mark_dirty(req.offset, req.length);
    actively_synced_ = false;
  } else if (!half->result) {
    ++stats_.errors;
    mark_dirty(off, end - off);
    on_op_error(half->result.error(), false);
  } else if (off < end) {
    on_op_success();
    progress_offset_ += end - off;
    stats_.bytes_active += end - off;
    if (req.kind == WriteRequest::Kind::kDiscard || redirtied) {
      mark_dirty(off, end - off);
      actively_synced_ = false;  // until the copy loop reconciled the range
    } else {
      // The chunks the write covered whole now hold the same bytes on both sides:
      // nobody else could touch them while this write held them.
      uint64_t first = div_round_up(off, gran_);
      uint64_t last = end == length_ ? dirty_.size() : end / gran_;
      if (first < last) dirty_.reset(first, last - first);
    }
  }
  update_len();
  wake_.notify_all();
  // The client is told what happened on the source: that is its disk.
  co_return r;
}

Result<void> MirrorJob::change_copy_mode(CopyMode m) {
  if (!job_verb_allowed(JobVerb::kChange, status()))
    return make_plain_error(EPERM, job_verb_error(id(), status(), JobVerb::kChange));
  if (m == mode_) return {};
  if (m != CopyMode::kWriteBlocking)
    return make_plain_error(
        ENOTSUP, fmt::format("Change to copy mode '{}' is not implemented", to_string(m)));
  switch_to_write_blocking("block-job-change", false);
  return {};
}

void MirrorJob::switch_to_write_blocking(const std::string& why, bool emit_event) {
  if (write_blocking()) return;
  mode_ = CopyMode::kWriteBlocking;
  ++stats_.mode_switches;
  // actively-synced waits for the copy loop's next clean pass with no write
  // from background mode still in flight.
  actively_synced_ = false;
  if (emit_event) {
    JobEvent ev = block_event(JobEvent::Kind::kCopyModeChange);
    ev.copy_mode = to_string(CopyMode::kWriteBlocking);
    ev.message = why;
    emit(ev);
  }
  wake_.notify_all();
}

bool MirrorJob::actively_synced() const { return write_blocking() && actively_synced_; }

void MirrorJob::note_synced_state() {
  if (write_blocking() && synced_ && passive_writes_ == 0 && dirty_.count() == 0 &&
      in_flight_.empty())
    actively_synced_ = true;
}

// Adaptive: the controller (adaptive.h) watches the dirty count and says when
// the job stopped converging.
void MirrorJob::check_adaptive() {
  if (mode_ != CopyMode::kAdaptive) return;
  if (auto why = adaptive_.observe(dirty_bytes(), AdaptiveController::Clock::now()))
    return switch_to_write_blocking(*why, true);
  if (stats_.bytes_copied > length_ + length_ / 100 * kAdaptiveRecopyPercent)
    switch_to_write_blocking(
        fmt::format("the job has copied {} bytes of a {}-byte disk: clients keep rewriting "
                    "what it copied, and mirroring their writes costs less",
                    stats_.bytes_copied, length_),
        true);
}

}  // namespace blkmirror
