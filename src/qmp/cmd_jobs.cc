// Job commands: blockdev-mirror, the job queries, the block-job-* and job-*
// verbs, and the job events sent as QMP events (qmp/job_events.h).
#include <fmt/format.h>
#include <unistd.h>

#include <cassert>

#include "blockdev/file_device.h"
#include "mirror/mirror_job.h"
#include "mirror/mirror_state.h"
#include "qmp/daemon.h"
#include "qmp/job_events.h"
#include "qmp/mirror_args.h"

namespace blkmirror::qmp {

namespace {

tl::unexpected<QmpError> no_block_job(const std::string& id) {
  return tl::unexpected<QmpError>(
      QmpError{"DeviceNotActive", fmt::format("Block job '{}' not found", id)});
}

tl::unexpected<QmpError> from(const Error& e) { return generic_error(e.message()); }

bool is_block_job(const Job& j) { return j.info().type != "create"; }

// The verb of a block-job-X / job-X command (its table entry's), applied. As in
// QEMU, job-cancel is a forced cancel; block-job-cancel has its own handler.
Result<void> apply_verb(Job& job, JobVerb verb) {
  switch (verb) {
    case JobVerb::kPause:
      return job.pause();
    case JobVerb::kResume:
      return job.resume();
    case JobVerb::kCancel:
      return job.cancel(true);
    case JobVerb::kComplete:
      return job.complete();
    case JobVerb::kFinalize:
      return job.finalize();
    case JobVerb::kDismiss:
      return job.dismiss();
    case JobVerb::kSetSpeed:
    case JobVerb::kChange:
      break;  // commands of their own, with arguments
  }
  return make_plain_error(EINVAL,
                          fmt::format("no generic handler for the job verb '{}'", to_string(verb)));
}

// blockdev-mirror's members: the nodes and ids, then the job's options
// (qmp/mirror_args.h), which drive-mirror shares.
Schema mirror_schema() {
  Schema s = {
      {"job-id", Type::kString},
      {"device", Type::kString, true},
      {"target", Type::kString, true},
      {"replaces", Type::kString},
      {"filter-node-name", Type::kString},
      {"bitmap", Type::kString},
      {"bitmap-mode", Type::kEnum, false, {"on-success", "never", "always"}},
      // blkmirror's own: the crash-safe state file (docs/design/journal.md).
      {"x-persistent-state", Type::kString},
  };
  for (Field& f : mirror_option_fields()) s.push_back(std::move(f));
  return s;
}

const Schema kMirror = mirror_schema();
const Schema kNone = {};
const Schema kDevice = {{"device", Type::kString, true}};
const Schema kId = {{"id", Type::kString, true}};
const Schema kSetSpeed = {{"device", Type::kString, true}, {"speed", Type::kInt, true}};
const Schema kCancel = {{"device", Type::kString, true}, {"force", Type::kBool}};
const Schema kJobChange = {{"id", Type::kString, true},
                           {"type", Type::kEnum, true, {"mirror"}},
                           {"copy-mode", Type::kString, true}};

}  // namespace

struct Daemon::JobCommands {
  static Task<QResult<Json>> blockdev_mirror(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query_block_jobs(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query_jobs(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> block_job_verb(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> job_verb(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> block_job_set_speed(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> block_job_cancel(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> block_job_change(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::job_commands() {
  using J = JobCommands;
  static const Command table[] = {
      {"blockdev-mirror", &kMirror, &J::blockdev_mirror},
      {"query-block-jobs", &kNone, &J::query_block_jobs},
      {"query-jobs", &kNone, &J::query_jobs},
      {"block-job-set-speed", &kSetSpeed, &J::block_job_set_speed},
      {"block-job-pause", &kDevice, &J::block_job_verb, JobVerb::kPause},
      {"block-job-resume", &kDevice, &J::block_job_verb, JobVerb::kResume},
      {"block-job-complete", &kDevice, &J::block_job_verb, JobVerb::kComplete},
      {"block-job-cancel", &kCancel, &J::block_job_cancel},  // soft unless force
      {"block-job-finalize", &kId, &J::block_job_verb, JobVerb::kFinalize},
      {"block-job-dismiss", &kId, &J::block_job_verb, JobVerb::kDismiss},
      {"block-job-change", &kJobChange, &J::block_job_change},
      {"job-pause", &kId, &J::job_verb, JobVerb::kPause},
      {"job-resume", &kId, &J::job_verb, JobVerb::kResume},
      {"job-cancel", &kId, &J::job_verb, JobVerb::kCancel},  // QEMU: always forced
      {"job-complete", &kId, &J::job_verb, JobVerb::kComplete},
      {"job-finalize", &kId, &J::job_verb, JobVerb::kFinalize},
      {"job-dismiss", &kId, &J::job_verb, JobVerb::kDismiss},
  };
  return table;
}

void Daemon::add_job(std::shared_ptr<Job> job) {
  const std::string id = job->id();
  jobs_[id] = job;
  job->subscribe([this](const JobEvent& e) { on_job_event(e); });
  // QEMU reports the creation too, before the job runs.
  emit("JOB_STATUS_CHANGE", {{"id", id}, {"status", "created"}});
  job->start(loop_.executor());
}

void Daemon::on_job_event(const JobEvent& e) {
  auto it = jobs_.find(e.id);
  bool block = it != jobs_.end() && is_block_job(*it->second);
  // QEMU sends BLOCK_JOB_COMPLETED/CANCELLED for block jobs only (not for
  // blockdev-create's job).
  bool block_only = e.kind == JobEvent::Kind::kCompleted || e.kind == JobEvent::Kind::kCancelled;
  if (auto ev = job_event_json(e); ev && (block || !block_only)) emit(ev->name, ev->data);
  // A null job is gone: its id may be used again. The job's own coroutine
  // still holds a reference, so dropping ours here is safe.
  if (e.kind == JobEvent::Kind::kStatusChange && e.status == JobStatus::kNull && it != jobs_.end())
    jobs_.erase(it);
}

Task<QResult<Json>> Daemon::JobCommands::blockdev_mirror(Daemon& d, Json& a, const Call& call) {
  MirrorParams p;
  p.device = a["device"].get<std::string>();
  p.target = a["target"].get<std::string>();
  p.job_id = a.value("job-id", p.device);
  if (!id_wellformed(p.job_id))
    co_return generic_error(fmt::format("Invalid job ID '{}'", p.job_id));
  if (d.jobs_.count(p.job_id))
    co_return generic_error(fmt::format("Job ID '{}' already in use", p.job_id));
  if (auto r = set_mirror_options(p, a); !r) co_return from(r.error());
  if (a.contains("replaces")) p.replaces = a["replaces"].get<std::string>();
  if (a.contains("bitmap-mode") && !a.contains("bitmap"))
    co_return generic_error("Cannot specify bitmap sync mode without a bitmap");
  if (a.contains("bitmap")) p.bitmap = a["bitmap"].get<std::string>();
  const std::string mode = a.value("bitmap-mode", "never");
  if (mode == "always")
    co_return generic_error("Bitmap sync mode 'always' is not supported by blkmirror's mirror "
                            "(use 'never' or 'on-success')");
  p.bitmap_mode = mode == "on-success" ? BitmapMode::kOnSuccess : BitmapMode::kNever;
  if (a.contains("filter-node-name") && !id_wellformed(a["filter-node-name"].get<std::string>()))
    co_return generic_error(
        fmt::format("Invalid node-name: '{}'", a["filter-node-name"].get<std::string>()));
  if (auto v = validate_params(p); !v) co_return from(v.error());
  std::optional<MirrorState> state;
  if (a.contains("x-persistent-state")) {
    auto st = co_await d.open_state(a["x-persistent-state"].get<std::string>(), p,
                                    a.contains("granularity"));
    if (!st) co_return tl::unexpected(st.error());
    state = std::move(*st);
  }
  auto job = MirrorJob::create(d.loop_, d.graph_, p);
  if (!job) {
    // A state file made a moment ago for this refused job goes again.
    if (state && !state->resumed) ::unlink(state->path.c_str());
    co_return from(job.error());
  }
  d.add_job(*job);
  co_return Json::object();
}

// The file a node's bytes live in, for a state file's identity: the node's own
// device, or the file node below a format node (raw, qcow2).
const BlockDevice& Daemon::backing_store(const Node& n) const {
  auto it = nodes_.find(n.name());
  if (it != nodes_.end() && it->second.file_edge)
    return backing_store(it->second.file_edge->node());
  return *n.device_ptr();
}

Task<QResult<MirrorState>> Daemon::open_state(const std::string& path, MirrorParams& p,
                                              bool granularity_given) {
  auto checked = checked_path(path);
  if (!checked) co_return tl::unexpected(checked.error());
  Node* src = graph_.find(p.device);
  Node* tgt = graph_.find(p.target);
  // MirrorJob::create reports missing nodes with QEMU's texts.
  if (!src || !tgt) co_return MirrorState{};
  MirrorStateRequest req;
  req.path = *checked;
  req.src = &src->device();
  req.dst = &tgt->device();
  req.src_id = device_identity(backing_store(*src), p.device);
  req.dst_id = device_identity(backing_store(*tgt), p.target);
  req.src_id.length = src->length();
  req.dst_id.length = tgt->length();
  auto st = co_await open_mirror_state(loop_, &req, &p, granularity_given);
  if (!st) co_return generic_error(st.error().message());
  p.journal = st->journal;
  p.resume = st->resumed;
  co_return std::move(*st);
}

Task<QResult<Json>> Daemon::JobCommands::query_block_jobs(Daemon& d, Json& args, const Call& call) {
  Json list = Json::array();
  for (auto& [id, job] : d.jobs_) {
    if (!is_block_job(*job)) continue;
    JobInfo i = job->info();
    Json j = {{"type", i.type},
              {"device", i.id},
              {"len", i.len},
              {"offset", i.offset},
              {"busy", i.busy},
              {"paused", i.paused},
              {"speed", i.speed},
              {"io-status", to_string(i.io_status)},
              {"ready", i.ready},
              {"status", to_string(i.status)},
              {"auto-finalize", i.auto_finalize},
              {"auto-dismiss", i.auto_dismiss}};
    if (i.error) j["error"] = *i.error;
    if (i.type == "mirror") j["actively-synced"] = i.actively_synced;
    list.push_back(j);
  }
  co_return list;
}

Task<QResult<Json>> Daemon::JobCommands::query_jobs(Daemon& d, Json& args, const Call& call) {
  Json list = Json::array();
  for (auto& [id, job] : d.jobs_) {
    JobInfo i = job->info();
    Json j = {{"id", i.id},
              {"type", i.type},
              {"status", to_string(i.status)},
              {"current-progress", i.offset},
              {"total-progress", i.len}};
    if (i.error) j["error"] = *i.error;
    list.push_back(j);
  }
  co_return list;
}

// block-job-{pause,resume,complete,finalize,dismiss}: the job by device (or id).
Task<QResult<Json>> Daemon::JobCommands::block_job_verb(Daemon& d, Json& a, const Call& call) {
  std::string id =
      a.contains("device") ? a["device"].get<std::string>() : a["id"].get<std::string>();
  auto it = d.jobs_.find(id);
  if (it == d.jobs_.end() || !is_block_job(*it->second)) co_return no_block_job(id);
  assert(call.verb);  // the table gives each verb command its verb
  if (auto r = apply_verb(*it->second, *call.verb); !r) co_return from(r.error());
  co_return Json::object();
}

// job-{pause,resume,cancel,complete,finalize,dismiss}: any job, by id.
Task<QResult<Json>> Daemon::JobCommands::job_verb(Daemon& d, Json& a, const Call& call) {
  auto it = d.jobs_.find(a["id"].get<std::string>());
  if (it == d.jobs_.end()) co_return generic_error("Job not found");
  assert(call.verb);  // the table gives each verb command its verb
  if (auto r = apply_verb(*it->second, *call.verb); !r) co_return from(r.error());
  co_return Json::object();
}

Task<QResult<Json>> Daemon::JobCommands::block_job_set_speed(Daemon& d, Json& a, const Call& call) {
  std::string id = a["device"].get<std::string>();
  auto it = d.jobs_.find(id);
  if (it == d.jobs_.end() || !is_block_job(*it->second)) co_return no_block_job(id);
  if (auto r = it->second->set_speed(a["speed"].get<int64_t>()); !r) co_return from(r.error());
  co_return Json::object();
}

Task<QResult<Json>> Daemon::JobCommands::block_job_cancel(Daemon& d, Json& a, const Call& call) {
  std::string id = a["device"].get<std::string>();
  bool force = a.value("force", false);
  auto it = d.jobs_.find(id);
  if (it == d.jobs_.end() || !is_block_job(*it->second)) co_return no_block_job(id);
  JobInfo i = it->second->info();
  // QEMU: a soft cancel of a user-paused job is refused (resume it, or force).
  if (i.paused && !force)
    co_return generic_error(fmt::format("The block job for device '{}' is currently paused", id));
  if (auto r = it->second->cancel(force); !r) co_return from(r.error());
  co_return Json::object();
}

// block-job-change {id, type: mirror, copy-mode}: QEMU 8.2's command; the only
// change a mirror accepts is to write-blocking.
Task<QResult<Json>> Daemon::JobCommands::block_job_change(Daemon& d, Json& a, const Call& call) {
  std::string id = a["id"].get<std::string>();
  auto it = d.jobs_.find(id);
  if (it == d.jobs_.end() || !is_block_job(*it->second)) co_return no_block_job(id);
  auto mirror = std::dynamic_pointer_cast<MirrorJob>(it->second);
  if (!mirror) co_return generic_error(fmt::format("Job '{}' is not a mirror job", id));
  auto mode = parse_copy_mode(a["copy-mode"].get<std::string>());
  if (!mode) co_return from(mode.error());
  if (auto r = mirror->change_copy_mode(*mode); !r) co_return from(r.error());
  co_return Json::object();
}

}  // namespace blkmirror::qmp
