#include "commit/commit_job.h"

#include <algorithm>

#include <fmt/format.h>

#include "blockdev/qcow2/qcow2_device.h"

namespace blkmirror {

Result<std::shared_ptr<CommitJob>> CommitJob::create(Graph& graph, const CommitPlan& plan,
                                                     CommitParams p) {
  if (!plan.overlay || plan.active)
    return make_plain_error(EINVAL, "an intermediate commit needs a top with an overlay");
  if (!dynamic_cast<Qcow2Device*>(&plan.overlay->device()))
    return make_plain_error(EINVAL, fmt::format("Node '{}' cannot change its backing file",
                                                plan.overlay->name()));
  if (plan.base->device().caps().read_only)
    return make_plain_error(EROFS, fmt::format("Base node '{}' is read-only", plan.base->name()));
  const std::string who = fmt::format("commit job '{}'", p.job_id);
  const std::string role = "job " + p.job_id;
  const bool grow = plan.base->length() < plan.top->length();
  Edges e;
  // Top is read as its chain shows it; others may do anything meanwhile.
  auto t = graph.attach(plan.top, role, EdgeUse{who, "top", Perms{kPermConsistentRead, kPermAll}});
  if (!t) return make_error(t.error());
  e.top = std::move(*t);
  // The base takes data its readers already see through the layers above it:
  // they may keep reading, nobody else may change it.
  auto b = graph.attach(plan.base, role,
                        EdgeUse{who, "base",
                                Perms{kPermWrite | (grow ? kPermResize : 0u),
                                      kPermConsistentRead | kPermWriteUnchanged}});
  if (!b) return make_error(b.error());
  e.base = std::move(*b);
  // The layers in between and the overlay are held, so no other job or
  // blockdev-del changes the chain under the commit.
  std::vector<Node*> held(plan.removed.begin() + 1, plan.removed.end());
  held.push_back(plan.overlay);
  for (Node* n : held) {
    auto h = graph.attach(n, role, EdgeUse{who, "chain", Perms{0, kPermAll}});
    if (!h) return make_error(h.error());
    e.held.push_back(std::move(*h));
  }
  return std::shared_ptr<CommitJob>(new CommitJob(graph, plan, std::move(p), std::move(e)));
}

CommitJob::CommitJob(Graph& graph, const CommitPlan& plan, CommitParams p, Edges edges)
    : Job(p.job_id, "commit", p.device, p.auto_finalize, p.auto_dismiss),
      graph_(graph),
      p_(std::move(p)),
      top_(plan.top),
      base_(plan.base),
      overlay_(plan.overlay),
      base_depth_(plan.base_depth),
      removed_(plan.removed),
      edges_(std::move(edges)) {
  rate_.set_speed(static_cast<uint64_t>(p_.speed));
}

Task<Result<void>> CommitJob::on_error(const Error& e, bool is_read) {
  ErrorAction action = action_for(p_.on_error, e.errnum());
  JobEvent ev = block_event(JobEvent::Kind::kError);
  ev.operation = is_read ? "read" : "write";
  ev.action = to_string(action);
  ev.message = e.message();
  emit(ev);
  switch (action) {
    case ErrorAction::kReport: co_return make_error(e);
    case ErrorAction::kStop:
      // Paused like a user pause; the copy loop's pause_point waits for resume.
      pause_for_error(e.errnum() == ENOSPC ? IoStatus::kNoSpace : IoStatus::kFailed);
      break;
    case ErrorAction::kIgnore: {
      // Nothing can be skipped (the base would miss data), so the range is
      // retried, after a hold that grows while it keeps failing.
      auto now = RetryBackoff::Clock::now();
      backoff_.on_failure(now);
      co_await wake_.wait(backoff_.hold(now));
      break;
    }
  }
  co_return Result<void>{};
}

Task<Result<void>> CommitJob::run() {
  const uint64_t len = top_->length();
  progress_len_ = len;
  if (base_->length() < len) {
    auto r = co_await edges_.base->resize(len);
    if (!r)
      co_return make_plain_error(r.error().errnum(),
                                 fmt::format("Could not grow base '{}' to {} bytes: {}",
                                             base_->name(), len, r.error().message()));
  }
  uint64_t pos = 0;
  while (pos < len) {
    if (cancel_requested()) co_return Result<void>{};
    if (pause_requested()) {
      co_await pause_point();
      continue;
    }
    if (auto d = rate_.delay(); d > RateLimiter::Clock::duration::zero()) {
      co_await wake_.wait(d);
      continue;
    }
    auto e = co_await edges_.top->block_status(pos, std::min(len - pos, kStep));
    if (!e) {
      if (auto h = co_await on_error(e.error(), true); !h) co_return h;
      continue;
    }
    const uint64_t n = std::min(e->length, len - pos);
    if (n == 0)
      co_return make_plain_error(EIO, fmt::format("{}: empty extent at {}", top_->name(), pos));
    // Depth 1..base_depth_-1: a layer being committed holds it. Deeper (the
    // base or below) is already in place; depth 0 reads as zeroes everywhere.
    if (e->depth >= 1 && e->depth < base_depth_) {
      rate_.charge(n);
      bool is_read = false;
      Result<void> r;
      if (e->zero) {
        r = co_await edges_.base->write_zeroes(pos, n, ZeroFlags{.may_unmap = true});
      } else {
        r = co_await edges_.top->read(pos, buf_.span(n));
        if (!r) is_read = true;
        else r = co_await edges_.base->write(pos, buf_.span(n));
      }
      if (!r) {
        if (auto h = co_await on_error(r.error(), is_read); !h) co_return h;
        continue;  // the same range again
      }
      backoff_.on_success();
    }
    pos += n;
    progress_offset_ = pos;
  }
  auto f = co_await edges_.base->flush();
  if (!f) co_return f;
  co_return Result<void>{};
}

Task<Result<void>> CommitJob::prepare() {
  auto* q = dynamic_cast<Qcow2Device*>(&overlay_->device());  // create() checked
  if (overlay_->device().caps().read_only)
    co_return make_plain_error(
        EROFS, fmt::format("Node '{}' is read-only: its backing file name cannot be changed",
                           overlay_->name()));
  const std::optional<std::string> old_file = q->info().backing_file;
  const std::optional<std::string> old_format = q->info().backing_format;
  // Quiet on both ends while the overlay's link and the edges move.
  co_await top_->drain();
  co_await base_->drain();
  // The header first, as QEMU does: a failure leaves the graph as it was.
  auto r = co_await q->set_backing_link(p_.backing_file, p_.backing_format);
  if (r) {
    std::vector<const Child*> keep{edges_.top.get()};
    r = graph_.replace(top_, base_, keep);
    if (!r) (void)co_await q->set_backing_link(old_file, old_format);
  }
  base_->undrain();
  top_->undrain();
  co_return r;
}

Task<void> CommitJob::commit() {
  release();
  co_return;
}

Task<void> CommitJob::abort() {
  release();
  co_return;
}

void CommitJob::release() {
  edges_.held.clear();
  edges_.base.reset();
  edges_.top.reset();
}

}  // namespace blkmirror
