// Shared by the libFuzzer targets: the client side of a socketpair that reads
// and drops whatever the server sends, so the server never blocks on a full
// socket. Threading rule: runs on the target's Loop.
#pragma once

#include <vector>

#include <asio.hpp>

#include "base/task.h"

namespace blkmirror::fuzz {

inline Task<void> drain_replies(asio::generic::stream_protocol::socket* s) {
  std::vector<char> buf(1 << 16);
  for (;;) {
    std::error_code ec;
    co_await s->async_read_some(asio::buffer(buf), asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
  }
}

}  // namespace blkmirror::fuzz
