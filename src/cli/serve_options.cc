#include "cli/serve_options.h"

#include <asio/experimental/as_tuple.hpp>
#include <fmt/format.h>

#include <csignal>

#include "base/host_port.h"

namespace blkmirror {

void ServeOptions::add_to(CLI::App& cmd, bool with_read_only) {
  cmd.add_option("--socket", socket, "serve over NBD on this UNIX socket");
  cmd.add_option("--listen", listen, "serve over NBD on TCP HOST:PORT (loopback unless given)");
  cmd.add_option("--name", name, "NBD export name (default: empty, the default export)");
  if (with_read_only) cmd.add_flag("--read-only", read_only, "refuse writes");
  cmd.add_option("--handshake-limit", handshake_limit,
                 "seconds a client has to finish the NBD handshake (0: no limit)")
      ->capture_default_str();
  cmd.add_option("--max-connections", max_connections, "NBD clients at once (0: unlimited)")
      ->capture_default_str();
}

nbd::ServerLimits ServeOptions::limits() const {
  nbd::ServerLimits l;
  l.max_connections = max_connections;
  l.handshake_limit = std::chrono::seconds(handshake_limit);
  return l;
}

Result<void> ServeOptions::start(nbd::NbdServer& server, const std::string& node) const {
  std::optional<HostPort> tcp;
  if (!listen.empty()) {
    auto hp = parse_host_port(listen);
    if (!hp)
      return make_plain_error(EINVAL,
                              fmt::format("--listen '{}': {}", listen, hp.error().message()));
    tcp = *hp;
  }
  // qemu:allocation-depth is always offered here: the CLI has no option
  // surface for it, and a client that does not ask for it never sees it.
  nbd::ExportConfig cfg{name, node, "", !read_only, /*allocation_depth=*/true};
  if (auto r = server.add_export(cfg); !r) return r;
  if (!socket.empty())
    if (auto r = server.listen_unix(socket); !r) return r;
  if (tcp)
    if (auto r = server.listen_tcp(tcp->host, *tcp->port); !r) return r;
  return {};
}

std::string ServeOptions::where(const nbd::NbdServer& server) const {
  std::string out;
  if (!socket.empty()) out += fmt::format("nbd+unix:///{}?socket={}", name, socket);
  if (!listen.empty()) {
    if (!out.empty()) out += " and ";
    auto hp = parse_host_port(listen);  // accepted by start()
    std::string host = hp && !hp->host.empty() ? hp->host : "127.0.0.1";
    out += fmt::format("nbd://{}/{}", format_host_port(host, server.tcp_port()), name);
  }
  return out;
}

Task<int> wait_signal(Loop& loop, std::vector<int> sigs) {
  asio::signal_set set(loop.ctx());
  for (int s : sigs) set.add(s);
  auto [ec, sig] = co_await set.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
  co_return ec ? 0 : sig;
}

}  // namespace blkmirror

namespace blkmirror {

Task<int> wait_stop_signal(Loop& loop) {
  std::vector<int> sigs{SIGINT, SIGTERM};  // GCC 12 rule 3 (base/task.h)
  co_return co_await wait_signal(loop, sigs);
}

Task<Result<void>> stop_and_flush(nbd::NbdServer& server, Graph& graph) {
  co_await server.stop();
  Result<void> first;
  for (Node* n : graph.nodes()) {
    auto f = co_await n->device().flush();
    if (!f && first) first = f;
  }
  co_return first;
}

}  // namespace blkmirror
