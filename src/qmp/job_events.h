// The JSON form of a job event: the QMP event name and data that QMP clients
// receive and the CLI's --json prints, written once so the two cannot drift.
// QEMU's names and members, plus blkmirror's own: BLOCK_JOB_ERROR carries a
// `message` (the error text), BLOCK_JOB_COPY_MODE_CHANGED {device, copy-mode,
// reason} reports an adaptive job's switch. docs/qmp.md lists them.
//
// Threading rule: pure functions; any thread.
#pragma once

#include <optional>
#include <string>

#include "job/job.h"
#include "qmp/schema.h"

namespace blkmirror::qmp {

struct EventJson {
  std::string name;
  Json data;
};

// The event `e` is on the wire; nullopt for kNote (free text for a person,
// which the CLI prints as its own NOTE object and QMP does not send).
std::optional<EventJson> job_event_json(const JobEvent& e);

}  // namespace blkmirror::qmp
