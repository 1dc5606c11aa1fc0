// Job: the generic long-running job of QEMU's job model. It owns the state
// machine (job_state.h), the user verbs (pause, resume, cancel, set-speed,
// complete, finalize, dismiss), the event stream, and the lifecycle around a
// subclass's body:
//
//   start() -> running -> body run() -> waiting -> pending -> prepare() -> commit() -> concluded
//                                    \-> aborting -> abort() -> concluded  (also when prepare()
//                                    fails)
//   then null once dismissed (automatically with auto-dismiss).
//
// Subclasses (the mirror) implement run(), commit(), abort() and the verbs that
// need their help (complete, soft cancel). The body calls pause_point() where it
// can stop, and watches cancel_requested().
//
// Threading rule: loop thread only. Event sinks are called synchronously on the
// loop thread and must not call back into the job's verbs.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <asio.hpp>

#include "base/notifier.h"
#include "base/rate_limit.h"
#include "base/result.h"
#include "job/job_state.h"

namespace blkmirror {

enum class IoStatus { kOk, kFailed, kNoSpace };
const char* to_string(IoStatus s);

struct JobEvent {
  enum class Kind {
    kStatusChange, kReady, kCompleted, kCancelled, kError, kPending, kNote,
    kCopyModeChange,  // a mirror changed its copy mode by itself (adaptive)
    kMismatch,        // verify: [offset, offset+len) of the target differs; action
                      // "reported" or "repaired"
  };
  JobEvent(Kind k, std::string job_id) : kind(k), id(std::move(job_id)) {}
  Kind kind;
  std::string id;
  JobStatus status = JobStatus::kUndefined;  // kStatusChange
  // Block-job fields (kReady, kCompleted, kCancelled, kPending):
  std::string type, device;
  uint64_t len = 0, offset = 0, speed = 0;
  std::optional<std::string> error;  // kCompleted on failure
  // kError:
  std::string operation;  // "read" | "write"
  std::string action;     // "ignore" | "report" | "stop"
  uint64_t suppressed = 0;  // errors not reported (rate limit) since the last event sent
  std::string message;    // kNote: free text; kCopyModeChange: why
  std::string copy_mode;  // kCopyModeChange: the new mode ("write-blocking")
};

struct JobInfo {
  std::string id, type, device;
  JobStatus status = JobStatus::kUndefined;
  uint64_t len = 0, offset = 0, speed = 0;
  bool busy = false, paused = false, ready = false;
  IoStatus io_status = IoStatus::kOk;
  bool auto_finalize = true, auto_dismiss = true;
  std::optional<std::string> error;
  // Mirror: every client write reaches the target before its reply, and the
  // target held everything else already (QEMU's actively-synced).
  bool actively_synced = false;
};

class Job : public std::enable_shared_from_this<Job> {
 public:
  using EventSink = std::function<void(const JobEvent&)>;

  Job(std::string id, std::string type, std::string device, bool auto_finalize,
      bool auto_dismiss);
  virtual ~Job() = default;

  const std::string& id() const { return id_; }
  JobStatus status() const { return status_; }
  // When the job entered its current status (metrics: time in state).
  std::chrono::steady_clock::time_point status_since() const { return status_since_; }
  void subscribe(EventSink sink) { sinks_.push_back(std::move(sink)); }
  virtual JobInfo info() const;

  // Spawns the lifecycle on ex. Call once.
  void start(asio::any_io_executor ex);

  // User verbs. Each checks the verb table first.
  Result<void> pause();
  Result<void> resume();
  Result<void> cancel(bool force);
  Result<void> set_speed(int64_t bytes_per_sec);
  Result<void> complete();
  Result<void> finalize();
  Result<void> dismiss();

  // Waits until the job reached concluded (or null).
  Task<void> wait_concluded();
  bool concluded() const {
    return status_ == JobStatus::kConcluded || status_ == JobStatus::kNull;
  }
  // True when the job ended through cancellation (force, or before ready).
  bool was_cancelled() const { return cancelled_; }
  const std::optional<Error>& failure() const { return failure_; }

 protected:
  virtual Task<Result<void>> run() = 0;
  // After run() succeeded (and finalize, without auto-finalize): the last step
  // that may still fail the job, as QEMU's .prepare. A failure takes the abort
  // path with that error.
  virtual Task<Result<void>> prepare() { co_return Result<void>{}; }
  virtual Task<void> commit() { co_return; }
  virtual Task<void> abort() { co_return; }
  // Called by complete() after the verb check; may refuse.
  virtual Result<void> on_complete() {
    return make_plain_error(ENOTSUP, "Job cannot be completed");
  }
  // Called by cancel(); return true when a soft cancel is handled by the
  // subclass (mirror after ready: finish the final sync without swapping).
  virtual bool on_soft_cancel() { return false; }
  // Called once the job is dismissed (null): it lets go of the nodes it holds,
  // as QEMU drops a job's node references when the job is freed, so they can
  // be resized, removed or used by a new job right away. The job's objects
  // may live on a little (coroutines still hold them) but own no edges.
  virtual void on_dismissed() {}
  // Called after pause/resume/cancel/speed changes so the body wakes up.
  virtual void kick() { wake_.notify_all(); }

  // Body helpers.
  bool cancel_requested() const { return cancel_requested_; }
  bool pause_requested() const { return pause_requested_ > 0; }
  // If a pause is requested, moves to paused/standby and waits for resume or
  // cancel. REQUIRES: the body has no I/O in flight it cares about.
  Task<void> pause_point();
  void set_ready();
  void set_io_status(IoStatus s) { io_status_ = s; }
  IoStatus io_status() const { return io_status_; }
  // Stops the job as the `stop` error policy does: a user pause with io-status.
  void pause_for_error(IoStatus s);
  void emit(JobEvent e);
  JobEvent block_event(JobEvent::Kind kind) const;
  void transition(JobStatus to);
  bool is_ready_state() const {
    return status_ == JobStatus::kReady || status_ == JobStatus::kStandby;
  }

  RateLimiter rate_;
  Notifier wake_;
  uint64_t progress_offset_ = 0;  // maintained by the subclass
  uint64_t progress_len_ = 0;
  bool busy_ = false;

 private:
  Task<void> lifecycle(std::shared_ptr<Job> self);
  Result<void> check_verb(JobVerb v) const;

  std::string id_, type_, device_;
  bool auto_finalize_, auto_dismiss_;
  JobStatus status_ = JobStatus::kCreated;
  unsigned pause_requested_ = 0;
  bool user_paused_ = false;
  bool cancel_requested_ = false;
  bool force_cancel_ = false;
  bool cancelled_ = false;
  bool finalize_requested_ = false;
  bool dismiss_requested_ = false;
  std::chrono::steady_clock::time_point status_since_ = std::chrono::steady_clock::now();
  IoStatus io_status_ = IoStatus::kOk;
  std::optional<Error> failure_;
  std::vector<EventSink> sinks_;
  Notifier state_changed_;
};

}  // namespace blkmirror
