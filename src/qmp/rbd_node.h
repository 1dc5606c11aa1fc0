// blockdev-add / blockdev-create driver rbd, as qemu-storage-daemon 7.2 takes
// them: the BlockdevOptionsRbd members (pool, namespace, image, snapshot, conf,
// user, auth-client-required, server) become an RbdSpec; blockdev-create's
// {driver: rbd, location: {...}, size, cluster-size} runs as a "create" job.
// Not supported (refused with a one-line error): encrypt, and key-secret (this
// daemon has no `secret` objects; give a keyring through conf instead).
//
// Threading rule: loop thread.
#pragma once

#include <memory>
#include <string>

#include "blockdev/rbd/rbd_create.h"
#include "blockdev/rbd/rbd_device.h"
#include "job/job.h"
#include "qmp/schema.h"

namespace blkmirror::qmp {

// BlockdevOptionsRbd's own members (blockdev-add adds the common node members).
Schema rbd_location_members();
// blockdev-create's options for driver rbd.
const Schema& rbd_create_schema();

// The spec named by a checked BlockdevOptionsRbd object (blockdev-add's arguments,
// or blockdev-create's location). prefix names it in errors ("location.").
QResult<RbdSpec> rbd_spec_from_json(const Json& o, const std::string& prefix);

// Opens the node (read-only when asked or for a snapshot).
Task<QResult<BlockDevicePtr>> open_rbd_node(Loop& loop, const Json& args);

class CreateRbdJob : public Job {
 public:
  CreateRbdJob(Loop& loop, std::string id, RbdSpec spec, RbdCreateOptions opts)
      : Job(std::move(id), "create", "", true, false),
        loop_(loop),
        spec_(std::move(spec)),
        opts_(opts) {}

 protected:
  Task<Result<void>> run() override;

 private:
  Loop& loop_;
  RbdSpec spec_;
  RbdCreateOptions opts_;
};

}  // namespace blkmirror::qmp
