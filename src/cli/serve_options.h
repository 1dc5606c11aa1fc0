// Where and how the CLI serves a disk over NBD (--socket, --listen, --name,
// --read-only, --handshake-limit, --max-connections), shared by `serve` and
// `mirror`.
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

  // Enough for a VM, tools with multi-conn and a few operators, while a flood
  // of connections cannot run the process out of descriptors.
  static constexpr unsigned kDefaultMaxConnections = 256;

  void add_to(CLI::App& cmd, bool with_read_only);
  nbd::ServerLimits limits() const;
  bool enabled() const { return !socket.empty() || !listen.empty(); }
  // Starts the listeners and exports node as name. One-line errors.
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
