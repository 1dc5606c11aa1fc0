#include "nbd/server/nbd_server.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "io/unix_listen.h"
#include "nbd/server/connection.h"

namespace blkmirror::nbd {

NbdServer::~NbdServer() {
  for (auto& p : socket_paths_) ::unlink(p.c_str());
}

Result<void> NbdServer::add_export(const ExportConfig& cfg) {
  if (exports_.count(cfg.name))
    return make_plain_error(EEXIST, fmt::format("NBD server already has export named '{}'", cfg.name));
  Node* node = graph_.find(cfg.node);
  if (!node)
    return make_plain_error(ENOENT, fmt::format("Cannot find device='{}' nor node-name='{}'",
                                                cfg.node, cfg.node));
  if (cfg.writable && node->device().caps().read_only)
    return make_plain_error(EROFS, fmt::format("Node '{}' is read-only", cfg.node));
  // As QEMU's block exports: consistent read, write only when writable; others
  // may do anything but resize the disk under the clients.
  EdgeUse use{fmt::format("NBD export '{}'", cfg.name), "root",
              Perms{kPermConsistentRead | (cfg.writable ? kPermWrite : 0u), kPermAll & ~kPermResize}};
  auto edge = graph_.attach(node, "export " + cfg.name, std::move(use));
  if (!edge) return make_error(edge.error());
  auto e = std::make_unique<Export>();
  e->name = cfg.name;
  e->description = cfg.description;
  e->writable = cfg.writable;
  e->edge = std::move(*edge);
  exports_.emplace(cfg.name, std::move(e));
  if (!has_default_) {
    has_default_ = true;
    default_name_ = cfg.name;
  }
  return {};
}

Export* NbdServer::find_export(const std::string& name) {
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second.get();
}

size_t NbdServer::clients_of(const std::string& name) const {
  size_t n = 0;
  for (auto& c : conns_)
    if (c->current_export() && c->current_export()->name == name) ++n;
  return n;
}

Export* NbdServer::default_export() {
  if (auto* e = find_export("")) return e;
  return has_default_ ? find_export(default_name_) : nullptr;
}

Task<Result<void>> NbdServer::remove_export(const std::string& name) {
  auto it = exports_.find(name);
  if (it == exports_.end())
    co_return make_plain_error(ENOENT, fmt::format("Export '{}' is not found", name));
  Export* e = it->second.get();
  for (auto& c : conns_)
    if (c->current_export() == e) c->close();
  co_await e->gate.close();
  exports_.erase(name);
  if (has_default_ && default_name_ == name) {
    has_default_ = !exports_.empty();
    if (has_default_) default_name_ = exports_.begin()->first;
  }
  co_return Result<void>{};
}

Result<void> NbdServer::listen_unix(const std::string& path) {
  auto a = listen_unix_socket(loop_.ctx(), path);
  if (!a) return make_error(a.error());
  socket_paths_.push_back(path);
  unix_acceptors_.push_back(*a);
  asio::co_spawn(loop_.executor(), accept_unix(*a), asio::detached);
  return {};
}

Result<void> NbdServer::listen_tcp(const std::string& host, uint16_t port) {
  std::error_code ec;
  auto addr = asio::ip::make_address(host.empty() ? "127.0.0.1" : host, ec);
  if (ec) return make_plain_error(EINVAL, fmt::format("invalid listen address '{}'", host));
  auto a = std::make_shared<asio::ip::tcp::acceptor>(loop_.ctx());
  asio::ip::tcp::endpoint ep(addr, port);
  a->open(ep.protocol(), ec);
  if (!ec) a->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) a->bind(ep, ec);
  if (!ec) a->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return make_error(ec.value(), fmt::format("listen on {}:{}", addr.to_string(), port));
  tcp_port_ = a->local_endpoint().port();
  tcp_acceptors_.push_back(a);
  asio::co_spawn(loop_.executor(), accept_tcp(a), asio::detached);
  return {};
}

Task<void> NbdServer::accept_unix(std::shared_ptr<asio::local::stream_protocol::acceptor> a) {
  for (;;) {
    std::error_code ec;
    auto s = co_await a->async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted || !a->is_open()) co_return;
      continue;  // EMFILE and friends: keep serving the others
    }
    asio::generic::stream_protocol proto(AF_UNIX, SOCK_STREAM);
    start_connection(asio::generic::stream_protocol::socket(loop_.ctx(), proto, s.release()));
  }
}

Task<void> NbdServer::accept_tcp(std::shared_ptr<asio::ip::tcp::acceptor> a) {
  for (;;) {
    std::error_code ec;
    auto s = co_await a->async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted || !a->is_open()) co_return;
      continue;
    }
    s.set_option(asio::ip::tcp::no_delay(true), ec);
    int family = s.local_endpoint(ec).protocol().family();
    asio::generic::stream_protocol proto(family, SOCK_STREAM);
    start_connection(asio::generic::stream_protocol::socket(loop_.ctx(), proto, s.release()));
  }
}

void NbdServer::start_connection(asio::generic::stream_protocol::socket sock) {
  auto hold = gate_.try_enter();
  if (!hold) return;  // stopping: the socket closes as it goes out of scope
  auto c = std::make_shared<Connection>(*this, std::move(sock));
  auto it = conns_.insert(conns_.end(), c);
  asio::co_spawn(loop_.executor(),
                 [](NbdServer* s, std::shared_ptr<Connection> c,
                    std::list<std::shared_ptr<Connection>>::iterator it,
                    Gate::Holder h) -> Task<void> {
                   co_await c->run(c);
                   s->conns_.erase(it);
                 }(this, c, it, std::move(hold)),
                 asio::detached);
}

Task<void> NbdServer::stop() {
  std::error_code ec;
  for (auto& a : unix_acceptors_) a->close(ec);
  for (auto& a : tcp_acceptors_) a->close(ec);
  for (auto& c : conns_) c->close();
  co_await gate_.close();
  for (auto& p : socket_paths_) ::unlink(p.c_str());
  socket_paths_.clear();
  exports_.clear();
}

}  // namespace blkmirror::nbd
