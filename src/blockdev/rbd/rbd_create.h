// Creating an RBD image for a mirror target, as `rbd create` and QEMU's
// blockdev-create driver rbd make one: a size, an object size (0: Ceph's
// default, 4 MiB) and the features (none given: the cluster's default set, what
// `rbd create` gives: layering, exclusive-lock, object-map, fast-diff,
// deep-flatten). Never overwrites: an existing image fails with EEXIST.
//
// Threading rule: awaited on the loop; librbd's blocking calls run on the
// Loop's worker pool.
#pragma once

#include <cstdint>
#include <optional>

#include "blockdev/rbd/rbd_spec.h"
#include "io/loop.h"

namespace blkmirror {

struct RbdCreateOptions {
  uint64_t size = 0;
  uint64_t object_size = 0;          // a power of two from 4 KiB to 32 MiB; 0: default
  std::optional<uint64_t> features;  // RBD_FEATURE_* bits; none: the default set
};

// Errors: "rbd:pool/img: cannot create the image: File exists" and the like.
// REQUIRES: spec and opts outlive the co_await (GCC 12 rule 2, base/task.h).
Task<Result<void>> create_rbd_image(Loop& loop, const RbdSpec& spec, const RbdCreateOptions& opts);

// Feature names as `rbd create --image-feature` and QEMU take them ("layering",
// "exclusive-lock", ...) to RBD_FEATURE_* bits; an unknown name is an error.
Result<uint64_t> rbd_feature_bit(const std::string& name);

}  // namespace blkmirror
