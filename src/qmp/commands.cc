// execute() over the joined command tables of the cmd_*.cc files, and the
// commands about the daemon itself (version, command list, quit).
#include <cassert>

#include <fmt/format.h>

#include "qmp/daemon.h"
#include "qmp/wire.h"

namespace blkmirror::qmp {

namespace {

const Schema kNone = {};

}  // namespace

struct Daemon::CoreCommands {
  static Task<QResult<Json>> query_version(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query_commands(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> quit(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::core_commands() {
  static const Command table[] = {
      {"query-version", &kNone, &CoreCommands::query_version},
      {"query-commands", &kNone, &CoreCommands::query_commands},
      {"quit", &kNone, &CoreCommands::quit},
  };
  return table;
}

const std::map<std::string_view, const Daemon::Command*>& Daemon::commands() {
  static const auto joined = [] {
    std::map<std::string_view, const Command*> all;
    for (auto table : {core_commands(), block_commands(), object_commands(), job_commands(),
                       nbd_commands(), commit_commands(), reopen_commands(),
                       resize_commands(), drive_mirror_commands(),
                       verify_commands(), bitmap_commands()}) {
      for (const Command& c : table) {
        bool fresh = all.emplace(c.name, &c).second;
        assert(fresh && "a QMP command is listed twice");
        (void)fresh;
      }
    }
    return all;
  }();
  return joined;
}

Daemon::Daemon(Loop& loop, DaemonOptions opts) : loop_(loop), opts_(std::move(opts)) {}

Daemon::~Daemon() = default;

bool Daemon::has_command(const std::string& name) const {
  return name == "qmp_capabilities" || commands().count(name) > 0;
}

std::vector<std::string> Daemon::command_names() const {
  std::vector<std::string> names = {"qmp_capabilities"};
  for (auto& [name, cmd] : commands()) names.emplace_back(name);
  return names;
}

Task<QResult<Json>> Daemon::execute(const std::string& name, Json args, bool from_command_line) {
  auto it = commands().find(name);
  if (it == commands().end())
    co_return tl::unexpected<QmpError>(
        QmpError{"CommandNotFound", fmt::format("The command {} has not been found", name)});
  if (quitting_) co_return generic_error("The daemon is shutting down");
  const Command& cmd = *it->second;
  Call call{name, from_command_line, cmd.verb};
  if (cmd.schema) {
    if (auto r = check(args, *cmd.schema, "", call.coerce); !r) co_return tl::unexpected(r.error());
  } else if (!args.is_object()) {
    args = Json::object();
  }
  co_return co_await cmd.handler(*this, args, call);
}

Task<QResult<Json>> Daemon::CoreCommands::query_version(Daemon&, Json&, const Call&) {
  co_return version_json();
}

Task<QResult<Json>> Daemon::CoreCommands::query_commands(Daemon& d, Json&, const Call&) {
  Json list = Json::array();
  for (auto& n : d.command_names()) list.push_back({{"name", n}});
  co_return list;
}

Task<QResult<Json>> Daemon::CoreCommands::quit(Daemon& d, Json&, const Call&) {
  // The reply goes out first; the daemon's main task sees quitting() and shuts down.
  d.request_quit();
  co_return Json::object();
}

Task<Result<void>> Daemon::shutdown() {
  for (auto& [id, job] : std::map(jobs_)) {
    if (!job->concluded()) (void)job->cancel(true);
  }
  for (auto& [id, job] : std::map(jobs_)) co_await job->wait_concluded();
  // What runs after a commit's job uses the daemon's nodes: let it finish.
  while (aftermaths_ > 0) co_await aftermaths_done_.wait();
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
