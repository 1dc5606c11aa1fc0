#include "cli/mirror_options.h"

#include <fmt/format.h>

#include "base/size_parse.h"
#include "cli/exit_codes.h"

namespace blkmirror {

namespace {

// A size option; a leading '-' is reported as the negative value it is.
Result<int64_t> size_option(const std::string& text, const char* name, const char* negative_msg) {
  if (!text.empty() && text.front() == '-') return make_plain_error(EINVAL, negative_msg);
  auto v = parse_size(text);
  if (!v) return make_plain_error(EINVAL, fmt::format("--{}: {}", name, v.error().message()));
  if (*v > static_cast<uint64_t>(INT64_MAX)) return make_plain_error(ERANGE, fmt::format("--{}: too large", name));
  return static_cast<int64_t>(*v);
}

}  // namespace

void MirrorCliOptions::add_to(CLI::App& cmd) {
  cmd.add_option("--sync", sync, "full | top | none")->capture_default_str();
  cmd.add_option("--granularity", granularity, "dirty-tracking chunk (power of 2, 512..64M)");
  cmd.add_option("--buf-size", buf_size, "copy buffer in flight (default 16M)");
  cmd.add_option("--speed", speed, "copy rate limit in bytes/s, e.g. 100M (0: none)");
  cmd.add_option("--on-source-error", on_source_error, "report | ignore | stop | enospc");
  cmd.add_option("--on-target-error", on_target_error, "report | ignore | stop | enospc");
  cmd.add_option("--copy-mode", copy_mode,
                 "background | write-blocking | adaptive (background until the dirty count "
                 "stops falling, then write-blocking)")
      ->capture_default_str();
  cmd.add_option("--adaptive-window", adaptive_window_ms,
                 "adaptive: milliseconds without progress before switching to write-blocking")
      ->capture_default_str();
  cmd.add_flag("--direct", direct, "O_DIRECT I/O (cache.direct)");
  add_locking_option(cmd, locking);
  cmd.add_flag("--no-copy-offload", no_copy_offload,
               "read and write every byte, even where the kernel could copy (copy_file_range; "
               "reflink on XFS/btrfs)");
  cmd.add_flag("--json", json, "one JSON object per event on stdout");
  cmd.add_flag("--no-progress", no_progress, "no progress display");
  cmd.add_option("--progress-interval", progress_interval,
                 "seconds between --json PROGRESS objects (0.2 or more)")
      ->check(CLI::Range(0.2, 3600.0))
      ->capture_default_str();
}

Result<MirrorParams> MirrorCliOptions::to_params() const {
  MirrorParams p;
  auto s = parse_sync_mode(sync);
  if (!s) return make_error(s.error());
  p.sync = *s;
  if (!granularity.empty()) {
    auto g = size_option(granularity, "granularity",
                         "Parameter 'granularity' expects a value in range [512B, 64MB]");
    if (!g) return make_error(g.error());
    p.granularity = static_cast<uint64_t>(*g);
    if (p.granularity == 0)
      return make_plain_error(EINVAL, "Parameter 'granularity' expects a value in range [512B, 64MB]");
  }
  if (!buf_size.empty()) {
    auto b = size_option(buf_size, "buf-size", "Invalid parameter 'buf-size'");
    if (!b) return make_error(b.error());
    p.buf_size = *b;
  }
  if (!speed.empty()) {
    auto v = size_option(speed, "speed", "Parameter 'speed' expects a non-negative value");
    if (!v) return make_error(v.error());
    p.speed = *v;
  }
  auto se = parse_error_policy(on_source_error, "on-source-error");
  if (!se) return make_error(se.error());
  auto te = parse_error_policy(on_target_error, "on-target-error");
  if (!te) return make_error(te.error());
  auto cm = parse_copy_mode(copy_mode);
  if (!cm) return make_error(cm.error());
  p.copy_mode = *cm;
  p.adaptive_window_ms = adaptive_window_ms;
  p.copy_offload = !no_copy_offload;
  p.on_source_error = *se;
  p.on_target_error = *te;
  if (auto r = validate_params(p); !r) return make_error(r.error());
  return p;
}

void add_locking_option(CLI::App& cmd, std::string& locking) {
  cmd.add_option("--locking", locking,
                 "image locks shared with QEMU tools: auto | on | off (off: no second-writer protection)")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
}

int fail_input(const std::string& message) {
  fmt::print(stderr, "blkmirror: {}\n", message);
  return exit_code::kBadInput;
}

}  // namespace blkmirror
