// libFuzzer target: the whole NBD server (handshake, option parsing, request
// decoding, validation, dispatch) fed arbitrary client bytes over a socketpair.
// Built by the CMake preset `fuzz` (clang); scripts/fuzz builds and runs it; the
// seed corpus is tests/fuzz/corpus/nbd.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "blockdev/graph.h"
#include "blockdev/memory_device.h"
#include "fuzz_util.h"
#include "io/loop.h"
#include "nbd/server/nbd_server.h"

using namespace blkmirror;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1 << 16)) return 0;
  Loop loop(1);
  Graph graph;
  MemoryDevice::Options opts{MemoryDevice::defaults()};
  opts.yield = false;
  (void)graph.add("disk", std::make_shared<MemoryDevice>(1 << 20, opts));
  nbd::NbdServer server(loop, graph);
  (void)server.add_export({"", "disk", "", true});
  (void)server.add_export({"ro", "disk", "read-only view", false});
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  asio::generic::stream_protocol proto(AF_UNIX, SOCK_STREAM);
  server.serve_socket(asio::generic::stream_protocol::socket(loop.ctx(), proto, sv[0]));
  asio::generic::stream_protocol::socket peer(loop.ctx(), proto, sv[1]);
  loop.run([&]() -> Task<void> {
    asio::co_spawn(loop.executor(), fuzz::drain_replies(&peer), asio::detached);
    std::error_code ec;
    co_await asio::async_write(peer, asio::buffer(data, size),
                               asio::redirect_error(asio::use_awaitable, ec));
    peer.shutdown(asio::socket_base::shutdown_send, ec);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (server.connections() > 0 && std::chrono::steady_clock::now() < deadline)
      co_await sleep_for(std::chrono::microseconds(100));
    co_await server.stop();
  }());
  return 0;
}
