// Where and how the CLI serves a disk over NBD (--socket, --listen, --name,
// --read-only, --handshake-limit, --max-connections, TLS: --tls-creds,
// --tls-psk, --tls-verify-peer, --tls-authz, --insecure), shared by `serve`,
// `mirror` and `commit`.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "io/loop.h"
#include "nbd/server/nbd_server.h"

namespace blkmirror {

struct ServeOptions {
  std::string socket;  // UNIX socket path
  std::string listen;  // HOST:PORT, [IPv6]:PORT or :PORT (loopback)
  std::string name;    // export name
  bool read_only = false;
  unsigned handshake_limit = 10;  // seconds; 0 = none (qemu-nbd's --handshake-limit)
  unsigned max_connections = kDefaultMaxConnections;  // 0 = unlimited
  std::string tls_creds;                // X.509 directory (QEMU's file names)
  std::string tls_psk;                  // keys.psk
  bool tls_verify_peer = false;         // X.509: require a client certificate from the CA
  std::vector<std::string> tls_authz;   // clients allowed (DN or PSK username); empty: all
  bool insecure = false;                // plain TCP on a non-loopback address, knowingly

  // Enough for a VM, tools with multi-conn and a few operators, while a flood
  // of connections cannot run the process out of descriptors.
  static constexpr unsigned kDefaultMaxConnections = 256;

  void add_to(CLI::App& cmd, bool with_read_only);
  nbd::ServerLimits limits() const;
  bool enabled() const { return !socket.empty() || !listen.empty(); }
  // Starts the listeners and exports node as name, with TLS when asked for.
  // Plain TCP on an address other than loopback needs --insecure. One-line errors.
  Result<void> start(nbd::NbdServer& server, const std::string& node) const;
  std::string where(const nbd::NbdServer& server) const;
};

// Waits for one of the given signals; returns its number.
Task<int> wait_signal(Loop& loop, std::vector<int> sigs);
// Waits for SIGINT or SIGTERM; returns which.
Task<int> wait_stop_signal(Loop& loop);

// Stops the server (connections closed, requests finished), then flushes every
// node of the graph. Returns the first flush error, after trying them all.
Task<Result<void>> stop_and_flush(nbd::NbdServer& server, Graph& graph);

}  // namespace blkmirror
