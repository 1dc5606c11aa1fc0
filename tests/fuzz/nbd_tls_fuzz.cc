// libFuzzer target: the NBD server's TLS path (FORCEDTLS mode) fed arbitrary
// client bytes over a socketpair: the options before STARTTLS (each answered
// TLS_REQD, EXPORT_NAME hangs up), STARTTLS itself, and then whatever follows
// as TLS records, which GnuTLS's handshake parser meets through our
// non-blocking TlsStream. The server has PSK credentials (a key file written
// once per process). Built and run by scripts/fuzz; seeds in tests/fuzz/corpus/nbd_tls.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "blockdev/graph.h"
#include "blockdev/memory_device.h"
#include "fuzz_util.h"
#include "io/loop.h"
#include "nbd/server/nbd_server.h"

using namespace blkmirror;

namespace {

using Socket = asio::generic::stream_protocol::socket;

std::shared_ptr<const nbd::TlsServerCreds> creds() {
  static std::shared_ptr<const nbd::TlsServerCreds> c = [] {
    char path[] = "/tmp/blkmirror-fuzz-psk-XXXXXX";
    int fd = ::mkstemp(path);
    if (fd < 0) std::abort();
    const std::string line = "alice:00112233445566778899aabbccddeeff\n";
    if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) std::abort();
    ::close(fd);
    nbd::TlsServerConfig cfg;
    cfg.kind = nbd::TlsServerConfig::Kind::kPsk;
    cfg.psk_file = path;
    auto r = nbd::TlsServerCreds::load(cfg);
    ::unlink(path);
    if (!r) std::abort();
    return *r;
  }();
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1 << 16)) return 0;
  Loop loop(1);
  Graph graph;
  MemoryDevice::Options opts{MemoryDevice::defaults()};
  opts.yield = false;
  (void)graph.add("disk", std::make_shared<MemoryDevice>(1 << 20, opts));
  nbd::ServerLimits limits;
  limits.handshake_limit = std::chrono::seconds(2);
  nbd::NbdServer server(loop, graph, limits);
  server.set_tls(creds());
  (void)server.add_export({"", "disk", "", true});
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  asio::generic::stream_protocol proto(AF_UNIX, SOCK_STREAM);
  Socket server_end(loop.ctx(), proto, sv[0]), peer(loop.ctx(), proto, sv[1]);
  server.serve_socket(std::move(server_end));
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
