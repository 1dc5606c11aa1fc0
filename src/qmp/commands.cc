// The command table (name -> argument schema and handler), execute(), and the
// commands about the daemon itself (version, command list, quit).
#include <fmt/format.h>

#include "qmp/daemon.h"
#include "qmp/wire.h"

namespace blkmirror::qmp {

namespace {

const Schema kNone = {};
const Schema kQueryNodes = {{"flat", Type::kBool}};
const Schema kBlockdevDel = {{"node-name", Type::kString, true}};
const std::vector<std::string> kPolicies = {"report", "ignore", "enospc", "stop"};
const Schema kMirror = {
    {"job-id", Type::kString},
    {"device", Type::kString, true},
    {"target", Type::kString, true},
    {"replaces", Type::kString},
    {"sync", Type::kEnum, true, {"top", "full", "none", "incremental", "bitmap"}},
    {"speed", Type::kInt},
    {"granularity", Type::kInt},
    {"buf-size", Type::kInt},
    {"on-source-error", Type::kEnum, false, kPolicies},
    {"on-target-error", Type::kEnum, false, kPolicies},
    {"filter-node-name", Type::kString},
    {"copy-mode", Type::kString},
    {"auto-finalize", Type::kBool},
    {"auto-dismiss", Type::kBool},
    {"target-is-zero", Type::kBool},
    {"unmap", Type::kBool},
    {"x-adaptive-window-ms", Type::kInt},
};
const Schema kDevice = {{"device", Type::kString, true}};
const Schema kId = {{"id", Type::kString, true}};
const Schema kSetSpeed = {{"device", Type::kString, true}, {"speed", Type::kInt, true}};
const Schema kCancel = {{"device", Type::kString, true}, {"force", Type::kBool}};
const Schema kJobChange = {{"id", Type::kString, true},
                           {"type", Type::kEnum, true, {"mirror"}},
                           {"copy-mode", Type::kString, true}};
const Schema kExportAdd = {
    {"type", Type::kString, true}, {"id", Type::kString, true},
    {"node-name", Type::kString, true}, {"name", Type::kString},
    {"description", Type::kString}, {"writable", Type::kBool},
    {"writethrough", Type::kBool}, {"allocation-depth", Type::kBool},
};
const Schema kExportDel = {{"id", Type::kString, true},
                           {"mode", Type::kEnum, false, {"safe", "hard"}}};

}  // namespace

const std::map<std::string, Daemon::Command>& Daemon::commands() {
  static const std::map<std::string, Command> table = {
      {"query-version", {&kNone, &Daemon::cmd_query_version}},
      {"query-commands", {&kNone, &Daemon::cmd_query_commands}},
      {"quit", {&kNone, &Daemon::cmd_quit}},
      {"blockdev-add", {nullptr, &Daemon::cmd_blockdev_add}},
      {"blockdev-del", {&kBlockdevDel, &Daemon::cmd_blockdev_del}},
      {"object-add", {nullptr, &Daemon::cmd_object_add}},
      {"object-del", {&kId, &Daemon::cmd_object_del}},
      {"blockdev-create", {nullptr, &Daemon::cmd_blockdev_create}},
      {"query-named-block-nodes", {&kQueryNodes, &Daemon::cmd_query_named_block_nodes}},
      {"blockdev-mirror", {&kMirror, &Daemon::cmd_blockdev_mirror}},
      {"query-block-jobs", {&kNone, &Daemon::cmd_query_block_jobs}},
      {"query-jobs", {&kNone, &Daemon::cmd_query_jobs}},
      {"block-job-set-speed", {&kSetSpeed, &Daemon::cmd_block_job_set_speed}},
      {"block-job-pause", {&kDevice, &Daemon::cmd_block_job_verb}},
      {"block-job-resume", {&kDevice, &Daemon::cmd_block_job_verb}},
      {"block-job-complete", {&kDevice, &Daemon::cmd_block_job_verb}},
      {"block-job-cancel", {&kCancel, &Daemon::cmd_block_job_cancel}},
      {"block-job-finalize", {&kId, &Daemon::cmd_block_job_verb}},
      {"block-job-dismiss", {&kId, &Daemon::cmd_block_job_verb}},
      {"block-job-change", {&kJobChange, &Daemon::cmd_block_job_change}},
      {"job-pause", {&kId, &Daemon::cmd_job_verb}},
      {"job-resume", {&kId, &Daemon::cmd_job_verb}},
      {"job-cancel", {&kId, &Daemon::cmd_job_verb}},
      {"job-complete", {&kId, &Daemon::cmd_job_verb}},
      {"job-finalize", {&kId, &Daemon::cmd_job_verb}},
      {"job-dismiss", {&kId, &Daemon::cmd_job_verb}},
      {"nbd-server-start", {nullptr, &Daemon::cmd_nbd_server_start}},
      {"nbd-server-stop", {&kNone, &Daemon::cmd_nbd_server_stop}},
      {"block-export-add", {&kExportAdd, &Daemon::cmd_block_export_add}},
      {"block-export-del", {&kExportDel, &Daemon::cmd_block_export_del}},
      {"query-block-exports", {&kNone, &Daemon::cmd_query_block_exports}},
  };
  return table;
}

Daemon::Daemon(Loop& loop, DaemonOptions opts) : loop_(loop), opts_(std::move(opts)) {}

Daemon::~Daemon() = default;

bool Daemon::has_command(const std::string& name) const {
  return name == "qmp_capabilities" || commands().count(name) > 0;
}

std::vector<std::string> Daemon::command_names() const {
  std::vector<std::string> names = {"qmp_capabilities"};
  for (auto& [name, cmd] : commands()) names.push_back(name);
  return names;
}

Task<QResult<Json>> Daemon::execute(const std::string& name, Json args, bool from_command_line) {
  auto it = commands().find(name);
  if (it == commands().end())
    co_return tl::unexpected<QmpError>(
        QmpError{"CommandNotFound", fmt::format("The command {} has not been found", name)});
  if (quitting_) co_return generic_error("The daemon is shutting down");
  Call call{name, from_command_line};
  if (it->second.schema) {
    if (auto r = check(args, *it->second.schema, "", call.coerce); !r) co_return tl::unexpected(r.error());
  } else if (!args.is_object()) {
    args = Json::object();
  }
  co_return co_await (this->*(it->second.handler))(args, call);
}

Task<QResult<Json>> Daemon::cmd_query_version(Json&, const Call&) { co_return version_json(); }

Task<QResult<Json>> Daemon::cmd_query_commands(Json&, const Call&) {
  Json list = Json::array();
  for (auto& n : command_names()) list.push_back({{"name", n}});
  co_return list;
}

Task<QResult<Json>> Daemon::cmd_quit(Json&, const Call&) {
  // The reply goes out first; the daemon's main task sees quitting() and shuts down.
  request_quit();
  co_return Json::object();
}

Task<Result<void>> Daemon::shutdown() {
  for (auto& [id, job] : std::map(jobs_)) {
    if (!job->concluded()) (void)job->cancel(true);
  }
  for (auto& [id, job] : std::map(jobs_)) co_await job->wait_concluded();
  jobs_.clear();
  if (nbd_) {
    co_await nbd_->stop();
    nbd_.reset();
  }
  exports_.clear();
  Result<void> first;
  // qcow2 nodes first: closing writes their metadata back through their file
  // nodes and marks the images clean; the file nodes are flushed after.
  for (auto& [name, rec] : nodes_) {
    if (!rec.qcow2) continue;
    auto r = co_await rec.qcow2->close();
    if (!r && first && !rec.read_only) first = r;
  }
  for (Node* n : graph_.nodes()) {
    if (n->device().caps().read_only) continue;
    if (auto it = nodes_.find(n->name()); it != nodes_.end() && it->second.qcow2) continue;
    auto r = co_await n->device().flush();
    if (!r && first) first = r;
  }
  co_return first;
}

}  // namespace blkmirror::qmp
