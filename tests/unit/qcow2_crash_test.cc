// Crash safety: a child process writes through Qcow2Device with flushes and is
// killed with SIGKILL at many points. Afterwards `qemu-img check` must report no
// corruption (leaks are allowed), and every write acknowledged before the last
// completed flush must read back.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

constexpr uint64_t kSize = 32 << 20;
constexpr uint64_t kBlock = 4096;

uint64_t offset_of(uint64_t i) { return (i * 2053 % (kSize / kBlock)) * kBlock; }
std::byte pattern_of(uint64_t i) { return std::byte(1 + i % 251); }

// Waits until no process holds a lock on path (at most 10 s). A process killed
// with I/O still in its io_uring keeps its files, and so its image locks, until
// the kernel's asynchronous teardown of the ring has finished, which can be
// after waitpid() returned (seen on Linux 6.18). True when unlocked.
bool wait_unlocked(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool free = false;
  while (!free && std::chrono::steady_clock::now() < deadline) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 0;  // the whole file: QEMU's lock bytes are near its start
    free = ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type == F_UNLCK;
    if (!free) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::close(fd);
  return free;
}

// The child: writes block after block, flushing every few, and reports on the pipe
// how many writes the last completed flush covers.
[[noreturn]] void child(const std::string& path, int fd, uint64_t seed) {
  Loop loop;
  auto dev = open_qcow2(loop, path);
  if (!dev) _exit(2);
  Qcow2Device* q = dev->get();
  std::mt19937_64 rng(seed);
  loop.run([](Qcow2Device* q, int fd, uint64_t seed) -> Task<void> {
    std::mt19937_64 rng(seed);
    std::vector<std::byte> buf(kBlock);
    for (uint64_t i = 0; i < kSize / kBlock; ++i) {
      std::fill(buf.begin(), buf.end(), pattern_of(i));
      if (i % 7 == 3) {
        // Some zeroing and discards too (of blocks not used for data).
        (void)co_await q->write_zeroes(offset_of(i), kBlock,
                                       ZeroFlags{.may_unmap = (rng() & 1) != 0});
      }
      if (!co_await q->write(offset_of(i), buf, {})) _exit(3);
      if (i % 5 == 4) {
        if (!co_await q->flush()) _exit(4);
        uint64_t n = i + 1;
        if (::write(fd, &n, sizeof n) != sizeof n) _exit(5);
      }
    }
    _exit(0);
  }(q, fd, rng()));
  _exit(6);
}

TEST(Qcow2Crash, KilledWriterLeavesConsistentImage) {
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    SCOPED_TRACE(seed);
    TempDir dir;
    const std::string img = dir / "c.qcow2";
    ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -o cluster_size={} {} {}",
                             seed % 2 ? 65536 : 4096, img, kSize))
                  .status,
              0);
    int p[2];
    ASSERT_EQ(::pipe(p), 0);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(p[0]);
      child(img, p[1], seed);
    }
    ::close(p[1]);
    ::usleep(static_cast<useconds_t>(20000 + seed * 37000));
    ::kill(pid, SIGKILL);
    int st = 0;
    ::waitpid(pid, &st, 0);
    ASSERT_TRUE(wait_unlocked(img)) << "the killed writer's image locks were never released";
    uint64_t acked = 0, n;
    while (::read(p[0], &n, sizeof n) == sizeof n) acked = n;
    ::close(p[0]);
    // 0: clean, 3: leaked clusters only; 2 would be corruption.
    auto check = sh("qemu-img check -f qcow2 " + img);
    EXPECT_TRUE(check.status == 0 || check.status == 3) << check.out;
    Loop loop;
    auto dev = open_qcow2(loop, img, true);
    ASSERT_TRUE(dev) << dev.error().message();
    std::vector<std::byte> buf(kBlock);
    for (uint64_t i = 0; i < acked; ++i) {
      ASSERT_TRUE(loop.run((*dev)->read(offset_of(i), buf)));
      ASSERT_EQ(buf[0], pattern_of(i)) << "write " << i << " of " << acked << " lost";
      ASSERT_EQ(buf[kBlock - 1], pattern_of(i));
    }
    RecordProperty(fmt::format("acked_{}", seed), static_cast<int>(acked));
  }
}

}  // namespace
}  // namespace blkmirror::test
