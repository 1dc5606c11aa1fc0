// NbdServer: serves exports of graph nodes over NBD (fixed newstyle handshake,
// structured replies, base:allocation, qemu:allocation-depth) on UNIX sockets and TCP. Every export
// holds one Child edge to its node, shared by all its connections, so client
// I/O takes the node's write path (a running mirror sees every write) and, after
// a mirror completes, continues on the target without reconnecting.
//
// Exports are shared-owned: a connection that refers to one (while answering an
// option about it in the handshake, or in transmission) holds an ExportRef, so
// the export outlives every connection that can still touch it, counts as a
// client of it (clients_of, `block-export-del` safe), and is closed first when
// the export is removed.
//
// Threading rule: loop thread only. stop() must be awaited before the Graph or
// the Loop go away.
#pragma once

#include <array>
#include <asio.hpp>
#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/gate.h"
#include "base/limits.h"
#include "base/op_stats.h"
#include "blockdev/graph.h"
#include "io/listener.h"
#include "io/loop.h"
#include "nbd/server/tls.h"

namespace blkmirror::nbd {

struct ExportConfig {
  std::string name;  // export name ("" is allowed and is also the default)
  std::string node;  // node name in the graph
  std::string description;
  bool writable = true;
  // Offer the qemu:allocation-depth meta context (QEMU's allocation-depth
  // export option; off by default there too).
  bool allocation_depth = false;
  // Dirty bitmaps offered as qemu:dirty-bitmap:NAME meta contexts (QEMU's
  // `bitmaps`): a bare name is looked up on the node and down its backing
  // chain; {node, name} names the node, which must be the export's node or in
  // its backing chain. Each is busy while the export exists.
  struct BitmapRef {
    std::string node;  // "" for a bare name
    std::string name;
  };
  std::vector<BitmapRef> bitmaps;
};

struct Export {
  std::string name, description;
  bool writable = true;
  bool allocation_depth = false;
  // Exported dirty bitmaps: meta context id kMetaIdFirstBitmap + index. Marked
  // busy by add_export; the destructor unmarks them (the nodes holding them
  // outlive the export: they are its node or below it, held through edge).
  std::vector<NamedBitmap*> bitmaps;
  std::unique_ptr<Child> edge;
  ~Export() {
    for (NamedBitmap* b : bitmaps) b->busy = false;
  }
  Gate gate;  // held by each ExportRef: closed and waited for by remove_export

  // For the metrics endpoint: requests by NBD command (bytes: the request's
  // length), requests running now, and clients that ever chose the export.
  static constexpr const char* kCommands[] = {"read", "write", "disc",         "flush",
                                              "trim", "cache", "write_zeroes", "block_status"};
  std::array<OpStats, std::size(kCommands)> stats{};
  uint64_t in_flight = 0;
  uint64_t connections_total = 0;
  OpStats* stats_for(uint16_t cmd) { return cmd < stats.size() ? &stats[cmd] : nullptr; }
};

// A connection's hold on an export: keeps it alive and counted while held.
struct ExportRef {
  std::shared_ptr<Export> exp;
  Gate::Holder hold;
  explicit operator bool() const { return exp != nullptr; }
  Export* operator->() const { return exp.get(); }
  Export& operator*() const { return *exp; }
  Export* get() const { return exp.get(); }
};

// What the server allows its clients (CLI options, nbd-server-start arguments).
struct ServerLimits {
  // Connections at once; 0 = unlimited. A connection beyond it is closed at
  // once, before the greeting. 1 also stops advertising multi-conn (as QEMU).
  uint32_t max_connections = 0;
  // Time from accept to the end of the handshake (NBD_OPT_GO or
  // NBD_OPT_EXPORT_NAME answered); a client still negotiating is disconnected.
  // Zero: no limit. qemu-nbd's --handshake-limit, default 10 s.
  std::chrono::milliseconds handshake_limit{std::chrono::seconds(10)};
  // Time a write payload may go without a byte arriving before the connection
  // is closed: a stalled payload must not hold its buffer forever.
  std::chrono::milliseconds payload_stall_limit{std::chrono::seconds(30)};
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
  // Memory a connection may hold before its handshake completes: its read
  // buffer plus one option's data. An idle or slow client costs at most this.
  static constexpr size_t kHandshakeReadBuffer = 4u << 10;
  static constexpr size_t kMaxOptionData = 12u << 10;
  // The read buffer once in transmission: one recv brings many request headers.
  static constexpr size_t kTransmissionReadBuffer = 256u << 10;

  NbdServer(Loop& loop, Graph& graph, ServerLimits limits = {})
      : loop_(loop), graph_(graph), limits_(limits) {}
  ~NbdServer();

  const ServerLimits& limits() const { return limits_; }
  // TLS required for every client from now on (nullptr: plain NBD). Clients
  // already connected keep what they negotiated.
  void set_tls(std::shared_ptr<const TlsServerCreds> creds) { tls_ = std::move(creds); }
  const std::shared_ptr<const TlsServerCreds>& tls() const { return tls_; }

  // Errors: unknown node, duplicate export name.
  Result<void> add_export(const ExportConfig& cfg);
  // Closes the connections referring to the export first, then waits for them.
  Task<Result<void>> remove_export(const std::string& name);
  Export* find_export(const std::string& name);
  // A hold on the export named name ("" = the default export), or an empty
  // ref when there is none or it is being removed.
  ExportRef acquire_export(const std::string& name);
  // Connections referring to the export now (in the handshake or transmission).
  size_t clients_of(const std::string& name) const;
  // Names and descriptions, copied (NBD_OPT_LIST sends them across suspensions).
  std::vector<std::pair<std::string, std::string>> export_list() const;
  const std::map<std::string, std::shared_ptr<Export>>& exports() const { return exports_; }

  // Starts listening; a stale socket file is replaced, a live one refused. Its
  // mode follows the umask, so clients running as other users (a VM's qemu)
  // can be let in.
  Result<void> listen_unix(const std::string& path);
  // host "" means loopback. Port 0 picks a free port (see tcp_port()).
  Result<void> listen_tcp(const std::string& host, uint16_t port);
  uint16_t tcp_port() const { return tcp_port_; }

  // Serves one already connected socket (tests, fuzzing, socket activation).
  void serve_socket(asio::generic::stream_protocol::socket sock) {
    start_connection(std::move(sock));
  }

  // Stops accepting, closes every connection, waits for their requests.
  Task<void> stop();
  size_t connections() const { return conns_.size(); }
  // Connections closed at once because max_connections was reached.
  uint64_t refused() const { return refused_; }

 private:
  Result<std::vector<NamedBitmap*>> find_bitmaps(Node& node, const ExportConfig& cfg,
                                                 bool writable);
  friend class Connection;
  void start_connection(asio::generic::stream_protocol::socket sock);
  Export* default_export();

  Loop& loop_;
  Graph& graph_;
  ServerLimits limits_;
  std::shared_ptr<const TlsServerCreds> tls_;
  std::map<std::string, std::shared_ptr<Export>> exports_;
  std::string default_name_;
  bool has_default_ = false;
  std::vector<std::unique_ptr<Listener>> listeners_;
  uint16_t tcp_port_ = 0;
  std::list<std::shared_ptr<Connection>> conns_;
  uint64_t refused_ = 0;
  Gate gate_;
};

}  // namespace blkmirror::nbd
