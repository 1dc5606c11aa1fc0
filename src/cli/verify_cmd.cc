// `blkmirror verify SRC DST`: proves DST equal to SRC (files, block devices,
// qcow2 images, NBD exports on either side), lists the ranges that differ, and
// with --repair copies them from SRC. The comparison is the daemon's verify job
// (verify/verify_job.h) on two nodes of a local graph. Nothing here writes the
// devices except --repair, and only DST (recorded in DST's persistent dirty
// bitmaps, cli/image_bitmaps.h).
#include <fmt/format.h>

#include <csignal>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "base/size_parse.h"
#include "cli/commands.h"
#include "cli/device_spec.h"
#include "cli/exit_codes.h"
#include "cli/image_bitmaps.h"
#include "cli/mirror_options.h"
#include "cli/progress.h"
#include "cli/signals.h"
#include "qmp/wire.h"
#include "verify/verify_job.h"

namespace blkmirror {

namespace {

struct VerifyArgs {
  std::string src, dst;
  std::string src_format, dst_format;  // "" = detect
  std::string granularity = "64K";
  std::string speed = "0";
  std::string locking = "auto";
  bool repair = false;
  bool force_share = false;
  bool direct = false;
  bool json = false, no_progress = false;
};

nlohmann::json ranges_json(const std::vector<ByteRange>& v) {
  nlohmann::json out = nlohmann::json::array();
  for (auto& r : v) out.push_back({{"offset", r.offset}, {"length", r.length}});
  return out;
}

nlohmann::json report_json(const VerifyJob& job) {
  const VerifyReport& r = job.report();
  return {{"equal", r.equal()},
          // After --repair: every difference was repaired.
          {"target-equal", r.unverified.empty() && r.repaired == r.differing},
          {"length", r.length},
          {"granularity", job.granularity()},
          {"compared", r.compared},
          {"differing", r.differing},
          {"repaired", r.repaired},
          {"zero-skipped", r.zero_skipped},
          {"bytes-read", r.bytes_read},
          {"rechecks", r.rechecks},
          {"differences", ranges_json(r.differences)},
          {"unverified", ranges_json(r.unverified)}};
}

int run_verify(const VerifyArgs& a) {
  auto gran = parse_size(a.granularity);
  if (!gran) return fail_input("--granularity: " + gran.error().message());
  auto speed = parse_size(a.speed);
  if (!speed) return fail_input("--speed: " + speed.error().message());
  auto src_fmt = parse_format_option(a.src_format, "--src-format");
  if (!src_fmt) return fail_input(src_fmt.error().message());
  auto dst_fmt = parse_format_option(a.dst_format, "--dst-format");
  if (!dst_fmt) return fail_input(dst_fmt.error().message());
  LockMode lock = a.locking == "on"    ? LockMode::kOn
                  : a.locking == "off" ? LockMode::kOff
                                       : LockMode::kAuto;
  Loop loop;
  StraySignalGuard stray_signals(loop);
  Graph graph;  // devices use the loop's services: destroyed before the loop
  auto src = open_device_spec(
      loop, a.src,
      FileOptions{
          .read_only = true, .direct = a.direct, .locking = lock, .force_share = a.force_share},
      *src_fmt, "SRC");
  if (!src) return fail_input(src.error().message());
  auto dst = open_device_spec(loop, a.dst,
                              FileOptions{.read_only = !a.repair,
                                          .direct = a.direct,
                                          .locking = lock,
                                          .force_share = a.force_share && !a.repair},
                              *dst_fmt, "DST");
  if (!dst) return fail_input(dst.error().message());
  bool same = src->file && dst->file ? src->file->identity() == dst->file->identity()
                                     : src->dev->describe() == dst->dev->describe();
  if (same)
    return fail_input(
        fmt::format("{} and {} are the same {}", a.src, a.dst, src->file ? "file" : "export"));
  (void)graph.add("src", src->dev);
  Node* dst_node = *graph.add("dst", dst->dev);
  VerifyParams p;
  p.source = "src";
  p.target = "dst";
  p.granularity = *gran;
  p.speed = static_cast<int64_t>(*speed);
  p.repair = a.repair;
  auto job = VerifyJob::create(loop, graph, p);
  if (!job) return fail_input(job.error().message());
  // What --repair writes is recorded in DST's enabled persistent bitmaps.
  CliImageBitmaps bitmaps(loop, graph);  // after the graph and the images: goes first
  if (a.repair)
    if (auto r = bitmaps.attach(*dst_node, *dst, a.dst, true); !r)
      return fail_input(r.error().message());

  Progress progress(a.json          ? ProgressStyle::kJson
                    : a.no_progress ? ProgressStyle::kNone
                                    : ProgressStyle::kAuto);
  progress.note(fmt::format("verifying {} against {} ({}, granularity {}){}", a.dst, a.src,
                            format_size(src->dev->length()), format_size((*job)->granularity()),
                            a.repair ? ", repairing" : ""));
  return loop.run([&]() -> Task<int> {
    std::shared_ptr<VerifyJob> j = *job;
    // Shared with the job's event sink, which outlives this frame (there is
    // no unsubscribe, and dismissal may come after the loop below ends).
    auto changed = std::make_shared<Notifier>();
    Progress* shown = &progress;
    j->subscribe([changed, shown](const JobEvent& e) {
      shown->event(e);
      changed->notify_all();
    });
    asio::signal_set signals(loop.ctx(), SIGINT, SIGTERM);
    bool interrupted = false;
    signals.async_wait([&](const std::error_code& ec, int sig) {
      if (ec) return;
      interrupted = true;
      (void)j->cancel(true);
      progress.note(sig == SIGINT ? "interrupted: cancelling" : "terminated: cancelling");
      changed->notify_all();
    });
    j->start(loop.executor());
    while (!j->concluded()) {
      progress.tick(j->info());
      co_await changed->wait(std::chrono::milliseconds(200));
    }
    signals.cancel();
    progress.finish();
    int rc = exit_code::kOk;
    if (j->failure()) {
      progress.note("verify failed: " + j->failure()->message());
      rc = exit_code::kJobFailed;
    } else if (interrupted || j->was_cancelled()) {
      rc = exit_code::kCancelled;
    } else {
      const VerifyReport& r = j->report();
      if (a.json) {
        nlohmann::json out = {{"event", "VERIFY_RESULT"}, {"data", report_json(*j)}};
        fmt::print(stdout, "{}\n", qmp::dump_line(out));
      } else {
        for (auto& d : r.differences)
          fmt::print(stdout, "{} offset {} length {}\n", a.repair ? "repaired" : "differ", d.offset,
                     d.length);
        for (auto& u : r.unverified)
          fmt::print(stdout, "unverified offset {} length {}\n", u.offset, u.length);
      }
      std::fflush(stdout);
      // Repaired everywhere it differed: the target is now equal.
      bool ok = r.unverified.empty() && r.repaired == r.differing;
      progress.note(fmt::format(
          "{}: {} compared, {} differ{}{}, {} read",
          r.equal() ? "equal" : (ok ? "repaired: now equal" : "not equal"), format_size(r.compared),
          format_size(r.differing),
          a.repair ? fmt::format(" ({} repaired)", format_size(r.repaired)) : "",
          r.unverified.empty() ? ""
                               : fmt::format(", {} still changing (unverified)",
                                             format_size(r.unverified.size() * j->granularity())),
          format_size(r.bytes_read)));
      rc = ok ? exit_code::kOk : exit_code::kVerifyFailed;
    }
    // Whatever the outcome: every write the job made was recorded.
    if (auto b = co_await bitmaps.store(); !b) {
      progress.note(b.error().message());
      if (rc == exit_code::kOk) rc = exit_code::kJobFailed;
    }
    if (auto c = co_await src->image.close(); !c) {
      progress.note(fmt::format("closing {}: {}", a.src, c.error().message()));
      if (rc == exit_code::kOk) rc = exit_code::kJobFailed;
    }
    if (auto c = co_await dst->image.close(); !c) {
      progress.note(fmt::format("closing {}: {}", a.dst, c.error().message()));
      if (rc == exit_code::kOk) rc = exit_code::kJobFailed;
    }
    co_return rc;
  }());
}

}  // namespace

CommandRunner add_verify_command(CLI::App& app) {
  auto args = std::make_shared<VerifyArgs>();
  auto* cmd = app.add_subcommand(
      "verify", "Compare DST with SRC chunk by chunk (XXH3-128); list, or --repair, what differs");
  cmd->add_option("SRC", args->src, "source: file, block device, qcow2 image or NBD URI")
      ->required();
  cmd->add_option("DST", args->dst, "target: file, block device, qcow2 image or NBD URI")
      ->required();
  cmd->add_option("--src-format", args->src_format,
                  "SRC's format: raw | qcow2 (default: detected; raw for NBD)");
  cmd->add_option("--dst-format,--format", args->dst_format,
                  "DST's format: raw | qcow2 (default: detected; raw for NBD)");
  cmd->add_flag("--repair", args->repair, "copy the differing chunks from SRC to DST");
  cmd->add_option("--granularity", args->granularity,
                  "bytes compared and reported as one chunk (power of 2, 512 B to 64 MiB)")
      ->capture_default_str();
  cmd->add_option("--speed", args->speed, "read rate limit per side, bytes/s (0: none)")
      ->capture_default_str();
  add_locking_option(*cmd, args->locking);
  cmd->add_flag("-U,--force-share", args->force_share,
                "read images other processes write (as qemu-img -U; not with --repair for DST)");
  cmd->add_flag("--direct", args->direct, "O_DIRECT reads (cache.direct)");
  cmd->add_flag("--json", args->json,
                "events and a final VERIFY_RESULT object as JSON lines on stdout");
  cmd->add_flag("--no-progress", args->no_progress, "no progress display");
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_verify(*args);
  };
}

}  // namespace blkmirror
