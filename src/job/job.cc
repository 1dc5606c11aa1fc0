#include "job/job.h"


#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/assert.h"

namespace blkmirror {

const char* to_string(IoStatus s) {
  switch (s) {
    case IoStatus::kOk: return "ok";
    case IoStatus::kFailed: return "failed";
    case IoStatus::kNoSpace: return "nospace";
  }
  return "?";
}

Job::Job(std::string id, std::string type, std::string device, bool auto_finalize,
         bool auto_dismiss)
    : id_(std::move(id)),
      type_(std::move(type)),
      device_(std::move(device)),
      auto_finalize_(auto_finalize),
      auto_dismiss_(auto_dismiss) {}

JobInfo Job::info() const {
  JobInfo i;
  i.id = id_;
  i.type = type_;
  i.device = device_;
  i.status = status_;
  i.len = progress_len_;
  i.offset = progress_offset_;
  i.speed = rate_.speed();
  i.busy = busy_;
  i.paused = pause_requested_ > 0;
  i.ready = is_ready_state();
  i.io_status = io_status_;
  i.auto_finalize = auto_finalize_;
  i.auto_dismiss = auto_dismiss_;
  if (failure_) i.error = failure_->plain ? failure_->message() : failure_->reason();
  return i;
}

void Job::emit(JobEvent e) {
  for (auto& s : sinks_) s(e);
}

JobEvent Job::block_event(JobEvent::Kind kind) const {
  JobEvent e{kind, id_};
  e.type = type_;
  e.device = id_;  // QEMU's block-job events name the job id as "device"
  e.len = progress_len_;
  e.offset = progress_offset_;
  e.speed = rate_.speed();
  return e;
}

void Job::transition(JobStatus to) {
  if (to == status_) return;
  if (!job_transition_allowed(status_, to)) {
    spdlog::error("job {}: illegal transition {} -> {}", id_, to_string(status_), to_string(to));
    BLKMIRROR_ASSERT(false, "illegal job transition (job/job_state.cc has the table)");
  }
  status_ = to;
  status_since_ = std::chrono::steady_clock::now();
  JobEvent e{JobEvent::Kind::kStatusChange, id_};
  e.status = to;
  emit(e);
  if (to == JobStatus::kNull) on_dismissed();
  state_changed_.notify_all();
}

void Job::start(asio::any_io_executor ex) {
  asio::co_spawn(ex, lifecycle(shared_from_this()), asio::detached);
}

Task<void> Job::lifecycle(std::shared_ptr<Job> self) {
  transition(JobStatus::kRunning);
  busy_ = true;
  Result<void> r = co_await run();
  busy_ = false;
  if (r && cancel_requested_) cancelled_ = true;
  if (r && !cancelled_) {
    transition(JobStatus::kWaiting);
    transition(JobStatus::kPending);
    if (!auto_finalize_) {
      emit(block_event(JobEvent::Kind::kPending));
      while (!finalize_requested_ && !cancel_requested_) co_await state_changed_.wait();
      if (cancel_requested_) cancelled_ = true;
    }
  } else if (!r) {
    failure_ = r.error();
  }
  if (!cancelled_ && !failure_) {
    if (auto p = co_await prepare(); !p) failure_ = p.error();
  }
  if (cancelled_ || failure_) {
    transition(JobStatus::kAborting);
    co_await abort();
    JobEvent e = block_event(cancelled_ ? JobEvent::Kind::kCancelled : JobEvent::Kind::kCompleted);
    if (failure_) e.error = failure_->plain ? failure_->message() : failure_->reason();
    emit(e);
  } else {
    co_await commit();
    emit(block_event(JobEvent::Kind::kCompleted));
  }
  transition(JobStatus::kConcluded);
  if (auto_dismiss_) {
    transition(JobStatus::kNull);
  }
  state_changed_.notify_all();
}

Task<void> Job::wait_concluded() {
  while (!concluded()) co_await state_changed_.wait();
}

Result<void> Job::check_verb(JobVerb v) const {
  if (!job_verb_allowed(v, status_))
    return make_plain_error(EPERM, job_verb_error(id_, status_, v));
  return {};
}

Result<void> Job::pause() {
  if (auto r = check_verb(JobVerb::kPause); !r) return r;
  if (user_paused_) return make_plain_error(EBUSY, "Job is already paused");
  user_paused_ = true;
  ++pause_requested_;
  kick();
  return {};
}

Result<void> Job::resume() {
  if (auto r = check_verb(JobVerb::kResume); !r) return r;
  if (!user_paused_) return make_plain_error(EINVAL, "Can't resume a job that was not paused");
  user_paused_ = false;
  BLKMIRROR_ASSERT(pause_requested_ > 0, "pause requests below zero");
  --pause_requested_;
  io_status_ = IoStatus::kOk;
  kick();
  return {};
}

Result<void> Job::cancel(bool force) {
  if (auto r = check_verb(JobVerb::kCancel); !r) return r;
  if (!force && is_ready_state() && on_soft_cancel()) {
    kick();
    return {};
  }
  cancel_requested_ = true;
  force_cancel_ = force;
  if (user_paused_) {  // a cancel also ends a pause
    user_paused_ = false;
    BLKMIRROR_ASSERT(pause_requested_ > 0, "pause requests below zero");
    --pause_requested_;
  }
  kick();
  state_changed_.notify_all();
  return {};
}

Result<void> Job::set_speed(int64_t bytes_per_sec) {
  if (auto r = check_verb(JobVerb::kSetSpeed); !r) return r;
  if (bytes_per_sec < 0)
    return make_plain_error(EINVAL, "Parameter 'speed' expects a non-negative value");
  rate_.set_speed(static_cast<uint64_t>(bytes_per_sec));
  kick();
  return {};
}

Result<void> Job::complete() {
  if (auto r = check_verb(JobVerb::kComplete); !r) return r;
  if (auto r = on_complete(); !r) return r;
  kick();
  return {};
}

Result<void> Job::finalize() {
  if (auto r = check_verb(JobVerb::kFinalize); !r) return r;
  finalize_requested_ = true;
  state_changed_.notify_all();
  return {};
}

Result<void> Job::dismiss() {
  if (auto r = check_verb(JobVerb::kDismiss); !r) return r;
  // The null event may drop the owner's last reference (a daemon forgets null
  // jobs); stay alive until the transition is done.
  auto self = shared_from_this();
  transition(JobStatus::kNull);
  return {};
}

Task<void> Job::pause_point() {
  if (!pause_requested() || cancel_requested_) co_return;
  bool was_ready = is_ready_state();
  transition(was_ready ? JobStatus::kStandby : JobStatus::kPaused);
  busy_ = false;
  while (pause_requested() && !cancel_requested_) co_await wake_.wait();
  busy_ = true;
  transition(was_ready ? JobStatus::kReady : JobStatus::kRunning);
}

void Job::pause_for_error(IoStatus s) {
  io_status_ = s;
  if (!user_paused_) {
    user_paused_ = true;
    ++pause_requested_;
  }
}

void Job::set_ready() {
  if (status_ != JobStatus::kRunning) return;
  transition(JobStatus::kReady);
  emit(block_event(JobEvent::Kind::kReady));
}

}  // namespace blkmirror
