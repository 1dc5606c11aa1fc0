#include "cli/device_spec.h"

#include <fmt/format.h>

#include "blockdev/nbd_device.h"
#include "blockdev/nbd_uri.h"

namespace blkmirror {

bool is_nbd_spec(const std::string& spec) { return looks_like_nbd_uri(spec); }

Result<OpenedDevice> open_device_spec(Loop& loop, const std::string& spec, FileOptions opts) {
  if (!is_nbd_spec(spec)) {
    auto f = FileDevice::open(loop, spec, opts);
    if (!f) return make_error(f.error());
    return OpenedDevice{*f, *f};
  }
  auto o = parse_nbd_uri(spec);
  if (!o) return make_error(o.error());
  if (auto caveat = o->tls_caveat(); !caveat.empty())
    fmt::print(stderr, "blkmirror: warning: {}\n", caveat);
  auto dev = loop.run(open_nbd(loop, *o));
  if (!dev) return make_error(dev.error());
  return OpenedDevice{*dev, nullptr};
}

}  // namespace blkmirror
