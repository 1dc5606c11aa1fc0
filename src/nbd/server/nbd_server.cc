#include "nbd/server/nbd_server.h"

#include <algorithm>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "nbd/server/connection.h"

namespace blkmirror::nbd {

NbdServer::~NbdServer() = default;  // the listeners close (and remove their socket files)

Result<void> NbdServer::add_export(const ExportConfig& cfg) {
  if (exports_.count(cfg.name))
    return make_plain_error(EEXIST,
                            fmt::format("NBD server already has export named '{}'", cfg.name));
  Node* node = graph_.find(cfg.node);
  if (!node)
    return make_plain_error(
        ENOENT, fmt::format("Cannot find device='{}' nor node-name='{}'", cfg.node, cfg.node));
  if (cfg.writable && node->device().caps().read_only)
    return make_plain_error(EROFS, fmt::format("Node '{}' is read-only", cfg.node));
  // As QEMU's block exports: consistent read, write only when writable; others
  // may do anything but resize the disk under the clients.
  EdgeUse use{
      fmt::format("NBD export '{}'", cfg.name), "root",
      Perms{kPermConsistentRead | (cfg.writable ? kPermWrite : 0u), kPermAll & ~kPermResize}};
  auto bitmaps = find_bitmaps(*node, cfg, cfg.writable);
  if (!bitmaps) return make_error(bitmaps.error());
  auto edge = graph_.attach(node, "export " + cfg.name, std::move(use));
  if (!edge) return make_error(edge.error());
  auto e = std::make_shared<Export>();
  e->bitmaps = std::move(*bitmaps);
  for (NamedBitmap* b : e->bitmaps) b->busy = true;
  e->name = cfg.name;
  e->description = cfg.description;
  e->writable = cfg.writable;
  e->allocation_depth = cfg.allocation_depth;
  e->edge = std::move(*edge);
  exports_.emplace(cfg.name, std::move(e));
  if (!has_default_) {
    has_default_ = true;
    default_name_ = cfg.name;
  }
  return {};
}

// QEMU's nbd_export_create() checks, with its texts.
Result<std::vector<NamedBitmap*>> NbdServer::find_bitmaps(Node& node, const ExportConfig& cfg,
                                                          bool writable) {
  std::vector<NamedBitmap*> out;
  for (const auto& ref : cfg.bitmaps) {
    NamedBitmap* b = nullptr;
    bool in_chain = ref.node.empty();
    for (Node* n = &node; n && !b; n = n->backing()) {
      if (!ref.node.empty() && n->name() != ref.node) continue;
      in_chain = true;
      b = n->bitmaps().find(ref.name);
    }
    if (!ref.node.empty() && !in_chain)
      return make_plain_error(EINVAL, fmt::format("Bitmap '{}' of node '{}' is not in the backing "
                                                  "chain of the exported node '{}'",
                                                  ref.name, ref.node, node.name()));
    if (!b) return make_plain_error(ENOENT, fmt::format("Bitmap '{}' is not found", ref.name));
    if (b->busy)
      return make_plain_error(
          EBUSY, fmt::format(
                     "Bitmap '{}' is currently in use by another operation and cannot be used",
                     b->name()));
    if (b->inconsistent)
      return make_plain_error(
          EINVAL, fmt::format("Bitmap '{}' is inconsistent and cannot be used", b->name()));
    // A read-only export promises a stable view; a recording bitmap would move.
    if (!writable && b->enabled)
      return make_plain_error(
          EINVAL, fmt::format("Enabled bitmap '{}' incompatible with readonly export", b->name()));
    if (std::find(out.begin(), out.end(), b) == out.end()) out.push_back(b);
  }
  return out;
}

Export* NbdServer::find_export(const std::string& name) {
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second.get();
}

Export* NbdServer::default_export() {
  if (auto* e = find_export("")) return e;
  return has_default_ ? find_export(default_name_) : nullptr;
}

ExportRef NbdServer::acquire_export(const std::string& name) {
  Export* e = name.empty() ? default_export() : find_export(name);
  if (!e) return {};
  auto hold = e->gate.try_enter();
  if (!hold) return {};  // being removed
  return ExportRef{exports_.at(e->name), std::move(hold)};
}

size_t NbdServer::clients_of(const std::string& name) const {
  size_t n = 0;
  for (auto& c : conns_)
    if (c->current_export() && c->current_export()->name == name) ++n;
  return n;
}

std::vector<std::pair<std::string, std::string>> NbdServer::export_list() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& [name, e] : exports_) out.emplace_back(name, e->description);
  return out;
}

Task<Result<void>> NbdServer::remove_export(const std::string& name) {
  auto it = exports_.find(name);
  if (it == exports_.end())
    co_return make_plain_error(ENOENT, fmt::format("Export '{}' is not found", name));
  // Out of the table first: no new connection can find it, the name is free,
  // and the shared_ptr keeps it alive until its holders are gone.
  std::shared_ptr<Export> e = std::move(it->second);
  exports_.erase(it);
  if (has_default_ && default_name_ == name) {
    has_default_ = !exports_.empty();
    if (has_default_) default_name_ = exports_.begin()->first;
  }
  for (auto& c : conns_)
    if (c->current_export() == e.get()) c->close();
  co_await e->gate.close();
  co_return Result<void>{};
}

Result<void> NbdServer::listen_unix(const std::string& path) {
  auto l = Listener::unix_socket(loop_.ctx(), path, std::nullopt,
                                 [this](Listener::Socket s) { start_connection(std::move(s)); });
  if (!l) return make_error(l.error());
  listeners_.push_back(std::move(*l));
  return {};
}

Result<void> NbdServer::listen_tcp(const std::string& host, uint16_t port) {
  auto l = Listener::tcp(loop_.ctx(), host.empty() ? "127.0.0.1" : host, port,
                         [this](Listener::Socket s) { start_connection(std::move(s)); });
  if (!l) return make_error(l.error());
  tcp_port_ = (*l)->port();
  listeners_.push_back(std::move(*l));
  return {};
}

void NbdServer::start_connection(asio::generic::stream_protocol::socket sock) {
  if (limits_.max_connections && conns_.size() >= limits_.max_connections) {
    // Refused before the greeting: the client sees the connection close at
    // once instead of hanging, and holds nothing of ours.
    if (refused_++ % 1000 == 0)
      spdlog::warn("nbd: refusing a connection: {} clients connected (max-connections)",
                   conns_.size());
    return;  // the socket closes as it goes out of scope
  }
  auto hold = gate_.try_enter();
  if (!hold) return;  // stopping: the socket closes as it goes out of scope
  auto c = std::make_shared<Connection>(*this, std::move(sock));
  auto it = conns_.insert(conns_.end(), c);
  asio::co_spawn(
      loop_.executor(),
      [](NbdServer* s, std::shared_ptr<Connection> c,
         std::list<std::shared_ptr<Connection>>::iterator it, Gate::Holder h) -> Task<void> {
        co_await c->run(c);
        s->conns_.erase(it);
      }(this, c, it, std::move(hold)),
      asio::detached);
}

Task<void> NbdServer::stop() {
  for (auto& l : listeners_) l->close();
  for (auto& c : conns_) c->close();
  co_await gate_.close();
  listeners_.clear();
  exports_.clear();
}

}  // namespace blkmirror::nbd
