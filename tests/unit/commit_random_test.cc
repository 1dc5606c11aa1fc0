// Active commit's correctness proof, as mirror_random_test.cc is the mirror's:
// a three-layer chain in memory (base <- mid <- top, qcow2 layers over memory
// files, random data in each), a client writing the top during the whole job
// (before ready, while ready, across complete and after); the base must end
// holding the chain's view plus every acknowledged write, and the client must
// be on the base. Many seeds, every copy mode, bases shorter than the top.
#include <gtest/gtest.h>

#include "blockdev/child_device.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "harness.h"
#include "sanitizer_scale.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

struct Layer {
  std::unique_ptr<Child> backing_edge;
  std::shared_ptr<Qcow2Device> dev;
};

// A qcow2 layer over a new memory file, its backing the node below through a
// graph edge (as the daemon builds chains), added to the graph as `name`.
Layer add_layer(Loop& loop, Graph& graph, const std::string& name, Node* below, uint64_t size,
                uint64_t cluster) {
  Layer l;
  auto file = std::make_shared<MemoryDevice>(0, memory_opts(true, 0));
  Qcow2CreateOptions c;
  c.size = size;
  c.cluster_size = cluster;
  EXPECT_TRUE(loop.run(Qcow2Device::create(*file, c)));
  l.backing_edge =
      graph.attach_child(below, "backing of " + name, EdgeUse{"node '" + name + "'", "backing", {}},
                         EdgeKind::kBacking);
  auto backing = std::make_shared<ChildDevice>(l.backing_edge.get(), true);
  auto q = loop.run(Qcow2Device::open(loop, file, backing, Qcow2OpenOptions{}));
  EXPECT_TRUE(q) << q.error().message();
  l.dev = *q;
  Node* n = *graph.add(name, l.dev);
  graph.adopt(n, l.backing_edge.get());
  n->set_backing_edge(l.backing_edge.get());
  return l;
}

// Random writes (data and zeroes) straight into a layer, before the job.
void scribble(Loop& loop, BlockDevice& dev, std::mt19937_64& rng, int n) {
  std::vector<std::byte> buf(128 << 10);
  loop.run([&]() -> Task<void> {
    for (int i = 0; i < n; ++i) {
      uint64_t len = 512 * (1 + rng() % 256);
      uint64_t off = rng() % (dev.length() - len);
      if (rng() % 5 == 0) {
        (void)co_await dev.write_zeroes(off, len, ZeroFlags{.may_unmap = rng() % 2 == 0});
      } else {
        for (uint64_t j = 0; j < len; ++j) buf[j] = static_cast<std::byte>(rng());
        (void)co_await dev.write(off, {buf.data(), len}, {});
      }
    }
  }());
}

void run_commit_case(uint64_t seed, CopyMode mode) {
  std::mt19937_64 rng(seed);
  const uint64_t size = (4 + rng() % 12) * 65536 + (rng() % 2 ? 512 * (rng() % 128) : 0);
  // Sometimes the base is shorter than the chain: the job grows it first.
  const uint64_t base_size = rng() % 3 == 0 ? size / 2 / 512 * 512 : size;
  const uint64_t cluster = uint64_t{4096} << (rng() % 5);  // 4 KiB .. 64 KiB
  SCOPED_TRACE(::testing::Message() << "seed=" << seed << " size=" << size << " base=" << base_size
                                    << " cluster=" << cluster << " mode=" << to_string(mode));
  Loop loop(2);
  Graph graph;
  auto base = std::make_shared<MemoryDevice>(base_size, memory_opts(false, 6, seed));
  fill_random(*base, rng);
  Node* base_node = *graph.add("base", base);
  Layer mid = add_layer(loop, graph, "mid", base_node, size, cluster);
  scribble(loop, *mid.dev, rng, 20);
  Layer top = add_layer(loop, graph, "top", graph.find("mid"), size, cluster);
  scribble(loop, *top.dev, rng, 20);
  std::vector<std::byte> model(size);
  loop.run([&]() -> Task<void> { (void)co_await top.dev->read(0, model); }());

  MirrorParams p;
  p.job_id = "c";
  p.device = "top";
  p.target = "base";
  p.commit = true;
  p.copy_mode = mode;
  p.granularity = uint64_t{512} << (rng() % 8);
  p.adaptive_window_ms = 1 + rng() % 30;
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job) << job.error().message();
  EXPECT_EQ((*job)->info().type, "commit");
  Recorder rec;
  rec.attach(**job);
  Client client;
  client.edge = graph.attach(graph.find("top"), "client");
  client.model = &model;
  client.rng.seed(seed * 17 + 3);

  bool ok = loop.run([&]() -> Task<bool> {
    asio::co_spawn(loop.executor(), client.run(), asio::detached);
    co_await sleep_for(std::chrono::microseconds(rng() % 2000));
    (*job)->start(loop.executor());
    co_return co_await drive_to_switch(**job, client, rng, mode == CopyMode::kBackground);
  }());
  ASSERT_FALSE((*job)->failure()) << (*job)->failure()->message();
  ASSERT_TRUE(ok);
  EXPECT_TRUE((*job)->switched());
  EXPECT_EQ(&client.edge->node(), base_node);
  EXPECT_EQ(client.failed, 0u);
  EXPECT_EQ(rec.count(JobEvent::Kind::kCompleted), 1);
  ASSERT_EQ(base->length(), size);
  int64_t diff = first_difference(contents(*base), model);
  EXPECT_EQ(diff, -1) << "the base differs from the model at byte " << diff;
  // The chain above is intact (it still reads through to the base).
  EXPECT_EQ(graph.find("top")->backing(), graph.find("mid"));
  client.edge.reset();
  job->reset();
  loop.run([&]() -> Task<void> {
    (void)co_await top.dev->close();
    (void)co_await mid.dev->close();
  }());
}

TEST(CommitRandom, BackgroundManySeeds) {
  for (uint64_t seed = 1; seed <= seeds(20); ++seed) {
    run_commit_case(seed, CopyMode::kBackground);
    if (HasFailure()) break;
  }
}

TEST(CommitRandom, WriteBlockingManySeeds) {
  for (uint64_t seed = 101; seed <= 100 + seeds(20); ++seed) {
    run_commit_case(seed, CopyMode::kWriteBlocking);
    if (HasFailure()) break;
  }
}

TEST(CommitRandom, AdaptiveManySeeds) {
  for (uint64_t seed = 201; seed <= 200 + seeds(20); ++seed) {
    run_commit_case(seed, CopyMode::kAdaptive);
    if (HasFailure()) break;
  }
}

// Only what the layers above the base hold is copied: a base-only region is
// never written (its bytes stay those of the base, even where they would be
// overwritten by a full copy with identical data).
TEST(CommitRandom, CopiesOnlyWhatTheLayersAboveHold) {
  Loop loop(2);
  Graph graph;
  const uint64_t size = 1 << 20;
  auto base = std::make_shared<MemoryDevice>(size, memory_opts(false));
  std::mt19937_64 rng(5);
  fill_random(*base, rng);
  Node* base_node = *graph.add("base", base);
  Layer mid = add_layer(loop, graph, "mid", base_node, size, 65536);
  Layer top = add_layer(loop, graph, "top", graph.find("mid"), size, 65536);
  std::vector<std::byte> data(65536, std::byte{0x5a});
  loop.run([&]() -> Task<void> {
    (void)co_await mid.dev->write(0, data, {});
    (void)co_await top.dev->write(512 << 10, data, {});
  }());
  MirrorParams p;
  p.job_id = "c";
  p.device = "top";
  p.target = "base";
  p.commit = true;
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job) << job.error().message();
  bool ok = loop.run([&]() -> Task<bool> {
    (*job)->start(loop.executor());
    if (!co_await wait_until([&] { return (*job)->info().ready; })) co_return false;
    co_return true;
  }());
  ASSERT_TRUE(ok);
  EXPECT_EQ((*job)->stats().bytes_copied + (*job)->stats().bytes_zeroed, 2 * 65536u);
  loop.run([&]() -> Task<void> {
    (void)(*job)->cancel(true);
    co_await (*job)->wait_concluded();
    (void)co_await top.dev->close();
    (void)co_await mid.dev->close();
  }());
}

}  // namespace
}  // namespace blkmirror::test
