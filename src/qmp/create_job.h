// CreateJob: QMP's blockdev-create for the `file` driver, as a job of type
// "create" like QEMU's: it makes a new image file of the given size (sparse, or
// preallocated with `falloc`/`full`). Unlike QEMU it refuses to overwrite an
// existing file: creating an image never touches user data.
// As in QEMU, the job waits in `concluded` until job-dismiss.
//
// Threading rule: loop thread; the file work runs on the Loop's worker pool.
#pragma once

#include <string>

#include "io/loop.h"
#include "job/job.h"

namespace blkmirror::qmp {

struct CreateFileSpec {
  std::string path;
  uint64_t size = 0;
  std::string preallocation = "off";  // off | falloc | full
};

class CreateJob : public Job {
 public:
  CreateJob(Loop& loop, std::string id, CreateFileSpec spec)
      : Job(std::move(id), "create", "", true, false), loop_(loop), spec_(std::move(spec)) {}

 protected:
  Task<Result<void>> run() override;

 private:
  Loop& loop_;
  CreateFileSpec spec_;
};

}  // namespace blkmirror::qmp
