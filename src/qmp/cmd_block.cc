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
#include "qmp/rbd_node.h"

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

const Schema kFile =
    with(common_members(), {{"filename", Type::kString, true},
                            {"aio", Type::kEnum, false, {"threads", "native", "io_uring"}},
                            {"locking", Type::kEnum, false, {"auto", "on", "off"}}});
const Schema kRaw = with(common_members(), {{"file", Type::kAny, true}});
const Schema kBlkdebug =
    with(common_members(), {{"image", Type::kAny, true}, {"inject-error", Type::kAny}});
const Schema kInjectError = {
    {"event", Type::kString},
    {"iotype",
     Type::kEnum,
     false,
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
const Schema kNull =
    with(common_members(), {{"size", Type::kInt, true}, {"read-zeroes", Type::kBool}});
// QEMU's BlockdevOptionsQcow2: the members blkmirror acts on, and the tuning
// knobs it accepts and leaves to its own defaults (caches, discard passing,
// overlap checks). encrypt and data-file are refused when given.
const Schema kQcow2 = with(common_members(), {{"file", Type::kAny, true},
                                              {"backing", Type::kAny},
                                              {"l2-cache-size", Type::kInt},
                                              {"l2-cache-entry-size", Type::kInt},
                                              {"cache-size", Type::kInt},
                                              {"refcount-cache-size", Type::kInt},
                                              {"cache-clean-interval", Type::kInt},
                                              {"lazy-refcounts", Type::kBool},
                                              {"pass-discard-request", Type::kBool},
                                              {"pass-discard-snapshot", Type::kBool},
                                              {"pass-discard-other", Type::kBool},
                                              {"overlap-check", Type::kAny},
                                              {"encrypt", Type::kAny},
                                              {"data-file", Type::kAny}});

const Schema kCreateFile = {{"driver", Type::kString, true},
                            {"filename", Type::kString, true},
                            {"size", Type::kInt, true},
                            {"preallocation", Type::kEnum, false, {"off", "falloc", "full"}},
                            {"nocow", Type::kBool}};
const Schema kRbd = [] {
  Schema s = common_members();
  Schema more = rbd_location_members();
  s.insert(s.end(), more.begin(), more.end());
  return s;
}();
const Schema kCreate = {{"job-id", Type::kString, true}, {"options", Type::kObject, true}};
const Schema kBlockdevDel = {{"node-name", Type::kString, true}};
const Schema kQueryNodes = {{"flat", Type::kBool}};

// blkdebug's inject-error list as FaultDevice rules. The subset of QEMU's
// blkdebug: an I/O type (or the read_aio/write_aio/flush_to_disk event that
// implies one), an errno, a 512-byte sector (-1 or absent: any) and `once`.
QResult<std::vector<FaultRule>> inject_rules(Json& list, bool coerce) {
  std::vector<FaultRule> rules;
  if (list.is_null()) return rules;
  if (!list.is_array())
    return generic_error("Invalid parameter type for 'inject-error', expected: array");
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
      else
        return generic_error(
            fmt::format("blkdebug: give {}iotype (event '{}' is not supported)", prefix, ev));
    }
    rule.ops = io == "read"           ? FaultRule::kRead
               : io == "write"        ? unsigned{FaultRule::kAllWrites}
               : io == "write-zeroes" ? FaultRule::kZero
               : io == "discard"      ? FaultRule::kDiscard
               : io == "flush"        ? FaultRule::kFlush
                                      : FaultRule::kBlockStatus;
    int64_t errnum = e.value("errno", int64_t{EIO});
    if (errnum <= 0 || errnum > 4095)
      return generic_error(fmt::format("Parameter '{}errno' expects a positive errno", prefix));
    rule.errnum = static_cast<int>(errnum);
    int64_t sector = e.value("sector", int64_t{-1});
    if (sector < -1)
      return generic_error(
          fmt::format("Parameter '{}sector' expects -1 or a sector number", prefix));
    if (sector >= 0) rule.offset = static_cast<uint64_t>(sector) * 512, rule.length = 512;
    if (e.value("once", false)) rule.remaining = 1;
    rules.push_back(rule);
  }
  return rules;
}

}  // namespace

struct Daemon::BlockCommands {
  static Task<QResult<Json>> blockdev_add(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> blockdev_del(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> blockdev_create(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query_named_block_nodes(Daemon& d, Json& args, const Call& call);
  static Task<QResult<BlockDevicePtr>> open_nbd_node(Daemon& d, Json& args);
  static Task<QResult<Json>> create_rbd(Daemon& d, Json& args, Json& o, const Call& call);
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

const Schema* Daemon::node_schema(std::string_view driver) {
  return driver == "file"       ? &kFile
         : driver == "raw"      ? &kRaw
         : driver == "qcow2"    ? &kQcow2
         : driver == "null-co"  ? &kNull
         : driver == "blkdebug" ? &kBlkdebug
         : driver == "nbd"      ? &kNbd
         : driver == "rbd"      ? &kRbd
                                : nullptr;
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
    return generic_error(
        fmt::format("'{}' is outside the daemon's file root '{}'", path, opts_.file_root));
  return full.string();
}

Task<QResult<Json>> Daemon::BlockCommands::blockdev_add(Daemon& d, Json& args, const Call& call) {
  co_return co_await d.add_node(args, call, nullptr, false);
}

Task<QResult<std::string>> Daemon::child_ref(Json& ref, const std::string& parent,
                                             const std::string& member, bool parent_read_only,
                                             NodeRecord& rec, const Call& call, ChainGuard* guard,
                                             bool trusted) {
  if (ref.is_string()) co_return ref.get<std::string>();
  if (!ref.is_object())
    co_return generic_error(
        fmt::format("Invalid parameter type for '{}', expected: object or string", member));
  // An inline node, as libvirt writes it: give it a name of its own. It
  // inherits read-only from its parent, and goes away with it.
  if (!ref.contains("node-name")) {
    std::string gen;
    for (int i = 0;
         graph_.find(gen = fmt::format("{}-{}{}", parent, member, i == 0 ? "" : std::to_string(i)));
         ++i) {
    }
    ref["node-name"] = gen;
  }
  if (parent_read_only && !ref.contains("read-only")) ref["read-only"] = true;
  // Names below a node this daemon named (#blockN) are ours too.
  auto r = co_await add_node(ref, call, guard, trusted);
  if (!r) {
    QmpError e = r.error();
    co_return tl::unexpected(e);
  }
  std::string child = ref["node-name"].get<std::string>();
  rec.implicit.push_back(child);
  co_return child;
}

Task<QResult<Json>> Daemon::add_node(Json& args, const Call& call, ChainGuard* guard,
                                     bool implicit_name) {
  Daemon& d = *this;
  auto drv = args.find("driver");
  if (drv == args.end()) co_return generic_error("Parameter 'driver' is missing");
  if (!drv->is_string())
    co_return generic_error("Invalid parameter type for 'driver', expected: string");
  const std::string driver = drv->get<std::string>();
  const Schema* schema = node_schema(driver);
  if (!schema) co_return generic_error(bad_value("driver", driver));
  if (auto r = check(args, *schema, "", call.coerce); !r) co_return tl::unexpected(r.error());

  const std::string name = args["node-name"].get<std::string>();
  if (!implicit_name && !id_wellformed(name))
    co_return generic_error(fmt::format("Invalid node-name: '{}'", name));
  if (d.graph_.find(name))
    co_return generic_error(fmt::format("Duplicate nodes with node-name='{}'", name));
  NodeRecord rec;
  rec.driver = driver;
  rec.read_only = args.value("read-only", false);
  rec.direct = args.contains("cache") && args["cache"].value("direct", false);
  BlockDevicePtr dev;
  // A failure after an inline child was added takes the child away again:
  // a refused blockdev-add leaves no nodes behind.
  auto fail = [](Daemon* d, NodeRecord* r, QmpError e) -> Task<QResult<Json>> {
    // An image opened writable marked its bitmaps in use: closing it again
    // (nothing written) clears the marks.
    if (r->qcow2) (void)co_await r->qcow2->close();
    r->file_edge.reset();
    r->backing_edge.reset();
    r->qcow2.reset();
    for (auto& n : r->implicit) co_await d->remove_node_tree(n);
    co_return tl::unexpected(e);
  };
  if (driver == "file") {
    auto path = d.checked_path(args["filename"].get<std::string>());
    if (!path) co_return tl::unexpected(path.error());
    rec.filename = args["filename"].get<std::string>();
    rec.local = true;
    if (guard) {
      if (auto g = guard->enter(*path); !g) co_return generic_error(g.error().message());
    }
    bool force_share = args.value("force-share", false);
    if (force_share && !rec.read_only)
      co_return generic_error("force-share=on can only be used with read-only images");
    auto locking = parse_lock_mode(args.value("locking", "auto"));  // the schema checked the value
    auto f = FileDevice::open(d.loop_, *path,
                              FileOptions{.read_only = rec.read_only,
                                          .direct = rec.direct,
                                          .locking = locking.value_or(LockMode::kAuto),
                                          .force_share = force_share});
    if (!f) {
      co_return generic_error(
          fmt::format("Could not open '{}': {}", rec.filename,
                      f.error().plain ? f.error().message() : f.error().reason()));
    }
    dev = *f;
  } else if (driver == "nbd") {
    auto nbd = co_await BlockCommands::open_nbd_node(d, args);
    if (!nbd) co_return tl::unexpected(nbd.error());
    dev = *nbd;
    rec.filename = dev->describe();
    rec.tls_creds = args.value("tls-creds", "");
  } else if (driver == "rbd") {
    auto rbd = co_await open_rbd_node(d.loop_, args);
    if (!rbd) co_return tl::unexpected(rbd.error());
    dev = *rbd;
    rec.filename = dev->describe();
  } else if (driver == "null-co") {
    int64_t size = args["size"].get<int64_t>();
    if (size < 0) co_return generic_error("Parameter 'size' expects a non-negative value");
    rec.filename = "null-co://";
    dev = std::make_shared<NullDevice>(static_cast<uint64_t>(size));
  } else if (driver == "qcow2") {
    auto q = co_await d.open_qcow2_node(args, name, rec, call, guard, implicit_name);
    if (!q) co_return co_await fail(this, &rec, q.error());
    dev = *q;
  } else {  // raw and blkdebug: a format over another node
    std::vector<FaultRule> rules;
    if (driver == "blkdebug") {
      auto r = inject_rules(args["inject-error"], call.coerce);
      if (!r) co_return tl::unexpected(r.error());
      rules = std::move(*r);
    }
    const char* child_name = driver == "raw" ? "file" : "image";
    auto child = co_await d.child_ref(args[child_name], name, child_name, rec.read_only, rec, call,
                                      guard, implicit_name);
    if (!child) co_return co_await fail(this, &rec, child.error());
    Node* fnode = d.graph_.find(*child);
    if (!fnode)
      co_return co_await fail(
          this, &rec,
          generic_error(fmt::format("Cannot find device='' nor node-name='{}'", *child)).value());
    if (auto it = d.nodes_.find(*child); it != d.nodes_.end()) {
      rec.filename = it->second.filename;
      rec.local = it->second.local;
    } else {
      rec.filename = *child;
    }
    // raw and blkdebug pass their parents' needs through to the file node
    // (adopted below, once the node exists).
    rec.file_edge = d.graph_.attach_child(fnode, "raw node " + name,
                                          EdgeUse{fmt::format("node '{}'", name), child_name, {}},
                                          EdgeKind::kFilteredFile);
    dev = std::make_shared<RawDevice>(rec.file_edge.get(), rec.read_only);
    if (driver == "blkdebug") {
      auto fault = std::make_shared<FaultDevice>(dev);
      for (auto& r : rules) fault->add_rule(r);
      dev = fault;
    }
  }
  // Persistent bitmaps load before the node joins the graph, so no request
  // can reach it between the two.
  auto found = d.bitmap_store_for(rec);
  if (!found) co_return co_await fail(this, &rec, found.error());
  BitmapStorePtr store = *found;
  std::vector<NamedBitmap> loaded;
  if (store) {
    auto l = co_await store->load();
    if (!l) co_return co_await fail(this, &rec, QmpError{"GenericError", l.error().message()});
    loaded = std::move(*l);
  }
  auto node = d.graph_.add(name, dev);
  if (!node) co_return co_await fail(this, &rec, QmpError{"GenericError", node.error().message()});
  for (NamedBitmap& b : loaded) (*node)->bitmaps().adopt(std::move(b));
  (*node)->set_bitmap_store(std::move(store));
  if (rec.file_edge && rec.file_edge->kind() != EdgeKind::kRoot)
    d.graph_.adopt(*node, rec.file_edge.get());
  if (rec.backing_edge) {
    d.graph_.adopt(*node, rec.backing_edge.get());
    (*node)->set_backing_edge(rec.backing_edge.get());
  }
  rec.options = args;
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
    if (srv.value("abstract", false))
      co_return generic_error("Abstract UNIX sockets are not supported");
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
    bool wanted = o.transport == NbdTransport::kUnix ? std::string_view(k) == "path"
                                                     : std::string_view(k) != "path";
    if (srv.contains(k) && !wanted)
      co_return generic_error(fmt::format("Parameter 'server.{}' is unexpected", k));
  }
  o.export_name = args.value("export", "");
  if (args.contains("tls-creds")) {
    auto creds = d.tls_creds(args["tls-creds"].get<std::string>());
    if (!creds) co_return tl::unexpected(creds.error());
    const QomObject& t = **creds;
    if (t.endpoint != "client")
      co_return generic_error("Expecting TLS credentials with a client endpoint");
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
    co_return generic_error(
        fmt::format("{}: the export is read-only; add it with read-only=true", o.display()));
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
  // An export or a job may still hold a bitmap of a node it no longer holds an
  // edge to (a mirror's switch-over moved the export away).
  for (const Node* c = n; c; c = c->backing())
    for (const NamedBitmap& b : c->bitmaps())
      if (b.busy)
        co_return generic_error(fmt::format(
            "Node '{}' is busy: its dirty bitmap '{}' is in use by another operation",
            c->name(), b.name()));
  co_await d.remove_node_tree(name);
  co_return Json::object();
}

Task<QResult<Json>> Daemon::BlockCommands::blockdev_create(Daemon& d, Json& args,
                                                           const Call& call) {
  if (auto r = check(args, kCreate, "", call.coerce); !r) co_return tl::unexpected(r.error());
  Json& o = args["options"];
  auto drv = o.find("driver");
  if (drv == o.end()) co_return generic_error("Parameter 'options.driver' is missing");
  if (!drv->is_string() || (*drv != "file" && *drv != "qcow2" && *drv != "rbd"))
    co_return generic_error(
        bad_value("options.driver", drv->is_string() ? drv->get<std::string>() : drv->dump()));
  if (*drv == "qcow2") co_return co_await d.create_qcow2(args, o, call);
  if (*drv == "rbd") co_return co_await BlockCommands::create_rbd(d, args, o, call);
  if (auto r = check(o, kCreateFile, "options.", call.coerce); !r)
    co_return tl::unexpected(r.error());
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

// blockdev-create driver rbd: {location: BlockdevOptionsRbd, size, cluster-size}
// (cluster-size is the object size). A "create" job like the file driver's.
Task<QResult<Json>> Daemon::BlockCommands::create_rbd(Daemon& d, Json& args, Json& o,
                                                      const Call& call) {
  if (auto r = check(o, rbd_create_schema(), "options.", call.coerce); !r)
    co_return tl::unexpected(r.error());
  if (o.contains("encrypt"))
    co_return generic_error("Parameter 'options.encrypt': rbd encryption is not supported");
  std::string id = args["job-id"].get<std::string>();
  if (!id_wellformed(id)) co_return generic_error(fmt::format("Invalid job ID '{}'", id));
  if (d.jobs_.count(id)) co_return generic_error(fmt::format("Job ID '{}' already in use", id));
  auto spec = rbd_spec_from_json(o["location"], "options.location.");
  if (!spec) co_return tl::unexpected(spec.error());
  if (spec->snapshot)
    co_return generic_error("Parameter 'options.location.snapshot': cannot create a snapshot");
  int64_t size = o["size"].get<int64_t>();
  if (size < 0) co_return generic_error("Parameter 'size' expects a non-negative value");
  RbdCreateOptions opts;
  opts.size = static_cast<uint64_t>(size);
  if (o.contains("cluster-size")) {
    int64_t cs = o["cluster-size"].get<int64_t>();
    if (cs < 4096 || cs > (32 << 20) || (cs & (cs - 1)) != 0)
      co_return generic_error(
          "Parameter 'options.cluster-size': the object size must be a power of two from 4 KiB "
          "to 32 MiB");
    opts.object_size = static_cast<uint64_t>(cs);
  }
  d.add_job(std::make_shared<CreateRbdJob>(d.loop_, id, std::move(*spec), opts));
  co_return Json::object();
}

Task<QResult<Json>> Daemon::BlockCommands::query_named_block_nodes(Daemon& d, Json& args,
                                                                   const Call&) {
  co_return d.named_block_nodes(args.value("flat", false));
}

}  // namespace blkmirror::qmp
