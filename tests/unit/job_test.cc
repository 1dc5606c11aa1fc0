// Job lifecycle tests that need no mirror: ownership across the null event.
#include <gtest/gtest.h>

#include <map>

#include "io/loop.h"
#include "job/job.h"

namespace blkmirror {
namespace {

class QuickJob : public Job {
 public:
  explicit QuickJob(bool* destroyed) : Job("q", "test", "", true, false), destroyed_(destroyed) {}
  ~QuickJob() override { *destroyed_ = true; }

 protected:
  Task<Result<void>> run() override { co_return Result<void>{}; }

 private:
  bool* destroyed_;
};

// A daemon forgets a job when it reaches null, dropping what may be the last
// reference while dismiss() is still running (regression: use after free,
// caught by ASan).
TEST(Job, DismissSurvivesOwnerDroppingLastReference) {
  Loop loop;
  std::map<std::string, std::shared_ptr<Job>> owner;
  bool destroyed = false;
  // Not make_shared: a weak reference must not keep the storage alive, so ASan
  // sees any use after the owner let go.
  auto job = std::shared_ptr<QuickJob>(new QuickJob(&destroyed));
  owner["q"] = job;
  std::vector<JobStatus> seen;
  job->subscribe([&](const JobEvent& e) {
    if (e.kind != JobEvent::Kind::kStatusChange) return;
    seen.push_back(e.status);
    if (e.status == JobStatus::kNull) owner.erase(e.id);
  });
  job->start(loop.executor());
  job.reset();
  loop.run([&]() -> Task<void> {
    while (owner.count("q") && !owner["q"]->concluded())
      co_await sleep_for(std::chrono::milliseconds(1));
    EXPECT_TRUE(owner.count("q"));
    if (owner.count("q")) {
      EXPECT_TRUE(owner["q"]->dismiss().has_value());
    }
  }());
  EXPECT_TRUE(owner.empty());
  EXPECT_TRUE(destroyed);
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back(), JobStatus::kNull);
}

}  // namespace
}  // namespace blkmirror
