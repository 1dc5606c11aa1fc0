#include "metrics/endpoint.h"

#include <asio/experimental/as_tuple.hpp>
#include <fmt/format.h>

namespace blkmirror::metrics {

namespace {

constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

std::string response(std::string_view status, std::string_view type, const std::string& body,
                     bool head) {
  std::string out = fmt::format(
      "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
      status, type, body.size());
  if (!head) out += body;
  return out;
}

}  // namespace

Endpoint::~Endpoint() {
  if (listener_) listener_->close();
}

Result<void> Endpoint::listen(const std::string& host, uint16_t port) {
  auto l = Listener::tcp(loop_.ctx(), host.empty() ? "127.0.0.1" : host, port,
                         [this](Listener::Socket s) {
                           auto hold = clients_.try_enter();
                           if (!hold || active_ >= kMaxClients) return;  // closed at once
                           asio::co_spawn(loop_.executor(), serve(std::move(s), std::move(hold)),
                                          asio::detached);
                         });
  if (!l) return make_plain_error(l.error().errnum(), "--metrics: " + l.error().message());
  listener_ = std::move(*l);
  return {};
}

Task<void> Endpoint::stop() {
  if (listener_) listener_->close();
  if (!clients_.closed()) co_await clients_.close();
}

Task<void> Endpoint::serve(Listener::Socket s, Gate::Holder hold) {
  ++active_;
  // The whole request within kRequestLimit: a client that trickles is cut.
  asio::steady_timer deadline(s.get_executor());
  deadline.expires_after(kRequestLimit);
  deadline.async_wait([&s](std::error_code ec) {
    if (!ec) {
      std::error_code ignored;
      s.close(ignored);
    }
  });
  std::string req;
  char buf[1024];
  while (req.find("\r\n\r\n") == std::string::npos && req.size() <= kMaxRequestBytes) {
    auto [ec, n] = co_await s.async_read_some(asio::buffer(buf), use_tuple);
    if (ec) break;
    req.append(buf, n);
  }
  std::string out;
  const auto eol = req.find("\r\n");
  if (req.find("\r\n\r\n") == std::string::npos || eol == std::string::npos) {
    out = response("400 Bad Request", "text/plain", "bad request\n", false);
  } else {
    // "METHOD TARGET HTTP/1.x"
    const std::string line = req.substr(0, eol);
    const auto sp1 = line.find(' '), sp2 = line.rfind(' ');
    if (sp1 == std::string::npos || sp2 == sp1 || line.compare(sp2 + 1, 5, "HTTP/") != 0) {
      out = response("400 Bad Request", "text/plain", "bad request\n", false);
    } else {
      const std::string method = line.substr(0, sp1);
      std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
      target = target.substr(0, target.find('?'));
      if (method != "GET" && method != "HEAD")
        out = response("405 Method Not Allowed", "text/plain", "GET /metrics\n", false);
      else if (target != "/metrics")
        out = response("404 Not Found", "text/plain", "try /metrics\n", method == "HEAD");
      else
        out = response("200 OK", "text/plain; version=0.0.4; charset=utf-8", render_(),
                       method == "HEAD");
    }
  }
  if (s.is_open()) co_await asio::async_write(s, asio::buffer(out), use_tuple);
  deadline.cancel();
  std::error_code ignored;
  s.shutdown(asio::socket_base::shutdown_both, ignored);
  s.close(ignored);
  --active_;
}

}  // namespace blkmirror::metrics
