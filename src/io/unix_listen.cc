#include "io/unix_listen.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

namespace blkmirror {

Result<std::shared_ptr<UnixAcceptor>> listen_unix_socket(asio::io_context& ctx, const std::string& path,
                                                         std::optional<mode_t> mode) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return make_plain_error(EEXIST, fmt::format("{}: exists and is not a socket", path));
    ::unlink(path.c_str());  // a stale socket from an earlier run
  }
  auto a = std::make_shared<UnixAcceptor>(ctx);
  std::error_code ec;
  a->open(asio::local::stream_protocol(), ec);
  // The umask makes the socket no more open than `mode` from the moment it
  // exists; chmod then sets it exactly.
  mode_t old = mode ? ::umask(static_cast<mode_t>(~*mode & 0777)) : 0;
  if (!ec) a->bind(asio::local::stream_protocol::endpoint(path), ec);
  if (mode) ::umask(old);
  if (!ec && mode && ::chmod(path.c_str(), *mode) < 0) ec = std::error_code(errno, std::generic_category());
  if (!ec) a->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return make_plain_error(ec.value(), fmt::format("cannot listen on {}: {}", path, ec.message()));
  return a;
}

}  // namespace blkmirror
