// The chain rules shared by the daemon and the CLI: format names, magic
// detection, backing paths relative to the overlay, and loop detection by
// (device, inode) -- a symlink to an image already in the chain is the same image.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "blockdev/image_format.h"
#include "harness.h"

namespace blkmirror::test {
namespace {

TEST(ImageFormat, Names) {
  EXPECT_EQ(*parse_image_format("raw"), ImageFormat::kRaw);
  EXPECT_EQ(*parse_image_format("qcow2"), ImageFormat::kQcow2);
  auto bad = parse_image_format("vmdk");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message(), "unknown image format 'vmdk' (raw or qcow2)");
}

TEST(ImageFormat, DetectByMagic) {
  Loop loop;
  auto dev = std::make_shared<MemoryDevice>(4096, memory_opts());
  EXPECT_EQ(*loop.run(detect_image_format(*dev)), ImageFormat::kRaw);
  std::vector<std::byte> magic = {std::byte{'Q'}, std::byte{'F'}, std::byte{'I'}, std::byte{0xfb}};
  dev->write_now(0, magic);
  EXPECT_EQ(*loop.run(detect_image_format(*dev)), ImageFormat::kQcow2);
  auto tiny = std::make_shared<MemoryDevice>(2, memory_opts());
  EXPECT_EQ(*loop.run(detect_image_format(*tiny)), ImageFormat::kRaw);
}

TEST(ImageFormat, BackingPaths) {
  EXPECT_EQ(*resolve_backing_path("/vm/top.qcow2", true, "base.qcow2"), "/vm/base.qcow2");
  EXPECT_EQ(*resolve_backing_path("/vm/snap/top.qcow2", true, "../base.raw"), "/vm/base.raw");
  EXPECT_EQ(*resolve_backing_path("top.qcow2", true, "base.qcow2"), "base.qcow2");
  EXPECT_EQ(*resolve_backing_path("/vm/top.qcow2", true, "/images/b.qcow2"), "/images/b.qcow2");
  EXPECT_EQ(*resolve_backing_path("nbd://h/x", false, "/images/b.qcow2"), "/images/b.qcow2");
  EXPECT_FALSE(resolve_backing_path("nbd://h/x", false, "b.qcow2"));
}

TEST(ImageFormat, ChainGuardCatchesTheSameFileByAnyName) {
  auto dir = std::filesystem::temp_directory_path() / ("bm-guard-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "a").put('a');
  std::ofstream(dir / "b").put('b');
  std::filesystem::create_symlink(dir / "a", dir / "link");
  ChainGuard g;
  EXPECT_TRUE(g.enter((dir / "a").string()));
  EXPECT_TRUE(g.enter((dir / "b").string()));
  auto again = g.enter((dir / "link").string());
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().errnum(), ELOOP);
  EXPECT_NE(again.error().message().find("loops"), std::string::npos);
  auto missing = g.enter((dir / "nope").string());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().errnum(), ENOENT);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace blkmirror::test
