// `blkmirror ctl`: drives a running daemon over QMP. Subcommands: jobs, watch,
// mirror, complete, cancel, pause, resume, speed, nodes, exports, raw. --json
// prints the daemon's reply as JSON for scripts. A refused command prints the
// daemon's desc and exits 1; a daemon that cannot be reached exits 2.
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>
#include <variant>

#include <fmt/format.h>

#include "base/size_parse.h"
#include "cli/mirror_options.h"
#include "cli/commands.h"
#include "cli/exit_codes.h"
#include "cli/qmp_client.h"

namespace blkmirror {

namespace {

using Json = nlohmann::json;

struct CtlArgs {
  std::string qmp;
  bool json = false;
  std::string job, src, dst, job_id, speed, copy_mode, raw;
  // mirror: the option table's options (mirror/option_table.h), as the CLI's
  // `mirror` takes them; sync is QMP's required member.
  TableValues mirror_opts{{"sync", "full"}};
  bool force = false, wait = false, complete = false;
};

std::string bar(uint64_t offset, uint64_t len, int width = 24) {
  double f = len ? static_cast<double>(offset) / static_cast<double>(len) : 1.0;
  int full = static_cast<int>(f * width + 0.5);
  return fmt::format("[{}{}] {:5.1f}%", std::string(full, '#'), std::string(width - full, '.'),
                     f * 100);
}

std::string job_line(const Json& j) {
  uint64_t off = j.value("offset", uint64_t{0}), len = j.value("len", uint64_t{0});
  uint64_t speed = j.value("speed", uint64_t{0});
  std::string extra;
  if (j.value("io-status", "ok") != "ok") extra += " io-status=" + j.value("io-status", "");
  if (j.contains("error")) extra += " error=" + j["error"].get<std::string>();
  return fmt::format("{:<16} {:<8} {:<10} {} {:>10}/{:<10} {:>10}{}", j.value("device", ""),
                     j.value("type", ""), j.value("status", ""), bar(off, len), format_size(off),
                     format_size(len), speed ? format_size(speed) + "/s" : "unlimited", extra);
}

// Every job: block jobs with their mirror fields, other jobs (create) from query-jobs.
Result<Json> all_jobs(QmpClient& c) {
  auto block = c.execute("query-block-jobs");
  if (!block) return block;
  auto jobs = c.execute("query-jobs");
  if (!jobs) return jobs;
  Json out = *block;
  for (auto& j : *jobs) {
    bool seen = false;
    for (auto& b : *block) seen = seen || b.value("device", "") == j.value("id", "");
    if (!seen)
      out.push_back({{"device", j["id"]},
                     {"type", j["type"]},
                     {"status", j["status"]},
                     {"offset", j["current-progress"]},
                     {"len", j["total-progress"]},
                     {"speed", 0}});
  }
  return out;
}

void print_jobs(const Json& jobs) {
  if (jobs.empty()) {
    fmt::print("no jobs\n");
    return;
  }
  fmt::print("{:<16} {:<8} {:<10} {:<33} {:>21} {:>10}\n", "JOB", "TYPE", "STATUS", "PROGRESS",
             "DONE/TOTAL", "SPEED");
  for (auto& j : jobs) fmt::print("{}\n", job_line(j));
}

std::string event_line(const Json& e) {
  const Json& d = e.value("data", Json::object());
  std::string name = e.value("event", "");
  if (name == "JOB_STATUS_CHANGE")
    return fmt::format("job {}: {}", d.value("id", ""), d.value("status", ""));
  if (name == "BLOCK_JOB_ERROR")
    return fmt::format("job {}: {} error, action {}", d.value("device", ""),
                       d.value("operation", ""), d.value("action", ""));
  if (name == "BLOCK_JOB_COPY_MODE_CHANGED")
    return fmt::format("job {}: copy mode now {} ({})", d.value("device", ""),
                       d.value("copy-mode", ""), d.value("reason", ""));
  if (name == "BLOCK_JOB_COMPLETED" && d.contains("error"))
    return fmt::format("job {}: failed: {}", d.value("device", ""), d["error"].get<std::string>());
  return fmt::format("{} {}", name, d.dump());
}

// Follows jobs until `only` (or every job) has ended. Returns an exit code:
// 0 completed, 1 failed, 3 cancelled.
int watch(QmpClient& c, const std::string& only, bool as_json, bool until_ready = false) {
  bool tty = !as_json && ::isatty(STDOUT_FILENO);
  int rc = exit_code::kOk;
  size_t drawn = 0;
  bool ended = false;  // the followed job reported its end
  auto gone_since = std::chrono::steady_clock::time_point::max();
  for (;;) {
    while (auto e = c.next_event(0)) {
      const Json& d = (*e)["data"];
      std::string who = d.value("device", d.value("id", ""));
      if (!only.empty() && who != only) continue;
      std::string name = (*e)["event"];
      if (name == "BLOCK_JOB_COMPLETED") {
        ended = true;
        if (d.contains("error")) rc = exit_code::kJobFailed;
      }
      if (name == "BLOCK_JOB_CANCELLED") ended = true, rc = exit_code::kCancelled;
      if (as_json) {
        fmt::print("{}\n", e->dump());
      } else if (name != "JOB_STATUS_CHANGE" || !tty) {
        if (tty && drawn) fmt::print("\x1b[{}A\x1b[J", drawn), drawn = 0;
        fmt::print("{}\n", event_line(*e));
      }
      if (until_ready && name == "BLOCK_JOB_READY") return exit_code::kOk;
    }
    if (ended && !until_ready) return rc;
    auto jobs = all_jobs(c);
    if (!jobs) {
      fmt::print(stderr, "blkmirror: {}\n", jobs.error().message());
      return exit_code::kBadInput;
    }
    Json shown = Json::array();
    bool active = false;
    for (auto& j : *jobs) {
      if (!only.empty() && j.value("device", "") != only) continue;
      shown.push_back(j);
      std::string st = j.value("status", "");
      if (st != "concluded" && st != "null") active = true;
      if (until_ready && j.value("ready", false)) return exit_code::kOk;
    }
    if (as_json) {
      fmt::print("{}\n", Json{{"jobs", shown}}.dump());
    } else if (tty) {
      if (drawn) fmt::print("\x1b[{}A\x1b[J", drawn);
      for (auto& j : shown) fmt::print("{}\n", job_line(j));
      drawn = shown.size();
    } else {
      for (auto& j : shown) fmt::print("{}\n", job_line(j));
    }
    std::fflush(stdout);
    if (!active) {
      // Watching everything: done when nothing runs. Watching one job that has
      // vanished: its end events may still be on the way; wait a moment.
      if (only.empty() || until_ready) return rc;
      auto now = std::chrono::steady_clock::now();
      if (gone_since == std::chrono::steady_clock::time_point::max()) gone_since = now;
      if (now - gone_since > std::chrono::seconds(2)) return rc;
    }
    c.wait_for_event(500);  // wakes early on an event, which the next turn shows
  }
}

Result<Json> mirror_args(const CtlArgs& a) {
  Json args = {
      {"device", a.src}, {"target", a.dst}, {"job-id", a.job_id.empty() ? a.src : a.job_id}};
  // Checked here with the table's texts (the daemon checks again): bad input
  // fails before anything is sent, with the text the CLI and QMP give.
  MirrorParams checked;
  auto r =
      apply_table_options(checked, a.mirror_opts, [&](const MirrorOption& o, const OptionValue& v) {
        std::visit([&](const auto& x) { args[std::string(o.name)] = x; }, v);
      });
  if (!r) return make_error(r.error());
  return args;
}

// `ctl speed`: the table's speed option, as `ctl mirror --speed` takes it.
Result<Json> speed_arg(const std::string& text) {
  const MirrorOption& o = *find_mirror_option("speed");
  auto v = parse_option_text(o, text);
  if (!v) return make_error(v.error());
  MirrorParams checked;
  if (auto r = set_option(checked, o, *v, o.flag); !r) return make_error(r.error());
  return Json(std::get<int64_t>(*v));
}

int run_ctl(CLI::App* ctl, const CtlArgs& a) {
  std::string where = a.qmp;
  if (where.empty()) {
    const char* env = std::getenv("BLKMIRROR_QMP");
    if (!env)
      return fmt::print(stderr, "blkmirror: ctl: give --qmp PATH (or set BLKMIRROR_QMP)\n"),
             exit_code::kBadInput;
    where = env;
  }
  auto sub = ctl->get_subcommands();
  if (sub.empty()) return exit_code::kBadInput;
  const std::string cmd = sub.front()->get_name();

  // Checks that need no daemon come first.
  Json args = Json::object();
  std::string qmp_cmd;
  if (cmd == "mirror") {
    auto m = mirror_args(a);
    if (!m) return fmt::print(stderr, "blkmirror: {}\n", m.error().message()), exit_code::kBadInput;
    args = *m;
    qmp_cmd = "blockdev-mirror";
  } else if (cmd == "speed") {
    auto v = speed_arg(a.speed);
    if (!v) return fmt::print(stderr, "blkmirror: {}\n", v.error().message()), exit_code::kBadInput;
    args = {{"device", a.job}, {"speed", *v}};
    qmp_cmd = "block-job-set-speed";
  } else if (cmd == "raw") {
    Json req = Json::parse(a.raw, nullptr, false);
    if (req.is_discarded() || !req.is_object() || !req.contains("execute") ||
        !req["execute"].is_string())
      return fmt::print(stderr,
                        "blkmirror: raw: expected {{\"execute\": NAME, \"arguments\": {{...}}}}\n"),
             exit_code::kBadInput;
    qmp_cmd = req["execute"];
    args = req.value("arguments", Json::object());
  }

  auto client = QmpClient::connect(where);
  if (!client)
    return fmt::print(stderr, "blkmirror: {}\n", client.error().message()), exit_code::kBadInput;
  QmpClient& c = *client;
  auto run = [&](const std::string& name, const Json& arg) -> Result<Json> {
    auto r = c.execute(name, arg);
    if (!r) fmt::print(stderr, "blkmirror: {}\n", r.error().message());
    return r;
  };

  if (cmd == "jobs") {
    auto jobs = all_jobs(c);
    if (!jobs)
      return fmt::print(stderr, "blkmirror: {}\n", jobs.error().message()), exit_code::kJobFailed;
    if (a.json) fmt::print("{}\n", jobs->dump());
    else print_jobs(*jobs);
    return exit_code::kOk;
  }
  if (cmd == "watch") return watch(c, a.job, a.json);
  if (cmd == "nodes" || cmd == "exports") {
    auto r =
        run(cmd == "nodes" ? "query-named-block-nodes" : "query-block-exports", Json::object());
    if (!r) return exit_code::kJobFailed;
    if (a.json) return fmt::print("{}\n", r->dump()), exit_code::kOk;
    if (cmd == "nodes") {
      fmt::print("{:<16} {:<8} {:>10} {:<3} {}\n", "NODE", "DRIVER", "SIZE", "RO", "FILE");
      for (auto& n : *r)
        fmt::print("{:<16} {:<8} {:>10} {:<3} {}\n", n.value("node-name", ""), n.value("drv", ""),
                   format_size(n["image"].value("virtual-size", uint64_t{0})),
                   n.value("ro", false) ? "yes" : "no", n.value("file", ""));
    } else {
      fmt::print("{:<16} {}\n", "EXPORT", "NODE");
      for (auto& e : *r) fmt::print("{:<16} {}\n", e.value("id", ""), e.value("node-name", ""));
    }
    return exit_code::kOk;
  }
  if (cmd == "complete" || cmd == "pause" || cmd == "resume") {
    qmp_cmd = "block-job-" + cmd;
    args = {{"device", a.job}};
  } else if (cmd == "change") {
    qmp_cmd = "block-job-change";
    args = {{"id", a.job}, {"type", "mirror"}, {"copy-mode", a.copy_mode}};
  } else if (cmd == "cancel") {
    qmp_cmd = "block-job-cancel";
    args = {{"device", a.job}, {"force", a.force}};
  }
  auto r = run(qmp_cmd, args);
  if (!r) return exit_code::kJobFailed;
  if (a.json || cmd == "raw") fmt::print("{}\n", r->dump());
  if (cmd == "mirror") {
    std::string id = args["job-id"];
    if (!a.json) fmt::print(stderr, "started mirror job '{}' ({} -> {})\n", id, a.src, a.dst);
    if (a.complete) {
      if (int w = watch(c, id, a.json, true); w != exit_code::kOk) return w;
      if (!run("block-job-complete", Json{{"device", id}})) return exit_code::kJobFailed;
      return watch(c, id, a.json);
    }
    if (a.wait) return watch(c, id, a.json, true);
  }
  return exit_code::kOk;
}

}  // namespace

CommandRunner add_ctl_command(CLI::App& app) {
  auto a = std::make_shared<CtlArgs>();
  auto* ctl = app.add_subcommand("ctl", "Control a running blkmirror daemon over QMP");
  ctl->add_option("--qmp", a->qmp,
                  "daemon's QMP socket (PATH or tcp:HOST:PORT; default $BLKMIRROR_QMP)");
  ctl->add_flag("--json", a->json, "print replies as JSON");
  ctl->require_subcommand(1);
  ctl->add_subcommand("jobs", "list jobs with progress");
  ctl->add_subcommand("watch", "show live progress until the jobs end")
      ->add_option("JOB", a->job, "only this job");
  auto* m = ctl->add_subcommand("mirror", "start a mirror job from one node to another");
  m->add_option("SRC-NODE", a->src)->required();
  m->add_option("DST-NODE", a->dst)->required();
  m->add_option("--job-id", a->job_id, "job id (default: SRC-NODE)");
  add_table_options(*m, a->mirror_opts);
  m->add_flag("--wait", a->wait, "wait until the job is ready");
  m->add_flag("--complete", a->complete,
              "wait until ready, complete, and wait for the switch-over");
  for (const char* verb : {"complete", "pause", "resume"})
    ctl->add_subcommand(verb, fmt::format("{} a job", verb))->add_option("JOB", a->job)->required();
  auto* cancel =
      ctl->add_subcommand("cancel", "cancel a job (after ready: finish without switching)");
  cancel->add_option("JOB", a->job)->required();
  cancel->add_flag("--force", a->force, "abandon the copy at once, even after ready");
  auto* speed = ctl->add_subcommand("speed", "change a job's speed limit (0: unlimited)");
  speed->add_option("JOB", a->job)->required();
  speed->add_option("SPEED", a->speed)->required();
  auto* change =
      ctl->add_subcommand("change", "switch a running mirror's copy mode (to write-blocking)");
  change->add_option("JOB", a->job)->required();
  change->add_option("--copy-mode", a->copy_mode, "the new mode")->required();
  ctl->add_subcommand("nodes", "list block nodes");
  ctl->add_subcommand("exports", "list NBD exports");
  ctl->add_subcommand("raw", "send one QMP command given as JSON")
      ->add_option("JSON", a->raw)
      ->required();
  return [ctl, a]() -> int {
    if (!ctl->parsed()) return -1;
    return run_ctl(ctl, *a);
  };
}

}  // namespace blkmirror
