// libFuzzer target: the whole NBD server (handshake, option parsing, request
// decoding, validation, dispatch) fed arbitrary client bytes over a socketpair.
// Built by the CMake preset `fuzz` (clang); scripts/fuzz builds and runs it; the
// seed corpus is tests/fuzz/corpus/nbd.
//
// The input is the client's byte stream; its length picks one of four
// scenarios, so every stream is also tried against what a hostile client or an
// operator can do meanwhile:
//   0  plain: the stream, then EOF
//   1  a slow reader (tiny receive buffer, pauses) while both exports are
//      removed mid-conversation (block-export-del): exports must outlive every
//      connection that still refers to them
//   2  the stream in small pieces with a pause, under millisecond handshake and
//      payload-stall limits: the watchdog closes the connection anywhere
//   3  max-connections=1 and a second client (refused at once)
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "blockdev/graph.h"
#include "blockdev/memory_device.h"
#include "fuzz_util.h"
#include "io/loop.h"
#include "nbd/server/nbd_server.h"

using namespace blkmirror;
using namespace std::chrono_literals;

namespace {

using Socket = asio::generic::stream_protocol::socket;

// Reads what the server sends a little at a time, letting the server run in
// between: with the tiny socket buffers its replies wait on us.
Task<void> slow_drain(Socket* s) {
  std::vector<char> buf(1024);
  for (;;) {
    std::error_code ec;
    co_await s->async_read_some(asio::buffer(buf), asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    co_await yield_now();
  }
}

Task<void> send_all(Socket* s, const uint8_t* data, size_t size) {
  std::error_code ec;
  co_await asio::async_write(*s, asio::buffer(data, size),
                             asio::redirect_error(asio::use_awaitable, ec));
  s->shutdown(asio::socket_base::shutdown_send, ec);
}

bool socket_pair(Loop& loop, Socket& server_end, Socket& client_end) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return false;
  asio::generic::stream_protocol proto(AF_UNIX, SOCK_STREAM);
  server_end = Socket(loop.ctx(), proto, sv[0]);
  client_end = Socket(loop.ctx(), proto, sv[1]);
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1 << 16)) return 0;
  const unsigned scenario = size % 4;
  Loop loop(1);
  Graph graph;
  MemoryDevice::Options opts{MemoryDevice::defaults()};
  opts.yield = false;
  (void)graph.add("disk", std::make_shared<MemoryDevice>(1 << 20, opts));
  nbd::ServerLimits limits;
  if (scenario == 2) {
    limits.handshake_limit = 3ms;
    limits.payload_stall_limit = 3ms;
  }
  if (scenario == 3) limits.max_connections = 1;
  nbd::NbdServer server(loop, graph, limits);
  (void)server.add_export({"", "disk", "", true});
  (void)server.add_export({"ro", "disk", "read-only view", false});
  Socket server_end(loop.ctx()), peer(loop.ctx()), second_server(loop.ctx()), second(loop.ctx());
  if (!socket_pair(loop, server_end, peer)) return 0;
  if (scenario == 1) {
    int small = 4096;
    ::setsockopt(peer.native_handle(), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    ::setsockopt(server_end.native_handle(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  }
  server.serve_socket(std::move(server_end));
  if (scenario == 3 && socket_pair(loop, second_server, second))
    server.serve_socket(std::move(second_server));
  loop.run([&]() -> Task<void> {
    if (scenario == 1)
      asio::co_spawn(loop.executor(), slow_drain(&peer), asio::detached);
    else
      asio::co_spawn(loop.executor(), fuzz::drain_replies(&peer), asio::detached);
    std::error_code ec;
    const size_t half = size / 2;
    if (scenario == 2) {
      // Small pieces, and one pause longer than the limits in the middle.
      for (size_t pos = 0; pos < size && !ec; pos += 7) {
        if (pos >= half && pos < half + 7) co_await sleep_for(5ms);
        co_await asio::async_write(peer, asio::buffer(data + pos, std::min<size_t>(7, size - pos)),
                                   asio::redirect_error(asio::use_awaitable, ec));
        co_await yield_now();
      }
    } else if (scenario == 1) {
      asio::co_spawn(loop.executor(), send_all(&peer, data, size), asio::detached);
      // Somewhere in the conversation (the middle byte says where), remove both
      // exports as block-export-del does: connections referring to them close.
      for (unsigned i = 0, n = size ? data[half] % 64 : 0; i < n; ++i) co_await yield_now();
      (void)co_await server.remove_export("");
      (void)co_await server.remove_export("ro");
    } else {
      co_await asio::async_write(peer, asio::buffer(data, size),
                                 asio::redirect_error(asio::use_awaitable, ec));
    }
    if (scenario != 1) peer.shutdown(asio::socket_base::shutdown_send, ec);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (server.connections() > 0 && std::chrono::steady_clock::now() < deadline)
      co_await sleep_for(std::chrono::microseconds(100));
    co_await server.stop();
  }());
  return 0;
}
