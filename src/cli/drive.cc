#include "cli/drive.h"

#include <unistd.h>

#include <csignal>

#include "base/notifier.h"

#include <fmt/format.h>

#include "base/size_parse.h"
#include "cli/exit_codes.h"

namespace blkmirror {

Task<int> drive_mirror(Loop& loop, std::shared_ptr<MirrorJob> job, Progress& progress,
                       DriveOptions opts) {
  bool ready = false, interrupted = false, cancel_was_soft = false;
  Notifier changed;  // a job event or a signal: look again now, not at the next tick
  bool paused_said = false;  // the "paused, how to resume" line, once per pause
  job->subscribe([&](const JobEvent& e) {
    progress.event(e);
    if (e.kind == JobEvent::Kind::kReady) ready = true;
    if (e.kind == JobEvent::Kind::kError && e.action == "stop" && !paused_said) {
      paused_said = true;
      progress.note(fmt::format(
          "job paused by the {} error policy after a {} error; fix the cause, "
          "then resume with SIGUSR2 (kill -USR2 {}), or stop with SIGINT/SIGTERM",
          e.operation == "read" ? "on-source-error" : "on-target-error", e.operation, ::getpid()));
    }
    if (e.kind == JobEvent::Kind::kStatusChange && e.status == JobStatus::kRunning)
      paused_said = false;
    changed.notify_all();
  });

  asio::signal_set signals(loop.ctx(), SIGINT, SIGTERM);
  signals.async_wait([&](const std::error_code& ec, int sig) {
    if (ec) return;
    interrupted = true;
    // After ready a soft cancel finishes the last sync: the target is then a
    // consistent copy. Before ready there is no consistent copy to wait for.
    cancel_was_soft = job->info().ready;
    auto r = job->cancel(!cancel_was_soft);
    progress.note(fmt::format("{}: cancelling{}", sig == SIGINT ? "interrupted" : "terminated",
                              r ? "" : " failed: " + r.error().message()));
    changed.notify_all();
  });

  // The `stop` error policy pauses the job; SIGUSR2 resumes it (after the
  // operator fixed the cause), like QMP's block-job-resume.
  asio::signal_set resume_signal(loop.ctx(), SIGUSR2);
  std::function<void(const std::error_code&, int)> on_usr2 = [&](const std::error_code& ec, int) {
    if (ec) return;
    auto r = job->resume();
    progress.note(r ? "resumed" : "resume: " + r.error().message());
    resume_signal.async_wait(on_usr2);
  };
  resume_signal.async_wait(on_usr2);

  // SIGHUP switches a running mirror to write-blocking (block-job-change for the
  // standalone CLI): for when the writers turn out faster than the copy.
  asio::signal_set hup_signal(loop.ctx(), SIGHUP);
  std::function<void(const std::error_code&, int)> on_hup = [&](const std::error_code& ec, int) {
    if (ec) return;
    bool was = job->copy_mode() == CopyMode::kWriteBlocking;
    auto r = job->change_copy_mode(CopyMode::kWriteBlocking);
    if (!r) {
      progress.note("copy mode: " + r.error().message());
    } else if (!was) {
      JobEvent e{JobEvent::Kind::kCopyModeChange, job->id()};
      e.device = job->id();
      e.copy_mode = to_string(CopyMode::kWriteBlocking);
      e.message = "SIGHUP";
      progress.event(e);
    }
    hup_signal.async_wait(on_hup);
  };
  hup_signal.async_wait(on_hup);

  bool usr1 = false;
  asio::signal_set usr1_signal(loop.ctx());
  if (opts.complete_on_usr1) {
    usr1_signal.add(SIGUSR1);
    usr1_signal.async_wait([&](const std::error_code& ec, int) {
      if (!ec) usr1 = true;
      changed.notify_all();
    });
  }

  auto started = std::chrono::steady_clock::now();
  if (!opts.already_started) job->start(loop.executor());
  bool completed_requested = false;
  while (!job->concluded()) {
    progress.tick(job->info());
    if (ready && (opts.auto_complete || usr1) && !completed_requested && !interrupted) {
      completed_requested = true;
      if (opts.before_complete) co_await opts.before_complete();
      if (!interrupted && !job->concluded()) {
        if (auto r = job->complete(); !r) progress.note("complete: " + r.error().message());
      }
      continue;
    }
    co_await changed.wait(std::chrono::milliseconds(200));
  }
  signals.cancel();
  usr1_signal.cancel();
  resume_signal.cancel();
  hup_signal.cancel();
  progress.finish();

  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const auto& st = job->stats();
  if (job->failure()) {
    progress.note(
        fmt::format("mirror failed: {}; the target is incomplete", job->failure()->message()));
    co_return exit_code::kJobFailed;
  }
  if (job->was_cancelled()) {
    progress.note("mirror cancelled before source and target were in sync: the target is "
                  "NOT a consistent copy");
    co_return exit_code::kCancelled;
  }
  if (interrupted) {
    progress.note(fmt::format("mirror stopped after the final sync: the target is a consistent "
                              "copy of the source as of now ({:.1f}s)", secs));
    co_return exit_code::kCancelled;
  }
  std::string active =
      job->copy_mode() == CopyMode::kWriteBlocking
          ? fmt::format(", {} client writes mirrored synchronously", format_size(st.bytes_active))
          : "";
  if (st.bytes_offloaded)
    active += fmt::format(", {} of the copy by the kernel (copy offload)",
                          format_size(st.bytes_offloaded));
  // The depth the job chose, when it chose one and saw the target's writes.
  if (const DepthControl* d = job->depth(); d && d->base_rtt().count() > 0)
    active += fmt::format(
        ", up to {} in flight (target write round trip {:.1f} ms)", format_size(d->peak()),
        std::chrono::duration<double, std::milli>(d->base_rtt()).count());
  progress.note(fmt::format(
      "mirror completed in {:.2f}s: {} copied, {} zeroed, {} ops, {} errors retried{}; "
      "target {}",
      secs, format_size(st.bytes_copied), format_size(st.bytes_zeroed), st.ops, st.errors,
      active, job->switched() ? "switched in" : "in sync"));
  co_return exit_code::kOk;
}

}  // namespace blkmirror
