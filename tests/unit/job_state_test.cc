#include "job/job_state.h"

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

TEST(JobState, HappyPathTransitionsAllowed) {
  using S = JobStatus;
  const S path[] = {S::kUndefined, S::kCreated, S::kRunning, S::kReady, S::kWaiting,
                    S::kPending,   S::kConcluded, S::kNull};
  for (size_t i = 0; i + 1 < std::size(path); ++i)
    EXPECT_TRUE(job_transition_allowed(path[i], path[i + 1]))
        << to_string(path[i]) << " -> " << to_string(path[i + 1]);
}

TEST(JobState, PauseAndStandbyRoundTrips) {
  using S = JobStatus;
  EXPECT_TRUE(job_transition_allowed(S::kRunning, S::kPaused));
  EXPECT_TRUE(job_transition_allowed(S::kPaused, S::kRunning));
  EXPECT_TRUE(job_transition_allowed(S::kReady, S::kStandby));
  EXPECT_TRUE(job_transition_allowed(S::kStandby, S::kReady));
  EXPECT_FALSE(job_transition_allowed(S::kPaused, S::kReady));
  EXPECT_FALSE(job_transition_allowed(S::kStandby, S::kRunning));
}

TEST(JobState, AbortPaths) {
  using S = JobStatus;
  for (S s : {S::kCreated, S::kRunning, S::kReady, S::kWaiting, S::kPending})
    EXPECT_TRUE(job_transition_allowed(s, S::kAborting)) << to_string(s);
  EXPECT_TRUE(job_transition_allowed(S::kAborting, S::kConcluded));
  EXPECT_FALSE(job_transition_allowed(S::kConcluded, S::kRunning));
  EXPECT_FALSE(job_transition_allowed(S::kNull, S::kCreated));
}

TEST(JobState, VerbTableMatchesQemu) {
  using S = JobStatus;
  using V = JobVerb;
  EXPECT_TRUE(job_verb_allowed(V::kComplete, S::kReady));
  for (S s : {S::kCreated, S::kRunning, S::kPaused, S::kStandby, S::kWaiting, S::kPending,
              S::kAborting, S::kConcluded, S::kNull})
    EXPECT_FALSE(job_verb_allowed(V::kComplete, s)) << to_string(s);
  EXPECT_TRUE(job_verb_allowed(V::kFinalize, S::kPending));
  EXPECT_FALSE(job_verb_allowed(V::kFinalize, S::kReady));
  EXPECT_TRUE(job_verb_allowed(V::kDismiss, S::kConcluded));
  EXPECT_FALSE(job_verb_allowed(V::kDismiss, S::kPending));
  EXPECT_TRUE(job_verb_allowed(V::kCancel, S::kPending));
  EXPECT_FALSE(job_verb_allowed(V::kCancel, S::kAborting));
  EXPECT_FALSE(job_verb_allowed(V::kCancel, S::kConcluded));
  for (V v : {V::kPause, V::kResume, V::kSetSpeed}) {
    EXPECT_TRUE(job_verb_allowed(v, S::kStandby));
    EXPECT_FALSE(job_verb_allowed(v, S::kWaiting));
  }
}

TEST(JobState, VerbErrorText) {
  EXPECT_EQ(job_verb_error("job0", JobStatus::kRunning, JobVerb::kComplete),
            "Job 'job0' in state 'running' cannot accept command verb 'complete'");
}

}  // namespace
}  // namespace blkmirror
