// NBD server commands: nbd-server-start/stop, block-export-add/del and
// query-block-exports.
#include <chrono>
#include <cstdint>

#include <fmt/format.h>

#include "base/host_port.h"
#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kUnixData = {
    {"path", Type::kString, true}, {"abstract", Type::kBool}, {"tight", Type::kBool}};
const Schema kInetData = {{"host", Type::kString, true}, {"port", Type::kString, true},
                          {"numeric", Type::kBool},     {"ipv4", Type::kBool},
                          {"ipv6", Type::kBool},        {"keep-alive", Type::kBool}};
const Schema kAddr = {{"type", Type::kEnum, true, {"unix", "inet"}}, {"data", Type::kObject, true}};
// max-connections as QEMU 7.2 takes it; handshake-max-seconds as QEMU took it later (10.0).
const Schema kStart = {{"addr", Type::kObject, true, {}, &kAddr},
                       {"tls-creds", Type::kString},
                       {"tls-authz", Type::kString},
                       {"max-connections", Type::kInt},
                       {"handshake-max-seconds", Type::kInt}};

// QAPI's uint32 members: an integer in 0..2^32-1, else QEMU's text.
QResult<uint32_t> uint32_member(const Json& a, const char* name, uint32_t dflt) {
  if (!a.contains(name)) return dflt;
  // An integer (check() saw to that): signed from keyval, unsigned from JSON.
  const Json& v = a[name];
  bool fits = v.is_number_unsigned()
                  ? v.get<uint64_t>() <= UINT32_MAX
                  : v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT64_C(0xffffffff);
  if (!fits) return generic_error(fmt::format("Parameter '{}' expects uint32_t", name));
  return static_cast<uint32_t>(v.get<uint64_t>());
}

tl::unexpected<QmpError> not_running() { return generic_error("NBD server not running"); }

const Schema kNone = {};
const Schema kExportAdd = {
    {"type", Type::kString, true}, {"id", Type::kString, true},
    {"node-name", Type::kString, true}, {"name", Type::kString},
    {"description", Type::kString}, {"writable", Type::kBool},
    {"writethrough", Type::kBool}, {"allocation-depth", Type::kBool},
    {"bitmaps", Type::kAny},
};

// block-export-add's `bitmaps`: names, or {node, name} objects (QEMU 7.2's
// BlockDirtyBitmapOrStr).
QResult<std::vector<nbd::ExportConfig::BitmapRef>> bitmap_refs(const Json& a) {
  std::vector<nbd::ExportConfig::BitmapRef> out;
  if (!a.contains("bitmaps")) return out;
  const Json& list = a["bitmaps"];
  if (!list.is_array())
    return generic_error("Invalid parameter type for 'bitmaps', expected: array");
  for (const Json& b : list) {
    if (b.is_string()) {
      out.push_back({"", b.get<std::string>()});
    } else if (b.is_object() && b.size() == 2 && b.contains("node") && b["node"].is_string() &&
               b.contains("name") && b["name"].is_string()) {
      out.push_back({b["node"].get<std::string>(), b["name"].get<std::string>()});
    } else {
      return generic_error(
          "Invalid parameter type for 'bitmaps[]', expected: BlockDirtyBitmapOrStr");
    }
  }
  return out;
}
const Schema kExportDel = {{"id", Type::kString, true},
                           {"mode", Type::kEnum, false, {"safe", "hard"}}};

}  // namespace

struct Daemon::NbdCommands {
  static Task<QResult<Json>> nbd_server_start(Daemon& d, Json& args, const Call& call);
  // nbd-server-start's tls-creds and tls-authz, loaded (nullptr: no TLS).
  static QResult<std::shared_ptr<const nbd::TlsServerCreds>> server_tls(Daemon& d, const Json& a);
  static Task<QResult<Json>> nbd_server_stop(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> block_export_add(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> block_export_del(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query_block_exports(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::nbd_commands() {
  static const Command table[] = {
      // nbd-server-start checks its arguments itself (addr is a union).
      {"nbd-server-start", nullptr, &NbdCommands::nbd_server_start},
      {"nbd-server-stop", &kNone, &NbdCommands::nbd_server_stop},
      {"block-export-add", &kExportAdd, &NbdCommands::block_export_add},
      {"block-export-del", &kExportDel, &NbdCommands::block_export_del},
      {"query-block-exports", &kNone, &NbdCommands::query_block_exports},
  };
  return table;
}

Task<QResult<Json>> Daemon::NbdCommands::nbd_server_start(Daemon& d, Json& a, const Call& call) {
  if (auto r = check(a, kStart, "", call.coerce); !r) co_return tl::unexpected(r.error());
  Json& addr = a["addr"];
  bool is_unix = addr["type"] == "unix";
  if (auto r = check(addr["data"], is_unix ? kUnixData : kInetData, "addr.data.", call.coerce); !r)
    co_return tl::unexpected(r.error());
  nbd::ServerLimits limits;
  auto max_conn = uint32_member(a, "max-connections", 0);
  if (!max_conn) co_return tl::unexpected(max_conn.error());
  auto handshake = uint32_member(a, "handshake-max-seconds", 10);
  if (!handshake) co_return tl::unexpected(handshake.error());
  limits.max_connections = *max_conn;
  limits.handshake_limit = std::chrono::seconds(*handshake);
  if (d.nbd_) co_return generic_error("NBD server already running");
  auto tls = server_tls(d, a);
  if (!tls) co_return tl::unexpected(tls.error());
  auto server = std::make_unique<nbd::NbdServer>(d.loop_, d.graph_, limits);
  server->set_tls(*tls);
  Json& data = addr["data"];
  if (is_unix) {
    if (data.value("abstract", false))
      co_return generic_error("Abstract UNIX sockets are not supported");
    if (auto r = server->listen_unix(data["path"].get<std::string>()); !r)
      co_return generic_error(fmt::format("Failed to bind socket to {}: {}",
                                          data["path"].get<std::string>(), r.error().message()));
  } else {
    std::string host_s = data["host"].get<std::string>(), port_s = data["port"].get<std::string>();
    auto host = parse_host(host_s);
    if (!host) co_return generic_error(bad_value("addr.data.host", host_s));
    auto port = parse_port(port_s);
    if (!port) co_return generic_error(bad_value("addr.data.port", port_s));
    if (auto r = server->listen_tcp(*host, *port); !r)
      co_return generic_error(fmt::format("Failed to listen on {}: {}",
                                          format_host_port(*host, *port), r.error().message()));
  }
  d.nbd_ = std::move(server);
  d.nbd_tls_creds_ = a.value("tls-creds", "");
  d.nbd_tls_authz_ = a.value("tls-authz", "");
  co_return Json::object();
}

QResult<std::shared_ptr<const nbd::TlsServerCreds>> Daemon::NbdCommands::server_tls(Daemon& d,
                                                                                  const Json& a) {
  if (!a.contains("tls-creds")) {
    if (a.contains("tls-authz"))
      return generic_error("'tls-authz' is only supported with 'tls-creds'");
    return nullptr;
  }
  auto obj = d.tls_creds(a["tls-creds"].get<std::string>());
  if (!obj) return tl::unexpected(obj.error());
  const QomObject& o = **obj;
  if (o.endpoint != "server")
    return generic_error("Expected TLS credentials for a server endpoint");
  nbd::TlsServerConfig cfg;
  if (o.type == "tls-creds-psk") {
    cfg.kind = nbd::TlsServerConfig::Kind::kPsk;
    cfg.psk_file = o.dir + "/keys.psk";  // QEMU's layout of a PSK directory
  } else {
    cfg.dir = o.dir;
    cfg.verify_peer = o.verify_peer;
  }
  if (a.contains("tls-authz")) {
    // QEMU looks the object up for each client and denies all when it is
    // missing; here it is looked up once, and must exist.
    const std::string authz = a["tls-authz"].get<std::string>();
    auto z = d.objects_.find(authz);
    if (z == d.objects_.end() || z->second.is_tls_creds())
      return generic_error(fmt::format("No authorization object with id '{}'", authz));
    cfg.authz = z->second.authz;
  }
  auto creds = nbd::TlsServerCreds::load(cfg);
  if (!creds) return generic_error(creds.error().message());
  return *creds;
}

Task<QResult<Json>> Daemon::NbdCommands::nbd_server_stop(Daemon& d, Json& args, const Call& call) {
  if (!d.nbd_) co_return not_running();
  auto server = std::move(d.nbd_);
  co_await server->stop();
  auto gone = std::move(d.exports_);
  for (auto& [id, e] : gone) d.emit("BLOCK_EXPORT_DELETED", {{"id", id}});
  co_return Json::object();
}

Task<QResult<Json>> Daemon::NbdCommands::block_export_add(Daemon& d, Json& a, const Call& call) {
  std::string type = a["type"].get<std::string>();
  if (type != "nbd")
    co_return generic_error(fmt::format("Export type '{}' is not supported by blkmirror", type));
  if (a.value("writethrough", false))
    co_return generic_error(
        "Parameter 'writethrough' is not supported yet (use FUA or flush from the client)");
  if (!d.nbd_) co_return not_running();
  ExportRecord rec;
  rec.id = a["id"].get<std::string>();
  rec.node = a["node-name"].get<std::string>();
  rec.name = a.value("name", rec.node);
  rec.writable = a.value("writable", false);
  if (!id_wellformed(rec.id))
    co_return generic_error(fmt::format("Invalid block export id '{}'", rec.id));
  if (d.exports_.count(rec.id))
    co_return generic_error(fmt::format("Block export id '{}' is already in use", rec.id));
  if (rec.name.size() > 4096) co_return generic_error("export name too long to send to clients");
  nbd::ExportConfig cfg{rec.name, rec.node, a.value("description", std::string()), rec.writable,
                        a.value("allocation-depth", false)};
  auto bitmaps = bitmap_refs(a);
  if (!bitmaps) co_return tl::unexpected(bitmaps.error());
  cfg.bitmaps = std::move(*bitmaps);
  if (auto r = d.nbd_->add_export(cfg); !r) co_return generic_error(r.error().message());
  d.exports_.emplace(rec.id, rec);
  co_return Json::object();
}

Task<QResult<Json>> Daemon::NbdCommands::block_export_del(Daemon& d, Json& a, const Call& call) {
  std::string id = a["id"].get<std::string>();
  auto it = d.exports_.find(id);
  if (it == d.exports_.end() || !d.nbd_)
    co_return generic_error(fmt::format("Export '{}' is not found", id));
  bool hard = a.value("mode", "safe") == "hard";
  std::string name = it->second.name;
  if (!hard && d.nbd_->clients_of(name) > 0)
    co_return generic_error(
        fmt::format("export '{}' still in use (use mode 'hard' to disconnect its clients)", id));
  if (auto r = co_await d.nbd_->remove_export(name); !r)
    co_return generic_error(r.error().message());
  d.exports_.erase(id);
  d.emit("BLOCK_EXPORT_DELETED", {{"id", id}});
  co_return Json::object();
}

Task<QResult<Json>> Daemon::NbdCommands::query_block_exports(Daemon& d, Json& args,
                                                             const Call& call) {
  Json list = Json::array();
  for (auto& [id, rec] : d.exports_) {
    // After a mirror's switch-over the export serves the target: say so.
    std::string node = rec.node;
    if (d.nbd_) {
      if (nbd::Export* e = d.nbd_->find_export(rec.name)) node = e->edge->node().name();
    }
    list.push_back({{"type", "nbd"}, {"id", id}, {"node-name", node}, {"shutting-down", false}});
  }
  co_return list;
}

}  // namespace blkmirror::qmp
