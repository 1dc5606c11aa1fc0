// The copy loop's operations: picking the next dirty run, and copying, zeroing or
// discarding it on the target.
#include <algorithm>

#include <fmt/format.h>

#include "mirror/mirror_job.h"

namespace blkmirror {

const ByteRange* MirrorJob::in_flight_at(uint64_t chunk) const {
  ByteRange c = chunk_bytes(chunk, chunk + 1);
  for (auto& r : in_flight_)
    if (r.overlaps(c)) return &r;
  return nullptr;
}

std::optional<MirrorJob::Run> MirrorJob::pick_run() {
  uint64_t nchunks = dirty_.size();
  if (dirty_.count() == 0 || buf_size_ < in_flight_bytes_ + gran_) return std::nullopt;
  uint64_t free = buf_size_ - in_flight_bytes_;
  uint64_t limit = std::min(max_op_, free) / gran_;  // chunks in one operation
  // Find a dirty chunk that no running operation covers; a chunk dirtied again
  // while its copy runs waits for that copy to finish. Each skip passes one
  // in-flight operation, so a few tries cover them all.
  uint64_t pos = cursor_ < nchunks ? cursor_ : 0;
  bool wrapped = false;
  for (size_t tries = 0; tries < 2 * in_flight_.size() + 2; ++tries) {
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
    return Run{*next, end};
  }
  return std::nullopt;
}

bool MirrorJob::launch_next() {
  auto run = pick_run();
  if (!run) return false;
  // Clear the dirty bits before reading, so a write that lands during the copy
  // dirties the chunk again and it is copied once more.
  dirty_.reset(run->first_chunk, run->end_chunk - run->first_chunk);
  ByteRange bytes = chunk_bytes(run->first_chunk, run->end_chunk);
  auto op = in_flight_.insert(in_flight_.end(), bytes);
  in_flight_bytes_ += bytes.length;
  cursor_ = run->end_chunk;
  asio::co_spawn(loop_.executor(),
                 run_op(op, std::static_pointer_cast<MirrorJob>(shared_from_this())),
                 asio::detached);
  return true;
}

Task<Result<void>> MirrorJob::copy_range(uint64_t off, uint64_t len, bool& is_read) {
  AlignedBuffer buf = pool_.take();
  auto span = buf.span(len);
  if (auto r = co_await src_.read(off, span); !r) {
    pool_.give(std::move(buf));
    is_read = true;
    co_return r;
  }
  auto w = co_await tgt_.write(off, span, {});
  pool_.give(std::move(buf));
  co_return w;
}

Task<void> MirrorJob::run_op(std::list<ByteRange>::iterator op, std::shared_ptr<MirrorJob> self) {
  uint64_t off = op->offset, len = op->length;
  enum class Kind { kCopy, kZero, kDiscard } kind = Kind::kCopy;
  Result<void> result;
  bool is_read = false;

  auto st = co_await src_.block_status(off, len);
  if (!st) {
    result = make_error(st.error());
    is_read = true;
  } else {
    uint64_t oplen = len;
    if (st->length < len) {
      // The run mixes kinds: keep the part that matches the first extent (whole
      // chunks; a mixed chunk is copied as data) and leave the rest dirty.
      oplen = st->length >= gran_ ? align_down(st->length, gran_) : std::min(gran_, len);
      if (st->length < gran_) st->allocated = true, st->zero = false;
      mark_dirty(off + oplen, len - oplen);
      in_flight_bytes_ -= len - oplen;
      op->length = len = oplen;
    }
    if (st->zero)
      kind = Kind::kZero;
    else if (!st->allocated)
      kind = Kind::kDiscard;
    // Only data costs buffer space and rate budget; the target zeroes cheaply.
    if (kind != Kind::kCopy) {
      in_flight_bytes_ -= len;
      if (!tgt_.caps().can_zero) rate_.charge(len);
    } else {
      rate_.charge(len);
    }
    switch (kind) {
      case Kind::kCopy: {
        result = co_await copy_range(off, len, is_read);
        break;
      }
      case Kind::kZero:
        result = co_await tgt_.write_zeroes(off, len, ZeroFlags{.may_unmap = p_.unmap});
        break;
      case Kind::kDiscard:
        result = p_.unmap ? co_await tgt_.discard(off, len)
                          : co_await tgt_.write_zeroes(off, len, ZeroFlags{});
        break;
    }
  }

  if (kind == Kind::kCopy) in_flight_bytes_ -= len;
  in_flight_.erase(op);
  ++stats_.ops;
  if (result) {
    progress_offset_ += len;
    (kind == Kind::kCopy ? stats_.bytes_copied : stats_.bytes_zeroed) += len;
  } else {
    ++stats_.errors;
    mark_dirty(off, len);  // a failed operation is retried later (or the job ends)
    on_op_error(result.error(), is_read);
  }
  update_len();
  wake_.notify_all();
}

void MirrorJob::on_op_error(const Error& e, bool is_read) {
  ErrorAction action =
      action_for(is_read ? p_.on_source_error : p_.on_target_error, e.errnum());
  synced_ = false;
  JobEvent ev = block_event(JobEvent::Kind::kError);
  ev.operation = is_read ? "read" : "write";
  ev.action = to_string(action);
  ev.message = e.message();
  emit(ev);
  switch (action) {
    case ErrorAction::kReport:
      if (!fatal_) fatal_ = e;
      break;
    case ErrorAction::kIgnore:
      break;  // the range is dirty again; the loop comes back to it
    case ErrorAction::kStop:
      pause_for_error(e.errnum() == ENOSPC ? IoStatus::kNoSpace : IoStatus::kFailed);
      break;
  }
}

}  // namespace blkmirror
