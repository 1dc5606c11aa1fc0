#include "io/uring.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cstring>

#include <gtest/gtest.h>

#include "io/loop.h"

namespace blkmirror {
namespace {

struct ReadCheck {
  Loop* loop;
  int fd;
  const std::vector<char>* data;
  int done = 0, bad = 0;
};

// Values as parameters, not captures: the frame outlives any lambda object.
Task<void> read_one(ReadCheck* c, int i, std::array<char, 512>* buf) {
  uint64_t off = (static_cast<uint64_t>(i) * 4096) % c->data->size();
  int n = co_await c->loop->uring().read(c->fd, buf->data(), 512, off);
  if (n != 512 || std::memcmp(buf->data(), c->data->data() + off, 512) != 0) ++c->bad;
  ++c->done;
}

// Regression: with more requests in flight than the CQ ring holds, completions
// went to the kernel's overflow list and were never fetched; those requests
// hung forever.
TEST(Uring, MoreRequestsInFlightThanTheRingHolds) {
  char path[] = "/tmp/blkmirror-uring-XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  std::vector<char> data(1 << 20);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7);
  ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  Loop loop;
  constexpr int kRequests = 3000;  // the CQ ring holds 512
  std::vector<std::array<char, 512>> bufs(kRequests);
  ReadCheck check{&loop, fd, &data};
  loop.run([&]() -> Task<void> {
    for (int i = 0; i < kRequests; ++i)
      asio::co_spawn(loop.executor(), read_one(&check, i, &bufs[i]), asio::detached);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (check.done < kRequests && std::chrono::steady_clock::now() < deadline)
      co_await sleep_for(std::chrono::milliseconds(1));
  }());
  ::close(fd);
  EXPECT_EQ(check.done, kRequests);
  EXPECT_EQ(check.bad, 0);
}

}  // namespace
}  // namespace blkmirror
