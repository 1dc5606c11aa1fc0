// Job states and verbs, and QEMU's two tables: which state may follow which, and
// which user verb is legal in which state. Pure; thread-safe.
//
//   created -> running -> (paused) -> ready -> (standby) -> waiting -> pending
//           -> concluded -> null, with aborting on failure or cancel.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace blkmirror {

enum class JobStatus {
  kUndefined,
  kCreated,
  kRunning,
  kPaused,
  kReady,
  kStandby,
  kWaiting,
  kPending,
  kAborting,
  kConcluded,
  kNull,
};
inline constexpr int kJobStatusCount = 11;

enum class JobVerb { kCancel, kPause, kResume, kSetSpeed, kComplete, kFinalize, kDismiss, kChange };
inline constexpr int kJobVerbCount = 8;

const char* to_string(JobStatus s);
const char* to_string(JobVerb v);

bool job_transition_allowed(JobStatus from, JobStatus to);
bool job_verb_allowed(JobVerb verb, JobStatus state);

// The exact QMP error text for a refused verb.
std::string job_verb_error(std::string_view id, JobStatus state, JobVerb verb);

}  // namespace blkmirror
