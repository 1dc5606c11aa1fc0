#include "blockdev/rbd/librbd_loader.h"

#include <dlfcn.h>
#include <fmt/format.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

#include "base/assert.h"

namespace blkmirror {

namespace {

constexpr const char* kRados = "librados.so.2";
constexpr const char* kRbd = "librbd.so.1";

// Every function the forwarders below resolve: load_librbd() checks them all
// at once, so a library without one fails the open, not a later call.
constexpr const char* kFunctions[] = {
    "rados_create2",        "rados_conf_read_file",
    "rados_conf_set",       "rados_connect",
    "rados_ioctx_create",   "rados_ioctx_set_namespace",
    "rados_ioctx_destroy",  "rados_shutdown",
    "rbd_open",             "rbd_open_read_only",
    "rbd_close",            "rbd_stat",
    "rbd_get_features",     "rbd_get_flags",
    "rbd_lock_acquire",     "rbd_resize",
    "rbd_diff_iterate2",    "rbd_create4",
    "rbd_image_options_create", "rbd_image_options_set_uint64",
    "rbd_image_options_destroy", "rbd_aio_create_completion",
    "rbd_aio_release",      "rbd_aio_get_return_value",
    "rbd_aio_read",         "rbd_aio_write",
    "rbd_aio_write_zeroes", "rbd_aio_discard",
    "rbd_aio_flush",
};

struct Libraries {
  void* rados = nullptr;
  void* rbd = nullptr;
  std::string error;  // empty when both loaded with every function
};

void* find(const Libraries& l, const char* name) {
  void* f = l.rbd ? ::dlsym(l.rbd, name) : nullptr;
  if (!f && l.rados) f = ::dlsym(l.rados, name);
  return f;
}

Libraries open_libraries() {
  Libraries l;
  // RTLD_LOCAL: their symbols stay out of the global scope, so nothing else in
  // the process binds to them by accident. librbd needs librados, which it
  // names as a dependency of its own.
  l.rados = ::dlopen(kRados, RTLD_NOW | RTLD_LOCAL);
  if (!l.rados) {
    l.error = fmt::format("cannot load {} (Debian package librados2): {}", kRados, ::dlerror());
    return l;
  }
  l.rbd = ::dlopen(kRbd, RTLD_NOW | RTLD_LOCAL);
  if (!l.rbd) {
    l.error = fmt::format("cannot load {} (Debian package librbd1): {}", kRbd, ::dlerror());
    return l;
  }
  for (const char* name : kFunctions) {
    if (!find(l, name)) {
      l.error = fmt::format("{} / {} has no function {}", kRbd, kRados, name);
      return l;
    }
  }
  return l;
}

const Libraries& libraries() {
  static const Libraries l = open_libraries();
  return l;
}

// The function `name` of the loaded libraries. Reached only through the rbd
// code, after rbd_connect_blocking() has had load_librbd() succeed: a call
// without it is a programming error.
template <class F>
F* resolve(const char* name) {
  const Libraries& l = libraries();
  BLKMIRROR_ASSERT(l.error.empty(), "an rbd function called without load_librbd()");
  void* f = find(l, name);
  BLKMIRROR_ASSERT(f != nullptr, "an rbd function missing from kFunctions");
  return reinterpret_cast<F*>(f);
}

}  // namespace

Result<void> load_librbd() {
  const Libraries& l = libraries();
  if (!l.error.empty()) return make_plain_error(ELIBACC, "Ceph RBD: " + l.error);
  return {};
}

}  // namespace blkmirror

// The forwarders: the signatures are the headers' own (a mismatch is a
// compile error, two C functions of one name), and each resolves its target
// once.
#define BLKMIRROR_RBD_CALL(name, ...)                                           \
  static auto* const fn = blkmirror::resolve<decltype(::name)>(#name);          \
  return fn(__VA_ARGS__)

extern "C" {

int rados_create2(rados_t* pcluster, const char* const clustername, const char* const name,
                  uint64_t flags) {
  BLKMIRROR_RBD_CALL(rados_create2, pcluster, clustername, name, flags);
}
int rados_conf_read_file(rados_t cluster, const char* path) {
  BLKMIRROR_RBD_CALL(rados_conf_read_file, cluster, path);
}
int rados_conf_set(rados_t cluster, const char* option, const char* value) {
  BLKMIRROR_RBD_CALL(rados_conf_set, cluster, option, value);
}
int rados_connect(rados_t cluster) { BLKMIRROR_RBD_CALL(rados_connect, cluster); }
int rados_ioctx_create(rados_t cluster, const char* pool_name, rados_ioctx_t* ioctx) {
  BLKMIRROR_RBD_CALL(rados_ioctx_create, cluster, pool_name, ioctx);
}
void rados_ioctx_set_namespace(rados_ioctx_t io, const char* nspace) {
  BLKMIRROR_RBD_CALL(rados_ioctx_set_namespace, io, nspace);
}
void rados_ioctx_destroy(rados_ioctx_t io) { BLKMIRROR_RBD_CALL(rados_ioctx_destroy, io); }
void rados_shutdown(rados_t cluster) { BLKMIRROR_RBD_CALL(rados_shutdown, cluster); }

int rbd_open(rados_ioctx_t io, const char* name, rbd_image_t* image, const char* snap_name) {
  BLKMIRROR_RBD_CALL(rbd_open, io, name, image, snap_name);
}
int rbd_open_read_only(rados_ioctx_t io, const char* name, rbd_image_t* image,
                       const char* snap_name) {
  BLKMIRROR_RBD_CALL(rbd_open_read_only, io, name, image, snap_name);
}
int rbd_close(rbd_image_t image) { BLKMIRROR_RBD_CALL(rbd_close, image); }
int rbd_stat(rbd_image_t image, rbd_image_info_t* info, size_t infosize) {
  BLKMIRROR_RBD_CALL(rbd_stat, image, info, infosize);
}
int rbd_get_features(rbd_image_t image, uint64_t* features) {
  BLKMIRROR_RBD_CALL(rbd_get_features, image, features);
}
int rbd_get_flags(rbd_image_t image, uint64_t* flags) {
  BLKMIRROR_RBD_CALL(rbd_get_flags, image, flags);
}
int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode) {
  BLKMIRROR_RBD_CALL(rbd_lock_acquire, image, lock_mode);
}
int rbd_resize(rbd_image_t image, uint64_t size) { BLKMIRROR_RBD_CALL(rbd_resize, image, size); }
int rbd_diff_iterate2(rbd_image_t image, const char* fromsnapname, uint64_t ofs, uint64_t len,
                      uint8_t include_parent, uint8_t whole_object,
                      int (*cb)(uint64_t, size_t, int, void*), void* arg) {
  BLKMIRROR_RBD_CALL(rbd_diff_iterate2, image, fromsnapname, ofs, len, include_parent,
                     whole_object, cb, arg);
}
int rbd_create4(rados_ioctx_t io, const char* name, uint64_t size, rbd_image_options_t opts) {
  BLKMIRROR_RBD_CALL(rbd_create4, io, name, size, opts);
}
void rbd_image_options_create(rbd_image_options_t* opts) {
  BLKMIRROR_RBD_CALL(rbd_image_options_create, opts);
}
int rbd_image_options_set_uint64(rbd_image_options_t opts, int optname, uint64_t optval) {
  BLKMIRROR_RBD_CALL(rbd_image_options_set_uint64, opts, optname, optval);
}
void rbd_image_options_destroy(rbd_image_options_t opts) {
  BLKMIRROR_RBD_CALL(rbd_image_options_destroy, opts);
}
int rbd_aio_create_completion(void* cb_arg, rbd_callback_t complete_cb, rbd_completion_t* c) {
  BLKMIRROR_RBD_CALL(rbd_aio_create_completion, cb_arg, complete_cb, c);
}
void rbd_aio_release(rbd_completion_t c) { BLKMIRROR_RBD_CALL(rbd_aio_release, c); }
ssize_t rbd_aio_get_return_value(rbd_completion_t c) {
  BLKMIRROR_RBD_CALL(rbd_aio_get_return_value, c);
}
int rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char* buf, rbd_completion_t c) {
  BLKMIRROR_RBD_CALL(rbd_aio_read, image, off, len, buf, c);
}
int rbd_aio_write(rbd_image_t image, uint64_t off, size_t len, const char* buf,
                  rbd_completion_t c) {
  BLKMIRROR_RBD_CALL(rbd_aio_write, image, off, len, buf, c);
}
int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                         int zero_flags, int op_flags) {
  BLKMIRROR_RBD_CALL(rbd_aio_write_zeroes, image, off, len, c, zero_flags, op_flags);
}
int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c) {
  BLKMIRROR_RBD_CALL(rbd_aio_discard, image, off, len, c);
}
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c) {
  BLKMIRROR_RBD_CALL(rbd_aio_flush, image, c);
}

}  // extern "C"
