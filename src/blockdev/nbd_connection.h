// NbdConnection: one libnbd handle (one NBD connection) driven by the Loop.
//
// The handshake (TCP/UNIX connect, TLS, option negotiation) runs once, blocking,
// on the Loop's worker pool; after that the handle belongs to the loop thread.
// Commands go through libnbd's asynchronous API (nbd_aio_*): many can be in
// flight at once, libnbd writes them as far as the socket takes, and the loop
// waits on the handle's fd in whatever direction nbd_aio_get_direction() asks
// for and calls nbd_aio_notify_read/write. No thread per request.
//
// A connection that dies (EOF, reset, TLS error) completes every pending
// command with EIO and refuses new ones; it is never revived - the owner opens a
// new one (NbdDevice reconnects).
//
// Threading rule: loop thread only (after open() returns). Buffers passed to a
// command must stay valid until run() completes.
#pragma once

#include <libnbd.h>

#include <asio.hpp>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <span>
#include <string>

#include "base/result.h"
#include "base/task.h"
#include "blockdev/nbd_uri.h"
#include "io/loop.h"

namespace blkmirror {

class NbdConnection {
 public:
  // Issues one libnbd aio command with the given completion callback; returns
  // its cookie, or -1 (libnbd's error is then read with nbd_get_errno/error).
  using Issue = std::function<int64_t(nbd_handle*, nbd_completion_callback)>;

  // Connects and negotiates (with base:allocation requested); blocking work runs
  // on the loop's worker pool. Errors are one line naming the export and
  // libnbd's reason.
  static Task<Result<std::unique_ptr<NbdConnection>>> open(Loop& loop, NbdConnectOptions opts);
  ~NbdConnection();
  NbdConnection(const NbdConnection&) = delete;
  NbdConnection& operator=(const NbdConnection&) = delete;

  // Negotiated properties (valid after open; not for running commands).
  nbd_handle* handle() const { return h_; }

  bool dead() const { return dead_; }
  // Why the connection died ("" while alive).
  const std::string& death_reason() const { return death_reason_; }
  unsigned in_flight() const { return in_flight_; }

  // Issues every command of the batch at once (pipelined on the socket) and
  // completes when all have replied: 0, or the errno of the first failure.
  // A dead connection fails the batch with EIO. On failure, *why (when given)
  // gets libnbd's or the connection's explanation.
  Task<int> run(std::span<const Issue> batch, std::string* why = nullptr);

 private:
  struct Op;
  template <class Handler>
  struct HandlerOp;

  NbdConnection(Loop& loop, nbd_handle* h, std::string where);
  static int on_complete(void* user_data, int* error);
  static void on_free(void* user_data);
  void finish(Op* op, int err);
  void pump();
  void arm(bool read);
  void die(std::string reason);
  void release_fd();

  Loop& loop_;
  nbd_handle* h_;
  std::string where_;  // display URI, for messages
  asio::posix::stream_descriptor fd_;
  bool fd_open_ = false;
  bool want_read_ = false, want_write_ = false;  // a wait is pending
  bool dead_ = false;
  std::string death_reason_;
  unsigned in_flight_ = 0;
  std::list<Op*> pending_;  // batches not yet completed, failed together on death
  // Lets fd-wait handlers that fire after destruction see that we are gone.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace blkmirror
