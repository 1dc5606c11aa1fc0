#include "base/size_parse.h"

#include <cctype>
#include <charconv>
#include <limits>

#include <fmt/format.h>

namespace blkmirror {

Result<uint64_t> parse_size(std::string_view text) {
  std::string_view s = text;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  if (s.empty() || s.front() == '-')
    return make_plain_error(EINVAL, fmt::format("invalid size '{}'", text));
  uint64_t value = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || ptr == s.data())
    return make_plain_error(ec == std::errc::result_out_of_range ? ERANGE : EINVAL,
                      fmt::format("invalid size '{}'", text));
  std::string suffix(ptr, s.data() + s.size());
  for (auto& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (suffix.size() >= 2 && suffix.substr(suffix.size() - 2) == "IB")
    suffix.resize(suffix.size() - 2);
  else if (suffix.size() >= 2 && suffix.back() == 'B') suffix.pop_back();
  int shift = 0;
  if (suffix.empty() || suffix == "B") shift = 0;
  else if (suffix == "K") shift = 10;
  else if (suffix == "M") shift = 20;
  else if (suffix == "G") shift = 30;
  else if (suffix == "T") shift = 40;
  else if (suffix == "P") shift = 50;
  else return make_plain_error(EINVAL, fmt::format("invalid size suffix in '{}'", text));
  if (shift && value > (std::numeric_limits<uint64_t>::max() >> shift))
    return make_plain_error(ERANGE, fmt::format("size '{}' too large", text));
  return value << shift;
}

std::string format_size(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  if (u == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.1f} {}", v, units[u]);
}

}  // namespace blkmirror
