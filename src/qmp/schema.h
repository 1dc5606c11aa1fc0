// QMP argument checking: the small part of QEMU's QAPI that a command needs
// before it runs. A Schema lists a command's members with their types; check()
// refuses unknown members, missing required ones and wrong types with QEMU's
// texts ("Parameter 'x' is missing", "Parameter 'x' is unexpected", "Invalid
// parameter type for 'x', expected: string"), so a bad request is refused
// before any side effect. Nested objects are checked with dotted names
// ("server.path"), as QEMU reports them.
//
// The command line (`daemon --blockdev driver=file,...`) uses QEMU's keyval
// syntax, where every value is a string; parse_keyval() turns it into JSON and
// check(..., coerce=true) converts "on"/"off" and digits to the member's type.
//
// Threading rule: pure functions and plain data; any thread.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

namespace blkmirror::qmp {

using Json = nlohmann::json;

// An error reply: QMP's class ("GenericError", "CommandNotFound",
// "DeviceNotFound", "DeviceNotActive") and a one-line description.
struct QmpError {
  std::string cls;
  std::string desc;
};

template <class T>
using QResult = tl::expected<T, QmpError>;

inline tl::unexpected<QmpError> generic_error(std::string desc) {
  return tl::unexpected<QmpError>(QmpError{"GenericError", std::move(desc)});
}

enum class Type { kString, kInt, kBool, kObject, kEnum, kStringList, kAny };

struct Field;
using Schema = std::vector<Field>;

struct Field {
  Field(std::string n, Type t, bool req = false, std::vector<std::string> vals = {},
        const Schema* m = nullptr)
      : name(std::move(n)), type(t), required(req), values(std::move(vals)), members(m) {}
  std::string name;
  Type type = Type::kString;
  bool required = false;
  std::vector<std::string> values;  // kEnum: the accepted values
  const Schema* members = nullptr;  // kObject: checked recursively when set
};

// Checks `args` (a JSON object, or null for "no arguments") against `schema`.
// `prefix` names the enclosing member for nested errors ("server.").
// With coerce, string values are converted in place to the member's type.
QResult<void> check(Json& args, const Schema& schema, const std::string& prefix = "",
                    bool coerce = false);

// The text QEMU uses for a member that must be one of `values`.
std::string bad_value(std::string_view name, std::string_view value);

// QEMU's keyval syntax: "a=1,b.c=x,,y" -> {"a":"1","b":{"c":"x,y"}}. A text
// starting with '{' is parsed as JSON instead. One-line errors.
QResult<Json> parse_keyval(std::string_view text);

// QEMU's rule for ids and node names: a letter, then letters, digits, '-', '.', '_'.
bool id_wellformed(std::string_view id);

}  // namespace blkmirror::qmp
