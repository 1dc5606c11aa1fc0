// FileDevice's uncached requests (ReadFlags/WriteFlags::uncached): they return
// and store the same bytes as ordinary ones, see what ordinary writes left in
// the page cache, and leave no page-cache pages behind where the kernel can
// avoid it. Residency is read with mincore() on a mapping of the file.
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "blockdev/file_device.h"
#include "io/buffer.h"
#include "io/loop.h"
#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

constexpr size_t kLen = 1 << 20;

bool on_tmpfs(const std::string& dir) {
  struct statfs fs {};
  return ::statfs(dir.c_str(), &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

// Pages of [0, len) of path in the page cache.
size_t resident_pages(const std::string& path, size_t len) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return SIZE_MAX;
  void* m = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return SIZE_MAX;
  std::vector<unsigned char> vec(len / 4096);
  size_t n = SIZE_MAX;
  if (::mincore(m, len, vec.data()) == 0) {
    n = 0;
    for (unsigned char v : vec) n += v & 1;
  }
  ::munmap(m, len);
  return n;
}

// Drops path's clean pages from the page cache.
void drop_cache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// The kernel takes RWF_DONTCACHE on files in dir (Linux 6.14+, a file system
// that supports it).
bool kernel_has_dontcache(const std::string& dir) {
  const std::string p = dir + "/probe";
  int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  char b[4096] = {};
  iovec iov{b, sizeof b};
  bool ok = ::pwritev2(fd, &iov, 1, 0, 0x80 /* RWF_DONTCACHE */) == sizeof b;
  ::close(fd);
  ::unlink(p.c_str());
  return ok;
}

std::vector<std::byte> pattern(uint64_t seed) {
  std::vector<std::byte> v(kLen);
  std::mt19937_64 rng(seed);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

struct Fixture : ::testing::Test {
  TempDir dir;
  Loop loop;
  std::string path = dir / "f.raw";
  std::shared_ptr<FileDevice> dev;
  void SetUp() override {
    ASSERT_TRUE(FileDevice::create(path, 4 * kLen));
    auto d = FileDevice::open(loop, path, FileOptions{});
    ASSERT_TRUE(d) << d.error().message();
    dev = *d;
  }
  void write(uint64_t off, const std::vector<std::byte>& data, bool uncached) {
    AlignedBuffer b(data.size());
    std::memcpy(b.data(), data.data(), data.size());
    ASSERT_TRUE(loop.run(dev->write(off, b.span(), WriteFlags{.uncached = uncached})));
  }
  std::vector<std::byte> read(uint64_t off, size_t len, bool uncached, size_t misalign = 0) {
    AlignedBuffer b(len + misalign);
    auto span = std::span<std::byte>(b.data() + misalign, len);
    EXPECT_TRUE(loop.run(dev->read(off, span, ReadFlags{.uncached = uncached})));
    return {span.begin(), span.end()};
  }
};

using FileUncached = Fixture;

// Uncached and ordinary requests see one file: an uncached read returns what a
// buffered write left dirty in the page cache, an ordinary read what an
// uncached write stored, aligned or not.
TEST_F(FileUncached, ReadsAndWritesAgreeWithOrdinaryOnes) {
  auto a = pattern(1), b = pattern(2);
  write(0, a, false);  // dirty in the page cache
  EXPECT_EQ(read(0, kLen, true), a);
  write(kLen, b, true);
  EXPECT_EQ(read(kLen, kLen, false), b);
  EXPECT_EQ(read(kLen, kLen, true), b);
  // Not 4 KiB aligned (buffer, offset, length): an ordinary read after all.
  std::vector<std::byte> mid(a.begin() + 512, a.end());
  mid.insert(mid.end(), b.begin(), b.begin() + 1000);
  EXPECT_EQ(read(512, mid.size(), true, 8), mid);
  // Small uncached requests are ordinary ones.
  std::vector<std::byte> small(b.begin(), b.begin() + 4096);
  write(3 * kLen, small, true);
  EXPECT_EQ(read(3 * kLen, 4096, true), small);
}

// An uncached read of data not in the page cache leaves it out; an ordinary
// read brings it in (so the test can tell them apart).
TEST_F(FileUncached, ReadLeavesNoPagesBehind) {
  if (on_tmpfs(dir.path)) GTEST_SKIP() << "tmpfs is its page cache";
  EXPECT_TRUE(dev->caps().uncached_io);
  write(0, pattern(3), false);
  drop_cache(path);
  ASSERT_EQ(resident_pages(path, kLen), 0u) << "the page cache kept the file's pages";
  EXPECT_EQ(read(0, kLen, true), pattern(3));
  EXPECT_EQ(resident_pages(path, kLen), 0u);
  // A small read is buffered, but what it and readahead bring in leaves again.
  if (kernel_has_dontcache(dir.path)) {
    auto p = pattern(3);
    EXPECT_EQ(read(64 << 10, 16 << 10, true),
              std::vector<std::byte>(p.begin() + (64 << 10), p.begin() + (80 << 10)));
    EXPECT_EQ(resident_pages(path, kLen), 0u);
  }
  EXPECT_EQ(read(0, kLen, false), pattern(3));
  EXPECT_GT(resident_pages(path, kLen), 0u);
}

// An uncached write is dropped from the page cache once written back.
TEST_F(FileUncached, WriteLeavesNoPagesBehindOnceWritten) {
  if (on_tmpfs(dir.path)) GTEST_SKIP() << "tmpfs is its page cache";
  if (!kernel_has_dontcache(dir.path)) GTEST_SKIP() << "no RWF_DONTCACHE here";
  write(0, pattern(4), true);
  ASSERT_TRUE(loop.run(dev->flush()));
  // The kernel drops the pages when their writeback completes.
  size_t left = SIZE_MAX;
  for (int i = 0; i < 200 && left != 0; ++i) {
    left = resident_pages(path, kLen);
    if (left) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(left, 0u);
  EXPECT_EQ(read(0, kLen, false), pattern(4));
}

// tmpfs: no O_DIRECT to bypass and no RWF_DONTCACHE; uncached requests are
// ordinary ones and still correct.
TEST(FileUncachedTmpfs, RequestsAreOrdinaryOnes) {
  char tmpl[] = "/dev/shm/blkmirror-uncached-XXXXXX";
  if (!::mkdtemp(tmpl)) GTEST_SKIP() << "no /dev/shm";
  const std::string dirp = tmpl, path = dirp + "/f.raw";
  {
    Loop loop;
    ASSERT_TRUE(FileDevice::create(path, kLen));
    auto d = FileDevice::open(loop, path, FileOptions{});
    ASSERT_TRUE(d);
    EXPECT_FALSE((*d)->caps().uncached_io);
    auto data = pattern(5);
    AlignedBuffer b(kLen);
    std::memcpy(b.data(), data.data(), kLen);
    ASSERT_TRUE(loop.run((*d)->write(0, b.span(), WriteFlags{.uncached = true})));
    AlignedBuffer r(kLen);
    ASSERT_TRUE(loop.run((*d)->read(0, r.span(), ReadFlags{.uncached = true})));
    EXPECT_EQ(std::memcmp(r.data(), data.data(), kLen), 0);
  }
  std::filesystem::remove_all(dirp);
}

}  // namespace
}  // namespace blkmirror::test
