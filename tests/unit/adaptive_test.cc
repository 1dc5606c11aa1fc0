// AdaptiveController's two rules, driven with a fake clock.
#include "mirror/adaptive.h"

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

using Clock = AdaptiveController::Clock;
using std::chrono::milliseconds;

TEST(AdaptiveController, SwitchesWhenNoNewLowForAWindow) {
  AdaptiveController a(100);
  auto t = Clock::now();
  EXPECT_FALSE(a.observe(1000, t));
  EXPECT_FALSE(a.observe(900, t + milliseconds(50)));  // a new low at 50 ms
  // Up and down, never below 900: stuck since 50 ms.
  EXPECT_FALSE(a.observe(950, t + milliseconds(100)));
  EXPECT_FALSE(a.observe(900, t + milliseconds(149)));
  auto why = a.observe(920, t + milliseconds(150));
  ASSERT_TRUE(why);
  EXPECT_EQ(*why, "dirty count has not fallen below 900 bytes for 100 ms");
}

TEST(AdaptiveController, SteadyFallDoesNotSwitch) {
  AdaptiveController a(100);
  auto t = Clock::now();
  uint64_t d = 1 << 30;
  for (int i = 0; i < 100; ++i, d -= 1 << 20)
    EXPECT_FALSE(a.observe(d, t + milliseconds(10 * i))) << i;
}

TEST(AdaptiveController, SwitchesWhenEstimateGrowsTwoWindowsRunning) {
  // The count keeps reaching new lows (rule 1 stays quiet), but it falls 100,
  // then 50, then 10 bytes per window: the time to converge grows twice running.
  AdaptiveController a(100);
  auto t = Clock::now();
  EXPECT_FALSE(a.observe(10000, t));
  EXPECT_FALSE(a.observe(9900, t + milliseconds(100)));  // eta 9900/100 windows
  EXPECT_FALSE(a.observe(9850, t + milliseconds(200)));  // grew once
  auto why = a.observe(9840, t + milliseconds(300));     // grew twice
  ASSERT_TRUE(why);
  // 9900 left at 100 per window, then 9850 at 50, then 9840 at 10.
  EXPECT_EQ(*why,
            "estimated time to converge keeps growing (19700 ms -> 98400 ms, 9840 bytes dirty)");
}

TEST(AdaptiveController, EstimateGrowingOnceOrShrinkingDoesNotSwitch) {
  AdaptiveController a(100);
  auto t = Clock::now();
  EXPECT_FALSE(a.observe(10000, t));
  EXPECT_FALSE(a.observe(9900, t + milliseconds(100)));
  EXPECT_FALSE(a.observe(9850, t + milliseconds(200)));  // grew once
  EXPECT_FALSE(a.observe(9000, t + milliseconds(300)));  // fell fast: count resets
  EXPECT_FALSE(a.observe(8990, t + milliseconds(400)));  // grew once again
  EXPECT_FALSE(a.observe(8000, t + milliseconds(500)));
}

TEST(AdaptiveController, ShortEstimateNeverSwitches) {
  // Growing estimates that are still under two windows are a job about to
  // converge: no switch.
  AdaptiveController a(1000);
  auto t = Clock::now();
  EXPECT_FALSE(a.observe(1000, t));
  EXPECT_FALSE(a.observe(100, t + milliseconds(1000)));  // eta 111 ms
  EXPECT_FALSE(a.observe(40, t + milliseconds(2000)));   // eta 666 ms, grew
  EXPECT_FALSE(a.observe(20, t + milliseconds(3000)));   // eta 1000 ms, grew twice
}

TEST(AdaptiveController, ZeroAndRestartBeginANewWatch) {
  AdaptiveController a(100);
  auto t = Clock::now();
  EXPECT_FALSE(a.observe(500, t));
  EXPECT_FALSE(a.observe(0, t + milliseconds(90)));  // converged
  // Without the restart at zero, 500 at t would be the low and this would switch.
  EXPECT_FALSE(a.observe(800, t + milliseconds(150)));
  EXPECT_FALSE(a.observe(800, t + milliseconds(240)));
  a.restart();  // a pause in between
  EXPECT_FALSE(a.observe(800, t + milliseconds(300)));
  EXPECT_FALSE(a.observe(800, t + milliseconds(399)));
  EXPECT_TRUE(a.observe(800, t + milliseconds(400)));
}

}  // namespace
}  // namespace blkmirror
