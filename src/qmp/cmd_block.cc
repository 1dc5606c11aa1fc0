// Block node commands: blockdev-add, blockdev-del, blockdev-create and
// query-named-block-nodes.
#include <sys/stat.h>

#include <filesystem>

// GCC 12 rule 4 (base/task.h): a false -Wmismatched-new-delete on the Asio
// coroutine frames of the recursive blockdev-add (an inline file node).
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/host_port.h"
#include "blockdev/fault_device.h"
#include "blockdev/file_device.h"
#include "blockdev/nbd_device.h"
#include "blockdev/null_device.h"
#include "blockdev/raw_device.h"
#include "qmp/create_job.h"
#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kCache = {{"direct", Type::kBool}, {"no-flush", Type::kBool}};

// Members every node takes, whatever its driver.
Schema common_members() {
  return {
      {"driver", Type::kString, true},
      {"node-name", Type::kString, true},
      {"read-only", Type::kBool},
      {"auto-read-only", Type::kBool},
      {"force-share", Type::kBool},
      {"discard", Type::kEnum, false, {"unmap"}},
      {"detect-zeroes", Type::kEnum, false, {"off"}},
      {"cache", Type::kObject, false, {}, &kCache},
  };
}

Schema with(Schema s, std::initializer_list<Field> more) {
  s.insert(s.end(), more);
  return s;
}

const Schema kFile = with(common_members(), {{"filename", Type::kString, true},
                                             {"aio", Type::kEnum, false, {"threads", "native", "io_uring"}},
                                             {"locking", Type::kEnum, false, {"auto", "on", "off"}}});
const Schema kRaw = with(common_members(), {{"file", Type::kAny, true}});
const Schema kBlkdebug = with(common_members(), {{"image", Type::kAny, true}, {"inject-error", Type::kAny}});
const Schema kInjectError = {{"event", Type::kString},
                             {"iotype", Type::kEnum, false,
                              {"read", "write", "write-zeroes", "discard", "flush", "block-status"}},
                             {"errno", Type::kInt},
                             {"sector", Type::kInt},
                             {"once", Type::kBool},
                             {"immediately", Type::kBool}};
const Schema kNbdServer = {{"type", Type::kEnum, true, {"unix", "inet"}},
                           {"path", Type::kString},
                           {"host", Type::kString},
                           {"port", Type::kString},
                           {"abstract", Type::kBool},
                           {"numeric", Type::kBool}};
const Schema kNbd = with(common_members(), {{"server", Type::kObject, true, {}, &kNbdServer},
                                            {"export", Type::kString},
                                            {"tls-creds", Type::kString}});
const Schema kNull = with(common_members(), {{"size", Type::kInt, true}, {"read-zeroes", Type::kBool}});

const Schema kCreateFile = {{"driver", Type::kString, true},
                            {"filename", Type::kString, true},
                            {"size", Type::kInt, true},
                            {"preallocation", Type::kEnum, false, {"off", "falloc", "full"}},
                            {"nocow", Type::kBool}};
const Schema kCreate = {{"job-id", Type::kString, true}, {"options", Type::kObject, true}};
const Schema kBlockdevDel = {{"node-name", Type::kString, true}};
const Schema kQueryNodes = {{"flat", Type::kBool}};

// blkdebug's inject-error list as FaultDevice rules. The subset of QEMU's
// blkdebug: an I/O type (or the read_aio/write_aio/flush_to_disk event that
// implies one), an errno, a 512-byte sector (-1 or absent: any) and `once`.
QResult<std::vector<FaultRule>> inject_rules(Json& list, bool coerce) {
  std::vector<FaultRule> rules;
  if (list.is_null()) return rules;
  if (!list.is_array()) return generic_error("Invalid parameter type for 'inject-error', expected: array");
  for (size_t i = 0; i < list.size(); ++i) {
    std::string prefix = fmt::format("inject-error[{}].", i);
    if (auto r = check(list[i], kInjectError, prefix, coerce); !r) return tl::unexpected(r.error());
    Json& e = list[i];
    FaultRule rule;
    std::string io = e.value("iotype", "");
    if (io.empty()) {
      std::string ev = e.value("event", "");
      if (ev == "read_aio") io = "read";
      else if (ev == "write_aio") io = "write";
      else if (ev == "flush_to_disk") io = "flush";
      else return generic_error(fmt::format("blkdebug: give {}iotype (event '{}' is not supported)", prefix, ev));
    }
    rule.ops = io == "read"           ? FaultRule::kRead
               : io == "write"        ? unsigned{FaultRule::kAllWrites}
               : io == "write-zeroes" ? FaultRule::kZero
               : io == "discard"      ? FaultRule::kDiscard
               : io == "flush"        ? FaultRule::kFlush
                                      : FaultRule::kBlockStatus;
    int64_t errnum = e.value("errno", int64_t{EIO});
    if (errnum <= 0 || errnum > 4095) return generic_error(fmt::format("Parameter '{}errno' expects a positive errno", prefix));
    rule.errnum = static_cast<int>(errnum);
    int64_t sector = e.value("sector", int64_t{-1});
    if (sector < -1) return generic_error(fmt::format("Parameter '{}sector' expects -1 or a sector number", prefix));
    if (sector >= 0) rule.offset = static_cast<uint64_t>(sector) * 512, rule.length = 512;
    if (e.value("once", false)) rule.remaining = 1;
    rules.push_back(rule);
  }
  return rules;
}

uint64_t allocated_bytes(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
}

}  // namespace

struct Daemon::BlockCommands {
  static Task<QResult<Json>> blockdev_add(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> blockdev_del(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> blockdev_create(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query_named_block_nodes(Daemon& d, Json& args, const Call& call);
  static Task<QResult<BlockDevicePtr>> open_nbd_node(Daemon& d, Json& args);
};

std::span<const Daemon::Command> Daemon::block_commands() {
  // blockdev-add and blockdev-create check their arguments themselves: the
  // members depend on the driver (QAPI's unions).
  static const Command table[] = {
      {"blockdev-add", nullptr, &BlockCommands::blockdev_add},
      {"blockdev-del", &kBlockdevDel, &BlockCommands::blockdev_del},
      {"blockdev-create", nullptr, &BlockCommands::blockdev_create},
      {"query-named-block-nodes", &kQueryNodes, &BlockCommands::query_named_block_nodes},
  };
  return table;
}

QResult<std::string> Daemon::checked_path(const std::string& path) const {
  if (path.empty()) return generic_error("The filename must not be empty");
  if (opts_.file_root.empty()) return path;
  std::error_code ec;
  auto root = std::filesystem::weakly_canonical(opts_.file_root, ec);
  auto full = std::filesystem::weakly_canonical(std::filesystem::absolute(path, ec), ec);
  if (ec) return generic_error(fmt::format("Could not resolve '{}': {}", path, ec.message()));
  auto rel = full.lexically_relative(root);
  if (rel.empty() || *rel.begin() == "..")
    return generic_error(fmt::format("'{}' is outside the daemon's file root '{}'", path, opts_.file_root));
  return full.string();
}

Task<QResult<Json>> Daemon::BlockCommands::blockdev_add(Daemon& d, Json& args, const Call& call) {
  auto drv = args.find("driver");
  if (drv == args.end()) co_return generic_error("Parameter 'driver' is missing");
  if (!drv->is_string()) co_return generic_error("Invalid parameter type for 'driver', expected: string");
  const std::string driver = drv->get<std::string>();
  const Schema* schema = driver == "file"       ? &kFile
                         : driver == "raw"      ? &kRaw
                         : driver == "null-co"  ? &kNull
                         : driver == "blkdebug" ? &kBlkdebug
                         : driver == "nbd"      ? &kNbd
                                                : nullptr;
  if (!schema) co_return generic_error(bad_value("driver", driver));
  if (auto r = check(args, *schema, "", call.coerce); !r) co_return tl::unexpected(r.error());

  const std::string name = args["node-name"].get<std::string>();
  if (!id_wellformed(name)) co_return generic_error(fmt::format("Invalid node-name: '{}'", name));
  if (d.graph_.find(name)) co_return generic_error(fmt::format("Duplicate nodes with node-name='{}'", name));
  NodeRecord rec;
  rec.driver = driver;
  rec.read_only = args.value("read-only", false);
  rec.direct = args.contains("cache") && args["cache"].value("direct", false);
  BlockDevicePtr dev;
  if (driver == "file") {
    auto path = d.checked_path(args["filename"].get<std::string>());
    if (!path) co_return tl::unexpected(path.error());
    rec.filename = args["filename"].get<std::string>();
    auto f = FileDevice::open(d.loop_, *path, FileOptions{.read_only = rec.read_only, .direct = rec.direct});
    if (!f) {
      co_return generic_error(fmt::format("Could not open '{}': {}", rec.filename,
                                          f.error().plain ? f.error().message() : f.error().reason()));
    }
    dev = *f;
  } else if (driver == "nbd") {
    auto nbd = co_await open_nbd_node(d, args);
    if (!nbd) co_return tl::unexpected(nbd.error());
    dev = *nbd;
    rec.filename = dev->describe();
    rec.tls_creds = args.value("tls-creds", "");
  } else if (driver == "null-co") {
    int64_t size = args["size"].get<int64_t>();
    if (size < 0) co_return generic_error("Parameter 'size' expects a non-negative value");
    rec.filename = "null-co://";
    dev = std::make_shared<NullDevice>(static_cast<uint64_t>(size));
  } else {  // raw and blkdebug: a format over another node
    std::vector<FaultRule> rules;
    if (driver == "blkdebug") {
      auto r = inject_rules(args["inject-error"], call.coerce);
      if (!r) co_return tl::unexpected(r.error());
      rules = std::move(*r);
    }
    Json& file = args[driver == "raw" ? "file" : "image"];
    std::string child;
    if (file.is_string()) {
      child = file.get<std::string>();
    } else if (file.is_object()) {
      // An inline file node, as libvirt writes it: give it a name of its own.
      if (!file.contains("node-name")) {
        std::string gen;
        for (int i = 0; d.graph_.find(gen = fmt::format("{}-file{}", name, i == 0 ? "" : std::to_string(i))); ++i) {}
        file["node-name"] = gen;
      }
      auto r = co_await blockdev_add(d, file, call);
      if (!r) {
        QmpError e = r.error();
        co_return tl::unexpected(e);
      }
      child = file["node-name"].get<std::string>();
    } else {
      co_return generic_error(fmt::format("Invalid parameter type for '{}', expected: object or string",
                                          driver == "raw" ? "file" : "image"));
    }
    Node* fnode = d.graph_.find(child);
    if (!fnode) co_return generic_error(fmt::format("Cannot find device='' nor node-name='{}'", child));
    rec.filename = d.nodes_.count(child) ? d.nodes_[child].filename : child;
    rec.file_edge = d.graph_.attach(fnode, "raw node " + name);
    dev = std::make_shared<RawDevice>(rec.file_edge.get(), rec.read_only);
    if (driver == "blkdebug") {
      auto fault = std::make_shared<FaultDevice>(dev);
      for (auto& r : rules) fault->add_rule(r);
      dev = fault;
    }
  }
  if (auto r = d.graph_.add(name, dev); !r) co_return generic_error(r.error().message());
  d.nodes_.emplace(name, std::move(rec));
  co_return Json::object();
}

// blockdev-add driver nbd: server {type: unix, path} | {type: inet, host, port},
// export, tls-creds naming a tls-creds-x509/-psk object with a client endpoint.
Task<QResult<BlockDevicePtr>> Daemon::BlockCommands::open_nbd_node(Daemon& d, Json& args) {
  Json& srv = args["server"];
  NbdConnectOptions o;
  if (srv["type"] == "unix") {
    if (!srv.contains("path")) co_return generic_error("Parameter 'server.path' is missing");
    if (srv.value("abstract", false)) co_return generic_error("Abstract UNIX sockets are not supported");
    o.transport = NbdTransport::kUnix;
    o.path = srv["path"].get<std::string>();
  } else {
    if (!srv.contains("host")) co_return generic_error("Parameter 'server.host' is missing");
    if (!srv.contains("port")) co_return generic_error("Parameter 'server.port' is missing");
    o.transport = NbdTransport::kTcp;
    std::string host = srv["host"].get<std::string>(), port = srv["port"].get<std::string>();
    auto h = parse_host(host);
    if (!h)
      co_return generic_error(
          fmt::format("Parameter 'server.host' does not accept value '{}'", host));
    auto n = parse_port(port, false);
    if (!n)
      co_return generic_error(
          fmt::format("Parameter 'server.port' does not accept value '{}'", port));
    o.host = *h;
    o.port = *n;
  }
  for (const char* k : {"path", "host", "port"}) {
    bool wanted = o.transport == NbdTransport::kUnix ? std::string_view(k) == "path" : std::string_view(k) != "path";
    if (srv.contains(k) && !wanted) co_return generic_error(fmt::format("Parameter 'server.{}' is unexpected", k));
  }
  o.export_name = args.value("export", "");
  if (args.contains("tls-creds")) {
    std::string id = args["tls-creds"].get<std::string>();
    auto it = d.objects_.find(id);
    if (it == d.objects_.end()) co_return generic_error(fmt::format("No TLS credentials with id '{}'", id));
    const TlsObject& t = it->second;
    if (t.endpoint != "client") co_return generic_error("Expecting TLS credentials with a client endpoint");
    if (t.type == "tls-creds-x509") {
      o.tls = NbdTls::kX509;
      o.tls_cert_dir = t.dir;
      o.verify_peer = t.verify_peer;
    } else {
      o.tls = NbdTls::kPsk;
      o.tls_psk_file = t.dir + "/keys.psk";  // QEMU's layout of a PSK directory
      o.tls_username = t.username;
    }
  }
  if (auto v = o.validate(); !v) co_return generic_error(v.error().message());
  if (auto caveat = o.tls_caveat(); !caveat.empty()) spdlog::warn("{}", caveat);
  auto dev = co_await open_nbd(d.loop_, o);
  if (!dev) co_return generic_error(dev.error().message());
  if (args.value("read-only", false) == false && (*dev)->caps().read_only)
    co_return generic_error(fmt::format("{}: the export is read-only; add it with read-only=true", o.display()));
  co_return *dev;
}

Task<QResult<Json>> Daemon::BlockCommands::blockdev_del(Daemon& d, Json& args, const Call& call) {
  const std::string name = args["node-name"].get<std::string>();
  Node* n = d.graph_.find(name);
  if (!n) co_return generic_error(fmt::format("Failed to find node with node-name='{}'", name));
  if (!n->parents().empty()) {
    std::string users;
    for (const Child* c : n->parents()) users += (users.empty() ? "" : ", ") + c->role();
    co_return generic_error(fmt::format("Node '{}' is busy: in use by {}", name, users));
  }
  // The node's own edge (raw -> file) goes first, then the node.
  if (auto it = d.nodes_.find(name); it != d.nodes_.end()) d.nodes_.erase(it);
  if (auto r = d.graph_.remove(name); !r) co_return generic_error(r.error().message());
  co_return Json::object();
}

Task<QResult<Json>> Daemon::BlockCommands::blockdev_create(Daemon& d, Json& args, const Call& call) {
  if (auto r = check(args, kCreate, "", call.coerce); !r) co_return tl::unexpected(r.error());
  Json& o = args["options"];
  auto drv = o.find("driver");
  if (drv == o.end()) co_return generic_error("Parameter 'options.driver' is missing");
  if (!drv->is_string() || *drv != "file")
    co_return generic_error(bad_value("options.driver", drv->is_string() ? drv->get<std::string>() : drv->dump()));
  if (auto r = check(o, kCreateFile, "options.", call.coerce); !r) co_return tl::unexpected(r.error());
  std::string id = args["job-id"].get<std::string>();
  if (!id_wellformed(id)) co_return generic_error(fmt::format("Invalid job ID '{}'", id));
  if (d.jobs_.count(id)) co_return generic_error(fmt::format("Job ID '{}' already in use", id));
  int64_t size = o["size"].get<int64_t>();
  if (size < 0) co_return generic_error("Parameter 'size' expects a non-negative value");
  auto path = d.checked_path(o["filename"].get<std::string>());
  if (!path) co_return tl::unexpected(path.error());
  CreateFileSpec spec{*path, static_cast<uint64_t>(size), o.value("preallocation", "off")};
  d.add_job(std::make_shared<CreateJob>(d.loop_, id, std::move(spec)));
  co_return Json::object();
}

Task<QResult<Json>> Daemon::BlockCommands::query_named_block_nodes(Daemon& d, Json& args, const Call& call) {
  Json list = Json::array();
  for (Node* n : d.graph_.nodes()) {
    auto it = d.nodes_.find(n->name());
    std::string drv = it != d.nodes_.end() ? it->second.driver : "file";
    std::string filename = it != d.nodes_.end() ? it->second.filename : n->device().describe();
    bool direct = it != d.nodes_.end() && it->second.direct;
    const BlockCaps& caps = n->device().caps();
    Json image = {{"filename", filename},
                  {"format", drv},
                  {"virtual-size", n->length()},
                  {"dirty-flag", false}};
    if (drv == "file" || drv == "raw") image["actual-size"] = allocated_bytes(filename);
    list.push_back({
        {"node-name", n->name()},
        {"drv", drv},
        {"file", filename},
        {"ro", caps.read_only},
        {"image", image},
        {"cache", {{"writeback", true}, {"direct", direct}, {"no-flush", false}}},
        {"detect_zeroes", "off"},
        {"encrypted", false},
        {"backing_file_depth", 0},
        {"write_threshold", 0},
        {"bps", 0}, {"bps_rd", 0}, {"bps_wr", 0},
        {"iops", 0}, {"iops_rd", 0}, {"iops_wr", 0},
    });
  }
  co_return list;
}

}  // namespace blkmirror::qmp
