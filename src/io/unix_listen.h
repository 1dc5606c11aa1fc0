// Listening on a UNIX socket path, the way both servers (NBD, QMP) want it: a
// stale socket left by an earlier run is replaced, anything else at the path is
// refused, and the socket can be made private from the moment it exists.
//
// Threading rule: call on the loop thread (the acceptor belongs to its context).
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>

#include <asio.hpp>

#include "base/result.h"

namespace blkmirror {

using UnixAcceptor = asio::local::stream_protocol::acceptor;

// Binds and listens at path. With mode, the socket gets exactly that mode (no
// window where it is more open); without, it follows the umask. One-line
// errors naming the path.
Result<std::shared_ptr<UnixAcceptor>> listen_unix_socket(asio::io_context& ctx, const std::string& path,
                                                         std::optional<mode_t> mode = std::nullopt);

}  // namespace blkmirror
