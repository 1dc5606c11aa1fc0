#include "cli/qmp_client.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "base/host_port.h"

namespace blkmirror {

namespace {

Result<int> connect_unix(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof(sa.sun_path))
    return make_plain_error(ENAMETOOLONG, fmt::format("{}: socket path too long", path));
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_error(errno, "socket");
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0) {
    int e = errno;
    ::close(fd);
    return make_plain_error(
        e, fmt::format("cannot connect to the daemon at {}: {}", path, std::strerror(e)));
  }
  return fd;
}

Result<int> connect_tcp(const std::string& hostport) {
  auto hp = parse_host_port(hostport, HostPortRules{.port_zero_ok = false});
  if (!hp)
    return make_plain_error(EINVAL, fmt::format("tcp:{}: {}", hostport, hp.error().message()));
  std::string host = hp->host.empty() ? "127.0.0.1" : hp->host, port = std::to_string(*hp->port);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    return make_plain_error(EINVAL, fmt::format("{}: {}", hostport, gai_strerror(rc)));
  int err = ECONNREFUSED;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      ::freeaddrinfo(res);
      return fd;
    }
    err = errno;
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return make_plain_error(
      err, fmt::format("cannot connect to the daemon at {}: {}", hostport, std::strerror(err)));
}

}  // namespace

Result<QmpClient> QmpClient::connect(const std::string& where) {
  auto fd = where.rfind("tcp:", 0) == 0 ? connect_tcp(where.substr(4)) : connect_unix(where);
  if (!fd) return make_error(fd.error());
  QmpClient c(*fd);
  auto greeting = c.read_message(10000);
  if (!greeting) return make_error(greeting.error());
  if (!*greeting || !(*greeting)->contains("QMP"))
    return make_plain_error(EPROTO, fmt::format("{}: not a QMP server (no greeting)", where));
  if (auto r = c.execute("qmp_capabilities"); !r) return make_error(r.error());
  return c;
}

QmpClient::QmpClient(QmpClient&& o) noexcept
    : fd_(o.fd_), buf_(std::move(o.buf_)), events_(std::move(o.events_)), next_id_(o.next_id_) {
  o.fd_ = -1;
}

QmpClient::~QmpClient() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::optional<QmpClient::Json>> QmpClient::read_message(int timeout_ms) {
  for (;;) {
    if (auto nl = buf_.find('\n'); nl != std::string::npos) {
      std::string line = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      Json j = Json::parse(line, nullptr, false);
      if (j.is_discarded())
        return make_plain_error(EPROTO, "the daemon sent a line that is not JSON");
      return std::optional<Json>(std::move(j));
    }
    pollfd p{fd_, POLLIN, 0};
    int rc = ::poll(&p, 1, timeout_ms);
    if (rc < 0 && errno == EINTR) continue;
    if (rc == 0) return std::optional<Json>();
    char chunk[65536];
    ssize_t n = ::read(fd_, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return make_plain_error(ECONNRESET, "the daemon closed the connection");
    buf_.append(chunk, static_cast<size_t>(n));
  }
}

Result<QmpClient::Json> QmpClient::execute(const std::string& command, const Json& args) {
  uint64_t id = next_id_++;
  Json req = {{"execute", command}, {"id", id}};
  if (!args.empty()) req["arguments"] = args;
  std::string line = req.dump() + "\n";
  for (size_t off = 0; off < line.size();) {
    ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      return make_plain_error(errno,
                              fmt::format("sending to the daemon: {}", std::strerror(errno)));
    off += static_cast<size_t>(n);
  }
  for (;;) {
    auto m = read_message(-1);
    if (!m) return make_error(m.error());
    Json& msg = **m;
    if (msg.contains("event")) {
      events_.push_back(std::move(msg));
      continue;
    }
    if (msg.value("id", Json()) != Json(id)) continue;  // not ours
    if (msg.contains("error")) {
      last_class_ = msg["error"].value("class", "GenericError");
      return make_plain_error(EIO, msg["error"].value("desc", "unknown error"));
    }
    last_class_.clear();
    return msg["return"];
  }
}

std::optional<QmpClient::Json> QmpClient::next_event(int timeout_ms) {
  if (!events_.empty()) {
    Json e = std::move(events_.front());
    events_.pop_front();
    return e;
  }
  for (;;) {
    auto m = read_message(timeout_ms);
    if (!m || !*m) return std::nullopt;
    if ((**m).contains("event")) return **m;
  }
}

void QmpClient::wait_for_event(int timeout_ms) {
  if (!events_.empty()) return;
  if (auto e = next_event(timeout_ms)) events_.push_back(std::move(*e));
}

}  // namespace blkmirror
