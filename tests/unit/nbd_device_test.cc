// NbdDevice against a real server (nbdkit's memory plugin, spawned here): every
// operation, splitting and alignment to the server's block sizes (blocksize
// filter), and a connection that dies and comes back.
#include "blockdev/nbd_device.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "io/loop.h"

extern char** environ;

namespace blkmirror {
namespace {

// One nbdkit process serving on a UNIX socket; killed on destruction.
class Nbdkit {
 public:
  explicit Nbdkit(std::vector<std::string> args, const char* tag)
      : sock_(fmt::format("/tmp/blkmirror-nbdkit-{}-{}.sock", tag, ::getpid())),
        args_(std::move(args)) {
    start();
  }
  ~Nbdkit() { stop(); }
  bool available() const { return pid_ > 0; }
  void start() {
    ::unlink(sock_.c_str());
    std::vector<std::string> argv{"nbdkit", "-f", "--exit-with-parent", "-U", sock_};
    argv.insert(argv.end(), args_.begin(), args_.end());
    std::vector<char*> cargs;
    for (auto& a : argv) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    if (posix_spawnp(&pid_, "nbdkit", nullptr, nullptr, cargs.data(), environ) != 0) {
      pid_ = -1;
      return;
    }
    struct stat st {};
    for (int i = 0; i < 500 && ::stat(sock_.c_str(), &st) != 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
    ::unlink(sock_.c_str());
  }
  NbdConnectOptions options() const {
    NbdConnectOptions o;
    o.transport = NbdTransport::kUnix;
    o.path = sock_;
    return o;
  }

 private:
  std::string sock_;
  std::vector<std::string> args_;
  pid_t pid_ = -1;
};

// Opens an NbdDevice on srv and runs body(dev) (a coroutine) on a loop; fails
// the test when the device does not open.
template <class Body>
void with_device(Nbdkit& srv, Body body) {
  Loop loop(2);
  loop.run([](Loop* loop, Nbdkit* srv, Body body) -> Task<void> {
    auto d = co_await NbdDevice::open(*loop, srv->options());
    EXPECT_TRUE(d) << d.error().message();
    if (!d) co_return;
    co_await body(**d);
  }(&loop, &srv, std::move(body)));
}

std::vector<std::byte> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

TEST(NbdDevice, OperationsAgainstNbdkitMemory) {
  Nbdkit srv({"memory", "16M"}, "ops");
  ASSERT_TRUE(srv.available()) << "nbdkit not found";
  with_device(srv, [](NbdDevice& dev) -> Task<void> {
    EXPECT_EQ(dev.length(), 16u << 20);
    EXPECT_TRUE(dev.caps().has_block_status);
    EXPECT_TRUE(dev.caps().can_zero);
    EXPECT_TRUE(dev.caps().can_trim);
    EXPECT_FALSE(dev.caps().read_only);
    // nbdkit's memory plugin advertises multi-conn: requests spread over 4.
    EXPECT_TRUE(dev.multi_conn());
    EXPECT_EQ(dev.connections(), 4u);

    // A fresh memory disk is one hole.
    auto e = co_await dev.block_status(0, 16 << 20);
    EXPECT_TRUE(e && !e->allocated && e->zero && e->length == (16u << 20));

    // Data round trip, including an unaligned range, and FUA.
    auto data = random_bytes(3 << 20, 7);
    EXPECT_TRUE(co_await dev.write(1 << 20, data, WriteFlags{.fua = true}));
    std::vector<std::byte> back(data.size());
    EXPECT_TRUE(co_await dev.read(1 << 20, back));
    EXPECT_EQ(back, data);
    std::vector<std::byte> odd(1000);
    EXPECT_TRUE(co_await dev.read((1 << 20) + 17, odd));
    EXPECT_EQ(0, std::memcmp(odd.data(), data.data() + 17, odd.size()));

    // Block status sees the data, and the hole after it.
    auto s = co_await dev.block_status(1 << 20, 8 << 20);
    EXPECT_TRUE(s && s->allocated && !s->zero && s->length == (3u << 20));
    auto h = co_await dev.block_status(4 << 20, 1 << 20);
    EXPECT_TRUE(h && !h->allocated && h->zero);

    // Zeroes that may punch, then read back zeroes.
    EXPECT_TRUE(co_await dev.write_zeroes(2 << 20, 1 << 20, ZeroFlags{.may_unmap = true}));
    std::vector<std::byte> z(1 << 20);
    EXPECT_TRUE(co_await dev.read(2 << 20, z));
    EXPECT_TRUE(std::all_of(z.begin(), z.end(), [](std::byte b) { return b == std::byte{0}; }));
    EXPECT_TRUE(co_await dev.discard(3 << 20, 1 << 20));
    EXPECT_TRUE(co_await dev.flush());

    // Out of range is refused before reaching the server.
    auto bad = co_await dev.read(16 << 20, z);
    EXPECT_FALSE(bad);
    if (!bad) {
      EXPECT_EQ(bad.error().errnum(), EINVAL);
    }
  });
}

TEST(NbdDevice, SplitsAndAlignsToServerBlockSizes) {
  // The server advertises a 4 KiB minimum and 64 KiB maximum and fails any
  // request that breaks them: a 1 MiB write must be split into 16 commands and
  // an unaligned one done as a read-modify-write.
  Nbdkit srv(
      {"--filter=blocksize-policy", "memory", "8M", "blocksize-minimum=4096",
       "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error"},
      "bs");
  ASSERT_TRUE(srv.available());
  with_device(srv, [](NbdDevice& dev) -> Task<void> {
    EXPECT_EQ(dev.caps().min_block, 4096u);
    EXPECT_EQ(dev.caps().max_transfer, 65536u);
    std::vector<std::byte> model(8 << 20);
    auto big = random_bytes(1 << 20, 1);
    EXPECT_TRUE(co_await dev.write(0, big, {}));
    std::memcpy(model.data(), big.data(), big.size());
    auto small = random_bytes(5000, 2);
    EXPECT_TRUE(co_await dev.write(4096 * 3 + 100, small, {}));  // crosses a block edge
    std::memcpy(model.data() + 4096 * 3 + 100, small.data(), small.size());
    EXPECT_TRUE(co_await dev.write_zeroes(1000, 20000, ZeroFlags{}));
    std::memset(model.data() + 1000, 0, 20000);
    std::vector<std::byte> all(8 << 20);
    EXPECT_TRUE(co_await dev.read(0, all));
    auto diff = std::mismatch(all.begin(), all.end(), model.begin());
    EXPECT_TRUE(diff.first == all.end()) << "first difference at " << (diff.first - all.begin());
  });
}

TEST(NbdDevice, DeadServerFailsWithEioThenReconnects) {
  Nbdkit srv({"memory", "4M"}, "dead");
  ASSERT_TRUE(srv.available());
  with_device(srv, [&srv](NbdDevice& dev) -> Task<void> {
    auto data = random_bytes(65536, 3);
    EXPECT_TRUE(co_await dev.write(0, data, {}));
    srv.stop();
    // The first request finds the connection gone (EIO), and the reconnect
    // attempt fails while the server is down.
    auto r1 = co_await dev.write(0, data, {});
    EXPECT_FALSE(r1);
    if (!r1) {
      EXPECT_EQ(r1.error().errnum(), EIO) << r1.error().message();
      EXPECT_NE(r1.error().message().find(dev.describe()), std::string::npos)
          << r1.error().message();
    }
    auto r2 = co_await dev.write(0, data, {});
    EXPECT_FALSE(r2);
    srv.start();
    co_await sleep_for(std::chrono::milliseconds(1100));  // past the reconnect backoff
    auto r3 = co_await dev.write(0, data, {});
    EXPECT_TRUE(r3) << r3.error().message();
    EXPECT_EQ(dev.reconnects(), 1u);
    std::vector<std::byte> back(data.size());
    EXPECT_TRUE(co_await dev.read(0, back));
    EXPECT_EQ(back, data);
  });
}

TEST(NbdDevice, OneConnectionWithoutMultiConn) {
  // Without multi-conn a second connection may not see the first one's writes
  // (nor be covered by its flush): one connection only.
  Nbdkit srv({"--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable"}, "mc");
  ASSERT_TRUE(srv.available());
  Loop loop(2);
  auto d = loop.run(NbdDevice::open(loop, srv.options()));
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_FALSE((*d)->multi_conn());
  EXPECT_EQ((*d)->connections(), 1u);
}

TEST(NbdDevice, ConnectErrorIsOneLineNamingTheExport) {
  Loop loop(1);
  NbdConnectOptions o;
  o.path = "/nonexistent/blkmirror.sock";
  auto d = loop.run(open_nbd(loop, o));
  ASSERT_FALSE(d);
  std::string m = d.error().message();
  EXPECT_NE(m.find("nbd+unix:///?socket=/nonexistent/blkmirror.sock: cannot connect"),
            std::string::npos)
      << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
}

}  // namespace
}  // namespace blkmirror
