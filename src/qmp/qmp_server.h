// QmpServer: the QMP wire. Listens on a UNIX socket (mode 0600) and optionally
// on TCP loopback, greets each client, holds it to capabilities negotiation,
// reads one JSON request per line (lines over kMaxLine are refused and skipped),
// runs the requests of one client in order through the Daemon, and sends every
// event to each client past negotiation. A client that stops reading is dropped
// once its queued output passes a bound, so it cannot grow the daemon's memory.
//
// Threading rule: loop thread only. stop() must be awaited before destruction.
#pragma once

#include <list>
#include <memory>
#include <string>
#include <vector>

#include <asio.hpp>

#include "base/gate.h"
#include "io/listener.h"
#include "io/loop.h"
#include "qmp/daemon.h"

namespace blkmirror::qmp {

class Session;

class QmpServer {
 public:
  // Output a slow client may have queued before it is disconnected.
  static constexpr size_t kMaxQueuedOutput = 16u << 20;

  QmpServer(Loop& loop, Daemon& daemon);
  ~QmpServer();

  // One-line errors naming the path or address.
  Result<void> listen_unix(const std::string& path);
  // Loopback addresses only: QMP has no authentication.
  Result<void> listen_tcp(const std::string& host, uint16_t port);
  uint16_t tcp_port() const { return tcp_port_; }
  // Serves an already-connected socket (tests, the fuzz target).
  void serve_socket(asio::generic::stream_protocol::socket sock);

  // Sends an event to every negotiated client.
  void broadcast(const std::string& name, const Json& data);
  size_t sessions() const { return sessions_.size(); }
  Task<void> stop();

 private:
  friend class Session;
  Loop& loop_;
  Daemon& daemon_;
  std::vector<std::unique_ptr<Listener>> listeners_;  // io/listener.h: accept loop, socket file
  uint16_t tcp_port_ = 0;
  std::list<std::shared_ptr<Session>> sessions_;
  Gate gate_;
};

}  // namespace blkmirror::qmp
