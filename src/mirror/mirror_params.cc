#include "mirror/mirror_params.h"

#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "base/align.h"
#include "base/limits.h"
#include "base/size_parse.h"
#include "mirror/option_table.h"

namespace blkmirror {

Result<SyncMode> parse_sync_mode(std::string_view s) {
  if (s == "full") return SyncMode::kFull;
  if (s == "top") return SyncMode::kTop;
  if (s == "none") return SyncMode::kNone;
  if (s == "bitmap") return SyncMode::kBitmap;
  if (s == "incremental")
    return make_plain_error(ENOTSUP, fmt::format("Sync mode '{}' not supported", s));
  return make_plain_error(EINVAL, fmt::format("Parameter 'sync' does not accept value '{}'", s));
}

Result<CopyMode> parse_copy_mode(std::string_view s) {
  if (s == "background") return CopyMode::kBackground;
  if (s == "write-blocking") return CopyMode::kWriteBlocking;
  if (s == "adaptive") return CopyMode::kAdaptive;
  return make_plain_error(EINVAL,
                          fmt::format("Parameter 'copy-mode' does not accept value '{}'", s));
}

Result<ErrorPolicy> parse_error_policy(std::string_view s, std::string_view param) {
  if (s == "report") return ErrorPolicy::kReport;
  if (s == "ignore") return ErrorPolicy::kIgnore;
  if (s == "stop") return ErrorPolicy::kStop;
  if (s == "enospc") return ErrorPolicy::kEnospc;
  return make_plain_error(EINVAL,
                          fmt::format("Parameter '{}' does not accept value '{}'", param, s));
}

const char* to_string(SyncMode m) {
  switch (m) {
    case SyncMode::kFull: return "full";
    case SyncMode::kTop: return "top";
    case SyncMode::kBitmap: return "bitmap";
    case SyncMode::kNone: return "none";
  }
  return "?";
}

const char* to_string(CopyMode m) {
  switch (m) {
    case CopyMode::kBackground: return "background";
    case CopyMode::kWriteBlocking: return "write-blocking";
    case CopyMode::kAdaptive: return "adaptive";
  }
  return "?";
}

const char* to_string(ErrorAction a) {
  switch (a) {
    case ErrorAction::kReport: return "report";
    case ErrorAction::kIgnore: return "ignore";
    case ErrorAction::kStop: return "stop";
  }
  return "?";
}

ErrorAction action_for(ErrorPolicy p, int errnum) {
  switch (p) {
    case ErrorPolicy::kReport: return ErrorAction::kReport;
    case ErrorPolicy::kIgnore: return ErrorAction::kIgnore;
    case ErrorPolicy::kStop: return ErrorAction::kStop;
    case ErrorPolicy::kEnospc: return errnum == ENOSPC ? ErrorAction::kStop : ErrorAction::kReport;
  }
  return ErrorAction::kReport;
}

uint64_t max_buf_size_for(uint64_t physical_memory) {
  return std::min(kMaxBufSize, physical_memory / 4);
}

uint64_t max_buf_size() {
  static const uint64_t max = [] {
    long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return kMaxBufSize;
    return max_buf_size_for(static_cast<uint64_t>(pages) * static_cast<uint64_t>(page));
  }();
  return max;
}

Result<void> validate_params(const MirrorParams& p) {
  // The table's ranges and texts (option_table.h), as every front end checks them.
  for (const MirrorOption& o : mirror_options()) {
    if (!o.number) continue;
    if (auto r = check_number(o, o.number(p), o.name); !r) return r;
  }
  if (static_cast<uint64_t>(p.buf_size) > max_buf_size())
    return make_plain_error(EINVAL,
                            fmt::format("Parameter 'buf-size' expects a value of at most {} "
                                        "(a quarter of this machine's memory, at most 1 GiB)",
                                        format_size(max_buf_size())));
  // QEMU's texts for backup's bitmap arguments, which mirror's follow.
  if (p.sync == SyncMode::kBitmap && p.bitmap.empty())
    return make_plain_error(EINVAL, "must provide a valid bitmap name for 'bitmap' sync mode");
  if (p.sync != SyncMode::kBitmap && !p.bitmap.empty())
    return make_plain_error(EINVAL, fmt::format("a bitmap was given, but sync mode is '{}', not "
                                                "'bitmap'",
                                                to_string(p.sync)));
  if (p.max_in_flight == 0 || p.max_in_flight > 1024)
    return make_plain_error(EINVAL, "Parameter 'max-in-flight' expects a value in range [1, 1024]");
  return {};
}

uint64_t default_granularity(uint64_t cluster) {
  if (cluster == 0) return 64 << 10;
  return std::clamp<uint64_t>(cluster, 4 << 10, 64 << 10);
}

uint64_t default_mirror_granularity(uint64_t cluster, uint64_t length) {
  if (cluster != 0) return default_granularity(cluster);
  uint64_t g = 4 << 10;
  while (g < (64 << 10) && div_round_up(length, g) > kMirrorBitmapChunks) g *= 2;
  return g;
}

MirrorSizes derive_sizes(const MirrorParams& p, uint64_t cluster, uint64_t length) {
  MirrorSizes s;
  s.granularity = p.granularity ? p.granularity : default_mirror_granularity(cluster, length);
  uint64_t g = s.granularity;
  s.buf_size = align_up(p.buf_size ? static_cast<uint64_t>(p.buf_size) : kDefaultBufSize, g);
  // A copy of a target cluster must fit the buffer whole.
  if (cluster > g) s.buf_size = std::max(s.buf_size, align_up(cluster, g));
  // Large enough to stream well, small enough that max_in_flight operations
  // fit the buffer, never above the largest request, and at least one chunk.
  uint64_t share = std::max<uint64_t>(s.buf_size / p.max_in_flight, 1 << 20);
  uint64_t op = std::min<uint64_t>({s.buf_size, share, kMaxRequestBytes});
  s.max_op = std::max(g, align_down(op, g));
  return s;
}

}  // namespace blkmirror
