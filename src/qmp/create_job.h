// CreateJob: QMP's blockdev-create for the `file` driver, as a job of type
// "create" like QEMU's: it makes a new image file of the given size (sparse, or
// preallocated with `falloc`/`full`). Unlike QEMU it refuses to overwrite an
// existing file: creating an image never touches user data.
// CreateQcow2Job: blockdev-create for `qcow2`: formats the (empty) file node it
// holds an edge to as a new qcow2 image. The command refuses a non-empty file
// node, for the same reason.
// As in QEMU, the jobs wait in `concluded` until job-dismiss.
//
// Threading rule: loop thread; the file work runs on the Loop's worker pool.
#pragma once

#include <memory>
#include <string>

#include "blockdev/graph.h"
#include "blockdev/qcow2/qcow2_device.h"
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

class CreateQcow2Job : public Job {
 public:
  // file: the edge to the file node, held until the job ends.
  CreateQcow2Job(std::string id, std::unique_ptr<Child> file, Qcow2CreateOptions opts)
      : Job(std::move(id), "create", "", true, false),
        file_(std::move(file)),
        opts_(std::move(opts)) {}

 protected:
  Task<Result<void>> run() override;

 private:
  std::unique_ptr<Child> file_;
  Qcow2CreateOptions opts_;
};

}  // namespace blkmirror::qmp
