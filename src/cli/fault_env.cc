#include "cli/fault_env.h"

#include <cstdlib>
#include <sstream>
#include <vector>

#include <fmt/format.h>

#include "base/size_parse.h"
#include "blockdev/fault_device.h"

namespace blkmirror {

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

}  // namespace

Result<BlockDevicePtr> apply_fault_env(BlockDevicePtr dev, const std::string& role) {
  const char* env = std::getenv("BLKMIRROR_INJECT_FAULTS");
  if (!env || !*env) return dev;
  std::shared_ptr<FaultDevice> wrapped;
  for (const auto& rule : split(env, ',')) {
    auto f = split(rule, ':');
    auto bad = [&] {
      return make_plain_error(EINVAL, fmt::format("BLKMIRROR_INJECT_FAULTS: bad rule '{}'", rule));
    };
    if (f.size() < 4 || f.size() > 5) return bad();
    if (f[0] != "src" && f[0] != "dst") return bad();
    if (!role.empty() && f[0] != role) continue;
    FaultRule r;
    if (f[1] == "read") r.ops = FaultRule::kRead;
    else if (f[1] == "write") r.ops = FaultRule::kAllWrites;
    else if (f[1] == "flush") r.ops = FaultRule::kFlush;
    else if (f[1] == "any") r.ops = ~0u;
    else return bad();
    auto off = parse_size(f[2]);
    auto len = parse_size(f[3]);
    if (!off || !len) return bad();
    r.offset = *off;
    r.length = *len;
    if (f.size() == 5) {
      if (f[4] == "EIO") r.errnum = EIO;
      else if (f[4] == "ENOSPC") r.errnum = ENOSPC;
      else if (auto n = parse_size(f[4]); n && *n > 0 && *n < 4096) r.errnum = static_cast<int>(*n);
      else return bad();
    }
    if (!dev) continue;  // only checking the rules
    if (!wrapped) wrapped = std::make_shared<FaultDevice>(dev);
    wrapped->add_rule(r);
  }
  if (wrapped) return BlockDevicePtr(wrapped);
  return dev;
}

}  // namespace blkmirror
