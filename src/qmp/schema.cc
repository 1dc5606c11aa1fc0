#include "qmp/schema.h"

#include <algorithm>
#include <cctype>
#include <charconv>

#include <fmt/format.h>

namespace blkmirror::qmp {

namespace {

const char* type_name(Type t) {
  switch (t) {
    case Type::kString:
    case Type::kEnum: return "string";
    case Type::kInt: return "integer";
    case Type::kBool: return "boolean";
    case Type::kObject: return "object";
    case Type::kStringList: return "array";
    case Type::kAny: return "any";
  }
  return "?";
}

tl::unexpected<QmpError> wrong_type(const std::string& name, Type t) {
  return generic_error(
      fmt::format("Invalid parameter type for '{}', expected: {}", name, type_name(t)));
}

// Command-line values are strings; turn one into the member's JSON type.
bool coerce_value(Json& v, Type t) {
  if (!v.is_string()) return false;
  const std::string s = v.get<std::string>();
  if (t == Type::kBool) {
    if (s == "on" || s == "true" || s == "yes") return v = true, true;
    if (s == "off" || s == "false" || s == "no") return v = false, true;
    return false;
  }
  if (t == Type::kInt) {
    int64_t n = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
    if (ec != std::errc() || p != s.data() + s.size()) return false;
    v = n;
    return true;
  }
  return false;
}

bool type_matches(const Json& v, Type t) {
  switch (t) {
    case Type::kString:
    case Type::kEnum: return v.is_string();
    case Type::kInt: return v.is_number_integer();
    case Type::kBool: return v.is_boolean();
    case Type::kObject: return v.is_object();
    case Type::kStringList:
      return v.is_array() &&
             std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_string(); });
    case Type::kAny: return true;
  }
  return false;
}

}  // namespace

std::string bad_value(std::string_view name, std::string_view value) {
  return fmt::format("Parameter '{}' does not accept value '{}'", name, value);
}

QResult<void> check(Json& args, const Schema& schema, const std::string& prefix, bool coerce) {
  if (args.is_null()) args = Json::object();
  if (!args.is_object())
    return generic_error(
        fmt::format("Invalid parameter type for '{}', expected: object",
                    prefix.empty() ? "arguments" : prefix.substr(0, prefix.size() - 1)));
  // QEMU reports members in schema order: missing and ill-typed ones first,
  // then anything left over as unexpected.
  for (const Field& f : schema) {
    std::string name = prefix + f.name;
    auto it = args.find(f.name);
    if (it == args.end()) {
      if (f.required) return generic_error(fmt::format("Parameter '{}' is missing", name));
      continue;
    }
    Json& v = *it;
    if (!type_matches(v, f.type) && !(coerce && coerce_value(v, f.type)))
      return wrong_type(name, f.type);
    if (f.type == Type::kEnum &&
        std::find(f.values.begin(), f.values.end(), v.get<std::string>()) == f.values.end())
      return generic_error(bad_value(name, v.get<std::string>()));
    if (f.type == Type::kObject && f.members) {
      if (auto r = check(v, *f.members, name + ".", coerce); !r) return r;
    }
  }
  for (auto it = args.begin(); it != args.end(); ++it) {
    bool known = std::any_of(schema.begin(), schema.end(),
                             [&](const Field& f) { return f.name == it.key(); });
    if (!known)
      return generic_error(fmt::format("Parameter '{}' is unexpected", prefix + it.key()));
  }
  return {};
}

QResult<Json> parse_keyval(std::string_view text) {
  if (!text.empty() && text.front() == '{') {
    Json j = Json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return generic_error(fmt::format("Invalid JSON object: {}", text));
    return j;
  }
  Json out = Json::object();
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eq = text.find('=', pos);
    size_t comma = text.find(',', pos);
    if (eq == std::string_view::npos || (comma != std::string_view::npos && comma < eq))
      return generic_error(fmt::format("Expected '=' after parameter '{}'",
                                       text.substr(pos, std::min(comma, text.size()) - pos)));
    std::string key(text.substr(pos, eq - pos));
    if (key.empty()) return generic_error("Invalid parameter ''");
    // The value runs to the next single comma; ",," is a literal comma.
    std::string value;
    size_t i = eq + 1;
    for (; i < text.size(); ++i) {
      if (text[i] == ',') {
        if (i + 1 < text.size() && text[i + 1] == ',') {
          value += ',';
          ++i;
          continue;
        }
        break;
      }
      value += text[i];
    }
    pos = i + 1;
    // Walk "a.b.c" into nested objects.
    Json* node = &out;
    size_t start = 0;
    for (;;) {
      size_t dot = key.find('.', start);
      std::string part =
          key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (part.empty()) return generic_error(fmt::format("Invalid parameter '{}'", key));
      if (dot == std::string::npos) {
        if (node->contains(part))
          return generic_error(fmt::format("Parameter '{}' given more than once", key));
        (*node)[part] = value;
        break;
      }
      Json& child = (*node)[part];
      if (child.is_null()) child = Json::object();
      if (!child.is_object())
        return generic_error(
            fmt::format("Parameter '{}' conflicts with '{}'", key, key.substr(0, dot)));
      node = &child;
      start = dot + 1;
    }
  }
  return out;
}

bool id_wellformed(std::string_view id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

}  // namespace blkmirror::qmp
