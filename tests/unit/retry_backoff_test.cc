// RetryBackoff and EventThrottle (issue 17 item 14: a persistent error under
// `ignore` was retried 11,700 times a second with an event each time), with
// time passed in: no sleeping.
#include <gtest/gtest.h>

#include "base/event_throttle.h"
#include "mirror/retry_backoff.h"

namespace blkmirror {
namespace {

using namespace std::chrono_literals;
using Clock = RetryBackoff::Clock;

TEST(RetryBackoff, DoublesFromOneMillisecondToTheCap) {
  RetryBackoff b;
  Clock::time_point t{};
  EXPECT_EQ(b.hold(t), Clock::duration::zero());
  Clock::duration expect = 1ms;
  for (int i = 0; i < 15; ++i) {
    b.on_failure(t);
    EXPECT_EQ(b.hold(t), expect) << i;
    EXPECT_EQ(b.hold(t + expect / 2), expect - expect / 2);
    t += expect;  // the hold ends; the retry fails again
    EXPECT_EQ(b.hold(t), Clock::duration::zero());
    expect = std::min<Clock::duration>(expect * 2, 1s);
  }
  EXPECT_EQ(b.step(), 1s);  // capped: a persistent error costs one retry a second
}

TEST(RetryBackoff, FailuresDuringAHoldDoNotDoubleIt) {
  // Operations already running when the first one failed belong to the same
  // round: nine more of them failing must not jump to the cap.
  RetryBackoff b;
  Clock::time_point t{};
  b.on_failure(t);
  for (int i = 1; i < 10; ++i) b.on_failure(t + 100us * i);  // within the 1 ms hold
  EXPECT_EQ(b.step(), 1ms);
  b.on_failure(t + 1ms);  // after the hold: the retry failed
  EXPECT_EQ(b.step(), 2ms);
  EXPECT_EQ(b.hold(t + 1ms), 2ms);
}

TEST(RetryBackoff, ASuccessEndsTheHoldAndResetsTheStep) {
  RetryBackoff b;
  Clock::time_point t{};
  for (int i = 0; i < 12; ++i) {
    b.on_failure(t);
    t += b.step();
  }
  b.on_failure(t);
  ASSERT_EQ(b.hold(t), 1s);
  // Another operation succeeds during the hold: retries may start now, and a
  // new failure starts again at the first step.
  b.on_success();
  EXPECT_EQ(b.hold(t), Clock::duration::zero());
  EXPECT_EQ(b.step(), Clock::duration::zero());
  b.on_failure(t + 1ms);
  EXPECT_EQ(b.hold(t + 1ms), 1ms);
}

TEST(EventThrottle, LetsABurstThroughPerWindowAndCountsTheRest) {
  EventThrottle th(3, 1s);
  Clock::time_point t{};
  int sent = 0;
  // 1000 events in the first second (one a millisecond).
  for (int i = 0; i < 1000; ++i) sent += th.allow(t + 1ms * i);
  EXPECT_EQ(sent, 3);
  EXPECT_EQ(th.total_suppressed(), 997u);
  // The next window lets three through again; the first says how many were held back.
  EXPECT_TRUE(th.allow(t + 1000ms));
  EXPECT_EQ(th.take_suppressed(), 997u);
  EXPECT_EQ(th.take_suppressed(), 0u);
  EXPECT_TRUE(th.allow(t + 1001ms));
  EXPECT_TRUE(th.allow(t + 1002ms));
  EXPECT_FALSE(th.allow(t + 1003ms));
  EXPECT_EQ(th.take_suppressed(), 1u);
}

TEST(EventThrottle, SparseEventsAllPass) {
  EventThrottle th(3, 1s);
  Clock::time_point t{};
  for (int i = 0; i < 100; ++i) EXPECT_TRUE(th.allow(t + 400ms * i)) << i;
  EXPECT_EQ(th.total_suppressed(), 0u);
}

TEST(EventThrottle, AWindowStartsAtItsFirstEvent) {
  // Three events late in one second and three early in the next are six in
  // under a second: the window is counted from its first event, not the clock.
  EventThrottle th(3, 1s);
  Clock::time_point t{};
  for (auto at : {900ms, 950ms, 990ms}) EXPECT_TRUE(th.allow(t + at));
  for (auto at : {1010ms, 1050ms}) EXPECT_FALSE(th.allow(t + at));
  EXPECT_TRUE(th.allow(t + 1900ms));
}

}  // namespace
}  // namespace blkmirror
