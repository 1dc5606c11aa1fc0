#include "blockdev/rbd/rbd_image.h"

#include <fmt/format.h>

#include <cstring>

#include "blockdev/rbd/librbd_loader.h"

namespace blkmirror {

namespace {

std::string errtext(int r) { return std::strerror(r < 0 ? -r : r); }

tl::unexpected<Error> fail(const RbdSpec& spec, int r, const std::string& what) {
  return make_plain_error(r < 0 ? -r : r,
                          fmt::format("{}: {}: {}", spec.describe(), what, errtext(r)));
}

bool has_option(const RbdSpec& spec, const char* key) {
  for (auto& [k, v] : spec.options)
    if (k == key) return true;
  return false;
}

}  // namespace

void RbdCluster::close() {
  if (io) rados_ioctx_destroy(io);
  if (cluster) rados_shutdown(cluster);
  io = nullptr;
  cluster = nullptr;
}

Result<RbdCluster> rbd_connect_blocking(const RbdSpec& spec) {
  // Every path into librbd starts here (librbd_loader.h).
  if (auto loaded = load_librbd(); !loaded)
    return make_plain_error(loaded.error().errnum(),
                            spec.describe() + ": " + loaded.error().message());
  RbdCluster c;
  std::string name = "client." + spec.user.value_or("admin");
  int r = rados_create2(&c.cluster, "ceph", name.c_str(), 0);
  if (r < 0) return fail(spec, r, "cannot create a Ceph client");
  auto bad = [&](int err, const std::string& what) {
    c.close();
    return fail(spec, err, what);
  };
  if (spec.conf) {
    r = rados_conf_read_file(c.cluster, spec.conf->c_str());
    if (r < 0) return bad(r, fmt::format("cannot read Ceph config '{}'", *spec.conf));
  } else {
    // Ceph's default search (/etc/ceph/ceph.conf, ...); none found is fine when
    // the options name the monitors.
    rados_conf_read_file(c.cluster, nullptr);
  }
  auto set = [&](const char* key, const std::string& value) -> int {
    return rados_conf_set(c.cluster, key, value.c_str());
  };
  // A cluster that does not answer fails the open rather than hanging it for
  // Ceph's default 5 minutes.
  if (!has_option(spec, "client_mount_timeout")) set("client_mount_timeout", "30");
  if (spec.keyring && (r = set("keyring", *spec.keyring)) < 0) return bad(r, "bad keyring option");
  if (spec.key && (r = set("key", *spec.key)) < 0) return bad(r, "bad key");
  if (!spec.auth_client_required.empty()) {
    std::string list;
    for (auto& a : spec.auth_client_required) list += (list.empty() ? "" : ";") + a;
    if ((r = set("auth_client_required", list)) < 0)
      return bad(r, fmt::format("bad auth-client-required '{}'", list));
  }
  for (auto& [k, v] : spec.options) {
    if ((r = set(k.c_str(), v)) < 0) return bad(r, fmt::format("bad Ceph option '{}={}'", k, v));
  }
  r = rados_connect(c.cluster);
  if (r < 0) return bad(r, "cannot connect to the Ceph cluster");
  r = rados_ioctx_create(c.cluster, spec.pool.c_str(), &c.io);
  if (r == -ENOENT) return bad(r, fmt::format("pool '{}' does not exist", spec.pool));
  if (r < 0) return bad(r, fmt::format("cannot open pool '{}'", spec.pool));
  rados_ioctx_set_namespace(c.io, spec.ns.c_str());
  return c;
}

Task<Result<std::unique_ptr<RbdImage>>> RbdImage::open(Loop& loop, const RbdSpec& spec,
                                                       bool read_only) {
  const RbdSpec* s = &spec;
  auto opened = co_await loop.blocking([s, read_only]() -> Result<RbdImage*> {
    auto c = rbd_connect_blocking(*s);
    if (!c) return make_error(c.error());
    std::unique_ptr<RbdImage> img(new RbdImage);
    img->cluster_ = c->cluster;
    img->io_ = c->io;
    const char* snap = s->snapshot ? s->snapshot->c_str() : nullptr;
    int r;
    if (read_only || snap) {
      r = rbd_open_read_only(img->io_, s->image.c_str(), &img->image_, snap);
    } else {
      r = rbd_open(img->io_, s->image.c_str(), &img->image_, nullptr);
    }
    if (r == -ENOENT && snap) {
      return fail(*s, r,
                  fmt::format("image '{}' or its snapshot '{}' does not exist in pool '{}'",
                              s->image, *snap, s->pool));
    }
    if (r == -ENOENT)
      return fail(*s, r, fmt::format("image '{}' does not exist in pool '{}'", s->image, s->pool));
    if (r < 0) return fail(*s, r, "cannot open the image");
    if (auto ok = img->refresh(); !ok) return make_error(ok.error());
    if (!read_only && !snap && (img->info_.features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
      // Held for as long as the image is open: another writer cannot take it
      // over cooperatively in the middle of a mirror.
      r = rbd_lock_acquire(img->image_, RBD_LOCK_MODE_EXCLUSIVE);
      if (r < 0) {
        return fail(*s, r,
                    "cannot take the image's exclusive lock (is it open for writing "
                    "by another client? `rbd status` lists its watchers)");
      }
    }
    return img.release();
  });
  if (!opened) co_return make_error(opened.error());
  co_return std::unique_ptr<RbdImage>(*opened);
}

Result<void> RbdImage::refresh() {
  rbd_image_info_t st;
  int r = rbd_stat(image_, &st, sizeof st);
  if (r < 0) return make_error(-r, "rbd_stat");
  info_.size = st.size;
  info_.object_size = st.obj_size;
  uint64_t features = 0, flags = 0;
  if ((r = rbd_get_features(image_, &features)) < 0) return make_error(-r, "rbd_get_features");
  if ((r = rbd_get_flags(image_, &flags)) < 0) return make_error(-r, "rbd_get_flags");
  info_.features = features;
  info_.fast_diff = (features & RBD_FEATURE_FAST_DIFF) && !(flags & RBD_FLAG_FAST_DIFF_INVALID);
  return {};
}

RbdImage::~RbdImage() {
  if (image_) rbd_close(image_);
  RbdCluster c{cluster_, io_};
  c.close();
}

}  // namespace blkmirror
