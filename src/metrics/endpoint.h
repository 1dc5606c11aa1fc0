// Endpoint: the metrics' HTTP listener (`--metrics HOST:PORT`): GET /metrics
// answers the Collector's text (Prometheus's text format 0.0.4), anything else
// 404 or 405, a malformed or oversized request 400. One request per
// connection (Connection: close), read within kRequestLimit; at most
// kMaxClients scrapes at once, others are closed at once. It binds loopback
// unless given another address.
//
// Threading rule: loop thread only; stop() before the Loop goes away.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "base/gate.h"
#include "io/listener.h"
#include "io/loop.h"

namespace blkmirror::metrics {

class Endpoint {
 public:
  static constexpr std::chrono::seconds kRequestLimit{5};
  static constexpr size_t kMaxRequestBytes = 8192;
  static constexpr unsigned kMaxClients = 16;

  Endpoint(Loop& loop, std::function<std::string()> render)
      : loop_(loop), render_(std::move(render)) {}
  ~Endpoint();
  // host "" means 127.0.0.1. One-line errors.
  Result<void> listen(const std::string& host, uint16_t port);
  uint16_t port() const { return listener_ ? listener_->port() : 0; }
  Task<void> stop();

 private:
  Task<void> serve(Listener::Socket s, Gate::Holder hold);
  Loop& loop_;
  std::function<std::string()> render_;
  std::unique_ptr<Listener> listener_;
  Gate clients_;
  unsigned active_ = 0;
};

}  // namespace blkmirror::metrics
