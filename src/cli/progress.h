// Progress: shows a running job to a person or a script. On a TTY, a redrawn bar
// with bytes done/total, rate and ETA; otherwise a plain line per second; with
// json, one JSON object per job event plus a PROGRESS object per second.
//
// Threading rule: loop thread only.
#pragma once

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "job/job.h"

namespace blkmirror {

enum class ProgressStyle { kAuto, kNone, kJson };

class Progress {
 public:
  Progress(ProgressStyle style, std::FILE* out = stderr);

  // Renders one job event (ready, completed, errors...).
  void event(const JobEvent& e);
  // Samples the job; call about every 100-200 ms.
  void tick(const JobInfo& info);
  // Clears the bar line before other output.
  void finish();
  void note(const std::string& text);
  bool json() const { return style_ == ProgressStyle::kJson; }
  // Seconds between JSON PROGRESS objects (default 1).
  void set_json_interval(double s) { json_interval_ = s; }

 private:
  std::string bar_line(const JobInfo& info, double rate) const;

  ProgressStyle style_;
  std::FILE* out_;
  bool tty_;
  bool bar_shown_ = false;
  std::chrono::steady_clock::time_point start_, last_sample_, last_print_;
  uint64_t last_offset_ = 0;
  double rate_ = 0;  // bytes/s, smoothed
  double json_interval_ = 1.0;
};

}  // namespace blkmirror
