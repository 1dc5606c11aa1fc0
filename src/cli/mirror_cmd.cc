// `blkmirror mirror SRC DST`: mirror one file, block device or NBD export to another.
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>

#include <memory>
#include <string>

#include <fmt/format.h>

#include "base/size_parse.h"
#include "blockdev/file_device.h"
#include "cli/commands.h"
#include "cli/device_spec.h"
#include "cli/drive.h"
#include "cli/exit_codes.h"
#include "cli/fault_env.h"
#include "cli/serve_options.h"
#include "cli/mirror_options.h"
#include "cli/signals.h"

namespace blkmirror {

namespace {

// Largest disk for which `mirror --socket` defaults to 4 KiB tracking.
constexpr uint64_t kFineTrackingMaxDisk = uint64_t{256} << 30;

struct MirrorArgs {
  std::string src, dst;
  MirrorCliOptions opts;
  ServeOptions serve;
  bool create = false;
  bool no_auto_complete = false;
};

int run_mirror(const MirrorArgs& a) {
  auto params = a.opts.to_params();
  if (!params) return fail_input(params.error().message());
  if (auto probe = apply_fault_env(nullptr, ""); !probe) return fail_input(probe.error().message());
  // A target we create is removed again if anything stops us before the job
  // starts: bad input never leaves files behind.
  bool created = false;
  struct RemoveUnlessKept {
    const std::string& path;
    bool& created;
    bool keep = false;
    ~RemoveUnlessKept() {
      if (created && !keep) ::unlink(path.c_str());
    }
  } cleanup{a.dst, created};
  Loop loop;
  StraySignalGuard stray_signals(loop);  // before any other signal_set: outlives them
  Graph graph;  // devices use the loop's services: destroyed before the loop
  // Served, the source takes the clients' writes; otherwise it is only read.
  bool serving = a.serve.enabled();
  auto src = open_device_spec(
      loop, a.src, FileOptions{.read_only = !serving, .direct = a.opts.direct, .locking = a.opts.lock_mode()});
  if (!src) return fail_input(src.error().message());
  uint64_t size = src->dev->length();
  if (a.create) {
    if (is_nbd_spec(a.dst))
      return fail_input(a.dst + ": --create makes files; an NBD export is created by its server "
                                "(drop --create)");
    if (auto r = FileDevice::create(a.dst, size); !r)
      return fail_input(r.error().message() + (r.error().errnum() == EEXIST
                                                   ? " (drop --create to mirror into it)"
                                                   : ""));
    created = true;
  }
  // Before opening DST: the same file opened twice would otherwise meet its
  // own image lock and be refused with a less helpful text.
  struct stat dst_st {};
  if (src->file && !is_nbd_spec(a.dst) && ::stat(a.dst.c_str(), &dst_st) == 0 &&
      src->file->identity() == std::pair<uint64_t, uint64_t>(dst_st.st_dev, S_ISBLK(dst_st.st_mode)
                                                                                ? dst_st.st_rdev
                                                                                : dst_st.st_ino))
    return fail_input(fmt::format("{} and {} are the same file", a.src, a.dst));
  auto dst = open_device_spec(
      loop, a.dst, FileOptions{.read_only = false, .direct = a.opts.direct, .locking = a.opts.lock_mode()});
  if (!dst) return fail_input(dst.error().message());
  if (a.create) dst->file->set_zero_init(true);
  bool same = src->file && dst->file ? src->file->identity() == dst->file->identity()
                                     : src->dev->describe() == dst->dev->describe();
  if (same) return fail_input(fmt::format("{} and {} are the same {}", a.src, a.dst,
                                          src->file ? "file" : "export"));
  if (size != dst->dev->length())
    return fail_input(fmt::format("{}: size {} differs from {}'s size {} (Source and target "
                                  "image have different sizes)",
                                  a.dst, dst->dev->length(), a.src, size));

  auto src_dev = apply_fault_env(src->dev, "src");
  auto dst_dev = apply_fault_env(dst->dev, "dst");
  if (!src_dev || !dst_dev)
    return fail_input((!src_dev ? src_dev.error() : dst_dev.error()).message());
  (void)graph.add("src", *src_dev);
  (void)graph.add("dst", *dst_dev);
  params->device = "src";
  params->target = "dst";
  params->job_id = "mirror";
  if (serving && !a.opts.given("granularity") && size <= kFineTrackingMaxDisk) {
    // Live clients write in small blocks; 64 KiB tracking would re-copy 64 KiB
    // for every 4 KiB write. 4 KiB tracking copies what was written, at one bit
    // per 4 KiB (8 MiB of bitmap at the 256 GiB limit). Runs are still coalesced
    // up to the max op size, so the bulk copy is not slowed.
    params->granularity = 4096;
  }
  auto job = MirrorJob::create(loop, graph, *params);
  if (!job) return fail_input(job.error().message());

  nbd::NbdServer server(loop, graph, a.serve.limits());
  if (serving)
    if (auto r = a.serve.start(server, "src"); !r) return fail_input(r.error().message());

  Progress progress(a.opts.progress_style());
  progress.set_json_interval(a.opts.progress_interval);
  progress.note(fmt::format("mirroring {} -> {} ({}, granularity {}, buffer {}, copy mode {})",
                            a.src, a.dst, format_size(size),
                            format_size((*job)->granularity()), format_size((*job)->buf_size()),
                            to_string((*job)->copy_mode())));
  if (serving)
    progress.note(fmt::format("serving {} at {} (clients switch to {} on completion)", a.src,
                              a.serve.where(server), a.dst));
  cleanup.keep = true;
  DriveOptions drive;
  drive.auto_complete = !a.no_auto_complete;
  drive.complete_on_usr1 = a.no_auto_complete;
  // Registered for the whole run: a SIGTERM landing after the job ended but
  // before the wait below must not meet the default action (asio restores it
  // when drive_mirror's own signal_set goes away). A signal during the job is
  // queued here too, but then the job did not end switched and nobody waits.
  asio::signal_set stop_signals(loop.ctx(), SIGINT, SIGTERM);
  return loop.run([&]() -> Task<int> {
    int rc = co_await drive_mirror(loop, *job, progress, drive);
    if (serving) {
      if (rc == exit_code::kOk && (*job)->switched()) {
        progress.note(fmt::format("serving {} now; SIGINT/SIGTERM to stop", a.dst));
        std::error_code ec;
        co_await stop_signals.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      } else if (rc == exit_code::kJobFailed) {
        // The job failed on its own (a target problem, say): the clients keep
        // their disk, as in QEMU. Only the operator ends the process.
        progress.note(fmt::format("the mirror failed; still serving {} (the source, unchanged "
                                  "by the failure) at {}; SIGINT/SIGTERM to stop (exit {})",
                                  a.src, a.serve.where(server), exit_code::kJobFailed));
        std::error_code ec;
        co_await stop_signals.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      }
      if (auto f = co_await stop_and_flush(server, graph); !f) {
        progress.note("stopped serving; flush failed: " + f.error().message());
        rc = exit_code::kJobFailed;
      } else {
        progress.note("stopped serving; flushed");
      }
    }
    co_return rc;
  }());
}

}  // namespace

CommandRunner add_mirror_command(CLI::App& app) {
  auto args = std::make_shared<MirrorArgs>();
  auto* cmd = app.add_subcommand("mirror", "Mirror SRC to DST while SRC stays usable");
  cmd->add_option("SRC", args->src, "source: file, block device or NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds...)")->required();
  cmd->add_option("DST", args->dst, "target: file, block device or NBD URI (same size)")->required();
  cmd->add_flag("--create", args->create, "create DST as a sparse file of SRC's size");
  args->opts.add_to(*cmd);
  args->serve.add_to(*cmd, false);
  cmd->add_flag("--no-auto-complete", args->no_auto_complete,
                "when serving: stay ready until SIGUSR1, then complete");
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_mirror(*args);
  };
}

}  // namespace blkmirror
