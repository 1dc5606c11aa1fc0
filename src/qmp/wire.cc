#include "qmp/wire.h"

#include <sys/time.h>

#include <fmt/format.h>

namespace blkmirror::qmp {

bool json_nesting_exceeds(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

QResult<Request> parse_request(std::string_view line, std::optional<Json>* id) {
  if (json_nesting_exceeds(line, kMaxJsonDepth))
    return generic_error(
        fmt::format("JSON parse error, nesting deeper than {} levels", kMaxJsonDepth));
  Json j;
  try {
    j = Json::parse(line);
  } catch (const Json::exception& e) {
    // A syntax error, or a number beyond double range (out_of_range, 1e400).
    // nlohmann's own explanation names the byte; keep it to one line.
    std::string what = e.what();
    if (auto p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
    return generic_error("JSON parse error, " + what);
  }
  if (!j.is_object()) return generic_error("QMP input must be a JSON object");
  if (auto it = j.find("id"); it != j.end()) *id = *it;
  Request r;
  r.id = *id;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k == "execute") {
      if (!it->is_string()) return generic_error("QMP input member 'execute' must be a string");
      r.execute = it->get<std::string>();
    } else if (k == "arguments") {
      if (!it->is_object()) return generic_error("QMP input member 'arguments' must be an object");
      r.arguments = *it;
    } else if (k != "id") {
      return generic_error(fmt::format("QMP input member '{}' is unexpected", k));
    }
  }
  if (!j.contains("execute")) return generic_error("QMP input lacks member 'execute'");
  return r;
}

namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 (overlong forms, surrogates
// and code points past U+10FFFF are invalid, as nlohmann judges them).
size_t utf8_sequence(std::string_view s, size_t i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  auto cont = [&](size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) {
    return k < s.size() && b(k) >= lo && b(k) <= hi;
  };
  unsigned c = b(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c == 0xE0) return cont(i + 1, 0xA0) && cont(i + 2) ? 3 : 0;
  if (c == 0xED) return cont(i + 1, 0x80, 0x9F) && cont(i + 2) ? 3 : 0;
  if (c >= 0xE1 && c <= 0xEF) return cont(i + 1) && cont(i + 2) ? 3 : 0;
  if (c == 0xF0) return cont(i + 1, 0x90) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  if (c == 0xF4) return cont(i + 1, 0x80, 0x8F) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  return 0;
}

std::string escape_invalid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_sequence(s, i);
    if (n == 0) {
      out += fmt::format("\\x{:02x}", static_cast<unsigned char>(s[i]));
      ++i;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
  return out;
}

Json escaped(const Json& j) {
  if (j.is_string()) return escape_invalid_utf8(j.get_ref<const std::string&>());
  if (j.is_array()) {
    Json out = Json::array();
    for (auto& v : j) out.push_back(escaped(v));
    return out;
  }
  if (j.is_object()) {
    Json out = Json::object();
    for (auto it = j.begin(); it != j.end(); ++it)
      out[escape_invalid_utf8(it.key())] = escaped(it.value());
    return out;
  }
  return j;
}

}  // namespace

std::string dump_line(const Json& j) {
  try {
    return j.dump();
  } catch (const Json::type_error&) {
    // Invalid UTF-8 somewhere (the rare case): escape it and dump again.
    return escaped(j).dump(-1, ' ', false, Json::error_handler_t::replace);
  }
}

Json version_json() {
  return {{"qemu", {{"major", kQemuMajor}, {"minor", kQemuMinor}, {"micro", kQemuMicro}}},
          {"package", kPackage}};
}

std::string greeting() {
  Json g = {{"QMP", {{"version", version_json()}, {"capabilities", Json::array()}}}};
  return dump_line(g) + "\n";
}

std::string reply(const Json& value, const std::optional<Json>& id) {
  Json r = {{"return", value}};
  if (id) r["id"] = *id;
  return dump_line(r) + "\n";
}

std::string error_reply(const QmpError& e, const std::optional<Json>& id) {
  Json r = {{"error", {{"class", e.cls}, {"desc", e.desc}}}};
  if (id) r["id"] = *id;
  return dump_line(r) + "\n";
}

std::string event(const std::string& name, const Json& data) {
  struct timeval tv {};
  ::gettimeofday(&tv, nullptr);
  Json e = {{"event", name},
            {"data", data},
            {"timestamp", {{"seconds", tv.tv_sec}, {"microseconds", tv.tv_usec}}}};
  return dump_line(e) + "\n";
}

}  // namespace blkmirror::qmp
