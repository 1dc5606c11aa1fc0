// The mirror's crash-safe state: keeping the journal (journal/journal.h) a
// superset of where the target may differ from the source.
//
// Marking is in intercept() (active_write.cc): a client write's extents are
// dirty on stable storage before it runs. Clearing is here. An extent may be
// cleared when the target holds what the source holds there, durably on both:
//   1. candidates: extents the journal has dirty that no client wrote for a
//      whole interval (the activity log: hot extents stay marked and cost
//      their writers nothing), and that are idle now: nothing dirty, no copy
//      and no client write in flight;
//   2. flush the source, then the target: what was copied, and what the
//      source held when it was copied, are on stable storage (a power cut
//      could otherwise leave an acknowledged but unflushed source write out
//      of the source while its copy survived on the target);
//   3. drop the candidates touched or no longer idle meanwhile, clear the
//      rest, write them down.
// A write that lands on a cleared extent after 3 marks it again first; one
// that lands between 1 and 3 touched it, so it stays dirty.
#include <fmt/format.h>

#include <asio/co_spawn.hpp>

#include "mirror/mirror_job.h"

namespace blkmirror {

void MirrorJob::touch(uint64_t off, uint64_t len) {
  if (!journal_) return;
  auto [first, end] = journal_->extents_of(off, len);
  touched_.set(first, end - first);
}

bool MirrorJob::extent_idle(uint64_t x) const {
  const uint64_t ext = journal_->extent_size();
  ByteRange r{x * ext, std::min(ext, length_ - x * ext)};
  if (dirty_.count_range(r.offset / gran_, div_round_up(r.length, gran_)) > 0) return false;
  if (overlaps_any_op(r)) return false;
  for (auto& w : intercepting_)
    if (w.overlaps(r)) return false;
  return true;
}

void MirrorJob::journal_failed(const Error& e) {
  if (!fatal_) fatal_ = make_plain_error(e.errnum(), "crash-safe state: " + e.message()).value();
  wake_.notify_all();
}

Task<void> MirrorJob::checkpoint() {
  std::vector<uint64_t> cands;
  for (auto x = journal_->next_dirty(0); x; x = journal_->next_dirty(*x + 1))
    if (!touched_.test(*x) && extent_idle(*x)) cands.push_back(*x);
  touched_.reset_all();
  if (cands.empty()) co_return;
  if (auto f = co_await src_.flush(); !f) co_return;  // the copy loop reports device errors
  if (auto f = co_await tgt_.flush(); !f) co_return;
  std::erase_if(cands, [this](uint64_t x) { return touched_.test(x) || !extent_idle(x); });
  if (auto c = co_await journal_->clear(cands); !c) journal_failed(c.error());
}

Task<void> MirrorJob::run_checkpoints(std::shared_ptr<MirrorJob> self) {
  checkpoints_running_ = true;
  while (!stop_checkpoints_) {
    co_await checkpoint_wake_.wait(p_.checkpoint_interval);
    if (stop_checkpoints_ || fatal_) break;
    co_await checkpoint();
  }
  checkpoints_running_ = false;
  checkpoint_wake_.notify_all();
}

Task<void> MirrorJob::stop_checkpoints() {
  stop_checkpoints_ = true;
  while (checkpoints_running_) {
    checkpoint_wake_.notify_all();
    co_await checkpoint_wake_.wait(std::chrono::milliseconds(10));
  }
}

Task<void> MirrorJob::record_end(JournalState s) {
  if (!journal_) co_return;
  if (auto r = co_await journal_->set_state(s); !r) {
    JobEvent e{JobEvent::Kind::kNote, id()};
    e.message = fmt::format("crash-safe state: recording '{}' failed: {}", to_string(s),
                            r.error().message());
    emit(std::move(e));
  }
}

}  // namespace blkmirror
