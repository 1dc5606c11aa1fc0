#include "blockdev/nbd_connection.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string_view>

namespace blkmirror {

// One batch of commands and the coroutine waiting for it. Freed when both the
// waiter has been completed and libnbd has dropped every callback it holds
// (on_free), whichever comes last: libnbd may release callbacks after we have
// already failed the batch because the connection died.
struct NbdConnection::Op {
  virtual ~Op() = default;
  virtual void complete(asio::any_io_executor ex, int err) = 0;
  NbdConnection* conn = nullptr;
  std::string* why_out = nullptr;
  size_t remaining = 0;  // commands issued and not yet replied
  unsigned refs = 0;     // libnbd callbacks not yet freed, + 1 while issuing
  int first_err = 0;
  bool completed = false;
  std::list<Op*>::iterator pos;
};

template <class Handler>
struct NbdConnection::HandlerOp : NbdConnection::Op {
  explicit HandlerOp(Handler h) : handler(std::move(h)) {}
  void complete(asio::any_io_executor ex, int err) override {
    // Posted, not called: we may be inside a libnbd callback, and the waiter
    // will issue new commands on this handle.
    asio::post(ex, [h = std::move(handler), err]() mutable { std::move(h)(err); });
  }
  Handler handler;
};

namespace {

struct Connected {
  nbd_handle* h = nullptr;
  int err = 0;
  std::string msg;
};

// libnbd prefixes its errors with the API name ("nbd_connect_unix: connect: ...").
std::string libnbd_reason() {
  const char* e = nbd_get_error();
  std::string_view s = e ? e : "unknown error";
  if (s.starts_with("nbd_")) {
    auto colon = s.find(": ");
    if (colon != std::string_view::npos) s.remove_prefix(colon + 2);
  }
  return std::string(s);
}

int libnbd_errno() {
  int e = nbd_get_errno();
  return e > 0 ? e : EIO;
}

Connected fail_connect(nbd_handle* h) {
  Connected c{nullptr, libnbd_errno(), libnbd_reason()};
  nbd_close(h);
  return c;
}

// Runs on a worker thread: everything here may block (DNS, connect, TLS).
Connected connect_blocking(const NbdConnectOptions& o) {
  if (o.tls == NbdTls::kPsk && ::access(o.tls_psk_file.c_str(), R_OK) != 0)
    return {nullptr, errno,
            fmt::format("tls-psk-file {}: {}", o.tls_psk_file, std::strerror(errno))};
  if (o.tls == NbdTls::kX509 && !o.tls_cert_dir.empty()) {
    struct stat st {};
    if (::stat(o.tls_cert_dir.c_str(), &st) != 0)
      return {nullptr, errno,
              fmt::format("tls-certificates {}: {}", o.tls_cert_dir, std::strerror(errno))};
    if (!S_ISDIR(st.st_mode))
      return {nullptr, ENOTDIR,
              fmt::format("tls-certificates {}: not a directory", o.tls_cert_dir)};
  }
  nbd_handle* h = nbd_create();
  if (!h) return {nullptr, libnbd_errno(), libnbd_reason()};
  if (nbd_set_export_name(h, o.export_name.c_str()) == -1) return fail_connect(h);
  // Block status is how a sparse remote source keeps its holes.
  if (nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) return fail_connect(h);
  if (o.tls != NbdTls::kOff) {
    if (!nbd_supports_tls(h)) {
      nbd_close(h);
      return {nullptr, ENOTSUP, "this libnbd was built without TLS support"};
    }
    if (nbd_set_tls(h, LIBNBD_TLS_REQUIRE) == -1) return fail_connect(h);
    if (o.tls == NbdTls::kX509) {
      if (!o.tls_cert_dir.empty() && nbd_set_tls_certificates(h, o.tls_cert_dir.c_str()) == -1)
        return fail_connect(h);
      if (nbd_set_tls_verify_peer(h, o.verify_peer) == -1) return fail_connect(h);
    } else {
      if (nbd_set_tls_psk_file(h, o.tls_psk_file.c_str()) == -1) return fail_connect(h);
      if (!o.tls_username.empty() && nbd_set_tls_username(h, o.tls_username.c_str()) == -1)
        return fail_connect(h);
    }
  }
  int rc = o.transport == NbdTransport::kUnix
               ? nbd_connect_unix(h, o.path.c_str())
               : nbd_connect_tcp(h, o.host.c_str(), std::to_string(o.port).c_str());
  if (rc == -1) return fail_connect(h);
  return {h, 0, {}};
}

}  // namespace

Task<Result<std::unique_ptr<NbdConnection>>> NbdConnection::open(Loop& loop,
                                                                 NbdConnectOptions opts) {
  if (auto v = opts.validate(); !v) co_return make_error(v.error());
  // Only a pointer is captured (GCC 12 rule 2, base/task.h): opts lives in this
  // frame, which waits, untouched, while the worker reads it.
  const NbdConnectOptions* o = &opts;
  Connected c = co_await loop.blocking([o]() { return connect_blocking(*o); });
  if (!c.h)
    co_return make_plain_error(c.err, fmt::format("{}: cannot connect: {}", opts.display(), c.msg));
  std::unique_ptr<NbdConnection> conn(new NbdConnection(loop, c.h, opts.display()));
  co_return conn;
}

NbdConnection::NbdConnection(Loop& loop, nbd_handle* h, std::string where)
    : loop_(loop), h_(h), where_(std::move(where)), fd_(loop.ctx()) {
  int fd = nbd_aio_get_fd(h_);
  if (fd < 0) {
    die(libnbd_reason());
    return;
  }
  fd_.assign(fd);
  fd_open_ = true;
  pump();
}

NbdConnection::~NbdConnection() {
  *alive_ = false;
  // Waiters get an error now (their handlers run on the loop if it still
  // runs); libnbd then frees the callbacks of whatever is left.
  while (!pending_.empty()) finish(pending_.front(), ECANCELED);
  release_fd();
  if (!dead_ && nbd_aio_is_ready(h_)) nbd_aio_disconnect(h_, 0);  // best effort, not awaited
  nbd_close(h_);
}

void NbdConnection::release_fd() {
  if (!fd_open_) return;
  // Not closed: the descriptor is libnbd's.
  std::error_code ec;
  fd_.cancel(ec);
  fd_.release();
  fd_open_ = false;
}

int NbdConnection::on_complete(void* user_data, int* error) {
  auto* op = static_cast<Op*>(user_data);
  if (op->completed) return 1;  // already failed when the connection died
  NbdConnection* c = op->conn;
  if (c->in_flight_ > 0) --c->in_flight_;
  if (*error && !op->first_err) op->first_err = *error;
  if (--op->remaining == 0) c->finish(op, op->first_err);
  return 1;  // retire the command
}

void NbdConnection::on_free(void* user_data) {
  auto* op = static_cast<Op*>(user_data);
  if (--op->refs == 0 && op->completed) delete op;
}

void NbdConnection::finish(Op* op, int err) {
  op->completed = true;
  pending_.erase(op->pos);
  // libnbd fails commands cut off by a lost connection with ENOTCONN; for the
  // job that is an I/O error like any other (and not the server's errno).
  bool lost = dead_ || err == ENOTCONN || err == ESHUTDOWN || err == ECONNRESET || err == EPIPE;
  if (err && lost) {
    if (op->why_out)
      *op->why_out =
          "connection lost: " + (dead_ ? death_reason_ : std::string(std::strerror(err)));
    err = EIO;
  }
  op->complete(loop_.executor(), err);
  if (op->refs == 0) delete op;
}

void NbdConnection::die(std::string reason) {
  if (dead_) return;
  dead_ = true;
  death_reason_ = std::move(reason);
  release_fd();
  in_flight_ = 0;
  // A reply that never comes is an I/O error; the mirror re-dirties the range.
  while (!pending_.empty()) finish(pending_.front(), EIO);
}

// Asio's reactor is edge-triggered, but libnbd expects level-triggered
// polling: its state machine does not always read until EAGAIN (a reply that
// arrives while it is midway through sending a large write payload is read
// one at a time), so after an edge the socket may still hold data and no new
// edge will come. pump() therefore asks the socket itself (poll with no
// timeout) and keeps handing readiness to libnbd while there is some in a
// direction libnbd wants; only then does it wait for the next edge.
void NbdConnection::pump() {
  for (;;) {
    if (dead_) return;
    if (nbd_aio_is_dead(h_) || nbd_aio_is_closed(h_))
      return die(nbd_aio_is_closed(h_) ? "closed by the server" : libnbd_reason());
    unsigned dir = nbd_aio_get_direction(h_);
    pollfd p{nbd_aio_get_fd(h_), 0, 0};
    if (dir & LIBNBD_AIO_DIRECTION_READ) p.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) p.events |= POLLOUT;
    if (p.events == 0 || ::poll(&p, 1, 0) <= 0) break;
    int rc = 0;
    if (p.revents & (POLLIN | POLLHUP | POLLERR))
      rc = nbd_aio_notify_read(h_);
    else if (p.revents & POLLOUT)
      rc = nbd_aio_notify_write(h_);
    else
      break;
    if (rc == -1 && (nbd_aio_is_dead(h_) || nbd_aio_is_closed(h_))) return die(libnbd_reason());
  }
  unsigned dir = nbd_aio_get_direction(h_);
  if ((dir & LIBNBD_AIO_DIRECTION_READ) && !want_read_) arm(true);
  if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !want_write_) arm(false);
}

void NbdConnection::arm(bool read) {
  (read ? want_read_ : want_write_) = true;
  fd_.async_wait(
      read ? asio::posix::descriptor_base::wait_read : asio::posix::descriptor_base::wait_write,
      [this, read, alive = alive_](const std::error_code& ec) {
        if (!*alive) return;
        (read ? want_read_ : want_write_) = false;
        if (ec || dead_) return;
        pump();
      });
}

Task<int> NbdConnection::run(std::span<const Issue> batch, std::string* why) {
  if (dead_) {
    if (why) *why = "connection lost: " + death_reason_;
    co_return EIO;
  }
  if (batch.empty()) co_return 0;
  co_return co_await asio::async_initiate<decltype(asio::use_awaitable), void(int)>(
      [this, batch, why](auto handler) {
        auto* op = new HandlerOp<decltype(handler)>(std::move(handler));
        op->conn = this;
        op->why_out = why;
        op->refs = 1;  // ours while issuing: a command may complete inside its own call
        op->pos = pending_.insert(pending_.end(), op);
        for (const Issue& issue : batch) {
          ++op->refs;  // dropped by on_free, which libnbd calls even if issuing fails
          ++op->remaining;
          if (issue(h_, nbd_completion_callback{on_complete, op, on_free}) == -1) {
            int err = libnbd_errno();
            std::string reason = libnbd_reason();
            bool lost = nbd_aio_is_dead(h_) || nbd_aio_is_closed(h_);
            if (lost) err = EIO;  // not ENOTCONN: a lost connection is an I/O error
            --op->remaining;
            if (!op->completed) {
              if (!op->first_err) op->first_err = err;
              if (why) *why = reason;
            }
            if (lost) die(reason);
            break;
          }
          if (!op->completed) ++in_flight_;
        }
        if (!op->completed && op->remaining == 0) finish(op, op->first_err);
        if (--op->refs == 0 && op->completed) delete op;
        pump();
      },
      asio::use_awaitable);
}

}  // namespace blkmirror
