// NbdServer: serves exports of graph nodes over NBD (fixed newstyle handshake,
// structured replies, base:allocation) on UNIX sockets and TCP. Every export
// holds one Child edge to its node, shared by all its connections, so client
// I/O takes the node's write path (a running mirror sees every write) and, after
// a mirror completes, continues on the target without reconnecting.
//
// Threading rule: loop thread only. stop() must be awaited before the Graph or
// the Loop go away.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <asio.hpp>

#include "base/gate.h"
#include "base/limits.h"
#include "blockdev/graph.h"
#include "io/loop.h"

namespace blkmirror::nbd {

struct ExportConfig {
  std::string name;         // export name ("" is allowed and is also the default)
  std::string node;         // node name in the graph
  std::string description;
  bool writable = true;
};

struct Export {
  std::string name, description;
  bool writable = true;
  std::unique_ptr<Child> edge;
  Gate gate;  // held by each connection using the export
};

class Connection;

class NbdServer {
 public:
  // Payload limit advertised as the maximum block size.
  static constexpr uint32_t kMaxPayload = kMaxRequestBytes;
  // Requests a single connection may have in flight before reading pauses.
  static constexpr unsigned kMaxInFlightPerConn = 64;
  // Reply bytes a connection may have waiting for a slow reader before it stops
  // reading requests: a client that never reads cannot grow our memory.
  static constexpr uint64_t kMaxQueuedReplyBytes = 64u << 20;

  NbdServer(Loop& loop, Graph& graph) : loop_(loop), graph_(graph) {}
  ~NbdServer();

  // Errors: unknown node, duplicate export name.
  Result<void> add_export(const ExportConfig& cfg);
  // Closes the export's connections first.
  Task<Result<void>> remove_export(const std::string& name);
  Export* find_export(const std::string& name);
  Export* default_export();
  // Connections currently using the export.
  size_t clients_of(const std::string& name) const;
  const std::map<std::string, std::unique_ptr<Export>>& exports() const { return exports_; }

  // Starts listening; a stale socket file is replaced. Its mode follows the umask,
  // so clients running as other users (a VM's qemu) can be let in.
  Result<void> listen_unix(const std::string& path);
  // host "" means loopback. Port 0 picks a free port (see tcp_port()).
  Result<void> listen_tcp(const std::string& host, uint16_t port);
  uint16_t tcp_port() const { return tcp_port_; }

  // Serves one already connected socket (tests, fuzzing, socket activation).
  void serve_socket(asio::generic::stream_protocol::socket sock) { start_connection(std::move(sock)); }

  // Stops accepting, closes every connection, waits for their requests.
  Task<void> stop();
  size_t connections() const { return conns_.size(); }

 private:
  friend class Connection;
  Task<void> accept_unix(std::shared_ptr<asio::local::stream_protocol::acceptor> a);
  Task<void> accept_tcp(std::shared_ptr<asio::ip::tcp::acceptor> a);
  void start_connection(asio::generic::stream_protocol::socket sock);

  Loop& loop_;
  Graph& graph_;
  std::map<std::string, std::unique_ptr<Export>> exports_;
  std::string default_name_;
  bool has_default_ = false;
  std::vector<std::shared_ptr<asio::local::stream_protocol::acceptor>> unix_acceptors_;
  std::vector<std::shared_ptr<asio::ip::tcp::acceptor>> tcp_acceptors_;
  std::vector<std::string> socket_paths_;
  uint16_t tcp_port_ = 0;
  std::list<std::shared_ptr<Connection>> conns_;
  Gate gate_;
};

}  // namespace blkmirror::nbd
