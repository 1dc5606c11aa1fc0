#include "base/host_port.h"

#include <charconv>

#include <fmt/format.h>

namespace blkmirror {

namespace {

tl::unexpected<Error> bad(std::string text) { return make_plain_error(EINVAL, std::move(text)); }

}  // namespace

Result<uint16_t> parse_port(std::string_view text, bool zero_ok) {
  unsigned v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  // from_chars takes no sign, space or suffix: "1K", "+1", " 1" all stop early.
  if (text.empty() || ec != std::errc() || p != text.data() + text.size() || v > 65535 ||
      (v == 0 && !zero_ok))
    return bad(
        fmt::format("bad port '{}' (expected a number from {} to 65535)", text, zero_ok ? 0 : 1));
  return static_cast<uint16_t>(v);
}

Result<std::string> parse_host(std::string_view text) {
  if (!text.empty() && text.front() == '[') {
    if (text.size() < 2 || text.back() != ']' || text.find(']') != text.size() - 1)
      return bad(fmt::format("unterminated '[' in host '{}'", text));
    text = text.substr(1, text.size() - 2);
  }
  if (text.empty()) return bad("empty host");
  if (text.find_first_of("[]") != std::string_view::npos)
    return bad(fmt::format("bad host '{}'", text));
  return std::string(text);
}

Result<HostPort> parse_host_port(std::string_view text, HostPortRules rules) {
  HostPort out;
  std::string_view port;
  bool has_port = false;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos) return bad(fmt::format("unterminated '[' in '{}'", text));
    out.host = std::string(text.substr(1, close - 1));
    if (out.host.empty()) return bad(fmt::format("empty IPv6 address in '{}'", text));
    auto rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':')
        return bad(fmt::format("unexpected '{}' after ']' in '{}'", rest, text));
      port = rest.substr(1);
      has_port = true;
    }
  } else {
    auto colon = text.find(':');
    if (colon != std::string_view::npos && text.find(':', colon + 1) != std::string_view::npos)
      return bad(fmt::format("'{}': an IPv6 address needs brackets, as in [::1]:10809", text));
    out.host = std::string(text.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = text.substr(colon + 1);
      has_port = true;
    }
  }
  if (out.host.find_first_of("[]") != std::string::npos)
    return bad(fmt::format("bad host '{}' in '{}'", out.host, text));
  if (!has_port) {
    if (rules.port_required) return bad(fmt::format("expected HOST:PORT, got '{}'", text));
    return out;
  }
  auto p = parse_port(port, rules.port_zero_ok);
  if (!p) return make_error(p.error());
  out.port = *p;
  return out;
}

std::string format_host_port(std::string_view host, uint16_t port) {
  bool v6 = host.find(':') != std::string_view::npos;
  return fmt::format("{}{}{}:{}", v6 ? "[" : "", host, v6 ? "]" : "", port);
}

}  // namespace blkmirror
