#include "cli/device_spec.h"

#include <fmt/format.h>

#include "blockdev/nbd_device.h"
#include "blockdev/nbd_uri.h"
#include "blockdev/rbd/rbd_device.h"

namespace blkmirror {

bool is_nbd_spec(const std::string& spec) { return looks_like_nbd_uri(spec); }

Result<std::optional<ImageFormat>> parse_format_option(const std::string& text,
                                                       const char* option) {
  if (text.empty()) return std::optional<ImageFormat>();
  auto f = parse_image_format(text);
  if (!f) return make_plain_error(EINVAL, fmt::format("{}: {}", option, f.error().message()));
  return std::optional<ImageFormat>(*f);
}

Result<OpenedDevice> open_device_spec(Loop& loop, const std::string& spec, FileOptions opts,
                                      std::optional<ImageFormat> format, const char* role) {
  OpenedDevice out;
  BlockDevicePtr bytes;
  if (looks_like_rbd_spec(spec)) {
    auto r = parse_rbd_filename(spec);
    if (!r) return make_error(r.error());
    RbdOptions ro;
    ro.read_only = opts.read_only;
    auto dev = loop.run(RbdDevice::open(loop, *r, ro));
    if (!dev) return make_error(dev.error());
    bytes = *dev;
    out.rbd = *dev;
    if (!format) format = ImageFormat::kRaw;  // a guest's disk, like an NBD export
  } else if (!is_nbd_spec(spec)) {
    auto f = FileDevice::open(loop, spec, opts);
    if (!f) return make_error(f.error());
    out.file = *f;
    bytes = *f;
  } else {
    auto o = parse_nbd_uri(spec);
    if (!o) return make_error(o.error());
    if (auto caveat = o->tls_caveat(); !caveat.empty())
      fmt::print(stderr, "blkmirror: warning: {}\n", caveat);
    auto dev = loop.run(open_nbd(loop, *o));
    if (!dev) return make_error(dev.error());
    bytes = *dev;
    if (!format) format = ImageFormat::kRaw;  // see the header: never guessed for an export
  }
  auto img = loop.run(open_image(loop, bytes, spec, out.file != nullptr, format, opts.read_only));
  if (!img) return make_plain_error(img.error().errnum(), img.error().message());
  out.image = std::move(*img);
  out.dev = out.image.top;
  // Raw is what the CLI always did: said only when the magic made it qcow2.
  if (out.image.detected && out.image.format != ImageFormat::kRaw)
    fmt::print(stderr, "blkmirror: {}{}{}: detected format {} (say --format to choose)\n",
               role ? role : "", role ? " " : "", spec, to_string(out.image.format));
  return out;
}

}  // namespace blkmirror
