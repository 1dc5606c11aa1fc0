// drive-mirror: blockdev-mirror into an image named by its file name, as
// qemu-storage-daemon 7.2 takes it. The target is created (mode
// absolute-paths) or opened as it is (mode existing), added as a node
// (`node-name`, else an implicit #blockN), and mirrored into through the same
// job-creation path as blockdev-mirror (Daemon::start_mirror).
//
//   absolute-paths, sync=top over a backing file: a qcow2 image whose header
//     names the source's backing file (absolute name, format), of the source's
//     size, its backing node the source's own backing node, so reads through
//     the target are right at every moment;
//   absolute-paths, sync=full (or top without a backing file, which QEMU turns
//     into full): a standalone image of `format` (default: the source's);
//   existing: the file opened in `format` (probed when absent), with the
//     backing chain its header names, as blockdev-add opens a qcow2.
//
// Everything that can be refused is checked before the file is created, so a
// refused command touches no file; a failure after it removes the new file
// again. When the job ends without switching over (cancelled, failed), the
// target node it opened is closed (QEMU drops its last reference then); after
// complete the target is the node clients use and the old source stays.
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

// GCC 12 rule 4 (base/task.h): a false -Wmismatched-new-delete on the Asio
// coroutine frames of blockdev-add's body.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <fmt/format.h>

#include "blockdev/file_device.h"
#include "blockdev/image_create.h"
#include "mirror/mirror_job.h"
#include "mirror/option_table.h"
#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

Type qmp_type(OptionType t) {
  switch (t) {
    case OptionType::kSize:
    case OptionType::kInteger: return Type::kInt;
    case OptionType::kEnum: return Type::kEnum;
    case OptionType::kBool: return Type::kBool;
  }
  return Type::kAny;
}

// QEMU 7.2's DriveMirror, with the mirror options from the shared table
// (mirror/option_table.h) except target-is-zero, which only blockdev-mirror has.
Schema drive_mirror_schema() {
  Schema s = {
      {"job-id", Type::kString},
      {"device", Type::kString, true},
      {"target", Type::kString, true},
      {"format", Type::kString},
      {"node-name", Type::kString},
      {"replaces", Type::kString},
      {"mode", Type::kEnum, false, {"existing", "absolute-paths"}},
  };
  for (const MirrorOption& o : mirror_options()) {
    if (o.name == "target-is-zero") continue;
    s.emplace_back(std::string(o.name), qmp_type(o.type), o.qmp_required,
                   std::vector<std::string>(o.words.begin(), o.words.end()));
  }
  return s;
}

const Schema kDriveMirror = drive_mirror_schema();

// The formats a target can have here: QEMU's names for them.
std::optional<std::string> known_format(const std::string& f) {
  if (f == "raw" || f == "qcow2" || f == "file") return f;
  return std::nullopt;
}

bool is_root(const Node& n) {
  for (const Child* c : n.parents())
    if (c->owner()) return false;
  return true;
}

std::optional<std::pair<uint64_t, uint64_t>> file_identity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return std::pair<uint64_t, uint64_t>(st.st_dev, S_ISBLK(st.st_mode) ? st.st_rdev : st.st_ino);
}

}  // namespace

struct Daemon::DriveMirrorCommands {
  static Task<QResult<Json>> drive_mirror(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::drive_mirror_commands() {
  static const Command table[] = {
      {"drive-mirror", &kDriveMirror, &DriveMirrorCommands::drive_mirror},
  };
  return table;
}

Task<QResult<Json>> Daemon::DriveMirrorCommands::drive_mirror(Daemon& d, Json& a,
                                                              const Call& call) {
  // The source, as QEMU's qmp_get_root_bs finds it, and not busy.
  const std::string device = a["device"].get<std::string>();
  Node* src = d.graph_.find(device);
  if (!src)
    co_return generic_error(
        fmt::format("Cannot find device='{}' nor node-name='{}'", device, device));
  if (!is_root(*src)) co_return generic_error("Need a root block node");
  if (const Child* c = job_edge(*src)) co_return generic_error(busy_message(*src, *c));

  MirrorParams p;
  p.device = device;
  if (auto r = d.mirror_params(a, p); !r) co_return tl::unexpected(r.error());
  const bool existing = a.value("mode", "absolute-paths") == "existing";
  const std::optional<std::string> node_name =
      a.contains("node-name") ? std::optional(a["node-name"].get<std::string>()) : std::nullopt;
  if (p.replaces && !node_name)
    co_return generic_error(
        "a node-name must be provided when replacing a named node of the graph");
  if (node_name && !id_wellformed(*node_name))
    co_return generic_error(fmt::format("Invalid node-name: '{}'", *node_name));
  if (node_name && d.graph_.find(*node_name))
    co_return generic_error(fmt::format("Duplicate nodes with node-name='{}'", *node_name));

  // The format: given, else the source's (absolute-paths) or probed (existing).
  const auto src_rec = d.nodes_.find(device);
  std::optional<std::string> format;
  if (a.contains("format")) {
    std::string f = a["format"].get<std::string>();
    format = known_format(f);
    if (!format)
      co_return generic_error(existing ? fmt::format("Unknown driver '{}'", f)
                                       : fmt::format("Unknown file format '{}'", f));
  } else if (!existing) {
    std::string f = src_rec != d.nodes_.end() ? src_rec->second.driver : "file";
    format = known_format(f);
    if (!format)
      co_return generic_error(fmt::format(
          "Cannot create an image of the source's format '{}': give 'format' (raw or qcow2)", f));
  }

  // sync=top copies what the top layer holds over the same backing content;
  // without a backing file that is everything (QEMU turns it into full).
  Node* backing = src->backing();
  if (p.sync == SyncMode::kTop && !backing) p.sync = SyncMode::kFull;
  // QEMU makes a sync=none target an overlay of the source itself, which
  // then stays below it after complete: a loop in this graph while the job
  // runs. Refused rather than creating a standalone image that would read
  // zeroes wherever no client wrote.
  if (!existing && p.sync == SyncMode::kNone)
    co_return generic_error(
        "drive-mirror: sync 'none' needs mode 'existing' (a target image that reads the "
        "source's data through its own backing chain)");

  auto path = d.checked_path(a["target"].get<std::string>());
  if (!path) co_return tl::unexpected(path.error());
  const std::string target_name = a["target"].get<std::string>();
  struct stat st {};
  const bool exists = ::stat(path->c_str(), &st) == 0;
  if (existing && !exists)
    co_return generic_error(
        fmt::format("Could not open '{}': {}", target_name, std::strerror(errno)));
  if (!existing && exists)
    co_return generic_error(fmt::format("Could not create '{}': {}", target_name,
                                        std::strerror(EEXIST)));
  // A file of the source's own chain is never a target: the mirror would
  // write the data it reads.
  if (exists) {
    auto id = file_identity(*path);
    for (Node* n = src; n; n = n->backing()) {
      auto it = d.nodes_.find(n->name());
      if (it == d.nodes_.end() || !it->second.local) continue;
      if (id && file_identity(it->second.filename) == id)
        co_return generic_error(fmt::format(
            "'{}' is the image of node '{}' in the source's chain: a mirror cannot write into it",
            target_name, n->name()));
    }
  }

  // The new image's spec; checked in full before the file exists.
  ImageCreateSpec spec;
  if (!existing) {
    spec.path = *path;
    spec.format = *format == "qcow2" ? ImageFormat::kQcow2 : ImageFormat::kRaw;
    spec.size = src->length();
    if (p.sync == SyncMode::kTop) {
      auto b = d.nodes_.find(backing->name());
      if (b == d.nodes_.end() || !b->second.local)
        co_return generic_error(
            fmt::format("The backing node '{}' has no file name to write into the new image",
                        backing->name()));
      if (spec.format != ImageFormat::kQcow2)
        co_return generic_error(
            fmt::format("Backing file not supported for file format '{}'", *format));
      spec.backing_file = absolute_path(b->second.filename);
      spec.backing_format =
          b->second.driver == "qcow2" ? ImageFormat::kQcow2 : ImageFormat::kRaw;
    }
  } else if (!format) {
    // As QEMU probes an image opened without a driver (raw and qcow2 here).
    auto probe = FileDevice::open(d.loop_, *path, FileOptions{.read_only = true});
    if (!probe)
      co_return generic_error(fmt::format("Could not open '{}': {}", target_name,
                                          probe.error().reason()));
    auto f = co_await detect_image_format(**probe);
    if (!f) co_return generic_error(f.error().message());
    format = to_string(*f);
  }

  if (!existing) {
    if (auto r = co_await create_image(d.loop_, spec); !r)
      co_return generic_error(r.error().message());
  }
  // From here on a failure removes what was made (the file only when new).
  auto undo = [](Daemon* dm, std::string node, std::string file_node, std::string created,
                 QmpError e) -> Task<QResult<Json>> {
    if (!node.empty()) co_await dm->remove_node_tree(node);
    if (!file_node.empty()) co_await dm->remove_node_tree(file_node);
    if (!created.empty()) ::unlink(created.c_str());
    co_return tl::unexpected(e);
  };
  const std::string created = existing ? std::string() : *path;

  // The nodes: the file (an implicit name, as QEMU's protocol node), then the
  // format over it, named as asked. A plain file target is its own node.
  const bool plain = *format == "file";
  const bool named_file = plain && node_name;
  const std::string file_node = named_file ? *node_name : d.implicit_node_name();
  Call inner{call.name, false, std::nullopt};
  Json file_args = {{"driver", "file"}, {"node-name", file_node}, {"filename", *path}};
  if (auto r = co_await d.add_node(file_args, inner, nullptr, !named_file); !r)
    co_return co_await undo(&d, "", "", created, r.error());
  std::string node = file_node;
  if (!plain) {
    node = node_name ? *node_name : d.implicit_node_name();
    Json fmt_args = {{"driver", *format}, {"node-name", node}, {"file", file_node}};
    if (*format == "qcow2" && !existing)
      fmt_args["backing"] = p.sync == SyncMode::kTop ? Json(backing->name()) : Json(nullptr);
    if (auto r = co_await d.add_node(fmt_args, inner, nullptr, !node_name); !r)
      co_return co_await undo(&d, "", file_node, created, r.error());
    d.nodes_[node].implicit.push_back(file_node);  // deleted with its format node
  }

  // A new image without a backing file reads as zeroes: nothing to zero.
  p.target = node;
  p.target_is_zero = !existing && !spec.backing_file;
  auto job = d.start_mirror(p);
  if (!job) co_return co_await undo(&d, node, "", created, job.error());
  ++d.aftermaths_;
  asio::co_spawn(d.loop_.executor(), d.after_drive_mirror(*job, node), asio::detached);
  co_return Json::object();
}

Task<void> Daemon::after_drive_mirror(std::shared_ptr<Job> job, std::string target) {
  co_await job->wait_concluded();
  auto m = std::dynamic_pointer_cast<MirrorJob>(job);
  if (m && !m->switched()) {
    m->release_nodes();
    co_await remove_node_tree(target);
  }
  if (--aftermaths_ == 0) aftermaths_done_.notify_all();
}

}  // namespace blkmirror::qmp
