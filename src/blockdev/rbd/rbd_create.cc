#include "blockdev/rbd/rbd_create.h"

#include <fmt/format.h>
#include <rbd/features.h>
#include <rbd/librbd.h>

#include <cstring>

#include "blockdev/rbd/rbd_image.h"

namespace blkmirror {

Result<uint64_t> rbd_feature_bit(const std::string& name) {
  struct Named {
    const char* name;
    uint64_t bit;
  };
  static const Named table[] = {
      {"layering", RBD_FEATURE_LAYERING},
      {"striping", RBD_FEATURE_STRIPINGV2},
      {"exclusive-lock", RBD_FEATURE_EXCLUSIVE_LOCK},
      {"object-map", RBD_FEATURE_OBJECT_MAP},
      {"fast-diff", RBD_FEATURE_FAST_DIFF},
      {"deep-flatten", RBD_FEATURE_DEEP_FLATTEN},
      {"journaling", RBD_FEATURE_JOURNALING},
      {"data-pool", RBD_FEATURE_DATA_POOL},
  };
  for (auto& n : table)
    if (name == n.name) return n.bit;
  return make_plain_error(EINVAL, fmt::format("unknown rbd image feature '{}'", name));
}

Task<Result<void>> create_rbd_image(Loop& loop, const RbdSpec& spec, const RbdCreateOptions& opts) {
  if (spec.snapshot)
    co_return make_plain_error(EINVAL, spec.describe() + ": cannot create a snapshot as an image");
  uint64_t osz = opts.object_size;
  if (osz != 0 && (osz < 4096 || osz > (32u << 20) || (osz & (osz - 1)) != 0)) {
    co_return make_plain_error(
        EINVAL, fmt::format("{}: object size {} is not a power of two from 4 KiB to 32 MiB",
                            spec.describe(), osz));
  }
  const RbdSpec* s = &spec;
  const RbdCreateOptions* o = &opts;
  co_return co_await loop.blocking([s, o]() -> Result<void> {
    auto c = rbd_connect_blocking(*s);
    if (!c) return make_error(c.error());
    rbd_image_options_t io;
    rbd_image_options_create(&io);
    if (o->object_size != 0) {
      uint64_t order = 0;
      while ((1ull << order) < o->object_size) ++order;
      rbd_image_options_set_uint64(io, RBD_IMAGE_OPTION_ORDER, order);
    }
    if (o->features) rbd_image_options_set_uint64(io, RBD_IMAGE_OPTION_FEATURES, *o->features);
    int r = rbd_create4(c->io, s->image.c_str(), o->size, io);
    rbd_image_options_destroy(io);
    c->close();
    if (r < 0) {
      return make_plain_error(
          -r, fmt::format("{}: cannot create the image: {}", s->describe(), std::strerror(-r)));
    }
    return {};
  });
}

}  // namespace blkmirror
