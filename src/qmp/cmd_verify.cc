// Verify commands, blkmirror's own (docs/qmp.md, "Extensions"): x-blockdev-verify
// starts a VerifyJob (verify/verify_job.h) comparing two nodes, x-query-verify
// reports what it found. Named with QMP's x- prefix for what is not QEMU's.
// A verify job between the nodes of a running mirror asks that mirror which
// chunks it still owes the target, so a copy in progress is never reported as
// a difference.
#include <fmt/format.h>

#include "mirror/mirror_job.h"
#include "qmp/daemon.h"
#include "verify/verify_job.h"

namespace blkmirror::qmp {

namespace {

const Schema kVerify = {
    {"job-id", Type::kString},       {"device", Type::kString, true},
    {"target", Type::kString, true}, {"granularity", Type::kInt},
    {"speed", Type::kInt},           {"repair", Type::kBool},
    {"settle-timeout", Type::kInt},  // ms a changing chunk is retried
    {"auto-finalize", Type::kBool},  {"auto-dismiss", Type::kBool},
};
const Schema kQuery = {{"id", Type::kString, true}};

Json ranges_json(const std::vector<ByteRange>& v) {
  Json out = Json::array();
  for (auto& r : v) out.push_back({{"offset", r.offset}, {"length", r.length}});
  return out;
}

}  // namespace

struct Daemon::VerifyCommands {
  static Task<QResult<Json>> verify(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> query(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::verify_commands() {
  static const Command table[] = {
      {"x-blockdev-verify", &kVerify, &VerifyCommands::verify},
      {"x-query-verify", &kQuery, &VerifyCommands::query},
  };
  return table;
}

Task<QResult<Json>> Daemon::VerifyCommands::verify(Daemon& d, Json& a, const Call& call) {
  VerifyParams p;
  p.source = a["device"].get<std::string>();
  p.target = a["target"].get<std::string>();
  p.job_id = a.value("job-id", p.source);
  if (!id_wellformed(p.job_id))
    co_return generic_error(fmt::format("Invalid job ID '{}'", p.job_id));
  if (d.jobs_.count(p.job_id))
    co_return generic_error(fmt::format("Job ID '{}' already in use", p.job_id));
  for (const std::string* name : {&p.source, &p.target})
    if (!d.graph_.find(*name))
      co_return generic_error(fmt::format("Cannot find device='{}' nor node-name='{}'",
                                          name == &p.source ? *name : "", *name));
  const int64_t gran = a.value("granularity", int64_t{0});
  if (gran < 0) co_return generic_error("Granularity must be a power of 2 between 512 and 64M");
  p.granularity = static_cast<uint64_t>(gran);
  p.speed = a.value("speed", int64_t{0});
  p.repair = a.value("repair", false);
  const int64_t settle = a.value("settle-timeout", int64_t{30000});
  if (settle < 0)
    co_return generic_error("Parameter 'settle-timeout' expects a non-negative value");
  p.settle_timeout = std::chrono::milliseconds(settle);
  p.auto_finalize = a.value("auto-finalize", true);
  // Unlike QEMU's jobs, the result is worth keeping: the job waits in
  // concluded for x-query-verify until dismissed, unless asked otherwise.
  p.auto_dismiss = a.value("auto-dismiss", false);
  // Mirrors (and active commits) between the same two nodes, looked up at each
  // question: one may start or end while the verify runs.
  Node* src = d.graph_.find(p.source);
  Node* tgt = d.graph_.find(p.target);
  Daemon* dp = &d;
  p.copy_pending = [dp, src, tgt](uint64_t off, uint64_t len) {
    for (auto& [id, job] : dp->jobs_) {
      auto* m = dynamic_cast<MirrorJob*>(job.get());
      if (m && m->source_node() == src && m->target_node() == tgt && m->copy_pending(off, len))
        return true;
    }
    return false;
  };
  auto job = VerifyJob::create(d.loop_, d.graph_, std::move(p));
  if (!job) co_return generic_error(job.error().message());
  d.add_job(*job);
  co_return Json::object();
}

Task<QResult<Json>> Daemon::VerifyCommands::query(Daemon& d, Json& a, const Call& call) {
  const std::string id = a["id"].get<std::string>();
  auto it = d.jobs_.find(id);
  auto* v = it == d.jobs_.end() ? nullptr : dynamic_cast<VerifyJob*>(it->second.get());
  if (!v) co_return generic_error(fmt::format("No verify job with id '{}'", id));
  const VerifyReport& r = v->report();
  Json out = {{"id", id},
              {"status", to_string(v->status())},
              {"granularity", v->granularity()},
              {"length", r.length},
              {"compared", r.compared},
              {"differing", r.differing},
              {"repaired", r.repaired},
              {"zero-skipped", r.zero_skipped},
              {"bytes-read", r.bytes_read},
              {"rechecks", r.rechecks},
              {"differences", ranges_json(v->differences_so_far())},
              {"unverified", ranges_json(r.unverified)}};
  if (v->concluded() && !v->was_cancelled() && !v->failure()) out["equal"] = r.equal();
  if (v->failure()) out["error"] = v->failure()->message();
  co_return out;
}

}  // namespace blkmirror::qmp
