// Listener: one listening socket (a UNIX socket path or a TCP address) and its
// accept loop, for every server of the house (NBD, QMP). Each accepted
// connection is handed to on_accept as a generic stream socket.
//
// - A UNIX socket path is never taken from a live server: a socket file that
//   still accepts connections is refused ("PATH is in use by another process");
//   only a stale one (nobody listening) is replaced, and anything that is not a
//   socket is refused. close() removes the file only while it is still ours.
// - Accept errors never spin: when the process runs out of descriptors or
//   memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the loop waits kBackoff before the
//   next try, so the clients already connected get the CPU and can hang up;
//   errors that belong to one connection (ECONNABORTED, EPROTO, ...) are skipped.
//
// Threading rule: loop thread only. on_accept runs on the loop and is never
// called after close() (or destruction).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <asio.hpp>

#include "base/result.h"
#include "base/task.h"

namespace blkmirror {

class Listener {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  using OnAccept = std::function<void(Socket)>;

  // How long the accept loop rests after a resource error (EMFILE and friends).
  static constexpr std::chrono::milliseconds kBackoff{100};

  // Binds and listens at path and starts accepting. With mode, the socket gets
  // exactly that mode from the moment it exists; without, it follows the umask.
  // One-line errors naming the path.
  static Result<std::unique_ptr<Listener>> unix_socket(asio::io_context& ctx,
                                                       const std::string& path,
                                                       std::optional<mode_t> mode,
                                                       OnAccept on_accept);
  // host is a numeric IPv4 or IPv6 address (no brackets); port 0 picks a free
  // port (see port()). Accepted TCP sockets get TCP_NODELAY.
  static Result<std::unique_ptr<Listener>> tcp(asio::io_context& ctx, const std::string& host,
                                               uint16_t port, OnAccept on_accept);

  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  // Stops accepting and closes the socket; a UNIX socket file is removed if it
  // is still the one we bound. Idempotent.
  void close();

  uint16_t port() const;             // TCP: the bound port
  const std::string& where() const;  // the path, or HOST:PORT
  uint64_t resource_errors() const;  // accept errors that made the loop back off

 private:
  struct State;
  explicit Listener(std::shared_ptr<State> st);
  static Task<void> accept_loop(std::shared_ptr<State> st);

  std::shared_ptr<State> st_;
};

}  // namespace blkmirror
