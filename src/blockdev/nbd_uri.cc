#include "blockdev/nbd_uri.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <optional>
#include <string_view>

#include "base/host_port.h"

namespace blkmirror {

namespace {

struct Scheme {
  std::string_view name;
  NbdTransport transport;
  bool tls;
};

constexpr Scheme kSchemes[] = {
    {"nbd", NbdTransport::kTcp, false},       {"nbds", NbdTransport::kTcp, true},
    {"nbd+tcp", NbdTransport::kTcp, false},   {"nbds+tcp", NbdTransport::kTcp, true},
    {"nbd+unix", NbdTransport::kUnix, false}, {"nbds+unix", NbdTransport::kUnix, true},
};

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    int hi = i + 1 < s.size() ? hex_value(s[i + 1]) : -1;
    int lo = i + 2 < s.size() ? hex_value(s[i + 2]) : -1;
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

// Characters that need no escaping in a path or query value we print.
std::string percent_encode(std::string_view s, bool keep_slash) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || (keep_slash && c == '/'))
      out += static_cast<char>(c);
    else
      out += fmt::format("%{:02X}", c);
  }
  return out;
}

tl::unexpected<Error> bad(const std::string& uri, const std::string& why) {
  return make_plain_error(EINVAL, fmt::format("{}: {}", uri, why));
}

std::optional<bool> parse_bool(std::string_view v) {
  std::string l(v);
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "1" || l == "true" || l == "on" || l == "yes") return true;
  if (l == "0" || l == "false" || l == "off" || l == "no") return false;
  return std::nullopt;
}

// Splits "user@host:port" into its parts; host keeps no brackets.
Result<void> parse_authority(const std::string& uri, std::string_view auth, NbdConnectOptions& o) {
  if (auto at = auth.rfind('@'); at != std::string_view::npos) {
    auto user = percent_decode(auth.substr(0, at));
    if (!user || user->empty()) return bad(uri, "bad user name before '@'");
    o.tls_username = *user;
    auth = auth.substr(at + 1);
  }
  auto hp = parse_host_port(auth, HostPortRules{.port_required = false, .port_zero_ok = false});
  if (!hp) return bad(uri, hp.error().message());
  o.host = hp->host;
  if (o.host.empty())
    return bad(uri, "no host name (use nbd+unix:///EXPORT?socket=PATH for a UNIX socket)");
  if (hp->port) o.port = *hp->port;
  return {};
}

Result<void> parse_query(const std::string& uri, std::string_view query, NbdConnectOptions& o,
                         bool& verify_given) {
  while (!query.empty()) {
    auto amp = query.find_first_of("&;");
    std::string_view item = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (item.empty()) continue;
    auto eq = item.find('=');
    std::string key(item.substr(0, eq));
    auto value =
        percent_decode(eq == std::string_view::npos ? std::string_view{} : item.substr(eq + 1));
    if (!value) return bad(uri, fmt::format("bad percent-encoding in parameter '{}'", key));
    if (eq == std::string_view::npos || value->empty())
      return bad(uri, fmt::format("parameter '{}' needs a value", key));
    if (key == "socket") {
      o.path = *value;
    } else if (key == "tls-certificates") {
      o.tls_cert_dir = *value;
    } else if (key == "tls-psk-file") {
      o.tls_psk_file = *value;
    } else if (key == "tls-verify-peer") {
      auto b = parse_bool(*value);
      if (!b)
        return bad(uri, fmt::format("tls-verify-peer expects true or false, not '{}'", *value));
      o.verify_peer = *b;
      verify_given = true;
    } else {
      return bad(uri, fmt::format("unknown parameter '{}' (known: socket, tls-certificates, "
                                  "tls-psk-file, tls-verify-peer)",
                                  key));
    }
  }
  return {};
}

}  // namespace

bool looks_like_nbd_uri(const std::string& text) {
  auto colon = text.find(':');
  if (colon == std::string::npos) return false;
  std::string_view scheme(text.data(), colon);
  return scheme == "nbd" || scheme == "nbds" || scheme.starts_with("nbd+") ||
         scheme.starts_with("nbds+");
}

Result<NbdConnectOptions> parse_nbd_uri(const std::string& uri) {
  NbdConnectOptions o;
  auto colon = uri.find(':');
  if (colon == std::string::npos) return bad(uri, "not a URI (expected nbd://HOST[:PORT]/EXPORT)");
  std::string_view scheme(uri.data(), colon);
  const Scheme* sc = nullptr;
  for (auto& s : kSchemes)
    if (s.name == scheme) sc = &s;
  if (!sc)
    return bad(
        uri, fmt::format("unsupported scheme '{}' (use nbd, nbds, nbd+unix or nbds+unix)", scheme));
  std::string_view rest(uri.data() + colon + 1, uri.size() - colon - 1);
  if (!rest.starts_with("//")) return bad(uri, "expected '//' after the scheme");
  rest.remove_prefix(2);
  if (rest.find('#') != std::string_view::npos) return bad(uri, "fragments ('#') are not allowed");
  std::string_view query;
  if (auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  auto slash = rest.find('/');
  std::string_view auth = rest.substr(0, slash);
  std::string_view path =
      slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
  auto exp = percent_decode(path);
  if (!exp) return bad(uri, "bad percent-encoding in the export name");
  o.export_name = *exp;
  o.transport = sc->transport;
  bool verify_given = false;
  if (auto r = parse_query(uri, query, o, verify_given); !r) return make_error(r.error());
  if (sc->transport == NbdTransport::kTcp) {
    if (auto r = parse_authority(uri, auth, o); !r) return make_error(r.error());
    if (!o.path.empty()) return bad(uri, "'socket' is only for nbd+unix:// and nbds+unix:// URIs");
  } else {
    // Only a user name may precede the (empty) host of a UNIX URI.
    if (auto at = auth.rfind('@'); at != std::string_view::npos) {
      auto user = percent_decode(auth.substr(0, at));
      if (!user || user->empty()) return bad(uri, "bad user name before '@'");
      o.tls_username = *user;
      auth = auth.substr(at + 1);
    }
    if (!auth.empty())
      return bad(uri,
                 fmt::format("a UNIX socket URI has no host ('{}'); write {}:///EXPORT?socket=PATH",
                             auth, scheme));
    if (o.path.empty()) return bad(uri, "missing ?socket=PATH");
  }
  bool tls_params =
      !o.tls_cert_dir.empty() || !o.tls_psk_file.empty() || verify_given || !o.tls_username.empty();
  if (!sc->tls) {
    if (tls_params)
      return bad(uri, fmt::format("TLS parameters need a TLS scheme ({}s{})", scheme.substr(0, 3),
                                  scheme.substr(3)));
    return o;
  }
  if (!o.tls_cert_dir.empty() && !o.tls_psk_file.empty())
    return bad(uri, "give tls-certificates or tls-psk-file, not both");
  o.tls = o.tls_psk_file.empty() ? NbdTls::kX509 : NbdTls::kPsk;
  if (o.tls == NbdTls::kPsk && verify_given)
    return bad(uri, "tls-verify-peer applies to X.509 certificates, not to tls-psk-file");
  if (o.tls == NbdTls::kX509 && !o.tls_username.empty())
    return bad(uri, "a user name is used with tls-psk-file only");
  return o;
}

std::string NbdConnectOptions::display() const {
  std::string scheme = tls == NbdTls::kOff ? "nbd" : "nbds";
  std::string exp = percent_encode(export_name, true);
  if (transport == NbdTransport::kUnix)
    return fmt::format("{}+unix:///{}?socket={}", scheme, exp, percent_encode(path, true));
  return fmt::format("{}://{}/{}", scheme, format_host_port(host, port), exp);
}

std::string NbdConnectOptions::tls_caveat() const {
  if (tls == NbdTls::kX509 && verify_peer && transport == NbdTransport::kUnix)
    return display() +
           ": the server certificate is not verified over a UNIX socket (libnbd "
           "checks it only against a TCP host name); traffic is still encrypted";
  return {};
}

Result<void> NbdConnectOptions::validate() const {
  std::string where = display();
  if (transport == NbdTransport::kUnix && path.empty())
    return make_plain_error(EINVAL, where + ": no UNIX socket path");
  if (transport == NbdTransport::kTcp && host.empty())
    return make_plain_error(EINVAL, where + ": no host");
  if (tls == NbdTls::kPsk && tls_psk_file.empty())
    return make_plain_error(EINVAL, where + ": TLS PSK needs a key file");
  if (export_name.size() > 4096)
    return make_plain_error(EINVAL,
                            where.substr(0, 64) + "...: export name longer than 4096 bytes");
  if (max_connections == 0)
    return make_plain_error(EINVAL, where + ": max_connections must be >= 1");
  return {};
}

}  // namespace blkmirror
