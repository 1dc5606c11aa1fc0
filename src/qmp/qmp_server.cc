#include "qmp/qmp_server.h"

#include <deque>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "qmp/wire.h"

namespace blkmirror::qmp {

// One client connection: a reader that runs requests in order, and a writer
// that drains the output queue (replies and events).
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(QmpServer& server, asio::generic::stream_protocol::socket sock)
      : server_(server), sock_(std::move(sock)) {}

  Task<void> run(std::shared_ptr<Session> self) {
    send(greeting());
    asio::co_spawn(sock_.get_executor(), writer(self), asio::detached);
    try {
      co_await reader();
    } catch (const std::exception& e) {
      // A bug, not the client's doing; still, the connection must close (an
      // escaped exception used to leave it open forever, its fd leaked).
      spdlog::error("qmp: session ended by an internal error: {}", e.what());
    }
    // The client hung up or the server is stopping: send what is queued (the
    // reply to `quit`, say), for a bounded time, then close.
    flushing_ = true;
    out_ready_.notify_all();
    // The writer ends once the queue is empty and its last write is done (it
    // pops a reply before writing it: an empty queue is not a sent reply).
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (writing_ && std::chrono::steady_clock::now() < deadline)
      co_await out_ready_.wait(std::chrono::milliseconds(100));
    close();
    // Let the writer see the close before the session goes.
    while (writing_) co_await out_ready_.wait();
  }

  // Stops reading; run() then flushes the output and closes.
  void finish() {
    std::error_code ec;
    sock_.shutdown(asio::socket_base::shutdown_receive, ec);
  }

  void send(std::string msg) {
    if (closed_) return;
    out_bytes_ += msg.size();
    out_.push_back(std::move(msg));
    if (out_bytes_ > QmpServer::kMaxQueuedOutput) {
      spdlog::warn("qmp: dropping a client that does not read its replies ({} bytes queued)",
                   out_bytes_);
      close();
      return;
    }
    out_ready_.notify_all();
  }

  void send_event(const std::string& text) {
    if (negotiated_) send(text);
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    std::error_code ec;
    sock_.shutdown(asio::socket_base::shutdown_both, ec);
    sock_.close(ec);
    out_ready_.notify_all();
  }

 private:
  Task<void> reader() {
    std::vector<char> buf(64 << 10);
    std::string line;
    bool skipping = false;  // inside an over-long line, until its newline
    while (!closed_) {
      std::error_code ec;
      size_t n = co_await sock_.async_read_some(asio::buffer(buf),
                                                asio::redirect_error(asio::use_awaitable, ec));
      if (ec || n == 0) co_return;
      size_t start = 0;
      for (size_t i = 0; i < n; ++i) {
        if (buf[i] != '\n') continue;
        if (!skipping) {
          line.append(buf.data() + start, i - start);
          co_await handle_line(line);
          if (closed_) co_return;
        }
        skipping = false;
        line.clear();
        start = i + 1;
      }
      if (!skipping) line.append(buf.data() + start, n - start);
      if (!skipping && line.size() > kMaxLine) {
        send(error_reply(
            QmpError{"GenericError",
                     fmt::format("QMP input line longer than {} bytes, ignored", kMaxLine)},
            std::nullopt));
        line.clear();
        skipping = true;
      }
    }
  }

  Task<void> handle_line(const std::string& line) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) co_return;
    std::optional<Json> id;
    auto req = parse_request(line, &id);
    if (!req) {
      send(error_reply(req.error(), id));
      co_return;
    }
    if (req->execute == "qmp_capabilities") {
      send(negotiate(*req));
      co_return;
    }
    if (!negotiated_) {
      send(error_reply(
          QmpError{"CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"},
          id));
      co_return;
    }
    auto r = co_await server_.daemon_.execute(req->execute, std::move(req->arguments));
    send(r ? reply(*r, id) : error_reply(r.error(), id));
  }

  std::string negotiate(Request& req) {
    if (negotiated_)
      return error_reply(QmpError{"CommandNotFound",
                                  "Capabilities negotiation is already complete, command ignored"},
                         req.id);
    static const Schema kCaps = {{"enable", Type::kStringList}};
    if (auto r = check(req.arguments, kCaps); !r) return error_reply(r.error(), req.id);
    if (req.arguments.contains("enable") && !req.arguments["enable"].empty()) {
      std::string cap = req.arguments["enable"][0].get<std::string>();
      return error_reply(
          QmpError{"GenericError", fmt::format("Capability '{}' not available", cap)}, req.id);
    }
    negotiated_ = true;
    return reply(Json::object(), req.id);
  }

  Task<void> writer(std::shared_ptr<Session> self) {
    writing_ = true;
    while (!closed_) {
      if (out_.empty()) {
        if (flushing_) break;
        co_await out_ready_.wait();
        continue;
      }
      std::string msg = std::move(out_.front());
      out_.pop_front();
      out_bytes_ -= msg.size();
      std::error_code ec;
      co_await asio::async_write(sock_, asio::buffer(msg),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (ec) close();
    }
    writing_ = false;
    out_ready_.notify_all();
  }

  QmpServer& server_;
  asio::generic::stream_protocol::socket sock_;
  std::deque<std::string> out_;
  size_t out_bytes_ = 0;
  Notifier out_ready_;
  bool negotiated_ = false;
  bool closed_ = false;
  bool writing_ = false;
  bool flushing_ = false;
};

QmpServer::QmpServer(Loop& loop, Daemon& daemon) : loop_(loop), daemon_(daemon) {
  daemon_.set_event_sink(
      [this](const std::string& name, const Json& data) { broadcast(name, data); });
}

QmpServer::~QmpServer() { daemon_.set_event_sink(nullptr); }

Result<void> QmpServer::listen_unix(const std::string& path) {
  // QMP has no authentication: only the owner may connect.
  auto l = Listener::unix_socket(loop_.ctx(), path, 0600,
                                 [this](Listener::Socket s) { serve_socket(std::move(s)); });
  if (!l) return make_error(l.error());
  listeners_.push_back(std::move(*l));
  return {};
}

Result<void> QmpServer::listen_tcp(const std::string& host, uint16_t port) {
  std::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec) return make_plain_error(EINVAL, fmt::format("invalid QMP address '{}'", host));
  if (!addr.is_loopback())
    return make_plain_error(EINVAL,
                            fmt::format("QMP over TCP listens on loopback only, not '{}'", host));
  auto l = Listener::tcp(loop_.ctx(), host, port,
                         [this](Listener::Socket s) { serve_socket(std::move(s)); });
  if (!l) return make_error(l.error());
  tcp_port_ = (*l)->port();
  listeners_.push_back(std::move(*l));
  return {};
}

void QmpServer::serve_socket(asio::generic::stream_protocol::socket sock) {
  auto hold = gate_.try_enter();
  if (!hold) return;
  auto s = std::make_shared<Session>(*this, std::move(sock));
  auto it = sessions_.insert(sessions_.end(), s);
  asio::co_spawn(
      loop_.executor(),
      [](QmpServer* srv, std::shared_ptr<Session> s,
         std::list<std::shared_ptr<Session>>::iterator it, Gate::Holder h) -> Task<void> {
        co_await s->run(s);
        srv->sessions_.erase(it);
      }(this, s, it, std::move(hold)),
      asio::detached);
}

void QmpServer::broadcast(const std::string& name, const Json& data) {
  if (sessions_.empty()) return;
  std::string text = event(name, data);
  for (auto& s : sessions_) s->send_event(text);
}

Task<void> QmpServer::stop() {
  for (auto& l : listeners_) l->close();  // removes the socket file
  for (auto& s : sessions_) s->finish();
  co_await gate_.close();
}

}  // namespace blkmirror::qmp
