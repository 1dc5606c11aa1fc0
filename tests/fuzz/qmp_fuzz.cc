// libFuzzer target: the QMP server and dispatcher (line framing, JSON parsing,
// negotiation, argument checking, every command) fed arbitrary client bytes
// over a socketpair. Files are confined to a scratch directory (--file-root),
// so blockdev-add/blockdev-create cannot touch anything else. Built by the
// CMake preset `fuzz` (scripts/fuzz builds and runs it); seeds in tests/fuzz/corpus/qmp.
//
// Beyond crashes, the target fails (aborts) when a request line gets no reply:
// every complete non-blank line must be answered, whatever it holds (a number
// beyond double range once hung the session silently). And since a 64 KiB
// input cannot nest deep enough to hurt, the bytes 0x01, 0x02 and 0x03 stand
// for nested arrays just within the limit (1023 levels), just beyond it (1025)
// and far beyond it (60,000, which once overflowed the stack): the seeds put
// them inside every field (id, execute, arguments, a member, a nested member).
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

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

// The input with 0x01/0x02/0x03 replaced by nested arrays (see above), up to
// 900 KB in all (below the line limit, so every line is parsed).
std::string expand_nesting(const uint8_t* data, size_t size) {
  std::string out;
  for (size_t i = 0; i < size; ++i) {
    size_t depth = data[i] == 0x01 ? 1023 : data[i] == 0x02 ? 1025 : data[i] == 0x03 ? 60000 : 0;
    if (depth > 0 && out.size() + 2 * depth < 900'000) {
      out.append(depth, '[');
      out.append(depth, ']');
    } else {
      out += static_cast<char>(data[i]);
    }
  }
  return out;
}

// Complete lines with something besides blanks: each must get exactly one reply.
size_t request_lines(const std::string& in) {
  size_t n = 0, start = 0;
  for (size_t nl; (nl = in.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string_view line(in.data() + start, nl - start);
    if (line.find_first_not_of(" \t\r") != std::string_view::npos) ++n;
  }
  return n;
}

// Reads the server's output and counts replies (objects with "return" or
// "error"; the greeting and events do not count).
Task<void> count_replies(asio::generic::stream_protocol::socket* s, size_t* replies) {
  std::vector<char> buf(1 << 16);
  std::string pending;
  for (;;) {
    std::error_code ec;
    size_t n = co_await s->async_read_some(asio::buffer(buf),
                                           asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    pending.append(buf.data(), n);
    for (size_t nl; (nl = pending.find('\n')) != std::string::npos; pending.erase(0, nl + 1)) {
      auto j = nlohmann::json::parse(std::string_view(pending.data(), nl), nullptr, false);
      if (!j.is_discarded() && j.is_object() && (j.contains("return") || j.contains("error")))
        ++*replies;
    }
  }
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
  const std::string input = expand_nesting(data, size);
  size_t replies = 0;
  bool session_ended = false;
  loop.run([&]() -> Task<void> {
    asio::co_spawn(loop.executor(), count_replies(&peer, &replies), asio::detached);
    std::error_code ec;
    co_await asio::async_write(peer, asio::buffer(input),
                               asio::redirect_error(asio::use_awaitable, ec));
    peer.shutdown(asio::socket_base::shutdown_send, ec);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (server.sessions() > 0 && std::chrono::steady_clock::now() < deadline)
      co_await sleep_for(std::chrono::microseconds(200));
    session_ended = server.sessions() == 0;
    // The session flushed its replies before closing; let the reader see them.
    while (peer.is_open() && std::chrono::steady_clock::now() < deadline) {
      if (peer.available(ec) == 0 && replies >= request_lines(input)) break;
      co_await sleep_for(std::chrono::microseconds(200));
    }
    (void)co_await daemon.shutdown();
    co_await server.stop();
  }());
  size_t expected = request_lines(input);
  if (!session_ended || replies != expected) {
    std::fprintf(stderr, "qmp_fuzz: %zu request lines, %zu replies, session %s\n", expected,
                 replies, session_ended ? "ended" : "still open after its input ended");
    std::abort();
  }
  // Images made by blockdev-create must not pile up across runs.
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator(scratch_dir(), ec))
    std::filesystem::remove_all(e.path(), ec);
  return 0;
}
