// Driving one mirror job from the CLI: starts it, shows progress, completes it
// when ready (when asked to), turns SIGINT/SIGTERM into a clean cancel, and
// reports how it ended as an exit code. Threading rule: loop thread only.
#pragma once

#include <functional>
#include <memory>

#include "cli/progress.h"
#include "io/loop.h"
#include "mirror/mirror_job.h"

namespace blkmirror {

struct DriveOptions {
  bool auto_complete = true;
  // Without auto_complete: complete when SIGUSR1 arrives (after ready).
  bool complete_on_usr1 = false;
  // The job was started by its creator (a job made by the in-process QMP daemon):
  // drive it without starting it again.
  bool already_started = false;
  // Called once when the job is ready, before complete; may delay completing.
  std::function<Task<void>()> before_complete;
};

// Returns an exit_code value.
Task<int> drive_mirror(Loop& loop, std::shared_ptr<MirrorJob> job, Progress& progress,
                       DriveOptions opts);

}  // namespace blkmirror
