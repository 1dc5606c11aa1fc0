// `blkmirror serve IMAGE --socket PATH | --listen HOST:PORT`: serve a disk over
// NBD until SIGINT/SIGTERM, then flush and exit.
#include <csignal>

#include <fmt/format.h>

#include "blockdev/file_device.h"
#include "cli/commands.h"
#include "cli/device_spec.h"
#include "cli/exit_codes.h"
#include "cli/image_bitmaps.h"
#include "cli/metrics_option.h"
#include "cli/mirror_options.h"
#include "cli/serve_options.h"
#include "cli/signals.h"

namespace blkmirror {

namespace {

struct ServeArgs {
  std::string image;
  ServeOptions serve;
  MetricsOption metrics;
  bool direct = false;
  std::string format;  // "" = detect
  std::string locking = "auto";
};

int run_serve(const ServeArgs& a) {
  if (!a.serve.enabled()) return fail_input("serve: give --socket PATH and/or --listen HOST:PORT");
  Loop loop;
  StraySignalGuard stray_signals(loop);  // before any other signal_set: outlives them
  Graph graph;  // devices use the loop's services: destroyed before the loop
  auto format = parse_format_option(a.format, "--format");
  if (!format) return fail_input(format.error().message());
  auto img =
      open_device_spec(loop, a.image,
                       FileOptions{.read_only = a.serve.read_only,
                                   .direct = a.direct,
                                   .locking = parse_lock_mode(a.locking).value_or(LockMode::kAuto)},
                       *format, "IMAGE");
  if (!img) return fail_input(img.error().message());
  if (img->is_nbd()) return fail_input(a.image + ": serve takes a file or block device");
  BlockDevicePtr dev = img->dev;
  Node* node = *graph.add("disk", dev);
  // The image's persistent dirty bitmaps record the clients' writes (QEMU's
  // qemu-nbd does the same with a qcow2 image's); stored when serving stops.
  CliImageBitmaps bitmaps(loop, graph);  // after the graph and the image: goes first
  if (auto r = bitmaps.attach(*node, *img, a.image, !a.serve.read_only); !r)
    return fail_input(r.error().message());
  nbd::NbdServer server(loop, graph, a.serve.limits());
  if (auto r = a.serve.start(server, "disk"); !r) return fail_input(r.error().message());
  fmt::print(stderr, "serving {} ({}, {} bytes{}) at {}\n", a.image, to_string(img->image.format),
             dev->length(), a.serve.read_only ? ", read-only" : "", a.serve.where(server));
  auto metrics = a.metrics.start(loop, metrics::Sources{&graph, [&server] { return &server; }, {}});
  if (!metrics) return fail_input(metrics.error().message());
  int rc = loop.run([&]() -> Task<int> {
    int sig = co_await wait_stop_signal(loop);
    if (*metrics) co_await (*metrics)->stop();
    auto f = co_await stop_and_flush(server, graph);
    if (auto b = co_await bitmaps.store(); !b && f) f = b;
    if (auto c = co_await img->image.close(); !c && f) f = c;
    fmt::print(stderr, "{}: stopped serving{}\n", sig == SIGINT ? "interrupted" : "terminated",
               f ? "; flushed" : "; flush failed: " + f.error().message());
    co_return f ? exit_code::kOk : exit_code::kJobFailed;
  }());
  return rc;
}

}  // namespace

CommandRunner add_serve_command(CLI::App& app) {
  auto args = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand("serve", "Serve a disk image over NBD");
  cmd->add_option("IMAGE", args->image, "file or block device")->required();
  args->serve.add_to(*cmd, true);
  args->metrics.add_to(*cmd);
  cmd->add_flag("--direct", args->direct, "O_DIRECT I/O (cache.direct)");
  cmd->add_option("--format", args->format, "raw | qcow2 (default: detected by magic)");
  add_locking_option(*cmd, args->locking);
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_serve(*args);
  };
}

}  // namespace blkmirror
