#include "blockdev/rbd/rbd_spec.h"

#include <fmt/format.h>

namespace blkmirror {

namespace {

// Splits text at unescaped `sep` characters, removing the escapes of `sep` and
// backslash in the pieces (other escapes stay for the next split).
std::vector<std::string> split_escaped(const std::string& text, char sep) {
  std::vector<std::string> out(1);
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '\\' && i + 1 < text.size()) {
      char next = text[i + 1];
      if (next != sep) out.back() += c;  // keep it for a later split
      out.back() += next;
      ++i;
    } else if (c == sep) {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  return out;
}

std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) ++i;
    out += s[i];
  }
  return out;
}

// Unescaped position of `sep` in s, or npos.
size_t find_unescaped(const std::string& s, char sep) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\') {
      ++i;
    } else if (s[i] == sep) {
      return i;
    }
  }
  return std::string::npos;
}

}  // namespace

std::string RbdSpec::describe() const {
  std::string s = "rbd:" + pool + "/";
  if (!ns.empty()) s += ns + "/";
  s += image;
  if (snapshot) s += "@" + *snapshot;
  return s;
}

bool looks_like_rbd_spec(const std::string& text) { return text.rfind("rbd:", 0) == 0; }

Result<RbdSpec> parse_rbd_filename(const std::string& text) {
  auto bad = [&](const std::string& why) {
    return make_plain_error(EINVAL, fmt::format("{}: {}", text, why));
  };
  if (!looks_like_rbd_spec(text)) return bad("not an rbd: filename");
  // Fields are split at ':' first, keeping the other escapes for the name split.
  std::string body = text.substr(4);
  std::vector<std::string> fields;
  {
    std::string cur;
    for (size_t i = 0; i < body.size(); ++i) {
      if (body[i] == '\\' && i + 1 < body.size()) {
        cur += body[i];
        cur += body[++i];
      } else if (body[i] == ':') {
        fields.push_back(cur);
        cur.clear();
      } else {
        cur += body[i];
      }
    }
    fields.push_back(cur);
  }
  RbdSpec spec;
  std::string name = fields[0];
  if (auto at = find_unescaped(name, '@'); at != std::string::npos) {
    spec.snapshot = unescape(name.substr(at + 1));
    if (spec.snapshot->empty()) return bad("empty snapshot name after '@'");
    name.resize(at);
  }
  auto parts = split_escaped(name, '/');
  if (parts.size() == 2) {
    spec.pool = unescape(parts[0]);
    spec.image = unescape(parts[1]);
  } else if (parts.size() == 3) {
    spec.pool = unescape(parts[0]);
    spec.ns = unescape(parts[1]);
    spec.image = unescape(parts[2]);
  } else {
    return bad("expected rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]");
  }
  if (spec.pool.empty()) return bad("empty pool name");
  if (spec.image.empty()) return bad("empty image name");
  for (size_t i = 1; i < fields.size(); ++i) {
    const std::string& f = fields[i];
    auto eq = find_unescaped(f, '=');
    if (eq == std::string::npos)
      return bad(fmt::format("option '{}' is not KEY=VALUE", unescape(f)));
    std::string key = unescape(f.substr(0, eq)), value = unescape(f.substr(eq + 1));
    if (key.empty()) return bad("empty option name");
    if (key == "conf") {
      spec.conf = value;
    } else if (key == "id") {
      spec.user = value;
    } else if (key == "keyring") {
      spec.keyring = value;
    } else if (key == "auth_supported" || key == "auth_client_required") {
      for (auto& a : split_escaped(value, ';')) spec.auth_client_required.push_back(a);
    } else {
      spec.options.emplace_back(key, value);
    }
  }
  return spec;
}

}  // namespace blkmirror
