// qcow2 nodes and backing chains: blockdev-add driver qcow2 (its file and
// backing children, the backing file its header names opened implicitly),
// removing a node with the implicit nodes it made, the `image` member of
// query-named-block-nodes, and blockdev-create driver qcow2.
#include <sys/stat.h>

#include <cstring>
#include <filesystem>

// GCC 12 rule 4 (base/task.h): a false -Wmismatched-new-delete on the Asio
// coroutine frames of the recursive blockdev-add.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "blockdev/child_device.h"
#include "blockdev/file_device.h"
#include "qmp/create_job.h"
#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

uint64_t host_allocated_bytes(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
}

// QEMU's BlockdevCreateOptionsQcow2.
const Schema kCreateQcow2 = {
    {"driver", Type::kString, true},
    {"file", Type::kAny, true},
    {"size", Type::kInt, true},
    {"version", Type::kEnum, false, {"v2", "v3"}},
    {"backing-file", Type::kString},
    {"backing-fmt", Type::kString},
    {"cluster-size", Type::kInt},
    {"preallocation", Type::kEnum, false, {"off", "metadata", "falloc", "full"}},
    {"lazy-refcounts", Type::kBool},
    {"refcount-bits", Type::kInt},
    {"compression-type", Type::kEnum, false, {"zlib", "zstd"}},
    {"extended-l2", Type::kBool},
    {"encrypt", Type::kAny},
    {"data-file", Type::kAny},
    {"data-file-raw", Type::kBool}};

bool power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// QEMU's checks of qcow2 creation options, with its texts where it has them.
QResult<Qcow2CreateOptions> qcow2_create_options(const Json& o) {
  Qcow2CreateOptions c;
  int64_t size = o["size"].get<int64_t>();
  if (size < 0) return generic_error("Parameter 'size' expects a non-negative value");
  if (size % 512) return generic_error("Image size must be a multiple of 512 bytes");
  c.size = static_cast<uint64_t>(size);
  c.version = o.value("version", "v3") == "v2" ? 2 : 3;
  int64_t cs = o.value("cluster-size", int64_t{65536});
  if (cs < 512 || cs > (2 << 20) || !power_of_two(static_cast<uint64_t>(cs)))
    return generic_error("Cluster size must be a power of two between 512 and 2048k");
  c.cluster_size = static_cast<uint64_t>(cs);
  int64_t rb = o.value("refcount-bits", int64_t{16});
  if (rb < 1 || rb > 64 || !power_of_two(static_cast<uint64_t>(rb)))
    return generic_error("Refcount width must be a power of two and may not exceed 64 bits");
  if (c.version < 3 && rb != 16)
    return generic_error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or "
        "above (use version=v3 or greater)");
  c.refcount_bits = static_cast<uint32_t>(rb);
  c.extended_l2 = o.value("extended-l2", false);
  if (c.extended_l2 && c.version < 3)
    return generic_error("Extended L2 entries are only supported with compatibility level 1.1 and "
                         "above (use version=v3 or greater)");
  if (c.extended_l2 && c.cluster_size < 16384)
    return generic_error("Extended L2 entries are only supported with cluster sizes of at least "
                         "16384 bytes");
  if (o.contains("backing-file")) c.backing_file = o["backing-file"].get<std::string>();
  if (o.contains("backing-fmt")) {
    if (!c.backing_file) return generic_error("Backing format cannot be used without backing file");
    c.backing_format = o["backing-fmt"].get<std::string>();
  }
  std::string prealloc = o.value("preallocation", "off");
  if (prealloc == "falloc" || prealloc == "full")
    return generic_error(fmt::format("Parameter 'preallocation': '{}' is not supported for qcow2 "
                                     "(off or metadata)",
                                     prealloc));
  c.prealloc = prealloc == "metadata" ? Qcow2CreateOptions::Prealloc::kMetadata
                                      : Qcow2CreateOptions::Prealloc::kOff;
  if (c.backing_file && c.prealloc != Qcow2CreateOptions::Prealloc::kOff)
    return generic_error("Backing file and preallocation can only be used at the same time if "
                         "preallocation=off");
  if (o.value("lazy-refcounts", false)) return generic_error("Lazy refcounts are not supported");
  if (o.value("compression-type", "zlib") != "zlib")
    return generic_error("Parameter 'compression-type': only zlib images can be created");
  if (o.contains("encrypt")) return generic_error("Encrypted images are not supported");
  if (o.contains("data-file") || o.contains("data-file-raw"))
    return generic_error("External data files are not supported");
  return c;
}

}  // namespace

std::string Daemon::implicit_node_name() {
  std::string name;
  do {
    name = fmt::format("#block{:03}", ++implicit_counter_);
  } while (graph_.find(name));
  return name;
}

Task<QResult<BlockDevicePtr>> Daemon::open_qcow2_node(Json& args, const std::string& name,
                                                      NodeRecord& rec, const Call& call,
                                                      ChainGuard* guard, bool trusted) {
  if (args.contains("encrypt"))
    co_return generic_error(
        fmt::format("qcow2 node '{}': encrypted images are not supported", name));
  if (args.contains("data-file"))
    co_return generic_error(
        fmt::format("qcow2 node '{}': external data files are not supported", name));
  auto child =
      co_await child_ref(args["file"], name, "file", rec.read_only, rec, call, guard, trusted);
  if (!child) co_return tl::unexpected(child.error());
  Node* fnode = graph_.find(*child);
  if (!fnode)
    co_return generic_error(fmt::format("Cannot find device='' nor node-name='{}'", *child));
  if (auto it = nodes_.find(*child); it != nodes_.end()) {
    rec.filename = it->second.filename;
    rec.local = it->second.local;
  } else {
    rec.filename = fnode->device().describe();
  }
  if (!rec.read_only && fnode->device().caps().read_only)
    co_return generic_error(
        fmt::format("qcow2 node '{}': its file node '{}' is read-only (add it with "
                    "read-only=true)",
                    name, *child));
  // As QEMU's format nodes: the image file is read for data and metadata, and
  // written (metadata too, whatever the parents do) when the node is writable;
  // nobody else may change it underneath (only writes that change nothing).
  uint32_t need = kPermConsistentRead | (rec.read_only ? 0u : kPermWrite | kPermResize);
  auto fe = graph_.attach(fnode, "file of " + name,
                          EdgeUse{fmt::format("node '{}'", name), "file",
                                  Perms{need, kPermConsistentRead | kPermWriteUnchanged}});
  if (!fe) co_return generic_error(fe.error().message());
  rec.file_edge = std::move(*fe);
  auto file = std::make_shared<ChildDevice>(rec.file_edge.get(), rec.read_only);
  auto info = co_await Qcow2Device::probe(*file);
  if (!info) co_return generic_error(info.error().message());

  if (info->backing_file) {
    auto full = resolve_backing_path(rec.filename, rec.local, *info->backing_file);
    rec.full_backing = full ? absolute_path(*full) : *info->backing_file;
  }
  // The chain being opened, so a header naming one of its own overlays is
  // caught. The top image enters it here; backing files as they are opened.
  std::optional<ChainGuard> own_guard;
  if (!guard) {
    guard = &own_guard.emplace();
    if (rec.local) {
      if (auto g = guard->enter(absolute_path(rec.filename)); !g)
        co_return generic_error(g.error().message());
    }
  }
  std::optional<std::string> backing;
  auto b = args.find("backing");
  if (b == args.end()) {
    if (info->backing_file) {
      auto r = co_await open_backing_from_header(rec, *info, call, guard);
      if (!r) co_return tl::unexpected(r.error());
      backing = *r;
    }
  } else if (!b->is_null() && !(call.coerce && *b == "null")) {
    auto r = co_await child_ref(*b, name, "backing", true, rec, call, guard, trusted);
    if (!r) co_return tl::unexpected(r.error());
    backing = *r;
  }
  BlockDevicePtr backing_dev;
  if (backing) {
    Node* bnode = graph_.find(*backing);
    if (!bnode)
      co_return generic_error(fmt::format("Cannot find device='' nor node-name='{}'", *backing));
    // Derived from the node's parents once it exists (Graph::adopt in add_node).
    rec.backing_edge = graph_.attach_child(bnode, "backing of " + name,
                                           EdgeUse{fmt::format("node '{}'", name), "backing", {}},
                                           EdgeKind::kBacking);
    backing_dev = std::make_shared<ChildDevice>(rec.backing_edge.get(), true);
  }
  Qcow2OpenOptions o;
  o.read_only = rec.read_only;
  int64_t l2 = args.value("l2-cache-size", int64_t{0});
  if (l2 < 0) co_return generic_error("Parameter 'l2-cache-size' expects a non-negative value");
  o.l2_cache_bytes = static_cast<uint64_t>(l2);
  auto q = co_await Qcow2Device::open(loop_, file, backing_dev, o);
  if (!q) co_return generic_error(q.error().message());
  rec.qcow2 = *q;
  co_return BlockDevicePtr(*q);
}

Task<QResult<std::string>> Daemon::open_backing_from_header(NodeRecord& rec, const Qcow2Info& info,
                                                            const Call& call, ChainGuard* guard) {
  auto fail = [](const std::string& why) {
    return generic_error(fmt::format("Could not open backing file: {}", why));
  };
  auto path = resolve_backing_path(rec.filename, rec.local, *info.backing_file);
  if (!path) co_return fail(path.error().message());
  auto checked = checked_path(*path);
  if (!checked) co_return fail(checked.error().desc);
  struct stat st {};
  if (::stat(checked->c_str(), &st) != 0)
    co_return fail(fmt::format("Could not open '{}': {}", *checked, std::strerror(errno)));
  // The header's backing format, or a probe when it has none (as QEMU 7.2
  // does for a backing file; only raw and qcow2 exist here).
  ImageFormat fmt = ImageFormat::kRaw;
  if (info.backing_format) {
    auto f = parse_image_format(*info.backing_format);
    if (!f) co_return fail(fmt::format("Unknown driver '{}'", *info.backing_format));
    fmt = *f;
  } else {
    auto probe_dev = FileDevice::open(loop_, *checked, FileOptions{.read_only = true});
    if (!probe_dev)
      co_return fail(fmt::format("Could not open '{}': {}", *checked, probe_dev.error().reason()));
    auto f = co_await detect_image_format(**probe_dev);
    if (!f) co_return fail(f.error().message());
    fmt = *f;
  }
  std::string fmt_node = implicit_node_name();
  std::string file_node = implicit_node_name();
  Json b = {{"driver", to_string(fmt)},
            {"node-name", fmt_node},
            {"read-only", true},
            {"file",
             {{"driver", "file"},
              {"filename", *checked},
              {"node-name", file_node},
              {"read-only", true}}}};
  // Its file node enters the guard: a backing file that is already in the
  // chain (itself, an overlay) fails there.
  Call inner{call.name, false};
  auto r = co_await add_node(b, inner, guard, true);
  if (!r) {
    std::string why = r.error().desc;
    const std::string prefix = "Could not open backing file: ";
    co_return fail(why.rfind(prefix, 0) == 0 ? why.substr(prefix.size()) : why);
  }
  rec.implicit.push_back(fmt_node);
  co_return fmt_node;
}

Task<void> Daemon::remove_node_tree(const std::string& name) {
  Node* n = graph_.find(name);
  if (!n || !n->parents().empty()) co_return;  // gone, or still used elsewhere: it stays
  std::vector<std::string> implicit;
  if (auto it = nodes_.find(name); it != nodes_.end()) {
    if (it->second.qcow2) {
      // Metadata written back and the image marked clean while its file edge
      // still exists.
      if (auto c = co_await it->second.qcow2->close(); !c && !it->second.read_only)
        spdlog::warn("closing node '{}': {}", name, c.error().message());
    }
    n->set_backing_edge(nullptr);
    implicit = std::move(it->second.implicit);
    nodes_.erase(it);  // its edges go first, then the node
  }
  (void)graph_.remove(name);
  for (auto& c : implicit) co_await remove_node_tree(c);
}

Task<QResult<Json>> Daemon::create_qcow2(Json& args, Json& o, const Call& call) {
  if (auto r = check(o, kCreateQcow2, "options.", call.coerce); !r)
    co_return tl::unexpected(r.error());
  std::string id = args["job-id"].get<std::string>();
  if (!id_wellformed(id)) co_return generic_error(fmt::format("Invalid job ID '{}'", id));
  if (jobs_.count(id)) co_return generic_error(fmt::format("Job ID '{}' already in use", id));
  auto opts = qcow2_create_options(o);
  if (!opts) co_return tl::unexpected(opts.error());
  if (!o["file"].is_string())
    co_return generic_error("Parameter 'options.file': give the node name of the file to format");
  std::string file = o["file"].get<std::string>();
  Node* n = graph_.find(file);
  if (!n) co_return generic_error(fmt::format("Cannot find device='' nor node-name='{}'", file));
  if (n->device().caps().read_only)
    co_return generic_error(fmt::format("Node '{}' is read-only", file));
  // Formatting writes a new header over the file: only into an empty one, so a
  // mistyped node name cannot destroy an image (QEMU would truncate it).
  if (n->length() != 0)
    co_return generic_error(
        fmt::format("Node '{}' is not empty ({} bytes): blockdev-create formats "
                    "only a new, empty file",
                    file, n->length()));
  auto edge = graph_.attach(n, "create job " + id,
                            EdgeUse{fmt::format("blockdev-create job '{}'", id), "file",
                                    Perms{kPermConsistentRead | kPermWrite | kPermResize,
                                          kPermConsistentRead | kPermWriteUnchanged}});
  if (!edge) co_return generic_error(edge.error().message());
  add_job(std::make_shared<CreateQcow2Job>(id, std::move(*edge), std::move(*opts)));
  co_return Json::object();
}

Json Daemon::image_info(const Node& n, bool flat) const {
  auto it = nodes_.find(n.name());
  const NodeRecord* rec = it != nodes_.end() ? &it->second : nullptr;
  std::string drv = rec ? rec->driver : "file";
  std::string filename = rec ? rec->filename : n.device_ptr()->describe();
  Json image = {
      {"filename", filename}, {"format", drv}, {"virtual-size", n.length()}, {"dirty-flag", false}};
  if (rec && rec->local) image["actual-size"] = host_allocated_bytes(filename);
  if (rec && rec->qcow2) {
    const Qcow2Info& q = rec->qcow2->info();
    image["cluster-size"] = q.cluster_size();
    image["dirty-flag"] = q.dirty;
    Json data = {{"compat", q.version >= 3 ? "1.1" : "0.10"},
                 {"compression-type", q.compression_zstd ? "zstd" : "zlib"},
                 {"refcount-bits", q.refcount_bits}};
    if (q.version >= 3) {
      data["lazy-refcounts"] = false;
      data["corrupt"] = q.corrupt;
      data["extended-l2"] = q.extended_l2;
    }
    image["format-specific"] = {{"type", "qcow2"}, {"data", data}};
    if (q.backing_file) {
      image["backing-filename"] = *q.backing_file;
      image["full-backing-filename"] = rec->full_backing;
      if (q.backing_format) image["backing-filename-format"] = *q.backing_format;
    }
  }
  if (!flat) {
    if (const Node* b = n.backing()) image["backing-image"] = image_info(*b, false);
  }
  return image;
}

Json Daemon::named_block_nodes(bool flat) const {
  Json list = Json::array();
  for (Node* n : graph_.nodes()) {
    auto it = nodes_.find(n->name());
    std::string drv = it != nodes_.end() ? it->second.driver : "file";
    bool direct = it != nodes_.end() && it->second.direct;
    Json image = image_info(*n, flat);
    // QEMU counts the depth while walking backing-image, so flat says 0.
    unsigned depth = 0;
    if (!flat)
      for (const Node* b = n->backing(); b; b = b->backing()) ++depth;
    Json node = {
        {"node-name", n->name()},
        {"drv", drv},
        {"file", image["filename"]},
        {"ro", n->device().caps().read_only},
        {"image", image},
        {"cache", {{"writeback", true}, {"direct", direct}, {"no-flush", false}}},
        {"detect_zeroes", "off"},
        {"encrypted", false},
        {"backing_file_depth", depth},
        {"write_threshold", 0},
        {"bps", 0}, {"bps_rd", 0}, {"bps_wr", 0},
        {"iops", 0}, {"iops_rd", 0}, {"iops_wr", 0},
    };
    if (!n->bitmaps().empty()) node["dirty-bitmaps"] = dirty_bitmaps_json(*n);
    if (const Node* b = n->backing()) {
      auto bit = nodes_.find(b->name());
      node["backing_file"] =
          bit != nodes_.end() ? bit->second.filename : b->device_ptr()->describe();
    }
    list.push_back(std::move(node));
  }
  return list;
}

}  // namespace blkmirror::qmp
