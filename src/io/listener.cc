#include "io/listener.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/host_port.h"

namespace blkmirror {

using Acceptor = asio::basic_socket_acceptor<asio::generic::stream_protocol>;

struct Listener::State {
  State(asio::io_context& ctx, OnAccept cb)
      : acceptor(ctx), backoff(ctx), on_accept(std::move(cb)) {}
  Acceptor acceptor;
  asio::steady_timer backoff;
  OnAccept on_accept;
  bool open = true;
  bool tcp = false;
  std::string where;
  uint16_t port = 0;
  // The socket file we bound, so close() removes it only while it is ours (a
  // later server may have replaced it).
  std::string path;
  dev_t dev = 0;
  ino_t ino = 0;
  uint64_t resource_errors = 0;
};

namespace {

// Errors of the process, not of the connection: accepting again at once fails
// the same way, so rest.
bool is_resource_error(const std::error_code& ec) {
  int e = ec.value();
  return ec.category() == asio::error::get_system_category() &&
         (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM);
}

// Errors that belong to one connection that went away before we took it.
bool is_connection_error(const std::error_code& ec) {
  int e = ec.value();
  return ec.category() == asio::error::get_system_category() &&
         (e == ECONNABORTED || e == EPROTO || e == EPERM || e == EINTR || e == EAGAIN ||
          e == ENETDOWN || e == ENOPROTOOPT || e == EHOSTDOWN || e == ENONET || e == EHOSTUNREACH ||
          e == EOPNOTSUPP || e == ENETUNREACH);
}

// What is at path: nothing (fine), a stale socket (removed), a live socket or
// anything else (refused).
Result<void> clear_stale_socket(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return make_plain_error(errno, fmt::format("{}: {}", path, std::strerror(errno)));
  }
  if (!S_ISSOCK(st.st_mode))
    return make_plain_error(EEXIST, fmt::format("{}: exists and is not a socket", path));
  // A socket file: is anybody listening? Non-blocking, so a server with a full
  // backlog answers EAGAIN (in use) instead of blocking us.
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return make_plain_error(errno, fmt::format("{}: socket: {}", path, std::strerror(errno)));
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
  int err = rc == 0 ? 0 : errno;
  ::close(fd);
  if (err == 0 || err == EAGAIN || err == EINPROGRESS)
    return make_plain_error(EADDRINUSE, fmt::format("{} is in use by another process", path));
  if (err == ENOENT) return {};  // removed meanwhile
  if (err != ECONNREFUSED)
    return make_plain_error(err, fmt::format("{}: cannot tell whether the socket is in use: {}",
                                             path, std::strerror(err)));
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return make_plain_error(
        errno, fmt::format("{}: cannot remove the stale socket: {}", path, std::strerror(errno)));
  return {};
}

}  // namespace

Listener::Listener(std::shared_ptr<State> st) : st_(std::move(st)) {}

Listener::~Listener() { close(); }

uint16_t Listener::port() const { return st_->port; }
const std::string& Listener::where() const { return st_->where; }
uint64_t Listener::resource_errors() const { return st_->resource_errors; }

Result<std::unique_ptr<Listener>> Listener::unix_socket(asio::io_context& ctx,
                                                        const std::string& path,
                                                        std::optional<mode_t> mode,
                                                        OnAccept on_accept) {
  if (path.empty()) return make_plain_error(EINVAL, "empty socket path");
  if (path.size() >= sizeof(sockaddr_un::sun_path))
    return make_plain_error(ENAMETOOLONG, fmt::format("{}: socket path longer than {} bytes", path,
                                                      sizeof(sockaddr_un::sun_path) - 1));
  if (auto r = clear_stale_socket(path); !r) return make_error(r.error());
  auto st = std::make_shared<State>(ctx, std::move(on_accept));
  st->where = path;
  std::error_code ec;
  st->acceptor.open(asio::generic::stream_protocol(AF_UNIX, 0), ec);
  // The umask makes the socket no more open than `mode` from the moment it
  // exists; chmod then sets it exactly.
  mode_t old = mode ? ::umask(static_cast<mode_t>(~*mode & 0777)) : 0;
  if (!ec) st->acceptor.bind(asio::local::stream_protocol::endpoint(path), ec);
  if (mode) ::umask(old);
  if (!ec) {
    st->path = path;
    struct stat sb {};
    if (::lstat(path.c_str(), &sb) == 0) {
      st->dev = sb.st_dev;
      st->ino = sb.st_ino;
    }
  }
  if (!ec && mode && ::chmod(path.c_str(), *mode) < 0)
    ec = std::error_code(errno, std::generic_category());
  if (!ec) st->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    auto err =
        make_plain_error(ec.value(), fmt::format("cannot listen on {}: {}", path, ec.message()));
    Listener failed(st);  // closes, and removes the file if we made it
    return err;
  }
  asio::co_spawn(ctx, accept_loop(st), asio::detached);
  return std::unique_ptr<Listener>(new Listener(std::move(st)));
}

Result<std::unique_ptr<Listener>> Listener::tcp(asio::io_context& ctx, const std::string& host,
                                                uint16_t port, OnAccept on_accept) {
  std::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec)
    return make_plain_error(EINVAL,
                            fmt::format("invalid listen address '{}' (expected a numeric IPv4 "
                                        "or IPv6 address)",
                                        host));
  asio::ip::tcp::endpoint ep(addr, port);
  auto st = std::make_shared<State>(ctx, std::move(on_accept));
  st->tcp = true;
  st->acceptor.open(asio::generic::stream_protocol(ep.protocol().family(), IPPROTO_TCP), ec);
  if (!ec) st->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) st->acceptor.bind(asio::generic::stream_protocol::endpoint(ep), ec);
  if (!ec) st->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (!ec) {
    auto local = st->acceptor.local_endpoint(ec);
    if (!ec) {
      const sockaddr* sa = local.data();
      st->port = sa->sa_family == AF_INET6
                     ? ntohs(reinterpret_cast<const sockaddr_in6*>(sa)->sin6_port)
                     : ntohs(reinterpret_cast<const sockaddr_in*>(sa)->sin_port);
    }
  }
  if (ec) {
    std::error_code ignore;
    st->acceptor.close(ignore);
    return make_plain_error(
        ec.value(), fmt::format("cannot listen on {}: {}", format_host_port(addr.to_string(), port),
                                ec.message()));
  }
  st->where = format_host_port(addr.to_string(), st->port);
  asio::co_spawn(ctx, accept_loop(st), asio::detached);
  return std::unique_ptr<Listener>(new Listener(std::move(st)));
}

void Listener::close() {
  State& s = *st_;
  if (!s.open) return;
  s.open = false;
  std::error_code ec;
  s.acceptor.close(ec);
  s.backoff.cancel();
  if (!s.path.empty()) {
    struct stat sb {};
    if (::lstat(s.path.c_str(), &sb) == 0 && sb.st_dev == s.dev && sb.st_ino == s.ino)
      ::unlink(s.path.c_str());
    s.path.clear();
  }
}

Task<void> Listener::accept_loop(std::shared_ptr<State> st) {
  bool resting = false;  // in a run of resource errors: warned once
  while (st->open) {
    std::error_code ec;
    auto sock = co_await st->acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (!st->open) co_return;  // closed meanwhile: a socket accepted just now closes here
    if (!ec) {
      if (resting) spdlog::info("accepting connections on {} again", st->where);
      resting = false;
      if (st->tcp) sock.set_option(asio::ip::tcp::no_delay(true), ec);
      st->on_accept(std::move(sock));
      continue;
    }
    if (ec == asio::error::operation_aborted) co_return;
    if (is_connection_error(ec)) continue;
    // Out of descriptors or memory, or an error we do not know: accepting again
    // at once would fail the same way and spin. Rest, so connected clients get
    // the CPU (and can hang up, which frees descriptors).
    ++st->resource_errors;
    if (!resting)
      spdlog::warn("accept on {}: {}; retrying every {} ms{}", st->where, ec.message(),
                   kBackoff.count(),
                   is_resource_error(ec) ? " while the process is out of resources" : "");
    resting = true;
    st->backoff.expires_after(kBackoff);
    co_await st->backoff.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
}

}  // namespace blkmirror
