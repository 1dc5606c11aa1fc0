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
  auto* creds = cmd.add_option("--tls-creds", tls_creds,
                               "require TLS: X.509 directory with server-cert.pem, "
                               "server-key.pem (and ca-cert.pem for --tls-verify-peer)");
  auto* psk = cmd.add_option("--tls-psk", tls_psk,
                             "require TLS with pre-shared keys: a keys.psk file of "
                             "username:hexkey lines");
  creds->excludes(psk);
  cmd.add_flag("--tls-verify-peer", tls_verify_peer,
               "X.509: refuse clients without a certificate signed by ca-cert.pem")
      ->needs(creds);
  cmd.add_option("--tls-authz", tls_authz,
                 "allow only this client (certificate DN such as 'CN=client', or PSK "
                 "username); repeat for more");
  cmd.add_flag("--insecure", insecure,
               "serve plain NBD on a TCP address other than loopback (no TLS)");
}

nbd::ServerLimits ServeOptions::limits() const {
  nbd::ServerLimits l;
  l.max_connections = max_connections;
  l.handshake_limit = std::chrono::seconds(handshake_limit);
  return l;
}

namespace {

// Loopback addresses (and "", which listen_tcp binds to loopback): only this
// machine reaches them, so plain text crosses no network.
bool is_loopback(const std::string& host) {
  if (host.empty() || host == "localhost") return true;
  std::error_code ec;
  auto a = asio::ip::make_address(host, ec);
  return !ec && a.is_loopback();
}

}  // namespace

Result<void> ServeOptions::start(nbd::NbdServer& server, const std::string& node) const {
  std::optional<HostPort> tcp;
  if (!listen.empty()) {
    auto hp = parse_host_port(listen);
    if (!hp)
      return make_plain_error(EINVAL,
                              fmt::format("--listen '{}': {}", listen, hp.error().message()));
    tcp = *hp;
  }
  const bool tls = !tls_creds.empty() || !tls_psk.empty();
  if (!tls && !tls_authz.empty())
    return make_plain_error(EINVAL, "--tls-authz needs --tls-creds or --tls-psk");
  if (tcp && !tls && !is_loopback(tcp->host)) {
    if (!insecure)
      return make_plain_error(
          EINVAL, fmt::format("--listen '{}': plain NBD on an address other than loopback: "
                              "give --tls-creds or --tls-psk, or --insecure",
                              listen));
    fmt::print(stderr, "blkmirror: warning: serving plain NBD without TLS on {}\n", listen);
  }
  if (tls) {
    nbd::TlsServerConfig cfg;
    cfg.kind = tls_psk.empty() ? nbd::TlsServerConfig::Kind::kX509
                               : nbd::TlsServerConfig::Kind::kPsk;
    cfg.dir = tls_creds;
    cfg.psk_file = tls_psk;
    cfg.verify_peer = tls_verify_peer;
    if (!tls_authz.empty()) {
      nbd::TlsAuthz authz;
      for (const auto& who : tls_authz) authz.rules.push_back({who, true, false});
      cfg.authz = std::move(authz);
    }
    auto creds = nbd::TlsServerCreds::load(cfg);
    if (!creds) return tl::unexpected(creds.error());
    server.set_tls(std::move(*creds));
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
  const char* scheme = server.tls() ? "nbds" : "nbd";  // libnbd's URIs for TLS
  if (!socket.empty()) out += fmt::format("{}+unix:///{}?socket={}", scheme, name, socket);
  if (!listen.empty()) {
    if (!out.empty()) out += " and ";
    auto hp = parse_host_port(listen);  // accepted by start()
    std::string host = hp && !hp->host.empty() ? hp->host : "127.0.0.1";
    out += fmt::format("{}://{}/{}", scheme, format_host_port(host, server.tcp_port()), name);
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
