// The mirror options shared by CLI subcommands (--sync, --granularity, sizes
// with suffixes, --speed, error policies, --copy-mode, output style), and their conversion to
// MirrorParams with one clear error per bad value.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "blockdev/image_lock.h"
#include "cli/progress.h"
#include "mirror/mirror_params.h"

namespace blkmirror {

struct MirrorCliOptions {
  std::string sync = "full";
  std::string granularity, buf_size, speed;
  std::string on_source_error = "report", on_target_error = "report";
  std::string copy_mode = "adaptive";  // bench/README.md: converges where background does not, same cost otherwise
  uint64_t adaptive_window_ms = kDefaultAdaptiveWindowMs;
  bool direct = false;
  std::string locking = "auto";  // image locks: auto | on | off (image_lock.h)
  bool no_copy_offload = false;
  bool json = false;
  bool no_progress = false;
  double progress_interval = 1.0;  // seconds between --json PROGRESS objects

  void add_to(CLI::App& cmd);
  Result<MirrorParams> to_params() const;
  LockMode lock_mode() const { return parse_lock_mode(locking).value_or(LockMode::kAuto); }
  ProgressStyle progress_style() const {
    return json ? ProgressStyle::kJson : no_progress ? ProgressStyle::kNone : ProgressStyle::kAuto;
  }
};

// Prints "blkmirror: <message>" to stderr and returns exit_code::kBadInput.
int fail_input(const std::string& message);

// --locking auto|on|off: the image locks QEMU tools also take and check.
void add_locking_option(CLI::App& cmd, std::string& locking);

}  // namespace blkmirror
