// Opening a mirror's crash-safe state file (journal/journal.h,
// docs/design/journal.md) for `blkmirror mirror --state` and blockdev-mirror's
// x-persistent-state. A missing file is made for a new copy; an existing one
// is this mirror's earlier run, resumed after checking that it belongs to
// these devices and that they were not changed behind its back:
//   - same source and target (device and inode for files, length), same
//     granularity and sync mode;
//   - not completed (the target took the source's place: copying again would
//     overwrite what clients wrote since);
//   - the first clean extent of each sixteenth of the disk reads the same on
//     both sides (a cheap fingerprint; when it does not, the caller may
//     compare every chunk instead: changed_ is then set rather than refused).
// Errors are one line naming the file and what is wrong; nothing is written.
//
// Threading rule: loop thread (a coroutine on the Loop).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "base/task.h"
#include "blockdev/block_device.h"
#include "io/loop.h"
#include "journal/journal.h"
#include "mirror/mirror_params.h"

namespace blkmirror {

struct MirrorStateRequest {
  std::string path;
  BlockDevice* src = nullptr;
  BlockDevice* dst = nullptr;
  JournalIdentity src_id, dst_id;
  // Resuming over a failed fingerprint is the caller's (it compares every
  // chunk): report it instead of refusing.
  bool allow_changed = false;
};

struct MirrorState {
  std::shared_ptr<Journal> journal;
  std::string path;
  bool resumed = false;
  bool changed = false;  // allow_changed: the fingerprint found a difference
  std::string note;      // what was decided, for the progress display
};

// p: the job's parameters; a resume sets p.granularity to the state's. req
// and p must stay put until the task ends (pointers: GCC 12 rule 2, base/task.h).
Task<Result<MirrorState>> open_mirror_state(Loop& loop, const MirrorStateRequest* req,
                                            MirrorParams* p, bool granularity_given);

// The identity of a file or block device (st_dev and st_ino), else zeros.
JournalIdentity device_identity(const BlockDevice& dev, std::string name);

}  // namespace blkmirror
