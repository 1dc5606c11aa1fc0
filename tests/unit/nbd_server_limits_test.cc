// What a client can make the NBD server hold, checked with a raw client on a
// socketpair (every byte under the test's control, on its own thread): the
// handshake limit, the payload stall limit, max-connections, and exports that
// outlive the handshake replies still referring to them.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "harness.h"
#include "nbd/proto/nbd_proto.h"
#include "nbd/server/nbd_server.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::byte>;

// The client end of a socketpair, blocking, with a receive timeout.
struct RawClient {
  int fd = -1;
  ~RawClient() {
    if (fd >= 0) ::close(fd);
  }
  bool send(const Bytes& b) {
    size_t off = 0;
    while (off < b.size()) {
      ssize_t n = ::send(fd, b.data() + off, b.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  // Exactly n bytes, or false on EOF, error or 5 s without data.
  bool recv(size_t n, Bytes& out) {
    out.resize(n);
    size_t off = 0;
    while (off < n) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 5000) != 1) return false;
      ssize_t r = ::recv(fd, out.data() + off, n - off, 0);
      if (r <= 0) return false;
      off += static_cast<size_t>(r);
    }
    return true;
  }
  // True when the server closes within timeout (data before the close is dropped).
  bool closed_within(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    char buf[4096];
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) != 1) return false;
      ssize_t r = ::recv(fd, buf, sizeof buf, 0);
      if (r <= 0) return true;
    }
  }
  bool greeting() {
    Bytes g;
    return recv(18, g);
  }
  // Greeting, client flags; then NBD_OPT_GO for the default export, replies read.
  bool handshake(uint16_t* tflags = nullptr) {
    if (!greeting()) return false;
    Bytes out;
    nbd::Writer(out).u32(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes);
    append_option(out, nbd::kOptGo, go_data(""));
    if (!send(out)) return false;
    for (;;) {
      Bytes hdr, data;
      if (!recv(20, hdr)) return false;
      uint32_t type = be32(hdr.data() + 12), len = be32(hdr.data() + 16);
      if (!recv(len, data)) return false;
      if (type == nbd::kRepInfo && len == 12 && tflags) *tflags = be16(data.data() + 10);
      if (type == nbd::kRepAck) return true;
      if (type & nbd::kRepErrBit) return false;
    }
  }
  static Bytes go_data(const std::string& name, std::vector<uint16_t> infos = {}) {
    Bytes d;
    nbd::Writer w(d);
    w.u32(static_cast<uint32_t>(name.size())).str(name).u16(static_cast<uint16_t>(infos.size()));
    for (uint16_t i : infos) w.u16(i);
    return d;
  }
  static void append_option(Bytes& out, uint32_t opt, const Bytes& data) {
    nbd::Writer(out)
        .u64(nbd::kOptsMagic)
        .u32(opt)
        .u32(static_cast<uint32_t>(data.size()))
        .bytes(data);
  }
  static uint32_t be32(const std::byte* p) {
    return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
  }
  static uint16_t be16(const std::byte* p) {
    return static_cast<uint16_t>(uint32_t(p[0]) << 8 | uint32_t(p[1]));
  }
};

// A server over one memory disk, exported as "" with a long description.
struct Fixture {
  Loop loop{1};
  Graph graph;
  std::unique_ptr<nbd::NbdServer> server;
  explicit Fixture(nbd::ServerLimits limits) {
    EXPECT_TRUE(graph.add("disk", std::make_shared<MemoryDevice>(4 << 20, memory_opts())));
    server = std::make_unique<nbd::NbdServer>(loop, graph, limits);
    EXPECT_TRUE(server->add_export({"", "disk", std::string(4000, 'd'), true}));
  }
  // A connected client whose other end the server serves.
  std::unique_ptr<RawClient> connect(int server_sndbuf = 0) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    if (server_sndbuf)
      ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &server_sndbuf, sizeof server_sndbuf);
    asio::generic::stream_protocol proto(AF_UNIX, SOCK_STREAM);
    server->serve_socket(asio::generic::stream_protocol::socket(loop.ctx(), proto, sv[0]));
    auto c = std::make_unique<RawClient>();
    c->fd = sv[1];
    return c;
  }
  // Runs body on the loop while client runs on its own thread; returns body's result.
  template <class Client, class Body>
  bool run(Client client, Body body) {
    std::atomic<bool> done{false};
    std::thread t([&] {
      client();
      done = true;
    });
    bool ok = loop.run([&]() -> Task<bool> {
      bool fine = co_await body(done);
      fine = co_await wait_until([&] { return done.load(); }, 30s) && fine;
      co_await server->stop();
      co_return fine;
    }());
    t.join();
    return ok;
  }
};

Task<bool> nothing(std::atomic<bool>&) { co_return true; }

TEST(NbdServerLimits, HandshakeLimitClosesASilentClient) {
  Fixture f({.handshake_limit = 200ms});
  auto c = f.connect();
  std::chrono::milliseconds took{};
  bool greeted = false, closed = false;
  EXPECT_TRUE(f.run(
      [&] {
        auto t0 = std::chrono::steady_clock::now();
        greeted = c->greeting();
        closed = c->closed_within(5s);
        took = std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::steady_clock::now() - t0);
      },
      [&](std::atomic<bool>& done) -> Task<bool> {
        co_return co_await wait_until([&] { return done && f.server->connections() == 0; }, 10s);
      }));
  EXPECT_TRUE(greeted);
  EXPECT_TRUE(closed) << "a client that never negotiated was kept";
  EXPECT_GE(took.count(), 150) << "closed before the limit";
}

TEST(NbdServerLimits, HandshakeLimitEndsWithTheHandshake) {
  Fixture f({.handshake_limit = 200ms});
  auto c = f.connect();
  bool ok = false, open_after = false;
  EXPECT_TRUE(f.run(
      [&] {
        ok = c->handshake();
        open_after = !c->closed_within(600ms);  // idle in transmission: fine
      },
      nothing));
  EXPECT_TRUE(ok);
  EXPECT_TRUE(open_after) << "the handshake limit cut a negotiated client";
}

TEST(NbdServerLimits, StalledWritePayloadClosesTheConnection) {
  Fixture f({.payload_stall_limit = 200ms});
  auto c = f.connect();
  bool ok = false, closed = false;
  EXPECT_TRUE(f.run(
      [&] {
        ok = c->handshake();
        Bytes req;
        nbd::encode_request({0, nbd::kCmdWrite, 1, 0, 1 << 20}, req);
        req.resize(req.size() + 100);  // 100 bytes of the announced 1 MiB, then silence
        ok = ok && c->send(req);
        closed = c->closed_within(5s);
      },
      nothing));
  EXPECT_TRUE(ok);
  EXPECT_TRUE(closed) << "a stalled write payload was waited for forever";
}

TEST(NbdServerLimits, TricklingPayloadIsNotAStall) {
  Fixture f({.payload_stall_limit = 400ms});
  auto c = f.connect();
  bool ok = false;
  uint32_t error = 99;
  EXPECT_TRUE(f.run(
      [&] {
        ok = c->handshake();
        Bytes req;
        nbd::encode_request({0, nbd::kCmdWrite, 7, 0, 64 << 10}, req);
        ok = ok && c->send(req);
        Bytes piece(16 << 10, std::byte{0x5a});
        for (int i = 0; i < 4 && ok; ++i) {  // 600 ms in all, never 400 ms silent
          std::this_thread::sleep_for(150ms);
          ok = c->send(piece);
        }
        Bytes reply;
        ok = ok && c->recv(16, reply);
        if (ok) error = RawClient::be32(reply.data() + 4);
      },
      nothing));
  EXPECT_TRUE(ok);
  EXPECT_EQ(error, 0u);
}

TEST(NbdServerLimits, MaxConnectionsRefusesTheNextClient) {
  Fixture f({.max_connections = 1});
  auto first = f.connect();
  auto second = f.connect();
  uint16_t tflags = 0;
  bool ok = false, refused = false;
  EXPECT_TRUE(f.run(
      [&] {
        ok = first->handshake(&tflags);
        refused = second->closed_within(5s);
      },
      nothing));
  EXPECT_TRUE(ok);
  EXPECT_TRUE(refused);
  EXPECT_EQ(f.server->refused(), 1u);
  EXPECT_FALSE(tflags & nbd::kFlagCanMultiConn) << "multi-conn advertised with max-connections=1";
}

// Regression (issue 17 item 3): a client in the handshake whose replies wait on
// a slow reader referred to an export that `block-export-del` (safe) could
// delete, because only clients in transmission counted; the handshake then read
// the freed export (ASan: heap-use-after-free in reply_info).
TEST(NbdServerLimits, ExportOutlivesAHandshakeReplyingAboutIt) {
  Fixture f({});
  auto c = f.connect(4096);
  size_t during = 0;
  bool removed = false, closed = false;
  std::atomic<bool> sent{false}, checked{false};
  EXPECT_TRUE(f.run(
      [&] {
        Bytes out;
        nbd::Writer(out).u32(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes);
        // Options pipelined without reading a reply: the server blocks in the
        // middle of one of them (each INFO reply carries the 4000-byte description).
        std::vector<uint16_t> infos(30, nbd::kInfoDescription);
        for (int i = 0; i < 900; ++i)
          RawClient::append_option(out, nbd::kOptInfo, RawClient::go_data("", infos));
        c->greeting();
        c->send(out);
        sent = true;
        while (!checked) std::this_thread::sleep_for(1ms);
        closed = c->closed_within(20s);  // reads everything the server still sends
      },
      [&](std::atomic<bool>&) -> Task<bool> {
        co_await wait_until([&] { return sent.load(); }, 10s);
        co_await sleep_for(100ms);  // the server is now stuck writing
        during = f.server->clients_of("");
        auto r = co_await f.server->remove_export("");
        removed = r.has_value();
        checked = true;
        co_return true;
      }));
  EXPECT_EQ(during, 1u) << "a client in the handshake did not count as a client of the export";
  EXPECT_TRUE(removed);
  EXPECT_TRUE(closed) << "removing the export left its handshaking client connected";
}

TEST(NbdServerLimits, RepeatedInfoRequestsGetOneReplyEach) {
  Fixture f({});
  auto c = f.connect();
  std::vector<uint32_t> types;
  bool ok = false;
  EXPECT_TRUE(f.run(
      [&] {
        ok = c->greeting();
        Bytes out;
        nbd::Writer(out).u32(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes);
        std::vector<uint16_t> infos(5000, nbd::kInfoDescription);
        infos.push_back(nbd::kInfoName);
        infos.push_back(nbd::kInfoDescription);
        RawClient::append_option(out, nbd::kOptInfo, RawClient::go_data("", infos));
        ok = ok && c->send(out);
        for (;;) {
          Bytes hdr, data;
          if (!(ok = ok && c->recv(20, hdr))) break;
          uint32_t type = RawClient::be32(hdr.data() + 12);
          if (!(ok = c->recv(RawClient::be32(hdr.data() + 16), data))) break;
          types.push_back(type == nbd::kRepInfo ? RawClient::be16(data.data()) : type);
          if (type == nbd::kRepAck || (type & nbd::kRepErrBit)) break;
        }
      },
      nothing));
  EXPECT_TRUE(ok);
  std::vector<uint32_t> want{nbd::kInfoExport, nbd::kInfoDescription, nbd::kInfoName,
                             nbd::kInfoBlockSize, nbd::kRepAck};
  EXPECT_EQ(types, want);
}

}  // namespace
}  // namespace blkmirror::test
