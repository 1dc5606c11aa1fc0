// qcow2 allocating writes: a fresh cluster (past the file's end at open) gets only
// the guest data written, a reused free cluster that may hold old bytes is written
// whole, and copy-on-write from a backing file leaves out nothing it needs.
#include <sys/stat.h>
#include <unistd.h>

#include <random>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include "blockdev/wrapper.h"
#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

uint64_t disk_usage(const std::string& path) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return ~0ull;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

void write_raw(const std::string& path, const std::vector<std::byte>& model) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(model.data()), static_cast<std::streamsize>(model.size()));
}

TEST(Qcow2Alloc, NewImageReportsZeroInitUnlessBacked) {
  TempDir dir;
  Loop loop;
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 " + (dir / "a.qcow2") + " 16M").status, 0);
  ASSERT_EQ(sh("qemu-img create -q -f raw " + (dir / "b.raw") + " 16M").status, 0);
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -F raw -b b.raw " + (dir / "c.qcow2")).status, 0);
  {
    auto dev = open_qcow2(loop, dir / "a.qcow2");
    ASSERT_TRUE(dev) << dev.error().message();
    EXPECT_TRUE((*dev)->caps().zero_init);
    std::vector<std::byte> d(4096, std::byte{1});
    ASSERT_TRUE(loop.run((*dev)->write(1 << 20, d, {})));
    ASSERT_TRUE(loop.run((*dev)->close()));
  }
  auto again = open_qcow2(loop, dir / "a.qcow2");  // now it holds data
  ASSERT_TRUE(again);
  EXPECT_FALSE((*again)->caps().zero_init);
  auto b = FileDevice::open(loop, dir / "b.raw", FileOptions{.read_only = true});
  ASSERT_TRUE(b);
  auto backed = open_qcow2(loop, dir / "c.qcow2", false, *b);
  ASSERT_TRUE(backed);
  EXPECT_FALSE((*backed)->caps().zero_init);
}

// 4 KiB into each of 64 unallocated 64 KiB clusters: the file grows by about the
// guest data plus metadata, not by 64 whole clusters, and reads back exactly.
TEST(Qcow2Alloc, FreshClustersGetOnlyTheGuestDataWritten) {
  TempDir dir;
  Loop loop;
  const std::string img = dir / "a.qcow2";
  const uint64_t size = 8 << 20, cs = 65536;
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 {} {}", img, size)).status, 0);
  std::vector<std::byte> model(size);
  const uint64_t before = disk_usage(img);
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev) << dev.error().message();
    Qcow2Device& q = **dev;
    for (uint64_t k = 0; k < 64; ++k) {
      // Page-aligned, unaligned and cluster-straddling writes.
      uint64_t off = k * 2 * cs + (k % 3 == 0 ? 8192 : k % 3 == 1 ? 1000 : cs - 2048);
      std::vector<std::byte> d(4096, std::byte(k + 1));
      ASSERT_TRUE(loop.run(q.write(off, d, {})));
      std::copy(d.begin(), d.end(), model.begin() + off);
    }
    auto got = loop.run(read_all(q));
    ASSERT_TRUE(got);
    EXPECT_EQ(first_diff(*got, model), -1);
    ASSERT_TRUE(loop.run(q.close()));
  }
  // Before: 64 clusters of 64 KiB each (4 MiB). Now: at most 2 pages per write
  // (8 KiB) plus an L2 table and a refcount block.
  const uint64_t grown = disk_usage(img) - before;
  EXPECT_LT(grown, 64 * 8192 + 4 * cs) << "file grew by " << grown << " bytes";
  EXPECT_EQ(qemu_check(img), "");
  write_raw(dir / "model.raw", model);
  EXPECT_EQ(sh(fmt::format("qemu-img compare -q -U -f qcow2 -F raw {} {}", img, dir / "model.raw"))
                .status,
            0);
}

// Free clusters inside the file at open may hold anything: an image whose file
// carries junk in unreferenced clusters must still read zeroes around new data.
TEST(Qcow2Alloc, ReusedFreeClustersAreWrittenWhole) {
  for (bool ext : {false, true}) {
    SCOPED_TRACE(ext);
    TempDir dir;
    Loop loop;
    const std::string img = dir / "a.qcow2";
    const uint64_t size = 4 << 20, cs = 65536;
    ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -o extended_l2={} {} {}",
                             ext ? "on" : "off", img, size))
                  .status,
              0);
    {
      // Eight clusters of junk after the image's last cluster: refcount 0, so the
      // allocator hands them out.
      std::ofstream f(img, std::ios::binary | std::ios::app);
      std::string junk(8 * cs, '\xaa');
      f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
    }
    std::vector<std::byte> model(size);
    {
      auto dev = open_qcow2(loop, img);
      ASSERT_TRUE(dev) << dev.error().message();
      Qcow2Device& q = **dev;
      for (uint64_t off : {uint64_t{4096}, 3 * cs + 5000, 6 * cs - 100, 20 * cs + cs / 2}) {
        std::vector<std::byte> d(4096, std::byte{0x11});
        ASSERT_TRUE(loop.run(q.write(off, d, {})));
        std::copy(d.begin(), d.end(), model.begin() + off);
      }
      auto got = loop.run(read_all(q));
      ASSERT_TRUE(got);
      EXPECT_EQ(first_diff(*got, model), -1);
      ASSERT_TRUE(loop.run(q.close()));
    }
    EXPECT_EQ(qemu_check(img), "");
    write_raw(dir / "model.raw", model);
    EXPECT_EQ(
        sh(fmt::format("qemu-img compare -q -U -f qcow2 -F raw {} {}", img, dir / "model.raw"))
            .status,
        0);
  }
}

// Partial writes over a backing file whose pages are a mix of data and zeroes:
// the copied part of each new cluster leaves out only all-zero pages, and every
// byte reads as before except the written ones.
TEST(Qcow2Alloc, CopyOnWriteFromSparseBackingKeepsEveryByte) {
  for (bool ext : {false, true}) {
    SCOPED_TRACE(ext);
    TempDir dir;
    Loop loop;
    const std::string base = dir / "base.raw", top = dir / "top.qcow2";
    const uint64_t size = 4 << 20;
    std::mt19937_64 rng(ext ? 7 : 11);
    std::vector<std::byte> model(size);
    for (uint64_t p = 0; p < size; p += 4096)
      if (rng() % 3 == 0)
        for (uint64_t i = 0; i < 4096; ++i) model[p + i] = std::byte(rng() | 1);
    write_raw(base, model);
    const auto before = model;
    ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -o extended_l2={} -b {} -F raw {}",
                             ext ? "on" : "off", base, top))
                  .status,
              0);
    auto b = FileDevice::open(loop, base, FileOptions{.read_only = true});
    ASSERT_TRUE(b);
    auto dev = open_qcow2(loop, top, false, *b);
    ASSERT_TRUE(dev);
    Qcow2Device& q = **dev;
    for (int i = 0; i < 200; ++i) {
      uint64_t len = 1 + rng() % 20000, off = rng() % (size - len);
      std::vector<std::byte> d(len, std::byte(i + 1));
      ASSERT_TRUE(loop.run(q.write(off, d, {})));
      std::copy(d.begin(), d.end(), model.begin() + off);
    }
    auto got = loop.run(read_all(q));
    ASSERT_TRUE(got);
    EXPECT_EQ(first_diff(*got, model), -1);
    ASSERT_TRUE(loop.run(q.close()));
    EXPECT_EQ(qemu_check(top), "");
    EXPECT_EQ(first_diff(read_file(base), before), -1);
    write_raw(dir / "model.raw", model);
    EXPECT_EQ(
        sh(fmt::format("qemu-img compare -q -U -f qcow2 -F raw {} {}", top, dir / "model.raw"))
            .status,
        0);
  }
}

// The image file, recording which buffers its writes came from, and the backing
// file, counting reads.
class WatchedFile : public BlockDeviceWrapper {
 public:
  using BlockDeviceWrapper::BlockDeviceWrapper;
  std::vector<const std::byte*> write_sources;
  int reads = 0;
  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override {
    ++reads;
    return BlockDeviceWrapper::read(off, buf, f);
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
    write_sources.push_back(buf.data());
    return BlockDeviceWrapper::write(off, buf, f);
  }
};

// A write that covers whole new clusters over a backing file (a sync=top mirror
// into a new overlay writes nothing else) has nothing to copy from below: the
// guest's buffer goes to the file as it is, with no read of the backing file and
// no cluster-sized bounce buffer (which cost a sync=top mirror most of its CPU).
TEST(Qcow2Alloc, WholeClustersOverABackingFileAreWrittenFromTheGuestBuffer) {
  TempDir dir;
  Loop loop;
  const std::string base = dir / "base.raw", top = dir / "top.qcow2";
  const uint64_t size = 4 << 20, cs = 65536;
  std::vector<std::byte> model(size, std::byte{0x5a});
  write_raw(base, model);
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -b {} -F raw {}", base, top)).status, 0);
  auto b = FileDevice::open(loop, base, FileOptions{.read_only = true});
  ASSERT_TRUE(b);
  auto backing = std::make_shared<WatchedFile>(*b);
  auto f = FileDevice::open(loop, top);
  ASSERT_TRUE(f);
  auto file = std::make_shared<WatchedFile>(*f);
  auto dev = loop.run(Qcow2Device::open(loop, file, backing, Qcow2OpenOptions{}));
  ASSERT_TRUE(dev) << dev.error().message();
  Qcow2Device& q = **dev;
  std::vector<std::byte> d(16 * cs, std::byte{0x33});
  ASSERT_TRUE(loop.run(q.write(cs, d, {})));
  std::copy(d.begin(), d.end(), model.begin() + cs);
  EXPECT_EQ(backing->reads, 0);
  EXPECT_NE(std::find(file->write_sources.begin(), file->write_sources.end(), d.data()),
            file->write_sources.end())
      << "the data was copied before it was written";
  auto got = loop.run(read_all(q));
  ASSERT_TRUE(got);
  EXPECT_EQ(first_diff(*got, model), -1);
  ASSERT_TRUE(loop.run(q.close()));
  EXPECT_EQ(qemu_check(top), "");
  write_raw(dir / "model.raw", model);
  EXPECT_EQ(sh(fmt::format("qemu-img compare -q -U -f qcow2 -F raw {} {}", top, dir / "model.raw"))
                .status,
            0);
}

// Zeroing the rest of a chunk around new data (what a mirror into a new image
// does): bytes that still read as zeroes (unallocated, or holes of a fresh
// cluster) are left alone, bytes that hold data are zeroed.
TEST(Qcow2Alloc, PartialZeroesOfZeroBytesWriteNothing) {
  TempDir dir;
  Loop loop;
  const std::string img = dir / "a.qcow2";
  const uint64_t size = 8 << 20, cs = 65536;
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 {} {}", img, size)).status, 0);
  std::vector<std::byte> model(size);
  const uint64_t before = disk_usage(img);
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev) << dev.error().message();
    Qcow2Device& q = **dev;
    std::vector<std::byte> d(4096, std::byte{9});
    for (uint64_t k = 0; k < 32; ++k) {
      const uint64_t c = k * 2 * cs;
      if (k % 2) {  // zeroes first, then the data
        ASSERT_TRUE(loop.run(q.write_zeroes(c, 8192, {})));
        ASSERT_TRUE(loop.run(q.write_zeroes(c + 12288, cs - 12288, {})));
      }
      ASSERT_TRUE(loop.run(q.write(c + 8192, d, {})));
      if (!(k % 2)) {  // the data first
        ASSERT_TRUE(loop.run(q.write_zeroes(c, 8192, {})));
        ASSERT_TRUE(loop.run(q.write_zeroes(c + 12288, cs - 12288, {})));
      }
      std::copy(d.begin(), d.end(), model.begin() + c + 8192);
    }
    // A cluster full of data, then zeroed in part: those bytes must change.
    std::vector<std::byte> full(cs, std::byte{5});
    ASSERT_TRUE(loop.run(q.write(100 * cs, full, {})));
    std::copy(full.begin(), full.end(), model.begin() + 100 * cs);
    ASSERT_TRUE(loop.run(q.write_zeroes(100 * cs + 1000, 20000, {})));
    std::fill_n(model.begin() + 100 * cs + 1000, 20000, std::byte{0});
    auto got = loop.run(read_all(q));
    ASSERT_TRUE(got);
    EXPECT_EQ(first_diff(*got, model), -1);
    ASSERT_TRUE(loop.run(q.close()));
  }
  const uint64_t grown = disk_usage(img) - before;
  EXPECT_LT(grown, 32 * 8192 + 6 * cs) << "file grew by " << grown << " bytes";
  EXPECT_EQ(qemu_check(img), "");
  write_raw(dir / "model.raw", model);
  EXPECT_EQ(sh(fmt::format("qemu-img compare -q -U -f qcow2 -F raw {} {}", img, dir / "model.raw"))
                .status,
            0);
}

}  // namespace
}  // namespace blkmirror::test
