// Reopening a device between read-only and read-write (BlockDevice::set_read_only):
// FileDevice moves its descriptor and image locks (qemu-io sees the change),
// Qcow2Device writes its metadata back going read-only and checks its header
// going read-write.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

std::string qemu_io(const std::string& args, const std::string& path) {
  return sh(fmt::format("qemu-io {} '{}'", args, path)).out;
}

bool qemu_io_ok(const std::string& args, const std::string& path) {
  return sh(fmt::format("qemu-io {} '{}'", args, path)).status == 0;
}

TEST(FileReopen, LocksFollowTheMode) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "a.raw";
  ASSERT_TRUE(FileDevice::create(path, 1 << 20));
  auto f = FileDevice::open(loop, path, FileOptions{.read_only = true});
  ASSERT_TRUE(f);
  FileDevice& d = **f;
  std::vector<std::byte> buf(4096, std::byte{0x5a});
  // Read-only: we forbid other writers, and readers are welcome.
  EXPECT_FALSE(qemu_io_ok("-f raw -c 'write 0 4k'", path));
  EXPECT_TRUE(qemu_io_ok("-r -f raw -c 'read 0 4k'", path));
  EXPECT_EQ(loop.run(d.write(0, buf, {})).error().errnum(), EROFS);

  ASSERT_TRUE(loop.run(d.set_read_only(false)));
  EXPECT_FALSE(d.caps().read_only);
  ASSERT_TRUE(loop.run(d.write(0, buf, {})));
  // Read-write: a writer is refused, and so is a reader that wants a
  // consistent image (another open file, as another process would be).
  EXPECT_NE(qemu_io("-f raw -c 'write 0 4k'", path).find("Failed to get \"write\" lock"),
            std::string::npos);
  auto reader = FileDevice::open(loop, path, FileOptions{.read_only = true});
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.error().message(),
            fmt::format("Failed to get shared \"write\" lock. Is another process using the image "
                        "[{}]?",
                        path));

  ASSERT_TRUE(loop.run(d.set_read_only(true)));
  EXPECT_TRUE(d.caps().read_only);
  EXPECT_TRUE(qemu_io_ok("-r -f raw -c 'read -P 0x5a 0 4k'", path));
  EXPECT_FALSE(qemu_io_ok("-f raw -c 'write 0 4k'", path));
  EXPECT_EQ(loop.run(d.write(0, buf, {})).error().errnum(), EROFS);
  std::vector<std::byte> back(4096);
  ASSERT_TRUE(loop.run(d.read(0, back)));
  EXPECT_EQ(back, buf);
}

TEST(FileReopen, ReadWriteRefusedWhileAnotherOpenReadsChangesNothing) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "a.raw";
  ASSERT_TRUE(FileDevice::create(path, 1 << 20));
  auto f = FileDevice::open(loop, path, FileOptions{.read_only = true});
  ASSERT_TRUE(f);
  {
    // A second open file is another user, as another process would be.
    auto other = FileDevice::open(loop, path, FileOptions{.read_only = true});
    ASSERT_TRUE(other);
    auto r = loop.run((*f)->set_read_only(false));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().message(),
              fmt::format("Failed to get \"write\" lock. Is another process using the image "
                          "[{}]?",
                          path));
    EXPECT_TRUE((*f)->caps().read_only);
  }
  // Still holding our read-only locks: writers stay out.
  EXPECT_FALSE(qemu_io_ok("-f raw -c 'write 0 4k'", path));
  ASSERT_TRUE(loop.run((*f)->set_read_only(false)));
}

TEST(FileReopen, ForceShareStaysReadOnly) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "a.raw";
  ASSERT_TRUE(FileDevice::create(path, 1 << 20));
  auto f = FileDevice::open(loop, path, FileOptions{.read_only = true, .force_share = true});
  ASSERT_TRUE(f);
  auto r = loop.run((*f)->set_read_only(false));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message(), "force-share=on can only be used with read-only images");
  EXPECT_TRUE((*f)->caps().read_only);
}

Result<void> create_qcow2(Loop& loop, const std::string& path, uint64_t size) {
  if (auto r = FileDevice::create(path, 0); !r) return r;
  auto f = FileDevice::open(loop, path);
  if (!f) return make_error(f.error());
  return loop.run(Qcow2Device::create(**f, Qcow2CreateOptions{.size = size}));
}

TEST(Qcow2Reopen, ReadWriteThenReadOnlyLeavesACleanImage) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "q.qcow2";
  ASSERT_TRUE(create_qcow2(loop, path, 8 << 20));
  auto dev = open_qcow2(loop, path, true);
  ASSERT_TRUE(dev);
  Qcow2Device& q = **dev;
  std::vector<std::byte> buf(70000, std::byte{0x33});
  EXPECT_EQ(loop.run(q.write(5000, buf, {})).error().errnum(), EROFS);

  ASSERT_TRUE(loop.run(q.set_read_only(false)));
  EXPECT_FALSE(q.caps().read_only);
  ASSERT_TRUE(loop.run(q.write(5000, buf, {})));
  ASSERT_TRUE(loop.run(q.write(3 << 20, buf, {})));

  ASSERT_TRUE(loop.run(q.set_read_only(true)));
  EXPECT_TRUE(q.caps().read_only);
  EXPECT_EQ(loop.run(q.write(0, buf, {})).error().errnum(), EROFS);
  // No -U: the image lock says read-only again, so qemu-img may check it, and
  // everything was written back.
  auto check = sh("qemu-img check -f qcow2 '" + path + "'");
  EXPECT_EQ(check.status, 0) << check.out;
  EXPECT_TRUE(qemu_io_ok(fmt::format("-r -f qcow2 -c 'read -P 0x33 5000 70000' -c 'read -P 0x33 "
                                     "{} 70000' -c 'read -P 0 0 5000'",
                                     3 << 20),
                         path));
  // Reads still work on the open device.
  std::vector<std::byte> back(buf.size());
  ASSERT_TRUE(loop.run(q.read(5000, back)));
  EXPECT_EQ(back, buf);
  // And it can become writable again.
  ASSERT_TRUE(loop.run(q.set_read_only(false)));
  ASSERT_TRUE(loop.run(q.write(0, buf, {})));
  ASSERT_TRUE(loop.run(q.close()));
  EXPECT_EQ(qemu_check(path), "");
}

TEST(Qcow2Reopen, DirtyImageStaysReadOnly) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "q.qcow2";
  ASSERT_TRUE(create_qcow2(loop, path, 1 << 20));
  {
    // The dirty bit: incompatible features (offset 72, big-endian), bit 0.
    int fd = ::open(path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    unsigned char b = 1;
    ASSERT_EQ(::pwrite(fd, &b, 1, 79), 1);
    ::close(fd);
  }
  auto dev = open_qcow2(loop, path, true);
  ASSERT_TRUE(dev) << dev.error().message();
  auto r = loop.run((*dev)->set_read_only(false));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("dirty (refcounts not up to date)"), std::string::npos)
      << r.error().message();
  EXPECT_TRUE((*dev)->caps().read_only);
  std::vector<std::byte> buf(512);
  EXPECT_EQ(loop.run((*dev)->write(0, buf, {})).error().errnum(), EROFS);
}

}  // namespace
}  // namespace blkmirror::test
