// block-commit: merging layers of a backing chain into their base, as
// qemu-storage-daemon 7.2 takes it. The nodes come from plan_commit()
// (commit/commit_plan.h); an active commit is a MirrorJob with
// MirrorParams::commit, an intermediate one a CommitJob. What happens to the
// graph after the job (committed layers removed, read-only flags restored) is
// after_commit() here.
#include <set>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "commit/commit_job.h"
#include "commit/commit_plan.h"
#include "mirror/mirror_job.h"
#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kCommit = {
    {"job-id", Type::kString},
    {"device", Type::kString, true},
    {"base-node", Type::kString},
    {"base", Type::kString},
    {"top-node", Type::kString},
    {"top", Type::kString},
    {"backing-file", Type::kString},
    {"backing-mask-protocol", Type::kBool},
    {"speed", Type::kInt},
    {"on-error", Type::kEnum, false, {"report", "ignore", "enospc", "stop"}},
    {"filter-node-name", Type::kString},
    {"auto-finalize", Type::kBool},
    {"auto-dismiss", Type::kBool},
    // Ours: how an active commit copies client writes (QEMU's is background).
    {"copy-mode", Type::kEnum, false, {"background", "write-blocking", "adaptive"}},
};

std::optional<std::string> opt_string(const Json& a, const char* key) {
  auto it = a.find(key);
  if (it == a.end()) return std::nullopt;
  return it->get<std::string>();
}

}  // namespace

struct Daemon::CommitCommands {
  static Task<QResult<Json>> block_commit(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::commit_commands() {
  static const Command table[] = {
      {"block-commit", &kCommit, &CommitCommands::block_commit},
  };
  return table;
}

Task<QResult<Json>> Daemon::CommitCommands::block_commit(Daemon& d, Json& a, const Call& call) {
  CommitRequest req;
  req.device = a["device"].get<std::string>();
  req.top_node = opt_string(a, "top-node");
  req.top = opt_string(a, "top");
  req.base_node = opt_string(a, "base-node");
  req.base = opt_string(a, "base");
  req.backing_file_given = a.contains("backing-file");
  auto plan = plan_commit(d.graph_, req, [&d](const Node& n) {
    auto it = d.nodes_.find(n.name());
    return it == d.nodes_.end() || !it->second.local ? std::string() : it->second.filename;
  });
  if (!plan) {
    if (plan.error().errnum() == ENODEV)
      co_return tl::unexpected<QmpError>(QmpError{"DeviceNotFound", plan.error().message()});
    co_return generic_error(plan.error().message());
  }
  const std::string job_id = a.value("job-id", req.device);
  if (!id_wellformed(job_id)) co_return generic_error(fmt::format("Invalid job ID '{}'", job_id));
  if (d.jobs_.count(job_id))
    co_return generic_error(fmt::format("Job ID '{}' already in use", job_id));
  const int64_t speed = a.value("speed", int64_t{0});
  if (speed < 0) co_return generic_error("Parameter 'speed' expects a non-negative value");
  auto on_error = parse_error_policy(a.value("on-error", "report"), "on-error");
  if (!on_error) co_return generic_error(on_error.error().message());
  if (auto f = opt_string(a, "filter-node-name"); f && !id_wellformed(*f))
    co_return generic_error(fmt::format("Invalid node-name: '{}'", *f));
  // QEMU reopens a read-only base (and, for an intermediate commit, the
  // overlay whose header changes) read-write for the job, and back after.
  std::vector<std::string> reopened;
  for (Node* n : {plan->base, plan->overlay}) {
    if (!n || !n->device().caps().read_only) continue;
    if (auto r = co_await d.reopen_read_only(n->name(), false); !r) {
      co_await d.restore_read_only(reopened);
      co_return tl::unexpected(r.error());
    }
    reopened.push_back(n->name());
  }

  std::shared_ptr<Job> job;
  CommitAftermath after;
  after.active = plan->active;
  after.top = plan->top->name();
  after.base = plan->base->name();
  after.reopened = reopened;
  if (plan->active) {
    MirrorParams p;
    p.job_id = job_id;
    p.device = plan->top->name();
    p.target = plan->base->name();
    p.commit = true;
    p.speed = speed;
    p.on_source_error = p.on_target_error = *on_error;
    p.auto_finalize = a.value("auto-finalize", true);
    p.auto_dismiss = a.value("auto-dismiss", true);
    // Adaptive by default: background as QEMU until client writes outpace the
    // copy, then write-blocking, so a busy disk still reaches ready.
    auto mode = parse_copy_mode(a.value("copy-mode", "adaptive"));
    if (!mode) co_return generic_error(mode.error().message());
    p.copy_mode = *mode;
    auto m = MirrorJob::create(d.loop_, d.graph_, p);
    if (!m) {
      co_await d.restore_read_only(reopened);
      co_return generic_error(m.error().message());
    }
    job = *m;
  } else {
    CommitParams p;
    p.job_id = job_id;
    p.device = req.device;
    p.speed = speed;
    p.on_error = *on_error;
    p.auto_finalize = a.value("auto-finalize", true);
    p.auto_dismiss = a.value("auto-dismiss", true);
    const NodeRecord* base_rec = nullptr;
    if (auto it = d.nodes_.find(plan->base->name()); it != d.nodes_.end()) base_rec = &it->second;
    if (auto b = opt_string(a, "backing-file")) {
      p.backing_file = *b;
    } else if (base_rec && base_rec->local) {
      // The base's path as the overlay can find it from anywhere.
      p.backing_file = absolute_path(base_rec->filename);
    } else {
      co_await d.restore_read_only(reopened);
      co_return generic_error(fmt::format(
          "The base '{}' has no file name to write into '{}': give backing-file",
          plan->base->name(), plan->overlay->name()));
    }
    if (base_rec && (base_rec->driver == "qcow2" || base_rec->driver == "raw"))
      p.backing_format = base_rec->driver;
    else if (base_rec && base_rec->driver == "file")
      p.backing_format = "raw";
    after.overlay = plan->overlay->name();
    after.backing_file = p.backing_file;
    for (Node* n : plan->removed) after.removed.push_back(n->name());
    auto c = CommitJob::create(d.graph_, *plan, p);
    if (!c) {
      co_await d.restore_read_only(reopened);
      co_return generic_error(c.error().message());
    }
    job = *c;
  }
  d.add_job(job);
  ++d.aftermaths_;
  asio::co_spawn(d.loop_.executor(), d.after_commit(job, std::move(after)), asio::detached);
  co_return Json::object();
}

Task<void> Daemon::restore_read_only(const std::vector<std::string>& names) {
  for (auto& name : names) (void)co_await reopen_read_only(name, true);
}

Task<void> Daemon::after_commit(std::shared_ptr<Job> job, CommitAftermath a) {
  co_await job->wait_concluded();
  const bool ok = !job->failure() && !job->was_cancelled();
  if (ok && !a.active) co_await drop_committed_layers(a);
  // An active commit's base takes the top's place and its read-only flag
  // (QEMU): the flags we changed stay as they are then. Otherwise they are
  // restored: the base of a cancelled or failed commit is read-only again.
  bool switched = false;
  if (auto m = std::dynamic_pointer_cast<MirrorJob>(job)) switched = m->switched();
  for (auto& name : a.reopened) {
    if (switched && name == a.base) continue;
    if (!graph_.find(name)) continue;
    if (auto r = co_await reopen_read_only(name, true); !r)
      spdlog::warn("commit '{}': reopening '{}' read-only: {}", job->id(), name, r.error().desc);
  }
  if (--aftermaths_ == 0) aftermaths_done_.notify_all();
}

Task<void> Daemon::drop_committed_layers(const CommitAftermath& a) {
  // The layers that left the chain: the implicit ones (opened from a header)
  // go, as QEMU frees nodes nobody references; named ones stay for
  // blockdev-del. What they had opened implicitly and is still in use (the
  // base and its file) passes to the overlay, deleted with it.
  std::set<std::string> implicit;
  for (auto& [name, rec] : nodes_) implicit.insert(rec.implicit.begin(), rec.implicit.end());
  std::vector<std::string> owned_below;
  for (auto& name : a.removed) {
    auto it = nodes_.find(name);
    if (it == nodes_.end()) continue;
    owned_below.insert(owned_below.end(), it->second.implicit.begin(), it->second.implicit.end());
  }
  for (auto& name : a.removed)
    if (implicit.count(name)) co_await remove_node_tree(name);
  auto ov = nodes_.find(a.overlay);
  if (ov == nodes_.end()) co_return;
  NodeRecord& rec = ov->second;
  std::erase_if(rec.implicit, [this](const std::string& n) { return !graph_.find(n); });
  std::set<std::string> still_owned;
  for (auto& [name, r] : nodes_) still_owned.insert(r.implicit.begin(), r.implicit.end());
  for (auto& n : owned_below)
    if (graph_.find(n) && !still_owned.count(n)) rec.implicit.push_back(n);
  auto full = resolve_backing_path(rec.filename, rec.local, a.backing_file);
  rec.full_backing = full ? absolute_path(*full) : a.backing_file;
}

}  // namespace blkmirror::qmp

namespace blkmirror::qmp {

// INTERIM until the reopen mechanism (branch chain-ops) is merged: nodes
// cannot change their read-only flag yet, so a read-only base is refused.
Task<QResult<void>> Daemon::reopen_read_only(const std::string& node, bool read_only) {
  Node* n = graph_.find(node);
  if (!n) co_return generic_error(fmt::format("Cannot find device='' nor node-name='{}'", node));
  if (n->device().caps().read_only == read_only) co_return QResult<void>{};
  co_return generic_error(fmt::format("Node '{}' is read-only", node));
}

}  // namespace blkmirror::qmp
