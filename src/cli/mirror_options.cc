#include "cli/mirror_options.h"

#include <fmt/format.h>

#include "cli/exit_codes.h"
#include "mirror/option_table.h"

namespace blkmirror {

void add_table_options(CLI::App& cmd, TableValues& values) {
  for (const MirrorOption& o : mirror_options()) {
    if (o.flag.empty()) continue;
    std::string& v = values[std::string(o.name)];
    auto* opt = cmd.add_option("--" + std::string(o.flag), v, std::string(o.help));
    if (!v.empty()) opt->capture_default_str();
    else if (!o.default_text.empty()) opt->default_str(std::string(o.default_text));
  }
}

Result<void> apply_table_options(
    MirrorParams& p, const TableValues& values,
    const std::function<void(const MirrorOption&, const OptionValue&)>& each) {
  for (const MirrorOption& o : mirror_options()) {
    auto it = values.find(o.name);
    if (o.flag.empty() || it == values.end() || it->second.empty()) continue;
    auto v = parse_option_text(o, it->second);
    if (!v) return make_error(v.error());
    if (auto r = set_option(p, o, *v, o.flag); !r) return r;
    if (each) each(o, *v);
  }
  return {};
}

void MirrorCliOptions::add_to(CLI::App& cmd) {
  add_table_options(cmd, table_values);
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

bool MirrorCliOptions::given(std::string_view name) const {
  auto it = table_values.find(name);
  return it != table_values.end() && !it->second.empty();
}

Result<MirrorParams> MirrorCliOptions::to_params() const {
  MirrorParams p;
  if (auto r = apply_table_options(p, table_values); !r) return make_error(r.error());
  p.copy_offload = !no_copy_offload;
  if (!bitmap.empty()) {
    p.bitmap = bitmap;
    if (!given("sync")) p.sync = SyncMode::kBitmap;
  }
  if (auto r = validate_params(p); !r) return make_error(r.error());
  return p;
}

void add_locking_option(CLI::App& cmd, std::string& locking) {
  cmd.add_option(
         "--locking", locking,
         "image locks shared with QEMU tools: auto | on | off (off: no second-writer protection)")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
}

int fail_input(const std::string& message) {
  fmt::print(stderr, "blkmirror: {}\n", message);
  return exit_code::kBadInput;
}

}  // namespace blkmirror
