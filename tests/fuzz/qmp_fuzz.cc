// libFuzzer target: the QMP server and dispatcher (line framing, JSON parsing,
// negotiation, argument checking, every command) fed arbitrary client bytes
// over a socketpair. Files are confined to a scratch directory (--file-root),
// so blockdev-add/blockdev-create cannot touch anything else. Built by the
// CMake preset `fuzz` (scripts/fuzz builds and runs it); seeds in tests/fuzz/corpus/qmp.
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "fuzz_util.h"
#include "io/loop.h"
#include "qmp/daemon.h"
#include "qmp/qmp_server.h"

using namespace blkmirror;

namespace {

const std::string& scratch_dir() {
  static std::string dir = [] {
    char tmpl[] = "/tmp/blkmirror-qmp-fuzz-XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    return std::string(d ? d : "/nonexistent");
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1 << 16)) return 0;
  Loop loop(2);
  qmp::Daemon daemon(loop, qmp::DaemonOptions{scratch_dir()});
  qmp::QmpServer server(loop, daemon);
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  asio::generic::stream_protocol proto(AF_UNIX, SOCK_STREAM);
  server.serve_socket(asio::generic::stream_protocol::socket(loop.ctx(), proto, sv[0]));
  asio::generic::stream_protocol::socket peer(loop.ctx(), proto, sv[1]);
  loop.run([&]() -> Task<void> {
    asio::co_spawn(loop.executor(), fuzz::drain_replies(&peer), asio::detached);
    std::error_code ec;
    co_await asio::async_write(peer, asio::buffer(data, size), asio::redirect_error(asio::use_awaitable, ec));
    peer.shutdown(asio::socket_base::shutdown_send, ec);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (server.sessions() > 0 && std::chrono::steady_clock::now() < deadline)
      co_await sleep_for(std::chrono::microseconds(200));
    (void)co_await daemon.shutdown();
    co_await server.stop();
  }());
  // Images made by blockdev-create must not pile up across runs.
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator(scratch_dir(), ec)) std::filesystem::remove_all(e.path(), ec);
  return 0;
}
