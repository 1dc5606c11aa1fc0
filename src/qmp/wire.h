// The QMP wire format: parsing one request line and building replies, errors,
// events and the greeting. One JSON object per line in both directions.
//
// Threading rule: pure functions; any thread.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "qmp/schema.h"

namespace blkmirror::qmp {

// QMP refuses lines longer than this (a guard against unbounded buffering).
inline constexpr size_t kMaxLine = 1 << 20;

// The version blkmirror reports: the QEMU release whose QMP it follows.
inline constexpr int kQemuMajor = 7, kQemuMinor = 2, kQemuMicro = 0;
inline constexpr const char* kPackage = "blkmirror 0.1.0";

// Arrays and objects nest at most this deep in a request (QEMU's limit too).
// The check runs before the JSON is built: copying or printing a value nested
// tens of thousands deep recurses that deep and overflows the stack.
inline constexpr int kMaxJsonDepth = 1024;

struct Request {
  std::string execute;
  Json arguments = Json::object();
  std::optional<Json> id;
};

// Parses one input line. On failure the error is what to send back, and *id
// holds the request's id when one could be read (it is echoed even on errors).
// Never throws: nesting beyond kMaxJsonDepth and numbers beyond double range
// are refused like any other malformed line.
QResult<Request> parse_request(std::string_view line, std::optional<Json>* id);

// True when arrays/objects in `text` (JSON) nest deeper than `limit`. Brackets
// inside strings do not count. A lexical scan: no recursion, no allocation.
bool json_nesting_exceeds(std::string_view text, int limit);

// `j` as one line of JSON text (no newline). Strings are bytes to blkmirror
// (file names): a byte that is not part of valid UTF-8 appears as the four
// characters \xNN (backslash, x, two hex digits), the rest as it is. Never
// throws for text. docs/qmp.md and docs/cli.md state this escaping.
std::string dump_line(const Json& j);

Json version_json();
std::string greeting();
std::string reply(const Json& value, const std::optional<Json>& id);
std::string error_reply(const QmpError& e, const std::optional<Json>& id);
// An event with the current wall-clock timestamp.
std::string event(const std::string& name, const Json& data);

}  // namespace blkmirror::qmp
