// The mirror options shared by CLI subcommands: the job's options of the option
// table (mirror/option_table.h: --sync, --granularity, sizes with suffixes,
// --speed, error policies, --copy-mode, --adaptive-window), the CLI's own (files,
// locking, output style), and their conversion to MirrorParams with one clear
// error per bad value, the same text QMP and `ctl` give.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>

#include "blockdev/image_lock.h"
#include "cli/progress.h"
#include "mirror/mirror_params.h"
#include "mirror/option_table.h"

namespace blkmirror {

// The option table's values as typed on a command line, by QMP name.
using TableValues = std::map<std::string, std::string, std::less<>>;

// Adds the table's command-line options (those with a flag) to cmd, their text
// kept in values. A value preset in values is shown as the default.
void add_table_options(CLI::App& cmd, TableValues& values);
// Parses and checks each given value (parse_option_text, set_option: the table's
// texts) and stores it in p; `each` (when set) sees every value stored. Stops
// at the first error. validate_params() is the caller's.
Result<void> apply_table_options(
    MirrorParams& p, const TableValues& values,
    const std::function<void(const MirrorOption&, const OptionValue&)>& each = {});

struct MirrorCliOptions {
  // The table's options as typed, by QMP name; absent or empty: not given (the
  // job's default). The CLI's defaults that differ from QMP's are preset:
  // copy mode adaptive (bench/README.md: converges where background does not,
  // same cost otherwise).
  TableValues table_values{{"copy-mode", "adaptive"}};
  bool direct = false;
  std::string locking = "auto";  // image locks: auto | on | off (image_lock.h)
  bool no_copy_offload = false;
  bool json = false;
  bool no_progress = false;
  double progress_interval = 1.0;  // seconds between --json PROGRESS objects
  // mirror --bitmap: SRC's persistent dirty bitmap for sync=bitmap (implied
  // when --sync is not given).
  std::string bitmap;

  void add_to(CLI::App& cmd);
  bool given(std::string_view name) const;
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
