// drive-mirror: blockdev-mirror to a target named by its file, as
// qemu-storage-daemon 7.2 takes it. The daemon opens the target itself:
//
// - mode absolute-paths (the default) creates it, of the source's size and in
//   `format` (default: the source's). With sync=top the new image (qcow2) names
//   the source's backing file, by absolute path and format, as its own; with
//   sync=none it names the source itself; with sync=full (or a source without a
//   backing file, where top means full, as in QEMU) it stands alone. An existing
//   file is refused rather than overwritten (QEMU truncates it).
// - mode existing opens the file as it is (format given, else probed), its
//   backing chain from its header.
//
// The new node is named by `node-name` or gets an implicit #blockN name; with
// a backing file it reads through the source's own backing node (sync=top) or
// the source (sync=none) from the start, so reads through the target are right
// at every moment after ready. Then it is blockdev-mirror. When the job is
// dismissed without having taken the source's place (cancelled, failed), the
// target node is closed, as QEMU drops its reference then; the file stays.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>

#include "blockdev/file_device.h"
#include "blockdev/image_create.h"
#include "blockdev/image_format.h"
#include "mirror/mirror_job.h"
#include "qmp/daemon.h"
#include "qmp/mirror_args.h"

namespace blkmirror::qmp {

namespace {

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
  for (Field& f : mirror_option_fields()) s.push_back(std::move(f));
  return s;
}

const Schema kDriveMirror = drive_mirror_schema();

// A node's image format as drive-mirror names it: its driver, raw for a file.
std::string format_of(const std::string& driver) {
  return driver == "qcow2" ? "qcow2" : driver == "file" ? "file" : "raw";
}

}  // namespace

struct Daemon::DriveMirrorCommands {
  static Task<QResult<Json>> drive_mirror(Daemon& d, Json& args, const Call& call);
  // The target as blockdev-add arguments, after creating it when asked to.
  struct Target {
    Json args;
    bool created = false;
  };
  static Task<QResult<Target>> prepare_target(Daemon& d, const Json& a, Node& src,
                                              const std::string& path, const std::string& name,
                                              std::string format, SyncMode& sync);
};

std::span<const Daemon::Command> Daemon::drive_mirror_commands() {
  static const Command table[] = {
      {"drive-mirror", &kDriveMirror, &DriveMirrorCommands::drive_mirror},
  };
  return table;
}

Task<QResult<Daemon::DriveMirrorCommands::Target>> Daemon::DriveMirrorCommands::prepare_target(
    Daemon& d, const Json& a, Node& src, const std::string& path, const std::string& name,
    std::string format, SyncMode& sync) {
  const bool existing = a.value("mode", "absolute-paths") == "existing";
  Target t;
  if (existing && format.empty()) {
    // QEMU probes an existing target's format.
    auto f = FileDevice::open(d.loop_, path, FileOptions{.read_only = true, .force_share = true});
    if (!f)
      co_return generic_error(
          fmt::format("Could not open '{}': {}", path, std::strerror(f.error().errnum())));
    auto fmt_r = co_await detect_image_format(**f);
    if (!fmt_r) co_return generic_error(fmt_r.error().message());
    format = to_string(*fmt_r);
  }
  if (format != "qcow2" && format != "raw" && format != "file")
    co_return generic_error(fmt::format("Unknown file format '{}'", format));
  Node* backing = src.backing();
  if (sync == SyncMode::kTop && !backing) sync = SyncMode::kFull;  // nothing below: QEMU's rule
  // What the target reads through: the source's backing node (top), the
  // source itself (none), nothing (full).
  Node* target_backing = sync == SyncMode::kTop    ? backing
                         : sync == SyncMode::kNone ? &src
                                                   : nullptr;
  if (!existing) {
    if (target_backing && format != "qcow2")
      co_return generic_error(
          fmt::format("'{}' does not support backing files", format == "file" ? "file" : "raw"));
    if (::access(path.c_str(), F_OK) == 0)
      co_return generic_error(fmt::format(
          "Could not create '{}': File exists (mode 'existing' mirrors into it)", path));
    ImageCreateSpec spec;
    spec.path = path;
    spec.format = format == "qcow2" ? ImageFormat::kQcow2 : ImageFormat::kRaw;
    spec.size = src.length();
    if (target_backing) {
      const NodeRecord& br = d.nodes_.at(target_backing->name());
      // Absolute, as the mode's name says: a local file's name as the node was
      // opened may be relative to the daemon's directory, which the new
      // image's header would resolve against its own directory instead.
      spec.backing_file = br.local ? absolute_path(br.filename) : br.filename;
      spec.backing_format =
          format_of(br.driver) == "qcow2" ? ImageFormat::kQcow2 : ImageFormat::kRaw;
    }
    if (auto r = co_await create_image(d.loop_, spec); !r)
      co_return generic_error(r.error().message());
    t.created = true;
  }
  Json file_node = {{"driver", "file"}, {"filename", path}};
  if (format == "file") {
    t.args = file_node;
    t.args["node-name"] = name;
  } else {
    t.args = {{"driver", format}, {"node-name", name}, {"file", file_node}};
    // Created with a backing file: read through the very node it names. An
    // existing image opens its chain from its header.
    if (format == "qcow2" && !existing) {
      if (target_backing)
        t.args["backing"] = target_backing->name();
      else
        t.args["backing"] = nullptr;
    }
  }
  co_return t;
}

Task<QResult<Json>> Daemon::DriveMirrorCommands::drive_mirror(Daemon& d, Json& a,
                                                              const Call& call) {
  MirrorParams p;
  p.device = a["device"].get<std::string>();
  if (auto r = set_mirror_options(p, a); !r) co_return generic_error(r.error().message());
  Node* src = d.graph_.find(p.device);
  if (!src)
    co_return generic_error(
        fmt::format("Cannot find device='{}' nor node-name='{}'", p.device, p.device));
  for (const Child* c : src->parents())
    if (c->owner()) co_return generic_error("Need a root block node");
  if (const Child* e = job_edge(*src)) co_return generic_error(busy_message(*src, *e));
  p.job_id = a.value("job-id", p.device);
  if (!id_wellformed(p.job_id))
    co_return generic_error(fmt::format("Invalid job ID '{}'", p.job_id));
  if (d.jobs_.count(p.job_id))
    co_return generic_error(fmt::format("Job ID '{}' already in use", p.job_id));
  if (a.contains("replaces")) {
    if (!a.contains("node-name"))
      co_return generic_error(
          "a node-name must be provided when replacing a named node of the graph");
    p.replaces = a["replaces"].get<std::string>();
  }
  std::string name;
  bool implicit = !a.contains("node-name");
  if (implicit) {
    name = d.implicit_node_name();
  } else {
    name = a["node-name"].get<std::string>();
    if (!id_wellformed(name)) co_return generic_error(fmt::format("Invalid node-name: '{}'", name));
    if (d.graph_.find(name))
      co_return generic_error(fmt::format("Duplicate nodes with node-name='{}'", name));
  }
  if (auto v = validate_params(p); !v) co_return generic_error(v.error().message());
  auto path = d.checked_path(a["target"].get<std::string>());
  if (!path) co_return tl::unexpected(path.error());
  auto src_rec = d.nodes_.find(src->name());
  std::string format = a.value("format", "");
  const bool existing = a.value("mode", "absolute-paths") == "existing";
  if (format.empty() && !existing)
    format = src_rec != d.nodes_.end() ? format_of(src_rec->second.driver) : "raw";
  auto target = co_await prepare_target(d, a, *src, *path, name, format, p.sync);
  if (!target) co_return tl::unexpected(target.error());
  auto undo = [&d, &target, &path](const std::string& node) -> Task<void> {
    co_await d.remove_node_tree(node);
    if (target->created) ::unlink(path->c_str());
  };
  if (auto r = co_await d.add_node(target->args, call, nullptr, implicit); !r) {
    if (target->created) ::unlink(path->c_str());
    co_return tl::unexpected(r.error());
  }
  p.target = name;
  // A new image reads as zeroes where it holds nothing (QEMU's has_zero_init).
  if (target->created && p.sync != SyncMode::kNone) p.target_is_zero = true;
  auto job = MirrorJob::create(d.loop_, d.graph_, p);
  if (!job) {
    co_await undo(name);
    co_return generic_error(job.error().message());
  }
  d.add_job(*job);
  // Dismissed without having taken the source's place: close the target (its
  // edges went with the job just before). Counted as an aftermath, so a daemon
  // shutting down waits for it before it closes the nodes itself.
  std::weak_ptr<MirrorJob> weak = *job;
  (*job)->subscribe([&d, name, weak](const JobEvent& e) {
    if (e.kind != JobEvent::Kind::kStatusChange || e.status != JobStatus::kNull) return;
    auto j = weak.lock();
    if (!j || j->switched()) return;
    ++d.aftermaths_;
    asio::co_spawn(
        d.loop_.executor(),
        [](Daemon* dm, std::string node) -> Task<void> {
          // co_spawn starts us inside the event: let the job drop its edges first.
          co_await yield_now();
          co_await dm->remove_node_tree(node);
          if (--dm->aftermaths_ == 0) dm->aftermaths_done_.notify_all();
        }(&d, name),
        asio::detached);
  });
  co_return Json::object();
}

}  // namespace blkmirror::qmp
