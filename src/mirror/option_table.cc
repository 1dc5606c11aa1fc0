#include "mirror/option_table.h"

#include <charconv>

#include <fmt/format.h>

#include "base/align.h"
#include "base/size_parse.h"

namespace blkmirror {

namespace {

constexpr std::string_view kSyncWords[] = {"top", "full", "none", "incremental", "bitmap"};
constexpr std::string_view kPolicyWords[] = {"report", "ignore", "enospc", "stop"};
constexpr std::string_view kCopyModeWords[] = {"background", "write-blocking", "adaptive"};

int64_t num(const OptionValue& v) { return std::get<int64_t>(v); }
const std::string& word(const OptionValue& v) { return std::get<std::string>(v); }
bool flag(const OptionValue& v) { return std::get<bool>(v); }

Result<void> store_policy(ErrorPolicy& field, const OptionValue& v, std::string_view name) {
  auto p = parse_error_policy(word(v), name);
  if (!p) return make_error(p.error());
  field = *p;
  return {};
}

// Stored as given: set_option() checked the range first.
constexpr MirrorOption kOptions[] = {
    {.name = "sync",
     .flag = "sync",
     .type = OptionType::kEnum,
     .qmp_required = true,
     .default_text = "full",
     .help = "what to copy: full | top (what the source's top layer holds) | none (new writes) | "
             "bitmap (what --bitmap marks dirty)",
     .words = kSyncWords,
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       auto s = parse_sync_mode(word(v));
       if (!s) return make_error(s.error());
       p.sync = *s;
       return {};
     }},
    {.name = "speed",
     .flag = "speed",
     .type = OptionType::kSize,
     .default_text = "0",
     .help = "copy rate limit in bytes/s, e.g. 100M (0: none)",
     .range_error = "Parameter '{}' expects a non-negative value",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.speed = num(v);
       return {};
     },
     .number = [](const MirrorParams& p) { return p.speed; }},
    {.name = "granularity",
     .flag = "granularity",
     .type = OptionType::kSize,
     .help = "dirty-tracking chunk: a power of 2 in [512, 64M] (default: the target's cluster "
             "size within [4K, 64K]; without one 4K, coarser past 32G up to 64K)",
     .min = static_cast<int64_t>(kMinGranularity),
     .max = static_cast<int64_t>(kMaxGranularity),
     .pow2 = true,
     .zero_is_default = true,
     .range_error = "Parameter '{}' expects a value in range [512B, 64MB]",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.granularity = static_cast<uint64_t>(num(v));
       return {};
     },
     .number = [](const MirrorParams& p) { return static_cast<int64_t>(p.granularity); }},
    {.name = "buf-size",
     .flag = "buf-size",
     .type = OptionType::kSize,
     .default_text = "16M",
     .help = "copy buffer in flight (rounded up to the granularity; at most a quarter of "
             "memory, 1G)",
     .range_error = "Invalid parameter '{}'",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.buf_size = num(v);
       return {};
     },
     .number = [](const MirrorParams& p) { return p.buf_size; }},
    {.name = "on-source-error",
     .flag = "on-source-error",
     .type = OptionType::kEnum,
     .default_text = "report",
     .help = "on a source read error: report | ignore | stop | enospc",
     .words = kPolicyWords,
     .store = [](MirrorParams& p, const OptionValue& v) {
       return store_policy(p.on_source_error, v, "on-source-error");
     }},
    {.name = "on-target-error",
     .flag = "on-target-error",
     .type = OptionType::kEnum,
     .default_text = "report",
     .help = "on a target write error: report | ignore | stop | enospc",
     .words = kPolicyWords,
     .store = [](MirrorParams& p, const OptionValue& v) {
       return store_policy(p.on_target_error, v, "on-target-error");
     }},
    {.name = "copy-mode",
     .flag = "copy-mode",
     .type = OptionType::kEnum,
     .default_text = "background",
     .help = "background | write-blocking | adaptive (background until the dirty count stops "
             "falling, then write-blocking)",
     .words = kCopyModeWords,
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       auto m = parse_copy_mode(word(v));
       if (!m) return make_error(m.error());
       p.copy_mode = *m;
       return {};
     }},
    {.name = "x-adaptive-window-ms",
     .flag = "adaptive-window",
     .type = OptionType::kInteger,
     .default_text = "3000",
     .help = "adaptive: milliseconds without progress before switching to write-blocking",
     .min = 1,
     .max = 3600 * 1000,
     .range_error = "Parameter '{}' expects a value in range [1, 3600000]",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.adaptive_window_ms = static_cast<uint64_t>(num(v));
       return {};
     },
     .number = [](const MirrorParams& p) { return static_cast<int64_t>(p.adaptive_window_ms); }},
    // QMP only (QEMU's members); the command lines keep QEMU's defaults.
    {.name = "unmap",
     .type = OptionType::kBool,
     .default_text = "true",
     .help = "discard target areas that are holes on the source",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.unmap = flag(v);
       return {};
     }},
    {.name = "target-is-zero",
     .type = OptionType::kBool,
     .default_text = "false",
     .help = "the target reads as zeroes: holes need not be written",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.target_is_zero = flag(v);
       return {};
     }},
    {.name = "auto-finalize",
     .type = OptionType::kBool,
     .default_text = "true",
     .help = "finalize without waiting for job-finalize",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.auto_finalize = flag(v);
       return {};
     }},
    {.name = "auto-dismiss",
     .type = OptionType::kBool,
     .default_text = "true",
     .help = "dismiss a concluded job without waiting for job-dismiss",
     .store = [](MirrorParams& p, const OptionValue& v) -> Result<void> {
       p.auto_dismiss = flag(v);
       return {};
     }},
};

Result<OptionValue> parse_number(const MirrorOption& opt, std::string_view text) {
  auto bad = [&](const std::string& why) {
    return make_plain_error(EINVAL, fmt::format("--{}: {}", opt.flag, why));
  };
  bool negative = !text.empty() && text.front() == '-';
  std::string_view digits = negative ? text.substr(1) : text;
  uint64_t v = 0;
  if (opt.type == OptionType::kSize) {
    auto s = parse_size(digits);
    if (!s) return bad(parse_size(text).error().message());  // names the whole text
    v = *s;
  } else {
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
    if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size())
      return bad(fmt::format("'{}' is not a whole number", text));
  }
  if (v > static_cast<uint64_t>(INT64_MAX)) return bad("too large");
  int64_t n = negative ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
  // A command line leaves such an option out to get the default: 0 there is a
  // value, and out of range.
  if (n == 0 && opt.zero_is_default)
    return make_plain_error(EINVAL, fmt::format(fmt::runtime(opt.range_error), opt.flag));
  return OptionValue{n};
}

}  // namespace

std::span<const MirrorOption> mirror_options() { return kOptions; }

const MirrorOption* find_mirror_option(std::string_view name) {
  for (const auto& o : kOptions)
    if (o.name == name || (!o.flag.empty() && o.flag == name)) return &o;
  return nullptr;
}

Result<void> check_number(const MirrorOption& opt, int64_t v, std::string_view shown) {
  if (v == 0 && opt.zero_is_default) return {};
  if (v < opt.min || v > opt.max)
    return make_plain_error(EINVAL, fmt::format(fmt::runtime(opt.range_error), shown));
  if (opt.pow2 && !is_pow2(static_cast<uint64_t>(v)))
    return make_plain_error(EINVAL, fmt::format("Parameter '{}' expects a power of 2", shown));
  return {};
}

Result<void> set_option(MirrorParams& p, const MirrorOption& opt, const OptionValue& v,
                        std::string_view shown) {
  bool is_number = opt.type == OptionType::kSize || opt.type == OptionType::kInteger;
  bool fits = is_number                       ? std::holds_alternative<int64_t>(v)
              : opt.type == OptionType::kBool ? std::holds_alternative<bool>(v)
                                              : std::holds_alternative<std::string>(v);
  if (!fits) return make_plain_error(EINVAL, fmt::format("Invalid parameter type for '{}'", shown));
  if (is_number)
    if (auto r = check_number(opt, num(v), shown); !r) return r;
  return opt.store(p, v);
}

Result<OptionValue> parse_option_text(const MirrorOption& opt, std::string_view text) {
  switch (opt.type) {
    case OptionType::kSize:
    case OptionType::kInteger:
      return parse_number(opt, text);
    case OptionType::kEnum:
      return OptionValue{std::string(text)};  // store() names a bad word
    case OptionType::kBool:
      if (text == "on" || text == "true") return OptionValue{true};
      if (text == "off" || text == "false") return OptionValue{false};
      return make_plain_error(EINVAL, fmt::format("--{}: expects on or off, not '{}'", opt.flag,
                                                  text));
  }
  return make_plain_error(EINVAL, fmt::format("--{}: unknown option type", opt.flag));
}

}  // namespace blkmirror
