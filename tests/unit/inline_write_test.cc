#include "io/inline_write.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

using namespace std::chrono_literals;
using Clock = InlineWrites::Clock;

TEST(InlineWrites, SmallWritesOnlyAndBackOffAfterAStall) {
  InlineWrites w;
  auto t = Clock::now();
  EXPECT_TRUE(w.allowed(4096, t));
  EXPECT_TRUE(w.allowed(InlineWrites::kMaxBytes, t));
  EXPECT_FALSE(w.allowed(InlineWrites::kMaxBytes + 1, t));
  // A quick write changes nothing.
  w.record(t, t + 100us);
  EXPECT_TRUE(w.allowed(4096, t + 100us));
  EXPECT_EQ(w.stalls(), 0u);
  // A write that held the loop longer than the limit sends the next ones
  // through io_uring for the back-off, then in place again.
  auto end = t + InlineWrites::kStallLimit + 1ms;
  w.record(t, end);
  EXPECT_EQ(w.stalls(), 1u);
  EXPECT_FALSE(w.allowed(4096, end));
  EXPECT_FALSE(w.allowed(4096, end + InlineWrites::kBackoff - 1ms));
  EXPECT_TRUE(w.allowed(4096, end + InlineWrites::kBackoff));
}

TEST(InlineWrites, WritesTheBytesAndReportsErrors) {
  char path[] = "/tmp/blkmirror-inline-XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  std::vector<char> data(8192, 'x');
  InlineWrites w;
  EXPECT_EQ(w.write(fd, data.data(), data.size(), 4096), 8192);
  std::vector<char> back(8192);
  ASSERT_EQ(::pread(fd, back.data(), back.size(), 4096), 8192);
  EXPECT_EQ(std::memcmp(back.data(), data.data(), data.size()), 0);
  ::close(fd);
  // A closed descriptor: the errno comes back negated, as from io_uring.
  EXPECT_EQ(w.write(fd, data.data(), 4096, 0), -EBADF);
}

}  // namespace
}  // namespace blkmirror
