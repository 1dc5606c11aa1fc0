#include "cli/progress.h"

#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/size_parse.h"
#include "qmp/job_events.h"
#include "qmp/wire.h"

namespace blkmirror {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string format_eta(double s) {
  if (s < 0 || s > 360000) return "--:--";
  auto t = static_cast<uint64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
  return fmt::format("{}:{:02}", t / 60, t % 60);
}

// One spelling for QMP and --json (qmp/job_events.h); NOTE is the CLI's own.
nlohmann::json event_json(const JobEvent& e) {
  if (auto ev = qmp::job_event_json(e)) return {{"event", ev->name}, {"data", ev->data}};
  return {{"event", "NOTE"}, {"data", {{"message", e.message}}}};
}

}  // namespace

Progress::Progress(ProgressStyle style, std::FILE* out)
    : style_(style), out_(out), tty_(isatty(fileno(out)) != 0) {
  start_ = last_sample_ = last_print_ = std::chrono::steady_clock::now();
}

void Progress::finish() {
  if (bar_shown_) {
    fmt::print(out_, "\r\033[K");
    bar_shown_ = false;
  }
  std::fflush(out_);
}

void Progress::note(const std::string& text) {
  if (style_ == ProgressStyle::kJson) {
    JobEvent e{JobEvent::Kind::kNote, ""};
    e.message = text;
    event(e);
    return;
  }
  finish();
  fmt::print(out_, "{}\n", text);
  std::fflush(out_);
}

void Progress::event(const JobEvent& e) {
  using K = JobEvent::Kind;
  if (style_ == ProgressStyle::kJson) {
    fmt::print(stdout, "{}\n", qmp::dump_line(event_json(e)));
    std::fflush(stdout);
    return;
  }
  switch (e.kind) {
    case K::kReady:
      note(fmt::format("ready: source and target in sync ({} copied) after {:.1f}s",
                       format_size(e.offset), seconds_since(start_)));
      break;
    case K::kError:
      note(fmt::format(
          "error: {} ({} error, action {}){}", e.message, e.operation, e.action,
          e.suppressed ? fmt::format("; {} more since the last one shown", e.suppressed) : ""));
      break;
    case K::kCopyModeChange:
      note(fmt::format("copy mode: {} ({}) after {:.1f}s", e.copy_mode, e.message,
                       seconds_since(start_)));
      break;
    default:
      break;
  }
}

std::string Progress::bar_line(const JobInfo& info, double rate) const {
  double frac = info.len ? static_cast<double>(info.offset) / static_cast<double>(info.len) : 1.0;
  frac = std::clamp(frac, 0.0, 1.0);
  constexpr int kWidth = 30;
  int filled = static_cast<int>(frac * kWidth);
  std::string bar(filled, '#');
  bar.append(kWidth - filled, '.');
  double eta = rate > 0 ? static_cast<double>(info.len - info.offset) / rate : -1;
  return fmt::format("[{}] {:5.1f}% {} / {}  {}/s  ETA {}  {}{}", bar, frac * 100,
                     format_size(info.offset), format_size(info.len),
                     format_size(static_cast<uint64_t>(rate)), format_eta(eta),
                     to_string(info.status), info.io_status != IoStatus::kOk ? " (io error)" : "");
}

void Progress::tick(const JobInfo& info) {
  auto now = std::chrono::steady_clock::now();
  double dt = std::chrono::duration<double>(now - last_sample_).count();
  if (dt >= 0.2) {
    double inst = static_cast<double>(info.offset - std::min(info.offset, last_offset_)) / dt;
    rate_ = rate_ == 0 ? inst : 0.7 * rate_ + 0.3 * inst;
    last_offset_ = info.offset;
    last_sample_ = now;
  }
  if (style_ == ProgressStyle::kNone) return;
  double since_print = std::chrono::duration<double>(now - last_print_).count();
  if (style_ == ProgressStyle::kJson) {
    if (since_print < json_interval_) return;
    nlohmann::json j = {{"event", "PROGRESS"},
                        {"data", {{"id", info.id}, {"status", to_string(info.status)},
                                  {"offset", info.offset}, {"len", info.len},
                                  {"rate", static_cast<uint64_t>(rate_)},
                                  {"actively-synced", info.actively_synced}}}};
    fmt::print(stdout, "{}\n", qmp::dump_line(j));
    std::fflush(stdout);
  } else if (tty_) {
    if (since_print < 0.2) return;
    fmt::print(out_, "\r\033[K{}", bar_line(info, rate_));
    bar_shown_ = true;
    std::fflush(out_);
  } else {
    if (since_print < 1.0) return;
    fmt::print(out_, "{}\n", bar_line(info, rate_));
    std::fflush(out_);
  }
  last_print_ = now;
}

}  // namespace blkmirror
