// QmpClient: a small blocking QMP client for `blkmirror ctl`: connects to a
// daemon's UNIX socket (or tcp:HOST:PORT), negotiates capabilities, runs
// commands and collects the events that arrive meanwhile.
//
// Threading rule: one thread; not shared.
#pragma once

#include <deque>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace blkmirror {

class QmpClient {
 public:
  using Json = nlohmann::json;

  // "PATH" or "tcp:HOST:PORT". One-line errors.
  static Result<QmpClient> connect(const std::string& where);
  QmpClient(QmpClient&& o) noexcept;
  QmpClient& operator=(QmpClient&&) = delete;
  ~QmpClient();

  // Runs a command; the error is the daemon's desc (plain), with its class kept
  // in last_error_class().
  Result<Json> execute(const std::string& command, const Json& args = Json::object());
  const std::string& last_error_class() const { return last_class_; }
  // The next event: queued ones first, else waits up to timeout_ms (-1: forever).
  std::optional<Json> next_event(int timeout_ms);
  // Waits up to timeout_ms until an event is queued (it stays queued).
  void wait_for_event(int timeout_ms);

 private:
  explicit QmpClient(int fd) : fd_(fd) {}
  // Reads one message; nullopt on timeout. Errors when the daemon hung up.
  Result<std::optional<Json>> read_message(int timeout_ms);

  int fd_ = -1;
  std::string buf_;
  std::deque<Json> events_;
  std::string last_class_;
  uint64_t next_id_ = 1;
};

}  // namespace blkmirror
