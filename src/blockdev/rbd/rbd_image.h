// RbdImage: one open RBD image and the cluster connection under it (rados_t,
// the pool's I/O context, the rbd_image_t), opened and closed with librbd's
// blocking calls. open() runs them on the Loop's worker pool; the destructor
// closes (rbd_close flushes librbd's cache and releases the exclusive lock, so it
// must run before the process exits) on the calling thread.
//
// Threading rule: open() is awaited on the loop; handle() may be used from any
// thread (librbd's image handle is thread-safe), the object is owned by the loop.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <cstdint>
#include <memory>
#include <string>

#include "blockdev/rbd/rbd_spec.h"
#include "io/loop.h"

namespace blkmirror {

struct RbdInfo {
  uint64_t size = 0;
  uint64_t object_size = 0;
  uint64_t features = 0;
  bool fast_diff = false;  // fast-diff on and its object map valid
};

class RbdImage {
 public:
  ~RbdImage();
  RbdImage(const RbdImage&) = delete;
  RbdImage& operator=(const RbdImage&) = delete;

  // Connects to the cluster and opens spec's image, read-only when asked or when
  // it names a snapshot; a writable open takes the exclusive lock (when the image
  // has that feature) and keeps it. Errors are one line naming the image and
  // what failed ("pool 'x' does not exist", "held by another client").
  // REQUIRES: spec outlives the co_await (GCC 12 rule 2, base/task.h).
  static Task<Result<std::unique_ptr<RbdImage>>> open(Loop& loop, const RbdSpec& spec,
                                                      bool read_only);

  rbd_image_t handle() const { return image_; }
  rados_ioctx_t ioctx() const { return io_; }
  const RbdInfo& info() const { return info_; }
  // Re-reads size and flags (after a resize).
  Result<void> refresh();

 private:
  RbdImage() = default;
  friend struct RbdOpener;

  rados_t cluster_ = nullptr;
  rados_ioctx_t io_ = nullptr;
  rbd_image_t image_ = nullptr;
  RbdInfo info_;
};

// Connects to spec's cluster and opens the pool's I/O context (with spec's
// namespace). Blocking: call off the loop. Used by open() and image creation.
struct RbdCluster {
  rados_t cluster = nullptr;
  rados_ioctx_t io = nullptr;
  void close();
};
Result<RbdCluster> rbd_connect_blocking(const RbdSpec& spec);

}  // namespace blkmirror
