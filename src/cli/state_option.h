// The crash-safe state options of `blkmirror mirror`: --state [PATH] (default
// DST.blkmirror-state for a local target) and --verify-resume, which compares
// every chunk with the verify job before resuming and adds what differs to the
// copy. The state itself: mirror/mirror_state.h.
//
// Threading rule: call on the thread that will run the Loop, before Loop::run.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "cli/device_spec.h"
#include "io/loop.h"
#include "mirror/mirror_state.h"

namespace blkmirror {

struct StateOption {
  bool enabled = false;
  std::string path;
  bool verify_resume = false;

  void add_to(CLI::App& cmd);
  // Opens or creates the state for this mirror (none when not enabled); sets
  // p.journal, p.resume and, resuming, p.granularity. One-line errors.
  Result<MirrorState> open(Loop& loop, const std::string& src_spec, const std::string& dst_spec,
                           const OpenedDevice& src, const OpenedDevice& dst, MirrorParams& p,
                           bool granularity_given) const;
};

}  // namespace blkmirror
