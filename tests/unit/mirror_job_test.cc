// Mirror job behaviour on memory devices: parameters, errors and policies,
// cancel, pause, speed, finalize/dismiss, sparse targets, zero length.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "base/size_parse.h"
#include "harness.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

// The harness's MirrorFixture with this file's shorthand: size, seed, and whether
// the target reads as zeroes.
struct Fixture : MirrorFixture {
  explicit Fixture(uint64_t size, uint64_t seed = 1, bool target_zero = true)
      : MirrorFixture({.size = size, .seed = seed, .target_zero = target_zero}) {}
};

Task<bool> until(std::function<bool()> pred, std::chrono::milliseconds t = 30s) {
  co_return co_await wait_until(pred, t);
}

// Starts the job, completes it once ready, waits until it concluded.
Task<bool> start_and_complete(std::shared_ptr<MirrorJob> job) {
  job->start(co_await asio::this_coro::executor);
  if (!co_await until([&] { return job->info().ready; })) co_return false;
  EXPECT_TRUE(job->complete());
  co_return co_await until([&] { return job->concluded(); });
}

TEST(MirrorParamsTest, MaxBufSizeIsAQuarterOfMemoryAtMostOneGiB) {
  EXPECT_EQ(max_buf_size_for(uint64_t{64} << 30), uint64_t{1} << 30);
  EXPECT_EQ(max_buf_size_for(uint64_t{2} << 30), uint64_t{512} << 20);
  EXPECT_EQ(max_buf_size_for(0), 0u);
  EXPECT_GE(max_buf_size(), uint64_t{16} << 20);  // the default fits on any test machine
}

TEST(MirrorJob, CopiesAndSwitches) {
  Fixture f(4 << 20);
  auto job = f.make(f.params());
  auto client_edge = f.graph.attach(f.graph.find("src"), "export");
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    co_return co_await start_and_complete(job);
  }));
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
  EXPECT_EQ(&client_edge->node(), f.graph.find("dst"));
  EXPECT_EQ(f.rec.statuses(), (std::vector<std::string>{"running", "ready", "waiting", "pending",
                                                        "concluded", "null"}));
  EXPECT_EQ(job->status(), JobStatus::kNull);
}

TEST(MirrorJob, RefusesBadParameters) {
  Fixture f(1 << 20);
  auto expect_error = [&](MirrorParams p, const std::string& text) {
    auto j = MirrorJob::create(f.loop, f.graph, p);
    ASSERT_FALSE(j);
    EXPECT_EQ(j.error().message(), text);
  };
  auto p = f.params();
  p.granularity = 3000;
  expect_error(p, "Parameter 'granularity' expects a power of 2");
  p.granularity = 256;
  expect_error(p, "Parameter 'granularity' expects a value in range [512B, 64MB]");
  p.granularity = uint64_t{128} << 20;
  expect_error(p, "Parameter 'granularity' expects a value in range [512B, 64MB]");
  p = f.params();
  p.buf_size = -1;
  expect_error(p, "Invalid parameter 'buf-size'");
  // Issue 17 item 6: 1 TiB hung the job (the copy buffer failed to allocate in
  // a detached coroutine): refused up front now.
  for (int64_t huge :
       {int64_t{1} << 40, int64_t{1} << 62, static_cast<int64_t>(max_buf_size()) + 1}) {
    p.buf_size = huge;
    expect_error(
        p, fmt::format("Parameter 'buf-size' expects a value of at most {} (a quarter of this "
                       "machine's memory, at most 1 GiB)",
                       format_size(max_buf_size())));
  }
  p.buf_size = static_cast<int64_t>(max_buf_size());
  EXPECT_TRUE(validate_params(p));
  p = f.params();
  p.speed = -5;
  expect_error(p, "Parameter 'speed' expects a non-negative value");
  p = f.params();
  p.target = "src";
  expect_error(p, "Can't mirror node into itself");
  p = f.params();
  p.device = "nope";
  expect_error(p, "Cannot find device='nope' nor node-name='nope'");
  p = f.params();
  p.replaces = "ghost";
  expect_error(p, "Node name 'ghost' not found");
  ASSERT_TRUE(f.graph.add("small", std::make_shared<MemoryDevice>(4096)));
  p = f.params();
  p.target = "small";
  expect_error(p, "Source and target image have different sizes");
  EXPECT_FALSE(parse_sync_mode("incremental"));
  EXPECT_EQ(parse_sync_mode("bitmap").value(), SyncMode::kBitmap);
  p = f.params();
  p.sync = SyncMode::kBitmap;
  expect_error(p, "must provide a valid bitmap name for 'bitmap' sync mode");
  p.bitmap = "ghost";
  expect_error(p, "Bitmap 'ghost' could not be found");
  p.sync = SyncMode::kFull;
  expect_error(p, "a bitmap was given, but sync mode is 'full', not 'bitmap'");
  EXPECT_EQ(f.dst->writes(), 0u);
}

TEST(MirrorJob, SecondJobOnBusyNodeRefused) {
  Fixture f(1 << 20);
  auto job = f.make(f.params());
  ASSERT_TRUE(f.graph.add("other", std::make_shared<MemoryDevice>(1 << 20)));
  auto p = f.params();
  p.job_id = "job1";
  p.target = "other";
  auto j2 = MirrorJob::create(f.loop, f.graph, p);
  ASSERT_FALSE(j2);
  EXPECT_NE(j2.error().message().find("is busy"), std::string::npos);
}

TEST(MirrorJob, CompleteBeforeReadyRefused) {
  Fixture f(1 << 20);
  auto job = f.make(f.params());
  auto r = job->complete();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message(),
            "Job 'job0' in state 'created' cannot accept command verb 'complete'");
}

TEST(MirrorJob, ReadErrorReportFailsJob) {
  Fixture f(2 << 20);
  f.src_fault->add_rule(FaultRule{.ops = FaultRule::kRead, .offset = 1 << 20, .length = 4096});
  f.src->write_now(1 << 20, std::vector<std::byte>(4096, std::byte{7}));
  auto job = f.make(f.params());
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    co_return co_await until([&] { return job->concluded(); });
  }));
  ASSERT_TRUE(job->failure());
  EXPECT_EQ(job->failure()->reason(), "Input/output error");
  auto* err = f.rec.last(JobEvent::Kind::kError);
  ASSERT_NE(err, nullptr);
  EXPECT_EQ(err->operation, "read");
  EXPECT_EQ(err->action, "report");
  auto* done = f.rec.last(JobEvent::Kind::kCompleted);
  ASSERT_NE(done, nullptr);
  EXPECT_EQ(done->error, "Input/output error");
  EXPECT_EQ(f.rec.statuses().back(), "null");
  EXPECT_NE(std::find(f.rec.statuses().begin(), f.rec.statuses().end(), "aborting"),
            f.rec.statuses().end());
}

// A device whose reads cannot get memory (as a huge copy buffer once could not).
struct OutOfMemoryOnRead : BlockDeviceWrapper {
  using BlockDeviceWrapper::BlockDeviceWrapper;
  Task<Result<void>> read(uint64_t, std::span<std::byte>, ReadFlags) override {
    throw std::bad_alloc();
    co_return Result<void>{};
  }
};

// Issue 17 item 6: an allocation failure in a copy operation (a detached
// coroutine) left the op in flight forever: the job hung at offset 0 and even a
// forced cancel never concluded. It fails the job with ENOMEM now, whatever the
// policy (ignore would retry it forever).
TEST(MirrorJob, AllocationFailureInACopyFailsTheJobWithEnomem) {
  Fixture f(2 << 20);
  ASSERT_TRUE(f.graph.add("oom", std::make_shared<OutOfMemoryOnRead>(f.src)));
  auto p = f.params();
  p.device = "oom";
  p.on_source_error = ErrorPolicy::kIgnore;
  auto job = f.make(p);
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    co_return co_await until([&] { return job->concluded(); }, 10s);
  }));
  ASSERT_TRUE(job->failure());
  EXPECT_EQ(job->failure()->errnum(), ENOMEM);
  auto* done = f.rec.last(JobEvent::Kind::kCompleted);
  ASSERT_NE(done, nullptr);
  ASSERT_TRUE(done->error);
  EXPECT_NE(done->error->find("cannot allocate"), std::string::npos) << *done->error;
}

TEST(MirrorJob, WriteErrorIgnoreRetriesAndEndsEqual) {
  Fixture f(4 << 20, 3);
  f.dst_fault->add_rule(FaultRule{.ops = FaultRule::kAllWrites, .rate = 0.3, .remaining = 20});
  auto p = f.params();
  p.on_target_error = ErrorPolicy::kIgnore;
  p.granularity = 65536;
  auto job = f.make(p);
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    co_return co_await start_and_complete(job);
  }));
  EXPECT_FALSE(job->failure());
  EXPECT_GT(f.dst_fault->injected(), 0u);
  // Every error is either reported or counted as left out by the rate limit.
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kError) + job->stats().errors_unreported,
            f.dst_fault->injected());
  EXPECT_EQ(f.rec.last(JobEvent::Kind::kError)->action, "ignore");
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

// Regression (issue 17 item 14): with `ignore`, a target that failed every
// write was retried as fast as the loop spun (11,700 times a second) with an
// event each time. Now retries back off (1 ms doubling to 1 s) and at most
// MirrorJob::kErrorEventsPerSecond events a second are sent; once the error
// clears, the job catches up at full speed.
TEST(MirrorJob, PersistentErrorUnderIgnoreBacksOffAndRecoversPromptly) {
  Fixture f(4 << 20, 11);
  f.dst_fault->add_rule(FaultRule{.ops = FaultRule::kAllWrites});
  auto p = f.params();
  p.on_target_error = ErrorPolicy::kIgnore;
  p.granularity = 65536;
  p.buf_size = 65536;  // one chunk at a time: 64 operations once the error clears
  auto job = f.make(p);
  std::chrono::steady_clock::duration recovery{};
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    co_await sleep_for(1500ms);
    // Holds of 1, 2, 4 ... 512 ms, then 1 s: about 12 rounds in 1.5 s.
    EXPECT_GE(f.dst_fault->injected(), 5u);
    EXPECT_LE(f.dst_fault->injected(), 40u);
    // Three events in the first second, up to three in the next.
    EXPECT_GE(f.rec.count(JobEvent::Kind::kError), 3);
    EXPECT_LE(f.rec.count(JobEvent::Kind::kError), 6);
    EXPECT_EQ(job->info().offset, 0u);
    EXPECT_FALSE(job->concluded());
    f.dst_fault->clear_rules();
    auto cleared = std::chrono::steady_clock::now();
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    recovery = std::chrono::steady_clock::now() - cleared;
    EXPECT_TRUE(job->complete());
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_FALSE(job->failure());
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
  // At most one capped hold (1 s) before the first retry, then no waiting:
  // 64 operations on memory devices take milliseconds.
  EXPECT_LT(recovery, 2500ms);
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kError) + job->stats().errors_unreported,
            f.dst_fault->injected());
  // The first event after the rate limit held some back says how many.
  uint64_t told = 0;
  for (auto& e : f.rec.events)
    if (e.kind == JobEvent::Kind::kError) told += e.suppressed;
  EXPECT_LE(told, job->stats().errors_unreported);
}


TEST(MirrorJob, WriteErrorStopPausesThenResumeEndsEqual) {
  Fixture f(4 << 20, 4);
  std::vector<std::byte> data(65536, std::byte{0x42});  // make sure the range is copied
  f.src->write_now(2 << 20, data);
  std::memcpy(f.model.data() + (2 << 20), data.data(), data.size());
  f.dst_fault->add_rule(
      FaultRule{.ops = FaultRule::kAllWrites, .offset = 2 << 20, .length = 65536});
  auto p = f.params();
  p.on_target_error = ErrorPolicy::kStop;
  auto job = f.make(p);
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    if (!co_await until([&] { return job->status() == JobStatus::kPaused; })) co_return false;
    auto info = job->info();
    EXPECT_EQ(info.io_status, IoStatus::kFailed);
    EXPECT_TRUE(info.paused);
    EXPECT_EQ(f.rec.last(JobEvent::Kind::kError)->action, "stop");
    // Stays paused: offset does not move.
    uint64_t off = info.offset;
    co_await sleep_for(100ms);
    EXPECT_EQ(job->info().offset, off);
    EXPECT_EQ(job->status(), JobStatus::kPaused);
    f.dst_fault->clear_rules();
    EXPECT_TRUE(job->resume());
    EXPECT_EQ(job->info().io_status, IoStatus::kOk);
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    EXPECT_TRUE(job->complete());
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_FALSE(job->failure());
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorJob, EnospcPolicyStopsOnEnospcReportsOtherwise) {
  {
    Fixture f(2 << 20, 5);
    f.dst_fault->add_rule(
        FaultRule{.ops = FaultRule::kAllWrites, .remaining = 1, .errnum = ENOSPC});
    auto p = f.params();
    p.on_target_error = ErrorPolicy::kEnospc;
    auto job = f.make(p);
    ASSERT_TRUE(f.run([&]() -> Task<bool> {
      job->start(f.loop.executor());
      if (!co_await until([&] { return job->status() == JobStatus::kPaused; })) co_return false;
      EXPECT_EQ(job->info().io_status, IoStatus::kNoSpace);
      EXPECT_TRUE(job->resume());
      if (!co_await until([&] { return job->info().ready; })) co_return false;
      EXPECT_TRUE(job->complete());
      co_return co_await until([&] { return job->concluded(); });
    }));
    EXPECT_FALSE(job->failure());
    EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
  }
  {
    Fixture f(2 << 20, 6);
    f.dst_fault->add_rule(FaultRule{.ops = FaultRule::kAllWrites, .remaining = 1, .errnum = EIO});
    auto p = f.params();
    p.on_target_error = ErrorPolicy::kEnospc;
    auto job = f.make(p);
    ASSERT_TRUE(f.run([&]() -> Task<bool> {
      job->start(f.loop.executor());
      co_return co_await until([&] { return job->concluded(); });
    }));
    ASSERT_TRUE(job->failure());
    EXPECT_EQ(f.rec.last(JobEvent::Kind::kError)->action, "report");
  }
}

TEST(MirrorJob, FlushFailureAtReadyCheckFollowsPolicy) {
  Fixture f(1 << 20, 7);
  f.dst_fault->add_rule(FaultRule{.ops = FaultRule::kFlush, .remaining = 2});
  auto p = f.params();
  p.on_target_error = ErrorPolicy::kIgnore;
  auto job = f.make(p);
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    co_return co_await start_and_complete(job);
  }));
  EXPECT_FALSE(job->failure());
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kError), 2);
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kReady), 1);
}

TEST(MirrorJob, CancelBeforeReadyLeavesTargetPartial) {
  Fixture f(8 << 20, 8);
  auto p = f.params();
  p.speed = 1 << 20;  // slow, so the cancel lands mid-copy
  auto job = f.make(p);
  auto src_before = contents(*f.src);
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    co_await sleep_for(50ms);
    EXPECT_TRUE(job->cancel(false));
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_TRUE(job->was_cancelled());
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCancelled), 1);
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCompleted), 0);
  EXPECT_NE(first_difference(contents(*f.dst), f.model), -1);  // partial
  EXPECT_EQ(contents(*f.src), src_before);                      // source untouched
  EXPECT_FALSE(job->switched());
}

TEST(MirrorJob, SoftCancelAfterReadyCompletesWithoutSwitch) {
  Fixture f(4 << 20, 9);
  auto job = f.make(f.params());
  auto client_edge = f.graph.attach(f.graph.find("src"), "export");
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    // A write while ready must still reach the target before the job ends.
    std::vector<std::byte> data(10000, std::byte{0x5a});
    EXPECT_TRUE(co_await client_edge->write(12345, data));
    std::memcpy(f.model.data() + 12345, data.data(), data.size());
    EXPECT_TRUE(job->cancel(false));
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_FALSE(job->was_cancelled());
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCompleted), 1);
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCancelled), 0);
  EXPECT_FALSE(job->switched());
  EXPECT_EQ(&client_edge->node(), f.graph.find("src"));
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorJob, ForceCancelAfterReadyIsCancelled) {
  Fixture f(2 << 20, 10);
  auto job = f.make(f.params());
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    EXPECT_TRUE(job->cancel(true));
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_TRUE(job->was_cancelled());
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCancelled), 1);
  EXPECT_FALSE(job->switched());
}

TEST(MirrorJob, PauseKeepsOffsetStill) {
  Fixture f(16 << 20, 11);
  auto p = f.params();
  p.speed = 8 << 20;
  auto job = f.make(p);
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    co_await sleep_for(100ms);
    EXPECT_TRUE(job->pause());
    EXPECT_FALSE(job->pause());  // already paused
    if (!co_await until([&] { return job->status() == JobStatus::kPaused; })) co_return false;
    uint64_t off = job->info().offset;
    EXPECT_TRUE(job->info().paused);
    co_await sleep_for(300ms);
    EXPECT_EQ(job->info().offset, off);
    EXPECT_TRUE(job->resume());
    EXPECT_FALSE(job->resume());  // not paused any more
    EXPECT_TRUE(job->set_speed(0));
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    EXPECT_GT(job->info().offset, off);
    // Pausing while ready goes to standby and back.
    EXPECT_TRUE(job->pause());
    if (!co_await until([&] { return job->status() == JobStatus::kStandby; })) co_return false;
    EXPECT_TRUE(job->resume());
    if (!co_await until([&] { return job->status() == JobStatus::kReady; })) co_return false;
    EXPECT_TRUE(job->complete());
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorJob, SpeedLimitHonoured) {
  // 6 MiB of data at 3 MiB/s: about 2 s (the first slice is free).
  Fixture f(6 << 20, 12);
  std::vector<std::byte> dense(6 << 20, std::byte{1});
  f.src->write_now(0, dense);
  f.model = dense;
  auto p = f.params();
  p.speed = 3 << 20;
  auto job = f.make(p);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    co_return co_await until([&] { return job->info().ready; });
  }));
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(secs, 2.0 * 0.8);
  EXPECT_LE(secs, 2.0 * 1.2);
  EXPECT_EQ(job->info().speed, 3u << 20);
  EXPECT_FALSE(job->set_speed(-1));
}

TEST(MirrorJob, AutoFinalizeOffWaitsInPendingAndAutoDismissOffInConcluded) {
  Fixture f(1 << 20, 13);
  auto p = f.params();
  p.auto_finalize = false;
  p.auto_dismiss = false;
  auto job = f.make(p);
  auto edge = f.graph.attach(f.graph.find("src"), "export");
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    EXPECT_FALSE(job->finalize());
    EXPECT_TRUE(job->complete());
    if (!co_await until([&] { return job->status() == JobStatus::kPending; })) co_return false;
    co_await sleep_for(50ms);
    EXPECT_EQ(job->status(), JobStatus::kPending);
    EXPECT_EQ(f.rec.count(JobEvent::Kind::kPending), 1);
    EXPECT_EQ(&edge->node(), f.graph.find("src"));  // not switched before finalize
    EXPECT_FALSE(job->dismiss());
    EXPECT_TRUE(job->finalize());
    if (!co_await until([&] { return job->status() == JobStatus::kConcluded; })) co_return false;
    co_await sleep_for(20ms);
    EXPECT_EQ(job->status(), JobStatus::kConcluded);
    EXPECT_TRUE(job->dismiss());
    co_return job->status() == JobStatus::kNull;
  }));
  EXPECT_EQ(&edge->node(), f.graph.find("dst"));
}

TEST(MirrorJob, ZeroLengthGoesStraightToReady) {
  Loop loop;
  Graph graph;
  ASSERT_TRUE(graph.add("src", std::make_shared<MemoryDevice>(0)));
  ASSERT_TRUE(graph.add("dst", std::make_shared<MemoryDevice>(0)));
  MirrorParams p;
  p.device = "src";
  p.target = "dst";
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job);
  EXPECT_EQ((*job)->id(), "src");  // job id defaults to the device
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    (*job)->start(loop.executor());
    if (!co_await wait_until([&] { return (*job)->info().ready; })) co_return false;
    EXPECT_EQ((*job)->info().len, 0u);
    EXPECT_TRUE((*job)->complete());
    co_return co_await wait_until([&] { return (*job)->concluded(); });
  }()));
  EXPECT_FALSE((*job)->failure());
}

TEST(MirrorJob, SparseSourceKeepsTargetSparse) {
  // 64 MiB virtual with 2 MiB of data; target zero-initialised.
  Fixture f(64 << 20, 14);
  f.src->zero_now(0, 64 << 20, true);
  std::vector<std::byte> data(1 << 20, std::byte{3});
  f.src->write_now(5 << 20, data);
  f.src->write_now(40 << 20, data);
  auto job = f.make(f.params());
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    co_return co_await start_and_complete(job);
  }));
  EXPECT_EQ(f.dst->allocated_bytes(), f.src->allocated_bytes());
  EXPECT_EQ(job->stats().bytes_copied, 2u << 20);
  EXPECT_EQ(contents(*f.dst), contents(*f.src));
}

TEST(MirrorJob, NonZeroTargetIsZeroedWithHolesNotData) {
  // The target holds old data where the source has holes: those areas must end
  // zero, made with write-zeroes that keep holes, not by writing zero buffers.
  Fixture f(8 << 20, 15, /*target_zero=*/false);
  std::mt19937_64 junk(77);
  fill_random(*f.dst, junk);
  auto job = f.make(f.params());
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    co_return co_await start_and_complete(job);
  }));
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
  EXPECT_GT(job->stats().bytes_zeroed, 0u);
  EXPECT_LE(f.dst->allocated_bytes(), f.src->allocated_bytes() + (1 << 20));
}

TEST(MirrorJob, SyncNoneCopiesOnlyNewWrites) {
  Fixture f(4 << 20, 16);
  auto p = f.params();
  p.sync = SyncMode::kNone;
  auto job = f.make(p);
  auto edge = f.graph.attach(f.graph.find("src"), "export");
  ASSERT_TRUE(f.run([&]() -> Task<bool> {
    job->start(f.loop.executor());
    if (!co_await until([&] { return job->info().ready; })) co_return false;
    std::vector<std::byte> data(8192, std::byte{9});
    EXPECT_TRUE(co_await edge->write(1 << 20, data));
    EXPECT_TRUE(job->complete());
    co_return co_await until([&] { return job->concluded(); });
  }));
  EXPECT_EQ(job->stats().bytes_copied, 8192u);  // the two 4 KiB chunks written
  std::vector<std::byte> got(8192);
  f.dst->read_now(1 << 20, got);
  EXPECT_EQ(got, std::vector<std::byte>(8192, std::byte{9}));
}

TEST(MirrorJob, BufSizeRoundedUpToGranularity) {
  Fixture f(1 << 20);
  auto p = f.params();
  p.buf_size = 4096;
  p.granularity = 65536;
  auto job = f.make(p);
  EXPECT_EQ(job->buf_size(), 65536u);
  EXPECT_EQ(job->granularity(), 65536u);
}

TEST(MirrorJob, DefaultGranularityFollowsTargetCluster) {
  EXPECT_EQ(default_granularity(0), 65536u);
  EXPECT_EQ(default_granularity(512), 4096u);
  EXPECT_EQ(default_granularity(16384), 16384u);
  EXPECT_EQ(default_granularity(2 << 20), 65536u);
}

TEST(MirrorJob, DefaultMirrorGranularityWithoutClustersKeepsTheBitmapSmall) {
  constexpr uint64_t GiB = uint64_t{1} << 30;
  // 4 KiB while the bitmap stays within 8 Mi chunks (1 MiB), then coarser,
  // never coarser than QEMU's 64 KiB.
  EXPECT_EQ(default_mirror_granularity(0, 2 * GiB), 4096u);
  EXPECT_EQ(default_mirror_granularity(0, 32 * GiB), 4096u);
  EXPECT_EQ(default_mirror_granularity(0, 32 * GiB + 1), 8192u);
  EXPECT_EQ(default_mirror_granularity(0, 100 * GiB), 16384u);
  EXPECT_EQ(default_mirror_granularity(0, 512 * GiB), 65536u);
  EXPECT_EQ(default_mirror_granularity(0, 64 * 1024 * GiB), 65536u);
  // A target with clusters keeps QEMU's rule whatever the size.
  EXPECT_EQ(default_mirror_granularity(65536, 2 * GiB), 65536u);
  EXPECT_EQ(default_mirror_granularity(512, 4 * 1024 * GiB), 4096u);
  // And a job made without a granularity takes it.
  Fixture f(1 << 20);
  auto p = f.params();
  p.granularity = 0;
  EXPECT_EQ(f.make(p)->granularity(), 4096u);
}

}  // namespace
}  // namespace blkmirror::test

namespace blkmirror::test {
namespace {

// Regression: the in-flight limit was not enforced; with a small granularity
// the buffer alone allowed thousands of concurrent operations.
TEST(MirrorJob, NeverMoreOperationsInFlightThanTheLimit) {
  struct CountingDevice : BlockDeviceWrapper {
    using BlockDeviceWrapper::BlockDeviceWrapper;
    unsigned now = 0, peak = 0;
    Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
      peak = std::max(peak, ++now);
      auto r = co_await inner()->write(off, buf, f);
      --now;
      co_return r;
    }
  };
  Loop loop;
  Graph graph;
  auto src = std::make_shared<MemoryDevice>(8 << 20, memory_opts());
  // Every other 4 KiB block has data: many small runs.
  std::vector<std::byte> block(4096, std::byte{1});
  for (uint64_t off = 0; off < (8 << 20); off += 8192) src->write_now(off, block);
  auto dst = std::make_shared<CountingDevice>(
      std::make_shared<MemoryDevice>(8 << 20, memory_opts(true, 4, 3)));
  ASSERT_TRUE(graph.add("src", src));
  ASSERT_TRUE(graph.add("dst", dst));
  MirrorParams p;
  p.device = "src";
  p.target = "dst";
  p.granularity = 4096;
  p.max_in_flight = 5;
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job);
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    (*job)->start(loop.executor());
    if (!co_await wait_until([&] { return (*job)->info().ready; })) co_return false;
    EXPECT_TRUE((*job)->complete());
    co_return co_await wait_until([&] { return (*job)->concluded(); });
  }()));
  EXPECT_GT(dst->peak, 1u);
  EXPECT_LE(dst->peak, 5u);
}

}  // namespace
}  // namespace blkmirror::test
