// The NBD server end to end, with libnbd (a real client) on its own thread: the
// commands, and a live mirror switching the client's export to the target while
// it writes.
#include <libnbd.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "harness.h"
#include "nbd/server/nbd_server.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

std::string temp_socket(const char* tag) {
  return fmt::format("/tmp/blkmirror-test-{}-{}.sock", tag, ::getpid());
}

struct NbdClient {
  nbd_handle* h = nbd_create();
  ~NbdClient() {
    if (h) nbd_close(h);
  }
  bool connect(const std::string& sock) {
    return nbd_connect_uri(h, fmt::format("nbd+unix:///?socket={}", sock).c_str()) == 0;
  }
};

TEST(NbdServer, CommandsAgainstMemoryDevice) {
  Loop loop(2);
  Graph graph;
  auto dev = std::make_shared<MemoryDevice>(4 << 20, memory_opts());
  std::vector<std::byte> data(65536, std::byte{0x11});
  dev->write_now(1 << 20, data);
  ASSERT_TRUE(graph.add("disk", dev));
  nbd::NbdServer server(loop, graph);
  ASSERT_TRUE(server.add_export({"disk", "disk", "a test disk", true}));
  std::string sock = temp_socket("cmds");
  ASSERT_TRUE(server.listen_unix(sock));

  std::atomic<bool> done{false};
  std::string failure;
  std::thread client([&] {
    NbdClient c;
    nbd_add_meta_context(c.h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    if (nbd_connect_uri(c.h, fmt::format("nbd+unix:///disk?socket={}", sock).c_str()) != 0) {
      failure = nbd_get_error();
    } else {
      std::vector<char> buf(65536);
      if (nbd_get_size(c.h) != (4 << 20)) failure = "size";
      if (nbd_pread(c.h, buf.data(), buf.size(), 1 << 20, 0) != 0 || buf[0] != 0x11)
        failure = "pread";
      std::memset(buf.data(), 0x22, buf.size());
      if (nbd_pwrite(c.h, buf.data(), 4096, 0, LIBNBD_CMD_FLAG_FUA) != 0) failure = "pwrite";
      if (nbd_zero(c.h, 8192, 1 << 20, LIBNBD_CMD_FLAG_NO_HOLE) != 0) failure = "zero";
      if (nbd_trim(c.h, 65536, 2 << 20, 0) != 0) failure = "trim";
      if (nbd_flush(c.h, 0) != 0) failure = "flush";
      if (nbd_can_multi_conn(c.h) != 1) failure = "multi-conn";
      // Out of range: an error, and the connection keeps working.
      if (nbd_pread(c.h, buf.data(), 4096, (4 << 20) - 100, 0) == 0) failure = "range";
      if (nbd_pread(c.h, buf.data(), 4096, 0, 0) != 0 || buf[0] != 0x22) failure = "after error";
      nbd_shutdown(c.h, 0);
    }
    done = true;
  });
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    bool ok = co_await wait_until([&] { return done.load(); });
    co_await server.stop();
    co_return ok;
  }()));
  client.join();
  EXPECT_EQ(failure, "");
  std::vector<std::byte> got(4096);
  dev->read_now(0, got);
  EXPECT_EQ(got[0], std::byte{0x22});
  dev->read_now(1 << 20, got);
  EXPECT_EQ(got[0], std::byte{0});  // zeroed by the NO_HOLE write-zeroes
}

TEST(NbdServer, LiveMirrorSwitchesClientWithoutLosingWrites) {
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    Loop loop(2);
    Graph graph;
    constexpr uint64_t kSize = 8 << 20;
    std::mt19937_64 rng(seed);
    auto src = std::make_shared<MemoryDevice>(kSize, memory_opts(true, 3, seed));
    auto dst = std::make_shared<MemoryDevice>(kSize, memory_opts(true, 3, seed + 7));
    auto model = fill_random(*src, rng);
    ASSERT_TRUE(graph.add("src", src));
    ASSERT_TRUE(graph.add("dst", dst));
    nbd::NbdServer server(loop, graph);
    ASSERT_TRUE(server.add_export({"", "src", "", true}));
    std::string sock = temp_socket("live");
    ASSERT_TRUE(server.listen_unix(sock));
    MirrorParams p;
    p.device = "src";
    p.target = "dst";
    auto job = MirrorJob::create(loop, graph, p);
    ASSERT_TRUE(job);

    std::atomic<bool> stop{false}, done{false}, hold{false};
    std::atomic<uint64_t> acked{0};
    std::string failure;
    std::thread client([&] {
      NbdClient c;
      if (!c.connect(sock)) {
        failure = nbd_get_error();
        done = true;
        return;
      }
      std::mt19937_64 r(seed * 13);
      std::vector<std::byte> buf(65536);
      while (!stop) {
        if (hold) {
          std::this_thread::sleep_for(1ms);
          continue;
        }
        uint64_t len = 512 * (1 + r() % 64);
        uint64_t off = r() % (kSize - len);
        for (auto& b : buf) b = static_cast<std::byte>(r());
        if (nbd_pwrite(c.h, buf.data(), len, off, 0) != 0) {
          failure = nbd_get_error();
          break;
        }
        std::memcpy(model.data() + off, buf.data(), len);
        ++acked;
        std::this_thread::sleep_for(200us);
      }
      nbd_flush(c.h, 0);
      nbd_shutdown(c.h, 0);
      done = true;
    });
    bool ok = loop.run([&]() -> Task<bool> {
      (*job)->start(loop.executor());
      // A background mirror may not converge against a fast writer; hold the
      // writer then (convergence under load is the active mode's job).
      bool fine = co_await wait_until([&] { return (*job)->info().ready; }, 5s);
      if (!fine) {
        hold = true;
        fine = co_await wait_until([&] { return (*job)->info().ready; });
        hold = false;
      }
      co_await sleep_for(50ms);
      fine = fine && (*job)->complete().has_value();
      fine = fine && co_await wait_until([&] { return (*job)->concluded(); });
      uint64_t after = acked + 50;
      fine = fine && co_await wait_until([&] { return acked >= after || done; });
      stop = true;
      fine = fine && co_await wait_until([&] { return done.load(); });
      co_await server.stop();
      co_return fine;
    }());
    client.join();
    ASSERT_TRUE(ok) << "seed " << seed;
    ASSERT_EQ(failure, "");
    EXPECT_TRUE((*job)->switched());
    EXPECT_EQ(first_difference(contents(*dst), model), -1) << "seed " << seed;
  }
}

}  // namespace
}  // namespace blkmirror::test
