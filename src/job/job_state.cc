#include "job/job_state.h"

#include <fmt/format.h>

namespace blkmirror {

namespace {

// Rows: from; columns: to. Order: U C R P Y S W D X E N.
constexpr bool kTransitions[kJobStatusCount][kJobStatusCount] = {
    /* U */ {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    /* C */ {0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1},
    /* R */ {0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0},
    /* P */ {0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
    /* Y */ {0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0},
    /* S */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* W */ {0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    /* D */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* X */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1},
    /* E */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
    /* N */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};

// Rows: verb; columns: state. Order: U C R P Y S W D X E N.
constexpr bool kVerbs[kJobVerbCount][kJobStatusCount] = {
    /* cancel    */ {0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
    /* pause     */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* resume    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* set-speed */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* complete  */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* finalize  */ {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
    /* dismiss   */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
    /* change    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
};

}  // namespace

const char* to_string(JobStatus s) {
  switch (s) {
    case JobStatus::kUndefined: return "undefined";
    case JobStatus::kCreated: return "created";
    case JobStatus::kRunning: return "running";
    case JobStatus::kPaused: return "paused";
    case JobStatus::kReady: return "ready";
    case JobStatus::kStandby: return "standby";
    case JobStatus::kWaiting: return "waiting";
    case JobStatus::kPending: return "pending";
    case JobStatus::kAborting: return "aborting";
    case JobStatus::kConcluded: return "concluded";
    case JobStatus::kNull: return "null";
  }
  return "?";
}

const char* to_string(JobVerb v) {
  switch (v) {
    case JobVerb::kCancel: return "cancel";
    case JobVerb::kPause: return "pause";
    case JobVerb::kResume: return "resume";
    case JobVerb::kSetSpeed: return "set-speed";
    case JobVerb::kComplete: return "complete";
    case JobVerb::kFinalize: return "finalize";
    case JobVerb::kDismiss: return "dismiss";
    case JobVerb::kChange: return "change";
  }
  return "?";
}

bool job_transition_allowed(JobStatus from, JobStatus to) {
  return kTransitions[static_cast<int>(from)][static_cast<int>(to)];
}

bool job_verb_allowed(JobVerb verb, JobStatus state) {
  return kVerbs[static_cast<int>(verb)][static_cast<int>(state)];
}

std::string job_verb_error(std::string_view id, JobStatus state, JobVerb verb) {
  return fmt::format("Job '{}' in state '{}' cannot accept command verb '{}'", id,
                     to_string(state), to_string(verb));
}

}  // namespace blkmirror
