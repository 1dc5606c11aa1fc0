// `blkmirror commit IMAGE`: merges a qcow2 image's top layer into its backing
// chain's base (or --base), optionally while serving the disk over NBD: clients
// write the top during the copy and are switched to the base at complete, with
// no write lost. The chain is opened and committed by an in-process QMP daemon
// (the same blockdev-add and block-commit a management tool would send), so the
// CLI and QMP share one implementation; the progress display and signals are
// the mirror's (drive.h).
#include <csignal>
#include <memory>
#include <set>
#include <string>

#include <fmt/format.h>

#include "base/size_parse.h"
#include "cli/commands.h"
#include "cli/drive.h"
#include "cli/exit_codes.h"
#include "cli/mirror_options.h"
#include "cli/serve_options.h"
#include "cli/signals.h"
#include "mirror/mirror_job.h"
#include "qmp/daemon.h"

namespace blkmirror {

namespace {

struct CommitArgs {
  std::string image;
  std::string base;  // "" = the bottom of the chain
  std::string speed = "0";
  std::string copy_mode = "adaptive";
  std::string on_error = "report";
  std::string locking = "auto";
  ServeOptions serve;
  bool no_auto_complete = false;
  bool json = false, no_progress = false;
};

// Runs one QMP command on the in-process daemon; its error text on failure.
Task<Result<qmp::Json>> run_qmp(qmp::Daemon* d, std::string name, qmp::Json args) {
  auto r = co_await d->execute(name, std::move(args));
  if (!r) co_return make_plain_error(EINVAL, r.error().desc);
  co_return *r;
}

// What carry_bitmaps did at ready: the bitmaps it carried (layer's node,
// name), and the names of those it created in the base.
struct Carried {
  bool ran = false;
  std::set<std::pair<std::string, std::string>> carried;
  std::vector<std::string> created;
};

// Carries the persistent bitmaps of the layers the commit drops from the chain
// (layers: IMAGE down to the base, exclusive) into the base, as libvirt does
// around block-commit (QEMU leaves it to the management tool): each is OR'ed
// into the base's bitmap of the same name, created first when missing
// (persistent, with the dropped one's granularity and recording flag; a name
// in two layers: created as the newest layer's, with both layers' bits). The
// base's own bitmaps recorded the commit's writes already. Runs at ready,
// before the switch, so a bitmap it creates records the base's writes from
// before the base takes the clients';
// and again (again = true: only what the first run carried) after the switch,
// for what the top took meanwhile. A bitmap it cannot carry (inconsistent, a
// base that cannot store bitmaps, ...) is named in a note and stays as it was.
Task<void> carry_bitmaps(qmp::Daemon* d, const std::vector<Node*>* layers, Node* base,
                         Progress* progress, Carried* c, bool again) {
  for (Node* n : *layers) {
    for (const NamedBitmap& b : n->bitmaps()) {
      if (!b.persistent) continue;
      if (again && !c->carried.count({n->name(), b.name()})) continue;
      const bool create = !base->bitmaps().find(b.name());
      qmp::Json actions = qmp::Json::array();
      if (create)
        actions.push_back({{"type", "block-dirty-bitmap-add"},
                           {"data",
                            {{"node", base->name()},
                             {"name", b.name()},
                             {"granularity", b.granularity()},
                             {"persistent", true},
                             {"disabled", !b.enabled}}}});
      qmp::Json source = {{"node", n->name()}, {"name", b.name()}};
      qmp::Json merge = {
          {"node", base->name()}, {"target", b.name()}, {"bitmaps", qmp::Json::array({source})}};
      actions.push_back({{"type", "block-dirty-bitmap-merge"}, {"data", merge}});
      const std::string node = n->name(), name = b.name(), image = n->device().describe();
      qmp::Json args = {{"actions", actions}};
      // The command's name from this frame, not a by-value string argument
      // (GCC 12 rule 2, base/task.h).
      const std::string command = "transaction";
      auto r = co_await d->execute(command, std::move(args));
      if (!r) {
        progress->note(fmt::format("bitmap '{}' of {} not carried into {}: {}; it stays as it was",
                                   name, image, base->device().describe(), r.error().desc));
        continue;
      }
      if (again) continue;
      c->carried.insert({node, name});
      if (create) c->created.push_back(name);
    }
  }
}

// A commit that did not switch keeps its chain: a bitmap carry_bitmaps made in
// the base would claim a history the base alone does not have.
Task<void> undo_carry(qmp::Daemon* d, Node* base, const Carried* c) {
  for (const std::string& name : c->created) {
    qmp::Json args = {{"node", base->name()}, {"name", name}};
    const std::string command = "block-dirty-bitmap-remove";
    (void)co_await d->execute(command, std::move(args));
  }
}

int run_commit(const CommitArgs& a) {
  auto speed = parse_size(a.speed);
  if (!speed) return fail_input("--speed: " + speed.error().message());
  Loop loop;
  StraySignalGuard stray_signals(loop);
  qmp::Daemon daemon(loop);
  const bool serving = a.serve.enabled();
  ProgressStyle style = a.json          ? ProgressStyle::kJson
                        : a.no_progress ? ProgressStyle::kNone
                                        : ProgressStyle::kAuto;
  Progress progress(style);
  asio::signal_set stop_signals(loop.ctx(), SIGINT, SIGTERM);
  return loop.run([&]() -> Task<int> {
    qmp::Daemon* d = &daemon;
    // Opening: the image over its file; the backing chain its header names
    // opens read-only below it, and block-commit makes the base writable.
    qmp::Json add = {{"driver", "qcow2"},
                     {"node-name", "top"},
                     {"file", {{"driver", "file"}, {"filename", a.image}, {"locking", a.locking}}}};
    auto added = co_await run_qmp(d, "blockdev-add", add);
    if (!added) {
      (void)co_await d->shutdown();
      co_return fail_input(fmt::format("{}: {}", a.image, added.error().message()));
    }
    if (!d->graph().find("top")->backing()) {
      (void)co_await d->shutdown();
      co_return fail_input(fmt::format("{} has no backing file: nothing to commit", a.image));
    }
    qmp::Json commit = {{"job-id", "commit"},     {"device", "top"},
                        {"speed", *speed},        {"copy-mode", a.copy_mode},
                        {"on-error", a.on_error}};
    if (!a.base.empty()) commit["base"] = a.base;
    auto started = co_await run_qmp(d, "block-commit", commit);
    if (!started) {
      (void)co_await d->shutdown();
      co_return fail_input(fmt::format("{}: {}", a.image, started.error().message()));
    }
    auto job = std::dynamic_pointer_cast<MirrorJob>(d->find_job("commit"));
    nbd::NbdServer server(loop, d->graph(), a.serve.limits());
    if (serving) {
      if (auto r = a.serve.start(server, "top"); !r) {
        (void)job->cancel(true);
        co_await job->wait_concluded();
        co_await server.stop();
        (void)co_await d->shutdown();
        co_return fail_input(r.error().message());
      }
    }
    Node* base = d->graph().find(job->params().target);
    progress.note(fmt::format("committing {} into {} ({}, copy mode {})", a.image,
                              base->device().describe(),
                              format_size(d->graph().find("top")->length()),
                              to_string(job->copy_mode())));
    if (serving)
      progress.note(fmt::format("serving {} at {} (clients switch to the base on completion)",
                                a.image, a.serve.where(server)));
    std::vector<Node*> layers;  // the ones the commit drops, newest first
    for (Node* n = d->graph().find("top"); n && n != base; n = n->backing()) layers.push_back(n);
    Carried carried;
    DriveOptions drive;
    drive.already_started = true;  // block-commit started it
    drive.auto_complete = !a.no_auto_complete;
    drive.complete_on_usr1 = a.no_auto_complete;
    drive.before_complete = [d, l = &layers, base, p = &progress, c = &carried]() -> Task<void> {
      return [](qmp::Daemon* d, const std::vector<Node*>* l, Node* base, Progress* p,
                Carried* c) -> Task<void> {
        c->ran = true;
        co_await carry_bitmaps(d, l, base, p, c, false);
      }(d, l, base, p, c);
    };
    int rc = co_await drive_mirror(loop, job, progress, drive);
    if (carried.ran && rc == exit_code::kOk && job->switched())
      co_await carry_bitmaps(d, &layers, base, &progress, &carried, true);
    else if (carried.ran)
      co_await undo_carry(d, base, &carried);
    if (serving) {
      if (rc == exit_code::kOk && job->switched()) {
        progress.note("serving the base now; SIGINT/SIGTERM to stop");
        std::error_code ec;
        co_await stop_signals.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      } else if (rc == exit_code::kJobFailed) {
        progress.note(fmt::format("the commit failed; still serving {} (unchanged) at {}; "
                                  "SIGINT/SIGTERM to stop (exit {})",
                                  a.image, a.serve.where(server), exit_code::kJobFailed));
        std::error_code ec;
        co_await stop_signals.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      }
      co_await server.stop();
    }
    // Every image flushed, its metadata written back and marked clean.
    if (auto s = co_await d->shutdown(); !s) {
      progress.note("closing the images: " + s.error().message());
      rc = exit_code::kJobFailed;
    }
    co_return rc;
  }());
}

}  // namespace

CommandRunner add_commit_command(CLI::App& app) {
  auto args = std::make_shared<CommitArgs>();
  auto* cmd = app.add_subcommand(
      "commit", "Merge a qcow2 image's top layer into its base, optionally while serving it");
  cmd->add_option("IMAGE", args->image, "the qcow2 image whose top layer is committed")
      ->required();
  cmd->add_option("--base", args->base,
                  "the image of IMAGE's backing chain to commit into (default: the bottom one)");
  cmd->add_option("--speed", args->speed,
                  "bytes per second at most (suffixes K, M, G; 0: no limit)")
      ->capture_default_str();
  cmd->add_option("--copy-mode", args->copy_mode,
                  "client writes during the commit: background | write-blocking | adaptive")
      ->check(CLI::IsMember({"background", "write-blocking", "adaptive"}))
      ->capture_default_str();
  cmd->add_option("--on-error", args->on_error, "report | ignore | stop | enospc")
      ->check(CLI::IsMember({"report", "ignore", "stop", "enospc"}))
      ->capture_default_str();
  add_locking_option(*cmd, args->locking);
  args->serve.add_to(*cmd, false);
  cmd->add_flag("--no-auto-complete", args->no_auto_complete,
                "when serving: stay ready until SIGUSR1, then complete");
  cmd->add_flag("--json", args->json, "one JSON object per event on stdout");
  cmd->add_flag("--no-progress", args->no_progress, "no progress display");
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_commit(*args);
  };
}

}  // namespace blkmirror
