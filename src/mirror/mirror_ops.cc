// The copy loop's operations: picking the next dirty run, and copying, zeroing or
// discarding it on the target.
#include <algorithm>

#include <fmt/format.h>

#include "base/assert.h"
#include "base/limits.h"
#include "blockdev/file_device.h"
#include "mirror/mirror_job.h"

namespace blkmirror {

const ByteRange* MirrorJob::in_flight_at(uint64_t chunk) const {
  ByteRange c = chunk_bytes(chunk, chunk + 1);
  for (auto& op : in_flight_)
    if (op.range.overlaps(c)) return &op.range;
  // A client write being mirrored synchronously owns its chunks too.
  for (auto& a : active_ops_)
    if (a.chunks.overlaps(c)) return &a.chunks;
  return nullptr;
}

uint64_t MirrorJob::kernel_copy_chunks() const {
  // Measured on ext4 (1 GiB, 4 workers): 1 MiB calls took 2.3-3.1 s of CPU,
  // 32 MiB calls 0.8-1.3 s. A speed limit is kept in max_op_ steps, so one
  // request cannot spend seconds of budget at once.
  bool large = rate_.speed() == 0 && (offload_->src.reflink || !write_blocking());
  return std::max<uint64_t>((large ? uint64_t{kMaxRequestBytes} : max_op_) / gran_, 1);
}

uint64_t MirrorJob::max_ops() const {
  // In step with the budget: the operations stay max_op_ long.
  return budget() / buf_size_ * p_.max_in_flight + budget() % buf_size_ / max_op_;
}

void MirrorJob::adjust_depth() {
  if (!depth_ || !depth_->tick(DepthControl::Clock::now())) return;
  // Idle buffers for a full budget, as at creation; the extra ones of a budget
  // that shrank are freed as they come back.
  pool_.set_max_cached(depth_->budget() / max_op_ + 1);
}

void MirrorJob::check_budget() const {
  // O(operations), up to a thousand with a grown budget: debug builds (the
  // unit and randomized model tests) only, as assert.h asks of costly checks.
#ifndef NDEBUG
  uint64_t sum = 0;
  for (const MirrorOp& op : in_flight_) sum += op.reserved;
  BLKMIRROR_ASSERT(sum == in_flight_bytes_, "buffer budget out of step with the operations");
#endif
}

std::optional<MirrorJob::Run> MirrorJob::pick_run() {
  uint64_t nchunks = dirty_.size();
  if (dirty_.count() == 0) return std::nullopt;
  // A budget the depth control just shrank may be below what is in flight.
  uint64_t budget = this->budget();
  if (in_flight_.size() >= max_ops() || budget < in_flight_bytes_ + gran_) {
    if (depth_) depth_->note_limited();
    return std::nullopt;
  }
  uint64_t free = budget - in_flight_bytes_;
  // Chunks in one operation; a kernel copy needs no buffer.
  uint64_t limit = kernel_copies() ? kernel_copy_chunks() : std::min(max_op_, free) / gran_;
  // Find a dirty chunk that no running operation covers; a chunk dirtied again
  // while its copy runs waits for that copy to finish. Each skip passes one
  // in-flight operation (or active write), so a few tries cover them all.
  uint64_t pos = cursor_ < nchunks ? cursor_ : 0;
  bool wrapped = false;
  for (size_t tries = 0; tries < 2 * (in_flight_.size() + active_ops_.size()) + 2; ++tries) {
    auto next = dirty_.next_set(pos);
    if (!next) {
      if (wrapped) return std::nullopt;
      wrapped = true;
      pos = 0;
      continue;
    }
    if (const ByteRange* busy = in_flight_at(*next)) {
      pos = div_round_up(busy->end(), gran_);
      continue;
    }
    uint64_t end = *next + 1;
    while (end < nchunks && end - *next < limit && dirty_.test(end) && !in_flight_at(end)) ++end;
    // A run too short for the kernel goes through a buffer (copies_in_kernel):
    // it must fit the budget like any buffered one.
    if (kernel_copies() && !kernel_copy_pays((end - *next) * gran_))
      end = *next + std::clamp<uint64_t>(std::min(max_op_, free) / gran_, 1, end - *next);
    return Run{*next, end};
  }
  return std::nullopt;
}

bool MirrorJob::cow_done(uint64_t off, uint64_t end) const {
  if (!cow_cluster_ || off >= end) return true;
  for (uint64_t c = off / cow_cluster_; c <= (end - 1) / cow_cluster_; ++c)
    if (!cow_written_.test(c)) return false;
  return true;
}

void MirrorJob::mark_cow_done(const ByteRange& r) {
  if (!cow_cluster_ || r.length == 0) return;
  // Clusters the range covers whole (the device's last, short one counts).
  uint64_t first = div_round_up(r.offset, cow_cluster_);
  uint64_t last = r.end() == length_ ? cow_written_.size() : r.end() / cow_cluster_;
  if (first < last) cow_written_.set(first, last - first);
}

std::optional<ByteRange> MirrorJob::cow_align(ByteRange bytes) const {
  if (!cow_cluster_) return bytes;
  uint64_t start = bytes.offset, end = bytes.end();
  if (!cow_written_.test(start / cow_cluster_)) start = align_down(start, cow_cluster_);
  if (!cow_written_.test((end - 1) / cow_cluster_))
    end = std::min(align_up(end, cow_cluster_), length_);
  if (start == bytes.offset && end == bytes.end()) return bytes;
  // The widened chunks must be free: copied by nobody else right now.
  for (uint64_t c = start / gran_; c < div_round_up(end, gran_); ++c)
    if (in_flight_at(c)) return std::nullopt;
  if (in_flight_bytes_ + (end - start) > budget() && !in_flight_.empty()) return std::nullopt;
  return ByteRange{start, end - start};
}

bool MirrorJob::launch_next() {
  auto run = pick_run();
  if (!run) return false;
  auto aligned = cow_align(chunk_bytes(run->first_chunk, run->end_chunk));
  if (!aligned) return false;  // retried when an operation finishes
  ByteRange bytes = *aligned;
  bool widened = bytes.offset != run->first_chunk * gran_ ||
                 bytes.end() != chunk_bytes(run->first_chunk, run->end_chunk).end();
  // Clear the dirty bits before reading, so a write that lands during the copy
  // dirties the chunk again and it is copied once more.
  uint64_t first_chunk = bytes.offset / gran_, end_chunk = div_round_up(bytes.end(), gran_);
  dirty_.reset(first_chunk, end_chunk - first_chunk);
  auto op = in_flight_.insert(in_flight_.end(), MirrorOp{.range = bytes, .cow_aligned = widened});
  op->reserved = copies_in_kernel(*op) ? 0 : bytes.length;
  in_flight_bytes_ += op->reserved;
  check_budget();
  // Charge at launch (the op may turn out to be a cheap zero and get a refund),
  // so a burst of launches cannot outrun the speed limit.
  rate_.charge(bytes.length);
  // The op writes the target's device directly (through the tracker, or the
  // kernel's copy_file_range), not through the node's request path: record it
  // in the target node's dirty bitmaps here, the whole range, whatever the op
  // turns out to write.
  tgt_node_->bitmaps().record(bytes.offset, bytes.length);
  cursor_ = end_chunk;
  asio::co_spawn(loop_.executor(),
                 run_op(op, std::static_pointer_cast<MirrorJob>(shared_from_this())),
                 asio::detached);
  return true;
}

namespace {

bool all_zero(const std::byte* p, size_t n) {
  // Word-wise; dense data usually fails on the first word.
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < n / 8; ++i)
    if (w[i]) return false;
  for (size_t i = n / 8 * 8; i < n; ++i)
    if (p[i] != std::byte{0}) return false;
  return true;
}

}  // namespace

// The copy's own writes stay out of the target's page cache (block_device.h).
constexpr WriteFlags kCopyWrite{.uncached = true};

Task<Result<void>> MirrorJob::write_keeping_holes(uint64_t off, std::span<const std::byte> data,
                                                  uint64_t& zeroed) {
  // A chunk that is partly hole on the source (a small write into a sparse
  // area) reads back as data plus zeroes. Writing the zeroes as holes keeps the
  // target as sparse as the source, at 4 KiB resolution.
  constexpr uint64_t kBlock = 4096;
  if (!p_.unmap || !tgt_.caps().can_zero_unmap || data.size() < kBlock)
    co_return co_await tgt_.write(off, data, kCopyWrite);
  uint64_t pos = 0, len = data.size();
  while (pos < len) {
    // Extend a run of blocks of one kind (the last block may be short).
    bool zero = all_zero(data.data() + pos, std::min(kBlock, len - pos));
    uint64_t end = pos;
    while (end < len && all_zero(data.data() + end, std::min(kBlock, len - end)) == zero)
      end += std::min(kBlock, len - end);
    Result<void> r;
    if (zero) {
      r = co_await tgt_.write_zeroes(off + pos, end - pos, ZeroFlags{.may_unmap = true});
      zeroed += end - pos;
    } else {
      r = co_await tgt_.write(off + pos, data.subspan(pos, end - pos), kCopyWrite);
    }
    if (!r) co_return r;
    pos = end;
  }
  co_return Result<void>{};
}

void MirrorJob::set_reserved(MirrorOp& op, uint64_t bytes) {
  BLKMIRROR_ASSERT(bytes <= op.reserved && op.reserved <= in_flight_bytes_,
                   "buffer budget released twice");
  in_flight_bytes_ -= op.reserved - bytes;
  op.reserved = bytes;
  check_budget();
}

bool MirrorJob::kernel_copy_pays(uint64_t length) const {
  return offload_->src.reflink || length >= kMinKernelCopy;
}

bool MirrorJob::copies_in_kernel(const MirrorOp& op) const {
  return offload_ && !op.partly_hole && !op.cow_aligned && kernel_copy_pays(op.range.length);
}

void MirrorJob::reserve_late(MirrorOp& op, uint64_t bytes) {
  BLKMIRROR_ASSERT(op.reserved == 0, "a late reservation for an op that holds one");
  op.reserved = bytes;
  in_flight_bytes_ += bytes;
  check_budget();
}

Task<Result<void>> MirrorJob::copy_range(MirrorOp& op) {
  bool kernel = copies_in_kernel(op);
  // A kernel copy that moves data waits for one of kKernelCopyStreams.
  while (kernel && offload_ && !offload_->src.reflink && kernel_streams_ >= kKernelCopyStreams)
    co_await kernel_stream_free_.wait();
  if (kernel && offload_) {
    bool stream = !offload_->src.reflink;
    if (stream) {
      ++kernel_streams_;
      stats_.kernel_streams_peak = std::max<uint64_t>(stats_.kernel_streams_peak, kernel_streams_);
    }
    auto r = co_await copy_file_range_all(loop_, offload_->src, offload_->tgt, op.range.offset,
                                          op.range.length);
    if (stream) {
      --kernel_streams_;
      kernel_stream_free_.notify_all();
    }
    if (r) {
      stats_.bytes_offloaded += op.range.length;
      co_return r;
    }
    // The kernel cannot copy for this pair (EXDEV, EOPNOTSUPP...), or an I/O
    // error hit one side, and which one is unknown: from now on read and write,
    // which also tells a source failure from a target one.
    offload_.reset();
  }
  // Buffered after all (see copies_in_kernel): one buffer of the budget.
  if (op.reserved == 0) reserve_late(op, std::min(op.range.length, max_op_));
  co_return co_await copy_through_buffer(op);
}

bool MirrorJob::clients_may_write() const {
  return (src_node_->cumulative_perms().need & kPermWrite) != 0;
}

Task<Result<void>> MirrorJob::copy_through_buffer(MirrorOp& op) {
  AlignedBuffer buf = pool_.take();
  Result<void> r;
  const ReadFlags rf{.uncached = clients_may_write()};
  for (uint64_t pos = op.range.offset; pos < op.range.end() && r;) {
    auto span = buf.span(std::min(max_op_, op.range.end() - pos));
    r = co_await src_.read(pos, span, rf);
    if (!r) {
      op.read_failed = true;
      break;
    }
    // The job's own writes are where a target's round trip shows (a server
    // may delay writes only): the depth control's samples. One that went out
    // partly as zeroes is not one write.
    auto issued = DepthControl::Clock::now();
    uint64_t zeroed = op.zeroed;
    r = co_await write_keeping_holes(pos, span, op.zeroed);
    if (r && depth_ && op.zeroed == zeroed)
      depth_->on_write(issued, DepthControl::Clock::now(), span.size());
    pos += span.size();
  }
  pool_.give(std::move(buf));
  co_return r;
}

Task<void> MirrorJob::run_op(std::list<MirrorOp>::iterator it, std::shared_ptr<MirrorJob> self) {
  MirrorOp& op = *it;
  using Kind = MirrorOp::Kind;
  Result<void> result;
  bool out_of_memory = false;  // no error policy retries an allocation failure

  // A widened run is copied whole: split by block status, its first piece
  // would be a partial write into the target cluster after all.
  // if/else, not ?: (GCC 12 rule 1, base/task.h).
  Result<Extent> st = Extent{op.range.length, true, false};
  if (op.cow_aligned)
    op.partly_hole = true;  // through a buffer, zero blocks as holes
  else
    st = co_await src_.block_status(op.range.offset, op.range.length);
  if (!st) {
    result = make_error(st.error());
    op.read_failed = true;
  } else {
    uint64_t off = op.range.offset, len = op.range.length;
    if (st->length < len) {
      // The run mixes kinds: keep the part that matches the first extent (whole
      // chunks; a mixed chunk is copied as data) and leave the rest dirty.
      uint64_t oplen = st->length >= gran_ ? align_down(st->length, gran_) : std::min(gran_, len);
      if (st->length < gran_) st->allocated = true, st->zero = false, op.partly_hole = true;
      mark_dirty(off + oplen, len - oplen);
      set_reserved(op, std::min(op.reserved, oplen));
      rate_.refund(len - oplen);
      op.range.length = len = oplen;
    }
    if (st->zero)
      op.kind = Kind::kZero;
    else if (!st->allocated)
      op.kind = Kind::kDiscard;
    // Only data costs buffer space and rate budget; the target zeroes cheaply.
    if (op.kind != Kind::kCopy) {
      set_reserved(op, 0);
      if (tgt_.caps().can_zero) rate_.refund(len);
    }
    switch (op.kind) {
      case Kind::kCopy:
        // This coroutine is detached: an exception escaping it would leave the
        // op in flight forever, and the job (and a forced cancel, and the
        // process's shutdown) waiting for it. A buffer that cannot be
        // allocated fails the job with ENOMEM instead; no policy retries it.
        try {
          result = co_await copy_range(op);
        } catch (const std::bad_alloc&) {
          out_of_memory = true;
          result = make_plain_error(
              ENOMEM, fmt::format("cannot allocate a {}-byte copy buffer", op.range.length));
        }
        break;
      case Kind::kZero:
        result = co_await tgt_.write_zeroes(off, len, ZeroFlags{.may_unmap = p_.unmap});
        break;
      case Kind::kDiscard:
        // if/else, not ?: (GCC 12 rule 1, base/task.h).
        if (p_.unmap)
          result = co_await tgt_.discard(off, len);
        else
          result = co_await tgt_.write_zeroes(off, len, ZeroFlags{});
        break;
    }
  }

  set_reserved(op, 0);
  MirrorOp done = op;
  in_flight_.erase(it);
  ++stats_.ops;
  if (result) {
    on_op_success();
    mark_cow_done(done.range);
    progress_offset_ += done.range.length;
    if (done.kind == Kind::kCopy) {
      stats_.bytes_copied += done.range.length - done.zeroed;
      stats_.bytes_zeroed += done.zeroed;
    } else {
      stats_.bytes_zeroed += done.range.length;
    }
  } else {
    ++stats_.errors;
    // A failed operation is retried later (or the job ends).
    mark_dirty(done.range.offset, done.range.length);
    if (out_of_memory) {
      if (!fatal_) fatal_ = result.error();
    } else {
      on_op_error(result.error(), done.read_failed);
    }
  }
  update_len();
  wake_.notify_all();
}

void MirrorJob::on_op_error(const Error& e, bool is_read) {
  ++stats_.errors_by[{!is_read, e.errnum()}];
  ErrorAction action =
      action_for(is_read ? p_.on_source_error : p_.on_target_error, e.errnum());
  synced_ = false;
  actively_synced_ = false;
  auto now = RetryBackoff::Clock::now();
  // A retried error may come back many times a second; a stop or a report
  // happens once per pause or job, and is always told.
  if (action != ErrorAction::kIgnore || error_events_.allow(now)) {
    JobEvent ev = block_event(JobEvent::Kind::kError);
    ev.operation = is_read ? "read" : "write";
    ev.action = to_string(action);
    ev.message = e.message();
    ev.suppressed = error_events_.take_suppressed();
    emit(ev);
  } else {
    ++stats_.errors_unreported;
  }
  switch (action) {
    case ErrorAction::kReport:
      if (!fatal_) fatal_ = e;
      break;
    case ErrorAction::kIgnore:
      // The range is dirty again; the loop comes back to it after the hold.
      backoff_.on_failure(now);
      break;
    case ErrorAction::kStop:
      pause_for_error(e.errnum() == ENOSPC ? IoStatus::kNoSpace : IoStatus::kFailed);
      break;
  }
}

}  // namespace blkmirror
