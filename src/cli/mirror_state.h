// `blkmirror mirror --state [PATH]`: the crash-safe state file of a CLI mirror
// (journal/journal.h, docs/design/journal.md). A new file is made for a new
// copy; an existing one is this mirror's earlier run, which is resumed after
// checking that it belongs to these devices and that they were not changed
// behind its back:
//   - same source and target (device and inode for files, length), same
//     granularity and sync mode;
//   - not completed (the target took the source's place: copying again would
//     overwrite what clients wrote since);
//   - a sample of extents the state says were copied read the same on both
//     sides (a cheap fingerprint; --verify-resume compares every chunk
//     instead, with the verify job, and adds what differs to the copy).
// Errors are one line naming the file and what is wrong; nothing is written.
//
// Threading rule: call on the thread that will run the Loop, before Loop::run.
#pragma once

#include <memory>
#include <string>

#include "cli/device_spec.h"
#include "io/loop.h"
#include "journal/journal.h"
#include "mirror/mirror_params.h"

namespace blkmirror {

struct MirrorStateOptions {
  bool enabled = false;
  std::string path;  // "" with enabled: DST + ".blkmirror-state" (local targets)
  bool verify_resume = false;
};

struct MirrorState {
  std::shared_ptr<Journal> journal;
  std::string path;
  bool resumed = false;
  std::string note;  // what was decided, for the progress display
};

// p: the job's parameters (granularity filled in when the state fixes it).
// Returns a state without journal when not enabled.
Result<MirrorState> open_mirror_state(Loop& loop, const MirrorStateOptions& o,
                                      const std::string& dst_spec, const OpenedDevice& src,
                                      const OpenedDevice& dst, MirrorParams& p,
                                      bool granularity_given);

}  // namespace blkmirror
