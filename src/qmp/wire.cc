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
    return generic_error(fmt::format("JSON parse error, nesting deeper than {} levels", kMaxJsonDepth));
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

Json version_json() {
  return {{"qemu", {{"major", kQemuMajor}, {"minor", kQemuMinor}, {"micro", kQemuMicro}}},
          {"package", kPackage}};
}

std::string greeting() {
  Json g = {{"QMP", {{"version", version_json()}, {"capabilities", Json::array()}}}};
  return g.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string reply(const Json& value, const std::optional<Json>& id) {
  Json r = {{"return", value}};
  if (id) r["id"] = *id;
  return r.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string error_reply(const QmpError& e, const std::optional<Json>& id) {
  Json r = {{"error", {{"class", e.cls}, {"desc", e.desc}}}};
  if (id) r["id"] = *id;
  return r.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string event(const std::string& name, const Json& data) {
  struct timeval tv {};
  ::gettimeofday(&tv, nullptr);
  Json e = {{"event", name},
            {"data", data},
            {"timestamp", {{"seconds", tv.tv_sec}, {"microseconds", tv.tv_usec}}}};
  return e.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

}  // namespace blkmirror::qmp
