// TargetTracker (mirror/target_tracker.h): after a remote target reconnects,
// what it had not flushed is handed back as dirty; another disk answering is
// refused before anything is written to it.
#include <thread>

#include <gtest/gtest.h>

#include "harness.h"
#include "mirror/target_tracker.h"

namespace blkmirror::test {
namespace {

constexpr uint64_t kSize = 1 << 20;
constexpr uint64_t kGran = 64 << 10;

// A remote disk in miniature: it keeps only what was flushed when its server
// restarts, and the restart is seen as a new connection generation.
class Remote : public BlockDeviceWrapper {
 public:
  Remote(std::shared_ptr<MemoryDevice> mem, bool reconnects)
      : BlockDeviceWrapper(mem), mem_(std::move(mem)), durable_(kSize), reconnects_(reconnects) {}

  uint64_t generation() const override { return gen_; }
  // Off: a disk that says it never reconnects (a local file).
  bool can_reconnect() const override { return reconnects_; }
  bool connected() const override { return up_; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags = {}) override {
    reconnect();
    co_return co_await mem_->read(off, buf);
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
    reconnect();
    ++writes_;
    co_return co_await mem_->write(off, buf, f);
  }
  Task<Result<void>> flush() override {
    reconnect();
    ++flushes_;
    mem_->read_now(0, durable_);
    co_return Result<void>{};
  }

  // The server restarts and loses what it had not flushed.
  void restart() {
    mem_->write_now(0, durable_);
    up_ = false;
  }
  // Another, empty disk of the same size answers at the same address.
  void swap_for_empty() {
    mem_->zero_now(0, kSize, false);
    up_ = false;
  }
  uint64_t writes() const { return writes_; }
  uint64_t flushes() const { return flushes_; }

 private:
  void reconnect() {
    if (up_) return;
    up_ = true;
    ++gen_;
  }
  std::shared_ptr<MemoryDevice> mem_;
  std::vector<std::byte> durable_;
  uint64_t gen_ = 0, writes_ = 0, flushes_ = 0;
  bool up_ = true;
  bool reconnects_;
};

// A remote target, checkpointed every `checkpoint` (by default too rarely to
// matter in a test).
struct Fixture {
  explicit Fixture(std::chrono::milliseconds checkpoint = std::chrono::hours(1),
                   bool reconnects = true)
      : remote(std::make_shared<Remote>(mem, reconnects)),
        tracker{remote, kGran,
                [this](uint64_t off, uint64_t len) { redirtied.push_back({off, len}); },
                checkpoint} {}
  Loop loop{1};
  std::shared_ptr<MemoryDevice> mem = std::make_shared<MemoryDevice>(kSize);
  std::shared_ptr<Remote> remote;
  std::vector<std::pair<uint64_t, uint64_t>> redirtied;
  TargetTracker tracker;
  std::vector<std::byte> data = std::vector<std::byte>(kGran, std::byte{0x5a});

  Result<void> write(uint64_t off) {
    return loop.run(
        [](TargetTracker* t, std::span<const std::byte> d, uint64_t o) -> Task<Result<void>> {
          co_return co_await t->write(o, d, {});
        }(&tracker, data, off));
  }
  bool redirtied_at(uint64_t off) const {
    for (auto [o, l] : redirtied)
      if (o <= off && off < o + l) return true;
    return false;
  }
};

TEST(TargetTracker, FirstWriteIsFlushedAsAFingerprint) {
  Fixture f;
  ASSERT_TRUE(f.write(0));
  EXPECT_EQ(f.tracker.durable_samples(), 1u);
  EXPECT_EQ(f.tracker.unflushed_chunks(), 0u);
  ASSERT_TRUE(f.write(4 * kGran));
  EXPECT_EQ(f.tracker.unflushed_chunks(), 1u);
}

TEST(TargetTracker, RestartHandsBackWhatWasNotFlushed) {
  Fixture f;
  ASSERT_TRUE(f.write(0));          // flushed (fingerprint)
  ASSERT_TRUE(f.write(4 * kGran));  // acknowledged, never flushed
  f.remote->restart();
  ASSERT_TRUE(f.write(8 * kGran));  // verifies the same disk answers, then writes
  EXPECT_FALSE(f.tracker.fatal());
  EXPECT_TRUE(f.redirtied_at(4 * kGran));
  EXPECT_FALSE(f.redirtied_at(0));
  EXPECT_FALSE(f.redirtied_at(8 * kGran));  // written after the reconnect
}

TEST(TargetTracker, ReconnectingTargetIsFlushedEveryCheckpoint) {
  Fixture f(std::chrono::milliseconds(50));
  ASSERT_TRUE(f.write(0));  // fingerprint flush
  ASSERT_TRUE(f.write(4 * kGran));
  EXPECT_EQ(f.tracker.unflushed_chunks(), 1u);  // within the checkpoint interval
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  ASSERT_TRUE(f.write(8 * kGran));  // past it: this write is followed by a flush
  EXPECT_EQ(f.tracker.unflushed_chunks(), 0u);
  f.remote->restart();
  ASSERT_TRUE(f.write(12 * kGran));
  EXPECT_TRUE(f.redirtied.empty());
}

TEST(TargetTracker, TargetThatCannotReconnectIsNeitherCheckpointedNorTracked) {
  Fixture f(std::chrono::milliseconds(50), false);
  ASSERT_TRUE(f.write(0));  // fingerprint flush
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  ASSERT_TRUE(f.write(4 * kGran));
  EXPECT_EQ(f.remote->flushes(), 1u);
  EXPECT_EQ(f.tracker.unflushed_chunks(), 0u);  // nothing it could lose: no bitmap
}

TEST(TargetTracker, FlushedWritesStayDone) {
  Fixture f;
  ASSERT_TRUE(f.write(0));
  ASSERT_TRUE(f.write(4 * kGran));
  ASSERT_TRUE(f.loop.run(f.tracker.flush()));
  EXPECT_EQ(f.tracker.unflushed_chunks(), 0u);
  f.remote->restart();
  ASSERT_TRUE(f.write(8 * kGran));
  EXPECT_TRUE(f.redirtied.empty());
}

TEST(TargetTracker, AnotherDiskIsRefusedBeforeAnyWrite) {
  Fixture f;
  ASSERT_TRUE(f.write(0));
  f.remote->swap_for_empty();
  uint64_t writes = f.remote->writes();
  auto r = f.write(8 * kGran);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().errnum(), ESTALE);
  EXPECT_NE(r.error().message().find("is not the disk this job was writing"), std::string::npos)
      << r.error().message();
  ASSERT_TRUE(f.tracker.fatal());
  EXPECT_EQ(f.remote->writes(), writes);  // nothing reached the other disk
  EXPECT_FALSE(f.write(12 * kGran));      // and nothing will
}

TEST(TargetTracker, RewrittenChunkIsNotASample) {
  Fixture f;
  ASSERT_TRUE(f.write(0));
  // The job rewrites chunk 0 with other data, unflushed: the old sample must
  // not be checked against it, nor the new unflushed one.
  f.data.assign(kGran, std::byte{0x11});
  ASSERT_TRUE(f.write(0));
  EXPECT_EQ(f.tracker.durable_samples(), 0u);
  f.remote->restart();  // chunk 0 reverts to the 0x5a data
  ASSERT_TRUE(f.write(8 * kGran));
  EXPECT_FALSE(f.tracker.fatal());
  EXPECT_TRUE(f.redirtied_at(0));
}

}  // namespace
}  // namespace blkmirror::test
