// The mirror's sizes (derive_sizes) and copy offload between two files on one
// file system, with a client writing to the source during the kernel copies:
// a chunk written while its copy runs must be copied again, as for read+write.
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/statfs.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <optional>

#include "base/limits.h"
#include "blockdev/file_device.h"
#include "harness.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

TEST(MirrorSizes, DerivedOnceFromParamsAndTargetCluster) {
  MirrorParams p;
  constexpr uint64_t kDisk = uint64_t{1} << 40;  // 1 TiB: 64 KiB chunks
  auto s = derive_sizes(p, 0, kDisk);
  EXPECT_EQ(s.granularity, 65536u);
  EXPECT_EQ(s.buf_size, 16u << 20);
  EXPECT_EQ(s.max_op, 1u << 20);  // 16 MiB / 16 in flight
  // A target cluster larger than the granularity: the buffer holds one whole.
  p.granularity = 4096;
  p.buf_size = 4096;
  s = derive_sizes(p, 2 << 20, kDisk);
  EXPECT_EQ(s.buf_size, 2u << 20);
  EXPECT_LE(s.max_op, s.buf_size);
  // Never above the largest request, never below one chunk.
  p = MirrorParams{};
  p.buf_size = int64_t{1} << 30;
  p.max_in_flight = 1;
  EXPECT_EQ(derive_sizes(p, 0, kDisk).max_op, kMaxRequestBytes);
  p.granularity = 64 << 20;
  EXPECT_EQ(derive_sizes(p, 0, kDisk).max_op, 64u << 20);
}

// The kernel moves data between files only where the copy cannot read and
// write around the page cache (MirrorJob: tmpfs); on ext4 and the like it reads
// and writes uncached. So the tests of data-moving kernel copies run in tmpfs.
constexpr const char* kMemoryFs = "/dev/shm";

struct TempDir {
  std::string path;
  explicit TempDir(const char* base = "/tmp") {
    std::string tmpl = std::string(base) + "/blkmirror-offload-XXXXXX";
    path = ::mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

// Writes model's bytes to a new file (zero runs of 64 KiB stay holes).
void write_file(const std::string& path, const std::vector<std::byte>& model) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(model.size())), 0);
  for (size_t off = 0; off < model.size(); off += 65536) {
    size_t n = std::min<size_t>(65536, model.size() - off);
    bool zero = std::all_of(model.begin() + off, model.begin() + off + n,
                            [](std::byte b) { return b == std::byte{0}; });
    if (!zero) ASSERT_EQ(::pwrite(fd, model.data() + off, n, static_cast<off_t>(off)), ssize_t(n));
  }
  ::close(fd);
}

std::vector<std::byte> read_file(const std::string& path, size_t size) {
  std::vector<std::byte> out(size);
  int fd = ::open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::pread(fd, out.data(), size, 0), ssize_t(size));
  ::close(fd);
  return out;
}

void run_offload_mirror(bool offload) {
  constexpr uint64_t kSize = 24 << 20;
  TempDir dir(kMemoryFs);
  std::mt19937_64 rng(7);
  std::vector<std::byte> model(kSize);
  // Half data, half holes, in 64 KiB..1 MiB runs.
  for (uint64_t pos = 0; pos < kSize;) {
    uint64_t len = std::min<uint64_t>(65536 * (1 + rng() % 16), kSize - pos);
    if (rng() % 2)
      for (uint64_t i = 0; i < len; ++i) model[pos + i] = static_cast<std::byte>(rng() | 1);
    pos += len;
  }
  std::string src_path = dir.path + "/src", dst_path = dir.path + "/dst";
  write_file(src_path, model);
  ASSERT_TRUE(FileDevice::create(dst_path, kSize));

  Loop loop;
  Graph graph;
  auto src = FileDevice::open(loop, src_path);
  auto dst = FileDevice::open(loop, dst_path);
  ASSERT_TRUE(src && dst);
  ASSERT_TRUE(graph.add("src", *src));
  ASSERT_TRUE(graph.add("dst", *dst));
  MirrorParams p;
  p.device = "src";
  p.target = "dst";
  p.copy_offload = offload;
  p.speed = 24 << 20;  // about a second of copying, so the client's writes land during it
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job) << job.error().message();
  Client client;
  client.edge = graph.attach(graph.find("src"), "client");
  client.model = &model;
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    (*job)->start(loop.executor());
    asio::co_spawn(loop.executor(), client.run(), asio::detached);
    co_await sleep_for(500ms);
    client.stop = true;
    if (!co_await wait_until([&] { return client.done; })) co_return false;
    if (!co_await wait_until([&] { return (*job)->info().ready; })) co_return false;
    EXPECT_TRUE((*job)->complete());
    co_return co_await wait_until([&] { return (*job)->concluded(); });
  }()));
  EXPECT_GT(client.acked, 10u);
  EXPECT_EQ(first_difference(read_file(dst_path, kSize), model), -1);
  EXPECT_EQ(first_difference(read_file(src_path, kSize), model), -1);
  // Linux copies between two files of one file system in the kernel (ext4,
  // tmpfs: a page-cache copy; XFS, btrfs: shared extents).
  if (offload)
    EXPECT_GT((*job)->stats().bytes_offloaded, 0u);
  else
    EXPECT_EQ((*job)->stats().bytes_offloaded, 0u);
}

TEST(MirrorOffload, ClientWritesDuringKernelCopiesAreCopiedAgain) { run_offload_mirror(true); }

TEST(MirrorOffload, OffOnlyReadsAndWrites) { run_offload_mirror(false); }

// Mirrors src_path onto dst_path (same size) with default parameters, idle,
// through ready and complete; the job's stats. *reflink: the files' file
// system shares extents (then the caller's expectations may not hold).
std::optional<MirrorStats> run_idle_mirror(const std::string& src_path,
                                           const std::string& dst_path, bool* reflink) {
  Loop loop;
  Graph graph;
  auto src = FileDevice::open(loop, src_path);
  auto dst = FileDevice::open(loop, dst_path);
  EXPECT_TRUE(src && dst);
  if (!src || !dst) return std::nullopt;
  auto span = (*src)->file_span();
  EXPECT_TRUE(span);
  *reflink = span && span->reflink;
  if (!span || *reflink) return std::nullopt;
  EXPECT_TRUE(graph.add("src", *src));
  EXPECT_TRUE(graph.add("dst", *dst));
  MirrorParams p;
  p.device = "src";
  p.target = "dst";
  auto job = MirrorJob::create(loop, graph, p);
  EXPECT_TRUE(job) << job.error().message();
  if (!job) return std::nullopt;
  bool ok = loop.run([&]() -> Task<bool> {
    (*job)->start(loop.executor());
    if (!co_await wait_until([&] { return (*job)->info().ready; })) co_return false;
    EXPECT_TRUE((*job)->complete());
    co_return co_await wait_until([&] { return (*job)->concluded(); });
  }());
  EXPECT_TRUE(ok);
  if (!ok) return std::nullopt;
  return (*job)->stats();
}

// Writes model to a source file in dir, mirrors it idle onto a new target
// (run_idle_mirror) and checks the target reads back as the model.
std::optional<MirrorStats> copy_idle(const TempDir& dir, const std::vector<std::byte>& model,
                                     bool* reflink) {
  std::string src_path = dir.path + "/src", dst_path = dir.path + "/dst";
  write_file(src_path, model);
  EXPECT_TRUE(FileDevice::create(dst_path, model.size()));
  auto stats = run_idle_mirror(src_path, dst_path, reflink);
  if (stats) EXPECT_EQ(first_difference(read_file(dst_path, model.size()), model), -1);
  return stats;
}

// size bytes of random data, every byte non-zero (no chunk may look like a hole),
// made a word at a time: 192 MiB a byte at a time takes a minute in the
// sanitized build. size: a multiple of 8.
std::vector<std::byte> dense_model(uint64_t size, uint64_t seed) {
  std::vector<std::byte> model(size);
  std::mt19937_64 rng(seed);
  for (uint64_t i = 0; i < size; i += 8) {
    const uint64_t w = rng() | 0x0101010101010101ull;
    std::memcpy(model.data() + i, &w, 8);
  }
  return model;
}

// A dense idle copy between files of one file system that does not share
// extents (ext4, tmpfs): the kernel moves every byte into one target file,
// whose inode lock serializes the writes, so at most kKernelCopyStreams copies
// run at once (more only spin on that lock), and the copy is still whole.
TEST(MirrorOffload, DataMovingKernelCopiesAreLimitedToTheStreams) {
  constexpr uint64_t kSize = 192 << 20;  // six 32 MiB kernel copies
  TempDir dir(kMemoryFs);
  auto model = dense_model(kSize, 11);
  bool reflink = false;
  auto stats = copy_idle(dir, model, &reflink);
  if (reflink) GTEST_SKIP() << "the test directory's file system shares extents";
  ASSERT_TRUE(stats);
  EXPECT_EQ(stats->bytes_offloaded, kSize);
  EXPECT_GE(stats->kernel_streams_peak, 1u);
  EXPECT_LE(stats->kernel_streams_peak, MirrorJob::kKernelCopyStreams);
}

// A data extent smaller than MirrorJob::kMinKernelCopy goes through a buffer on
// the loop (handing it to a pool thread costs more than the copy); a larger one
// still goes to the kernel. Both arrive exactly, holes kept.
TEST(MirrorOffload, SmallDataExtentsAreCopiedThroughABuffer) {
  constexpr uint64_t kSize = 8 << 20, kBig = 4 << 20, kSmall = 128 << 10;
  constexpr uint64_t kSmallAt = 6 << 20;  // holes on both sides
  TempDir dir(kMemoryFs);
  std::vector<std::byte> model(kSize);
  std::mt19937_64 rng(13);
  auto fill = [&](uint64_t off, uint64_t len) {
    for (uint64_t i = off; i < off + len; ++i) model[i] = static_cast<std::byte>(rng() | 1);
  };
  fill(0, kBig);
  fill(kSmallAt, kSmall);
  bool reflink = false;
  auto stats = copy_idle(dir, model, &reflink);
  if (reflink) GTEST_SKIP() << "the test directory's file system shares extents";
  ASSERT_TRUE(stats);
  EXPECT_EQ(stats->bytes_offloaded, kBig);
}

// Between two files of a file system with a page cache to keep out of (ext4:
// the test directory here), a copy that would move data in the kernel reads
// and writes uncached instead, and is whole.
TEST(MirrorOffload, PageCacheFileSystemsCopyUncachedNotInTheKernel) {
  constexpr uint64_t kSize = 48 << 20;
  TempDir dir;
  struct statfs fs {};
  ASSERT_EQ(::statfs(dir.path.c_str(), &fs), 0);
  if (fs.f_type == TMPFS_MAGIC) GTEST_SKIP() << "/tmp is tmpfs here";
  auto model = dense_model(kSize, 17);
  bool reflink = false;
  auto stats = copy_idle(dir, model, &reflink);
  if (reflink) GTEST_SKIP() << "the test directory's file system shares extents";
  ASSERT_TRUE(stats);
  EXPECT_EQ(stats->bytes_offloaded, 0u);
  EXPECT_EQ(stats->kernel_streams_peak, 0u);
}

}  // namespace
}  // namespace blkmirror::test
