// `blkmirror mirror SRC DST`: mirror one file, block device or NBD export to another.
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <memory>
#include <string>

#include "base/size_parse.h"
#include "blockdev/file_device.h"
#include "blockdev/rbd/rbd_create.h"
#include "cli/commands.h"
#include "cli/device_spec.h"
#include "cli/drive.h"
#include "cli/exit_codes.h"
#include "cli/fault_env.h"
#include "cli/image_bitmaps.h"
#include "cli/metrics_option.h"
#include "cli/mirror_options.h"
#include "cli/serve_options.h"
#include "cli/signals.h"
#include "cli/state_option.h"

namespace blkmirror {

namespace {

// Largest disk for which `mirror --socket` defaults to 4 KiB tracking.
constexpr uint64_t kFineTrackingMaxDisk = uint64_t{256} << 30;

struct MirrorArgs {
  std::string src, dst;
  MirrorCliOptions opts;
  ServeOptions serve;
  MetricsOption metrics;
  bool create = false;
  bool no_auto_complete = false;
  std::string src_format, dst_format;   // "" = detect
  std::string backing, backing_format;  // --create --format qcow2 only
  StateOption state;
};

// --create --format qcow2: formats the new, empty file at path as a qcow2
// image of `size` bytes, with the backing link when given (its format given or
// detected from the backing file itself).
Result<void> create_qcow2_target(Loop& loop, const MirrorArgs& a, uint64_t size) {
  Qcow2CreateOptions c;
  c.size = size;
  if (!a.backing.empty()) {
    c.backing_file = a.backing;
    auto bfmt = parse_format_option(a.backing_format, "--backing-format");
    if (!bfmt) return make_error(bfmt.error());
    if (*bfmt) {
      c.backing_format = to_string(**bfmt);
    } else {
      auto path = resolve_backing_path(a.dst, true, a.backing);
      if (!path) return make_error(path.error());
      auto bf = FileDevice::open(loop, *path, FileOptions{.read_only = true});
      if (!bf) return make_plain_error(bf.error().errnum(), "--backing: " + bf.error().message());
      auto f = loop.run(detect_image_format(**bf));
      if (!f) return make_error(f.error());
      c.backing_format = to_string(*f);
      fmt::print(stderr, "blkmirror: backing file {}: detected format {}\n", a.backing,
                 *c.backing_format);
    }
  }
  auto file = FileDevice::open(loop, a.dst, FileOptions{.read_only = false});
  if (!file) return make_error(file.error());
  // Pointers, not values, into the coroutine (GCC 12 rule 2, base/task.h).
  auto r = loop.run([](BlockDevice* f, const Qcow2CreateOptions* o) -> Task<Result<void>> {
    auto c = co_await Qcow2Device::create(*f, *o);
    if (c) c = co_await f->flush();
    co_return c;
  }(file->get(), &c));
  if (!r)
    return make_plain_error(r.error().errnum(), fmt::format("{}: creating qcow2 image: {}", a.dst,
                                                            r.error().message()));
  return {};
}

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
  auto src_fmt = parse_format_option(a.src_format, "--src-format");
  if (!src_fmt) return fail_input(src_fmt.error().message());
  auto dst_fmt = parse_format_option(a.dst_format, "--format");
  if (!dst_fmt) return fail_input(dst_fmt.error().message());
  bool qcow2_target = *dst_fmt == ImageFormat::kQcow2;
  if ((!a.backing.empty() || !a.backing_format.empty()) && !(a.create && qcow2_target))
    return fail_input("--backing and --backing-format need --create --format qcow2");
  auto src = open_device_spec(
      loop, a.src,
      FileOptions{.read_only = !serving, .direct = a.opts.direct, .locking = a.opts.lock_mode()},
      *src_fmt, "SRC");
  if (!src) return fail_input(src.error().message());
  uint64_t size = src->dev->length();
  if (a.create) {
    if (is_nbd_spec(a.dst))
      return fail_input(a.dst +
                        ": --create makes files; an NBD export is created by its server "
                        "(drop --create)");
    if (looks_like_rbd_spec(a.dst)) {
      if (qcow2_target)
        return fail_input(a.dst + ": --create makes rbd images raw (drop --format qcow2)");
      auto spec = parse_rbd_filename(a.dst);
      if (!spec) return fail_input(spec.error().message());
      RbdCreateOptions ro{.size = size};
      if (auto r = loop.run(create_rbd_image(loop, *spec, ro)); !r) {
        bool exists = r.error().errnum() == EEXIST;
        return fail_input(r.error().message() +
                          (exists ? " (drop --create to mirror into it)" : ""));
      }
    } else if (auto r = FileDevice::create(a.dst, qcow2_target ? 0 : size); !r) {
      return fail_input(r.error().message() +
                        (r.error().errnum() == EEXIST ? " (drop --create to mirror into it)" : ""));
    } else {
      created = true;
    }
    if (qcow2_target)
      if (auto r = create_qcow2_target(loop, a, size); !r) return fail_input(r.error().message());
  }
  // Before opening DST: the same file opened twice would otherwise meet its
  // own image lock and be refused with a less helpful text.
  struct stat dst_st {};
  if (src->file && !is_nbd_spec(a.dst) && !looks_like_rbd_spec(a.dst) &&
      ::stat(a.dst.c_str(), &dst_st) == 0 &&
      src->file->identity() ==
          std::pair<uint64_t, uint64_t>(dst_st.st_dev,
                                        S_ISBLK(dst_st.st_mode) ? dst_st.st_rdev : dst_st.st_ino))
    return fail_input(fmt::format("{} and {} are the same file", a.src, a.dst));
  // A target we created is raw or qcow2 as we made it: no detection.
  auto dst_open_fmt =
      a.create && !*dst_fmt ? std::optional<ImageFormat>(ImageFormat::kRaw) : *dst_fmt;
  auto dst = open_device_spec(
      loop, a.dst,
      FileOptions{.read_only = false, .direct = a.opts.direct, .locking = a.opts.lock_mode()},
      dst_open_fmt, "DST");
  if (!dst) return fail_input(dst.error().message());
  // A raw file or rbd image we just made reads as zeroes; a new qcow2 image says
  // so itself (and must not, over a backing file).
  if (a.create && !qcow2_target) {
    if (dst->file) dst->file->set_zero_init(true);
    if (dst->rbd) dst->rbd->set_zero_init(true);
  }
  bool same = src->file && dst->file ? src->file->identity() == dst->file->identity()
                                     : src->dev->describe() == dst->dev->describe();
  if (same)
    return fail_input(
        fmt::format("{} and {} are the same {}", a.src, a.dst, src->file ? "file" : "export"));
  if (size != dst->dev->length())
    return fail_input(
        fmt::format("{}: size {} differs from {}'s size {} (Source and target "
                    "image have different sizes)",
                    a.dst, dst->dev->length(), a.src, size));

  auto src_dev = apply_fault_env(src->dev, "src");
  auto dst_dev = apply_fault_env(dst->dev, "dst");
  if (!src_dev || !dst_dev)
    return fail_input((!src_dev ? src_dev.error() : dst_dev.error()).message());
  Node* src_node = *graph.add("src", *src_dev);
  Node* dst_node = *graph.add("dst", *dst_dev);
  // Persistent dirty bitmaps: SRC's for --bitmap (and, served, recording the
  // clients' writes), DST's recording the job's writes; both stored at the end.
  CliImageBitmaps bitmaps(loop, graph);  // after the graph and the images: goes first
  for (auto [node, dev, spec, writable] :
       {std::tuple{src_node, &*src, &a.src, serving}, std::tuple{dst_node, &*dst, &a.dst, true}}) {
    if (auto r = bitmaps.attach(*node, *dev, *spec, writable); !r)
      return fail_input(r.error().message());
  }
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
  auto state = a.state.open(loop, a.src, a.dst, *src, *dst, *params, a.opts.given("granularity"));
  if (!state) return fail_input(state.error().message());
  auto job = MirrorJob::create(loop, graph, *params);
  if (!job) return fail_input(job.error().message());

  nbd::NbdServer server(loop, graph, a.serve.limits());
  if (serving)
    if (auto r = a.serve.start(server, "src"); !r) return fail_input(r.error().message());

  std::shared_ptr<Job> job_ref = *job;
  auto metrics = a.metrics.start(
      loop,
      metrics::Sources{
          &graph, [&server, serving]() -> nbd::NbdServer* { return serving ? &server : nullptr; },
          [job_ref] { return std::vector<std::shared_ptr<Job>>{job_ref}; }});
  if (!metrics) return fail_input(metrics.error().message());

  Progress progress(a.opts.progress_style());
  progress.set_json_interval(a.opts.progress_interval);
  progress.note(fmt::format("mirroring {} -> {} ({}, granularity {}, buffer {}{}, copy mode {})",
                            a.src, a.dst, format_size(size), format_size((*job)->granularity()),
                            format_size((*job)->buf_size()),
                            (*job)->depth() ? " (grows with the target's round trip)" : "",
                            to_string((*job)->copy_mode())));
  if (!state->note.empty()) progress.note(state->note);
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
    if (state->journal && (*job)->failure() &&
        (*job)->failure()->message().starts_with("crash-safe state")) {
      // It could not be kept a superset of the truth: it must not be trusted.
      ::unlink(state->path.c_str());
      progress.note(
          fmt::format("removed {}: it could not be kept up to date (a new run copies "
                      "everything)",
                      state->path));
    }
    if (serving) {
      if (rc == exit_code::kOk && (*job)->switched()) {
        progress.note(fmt::format("serving {} now; SIGINT/SIGTERM to stop", a.dst));
        std::error_code ec;
        co_await stop_signals.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      } else if (rc == exit_code::kJobFailed) {
        // The job failed on its own (a target problem, say): the clients keep
        // their disk, as in QEMU. Only the operator ends the process.
        progress.note(
            fmt::format("the mirror failed; still serving {} (the source, unchanged "
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
    if (*metrics) co_await (*metrics)->stop();
    if (auto r = co_await bitmaps.store(); !r) {
      progress.note(r.error().message());
      rc = exit_code::kJobFailed;
    }
    // qcow2 layers write their metadata back and are marked clean.
    if (auto c = co_await src->image.close(); !c) {
      progress.note(fmt::format("closing {}: {}", a.src, c.error().message()));
      rc = exit_code::kJobFailed;
    }
    if (auto c = co_await dst->image.close(); !c) {
      progress.note(fmt::format("closing {}: {}", a.dst, c.error().message()));
      rc = exit_code::kJobFailed;
    }
    co_return rc;
  }());
}

}  // namespace

CommandRunner add_mirror_command(CLI::App& app) {
  auto args = std::make_shared<MirrorArgs>();
  auto* cmd = app.add_subcommand("mirror", "Mirror SRC to DST while SRC stays usable");
  cmd->add_option("SRC", args->src,
                  "source: file, block device or NBD URI (nbd://HOST[:PORT]/EXPORT, "
                  "nbd+unix:///EXPORT?socket=PATH, nbds...)")
      ->required();
  cmd->add_option("DST", args->dst, "target: file, block device or NBD URI (same size)")
      ->required();
  cmd->add_flag("--create", args->create,
                "create DST as a sparse file (or --format qcow2 image) of SRC's size");
  cmd->add_option(
      "--format,--dst-format", args->dst_format,
      "DST's format: raw | qcow2 (default: detected by magic; raw for --create and NBD)");
  cmd->add_option("--src-format", args->src_format,
                  "SRC's format: raw | qcow2 (default: detected; raw for NBD)");
  cmd->add_option(
      "--backing", args->backing,
      "with --create --format qcow2: the new image's backing file (relative to DST's directory)");
  cmd->add_option("--backing-format", args->backing_format,
                  "the backing file's format (default: detected)");
  args->opts.add_to(*cmd);
  args->serve.add_to(*cmd, false);
  args->metrics.add_to(*cmd);
  cmd->add_flag("--no-auto-complete", args->no_auto_complete,
                "when serving: stay ready until SIGUSR1, then complete");
  args->state.add_to(*cmd);
  cmd->add_option("--bitmap", args->opts.bitmap,
                  "copy only what SRC's persistent dirty bitmap NAME marks (--sync bitmap; the "
                  "bitmap lives in SRC's qcow2 image or SRC.blkmirror-bitmaps; see `blkmirror "
                  "bitmap`)");
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_mirror(*args);
  };
}

}  // namespace blkmirror
