// blockdev-reopen {options: [BlockdevOptions, ...]} as QEMU 7.2 takes it: each
// entry names a node and gives its options again. blkmirror changes one thing,
// the read-only flag (absent: read-write, as in QEMU), through
// Daemon::reopen_read_only; every other option must be what blockdev-add was
// given, the file child the same node, the backing child the same node (and
// present when the node has one). Every entry is checked before any changes,
// and a failure part-way puts the entries already reopened back.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kReopen = {{"options", Type::kAny, true}};

// Members blockdev-reopen handles itself (not compared as plain options).
bool handled(const std::string& key) {
  return key == "node-name" || key == "driver" || key == "read-only" || key == "auto-read-only" ||
         key == "file" || key == "image" || key == "backing";
}

// QEMU compares flattened options ("cache.direct"): the first member of `now`
// that `before` does not hold with the same value.
std::optional<std::string> changed_option(const Json& now, const Json& before,
                                          const std::string& prefix, bool top) {
  for (auto& [key, value] : now.items()) {
    if (top && handled(key)) continue;
    const std::string name = prefix + key;
    auto old = before.is_object() ? before.find(key) : before.end();
    if (value.is_object()) {
      if (old == before.end() || !old->is_object()) return name;
      if (auto c = changed_option(value, *old, name + ".", false)) return c;
      continue;
    }
    if (old == before.end() || *old != value) return name;
  }
  return std::nullopt;
}

QmpError cannot_change(const std::string& option) {
  return QmpError{"GenericError", fmt::format("Cannot change the option '{}'", option)};
}

}  // namespace

struct Daemon::ReopenCommands {
  static Task<QResult<Json>> blockdev_reopen(Daemon& d, Json& args, const Call& call);
  // One entry of the list, checked: the node and the read-only flag it asks for.
  struct Entry {
    std::string node;
    bool read_only = false;
  };
  static QResult<Entry> check_entry(Daemon& d, Json& o, size_t index, bool coerce);
  static QResult<void> check_child(Daemon& d, const Json& o, const std::string& member,
                                   const Child* edge);
};

std::span<const Daemon::Command> Daemon::reopen_commands() {
  static const Command table[] = {
      {"blockdev-reopen", &kReopen, &ReopenCommands::blockdev_reopen},
  };
  return table;
}

QResult<void> Daemon::ReopenCommands::check_child(Daemon& d, const Json& o,
                                                  const std::string& member, const Child* edge) {
  auto ref = o.find(member);
  if (ref == o.end()) return {};  // required ones were checked by the schema
  if (!edge) return tl::unexpected(cannot_change(member));
  const Node& child = edge->node();
  if (ref->is_string()) {
    if (ref->get<std::string>() != child.name()) return tl::unexpected(cannot_change(member));
    return {};
  }
  if (!ref->is_object()) return tl::unexpected(cannot_change(member));
  // An inline child: the same node, with the options it was added with.
  if (ref->contains("node-name") && (*ref)["node-name"] != child.name())
    return tl::unexpected(cannot_change(member));
  auto it = d.nodes_.find(child.name());
  Json before = it != d.nodes_.end() ? it->second.options : Json::object();
  if (auto c = changed_option(*ref, before, "", true)) return tl::unexpected(cannot_change(*c));
  if (ref->contains("driver") && before.contains("driver") && (*ref)["driver"] != before["driver"])
    return tl::unexpected(cannot_change("driver"));
  return {};
}

QResult<Daemon::ReopenCommands::Entry> Daemon::ReopenCommands::check_entry(Daemon& d, Json& o,
                                                                         size_t index,
                                                                         bool coerce) {
  const std::string prefix = fmt::format("options[{}].", index);
  if (!o.is_object())
    return generic_error(
        fmt::format("Invalid parameter type for 'options[{}]', expected: object", index));
  auto drv = o.find("driver");
  if (drv == o.end()) return generic_error(fmt::format("Parameter '{}driver' is missing", prefix));
  if (!drv->is_string())
    return generic_error(
        fmt::format("Invalid parameter type for '{}driver', expected: string", prefix));
  const std::string driver = drv->get<std::string>();
  const Schema* schema = node_schema(driver);
  if (!schema) return generic_error(bad_value(prefix + "driver", driver));
  // node-name is optional in BlockdevOptions: the schema without it as required.
  Schema relaxed = *schema;
  for (auto& f : relaxed)
    if (f.name == "node-name") f.required = false;
  if (auto r = check(o, relaxed, prefix, coerce); !r) return tl::unexpected(r.error());
  if (!o.contains("node-name")) return generic_error("node-name not specified");
  const std::string name = o["node-name"].get<std::string>();
  Node* n = d.graph_.find(name);
  auto it = d.nodes_.find(name);
  if (!n || it == d.nodes_.end())
    return generic_error(fmt::format("Failed to find node with node-name='{}'", name));
  NodeRecord& rec = it->second;
  if (driver != rec.driver) return tl::unexpected(cannot_change("driver"));
  if (auto c = changed_option(o, rec.options, "", true)) return tl::unexpected(cannot_change(*c));
  const char* file_member = driver == "blkdebug" ? "image" : "file";
  if (auto r = check_child(d, o, file_member, rec.file_edge.get()); !r)
    return tl::unexpected(r.error());
  if (driver == "qcow2") {
    auto b = o.find("backing");
    const bool has_backing = n->backing() || (rec.qcow2 && rec.qcow2->info().backing_file);
    if (b == o.end()) {
      if (has_backing) return generic_error(fmt::format("backing is missing for '{}'", name));
    } else if (b->is_null() || (coerce && *b == "null")) {
      if (n->backing()) return tl::unexpected(cannot_change("backing"));
    } else if (auto r = check_child(d, o, "backing", rec.backing_edge.get()); !r) {
      return tl::unexpected(r.error());
    }
  }
  return Entry{name, o.value("read-only", false)};
}

Task<QResult<Json>> Daemon::ReopenCommands::blockdev_reopen(Daemon& d, Json& args,
                                                            const Call& call) {
  Json& list = args["options"];
  if (!list.is_array())
    co_return generic_error("Invalid parameter type for 'options', expected: array");
  std::vector<Entry> entries;
  for (size_t i = 0; i < list.size(); ++i) {
    auto e = check_entry(d, list[i], i, call.coerce);
    if (!e) co_return tl::unexpected(e.error());
    entries.push_back(*e);
  }
  // Applied in order; a failure puts the earlier entries back as they were.
  std::vector<Entry> undo;
  for (const Entry& e : entries) {
    Node* n = d.graph_.find(e.node);
    const bool was = n ? n->device().caps().read_only : e.read_only;
    auto r = co_await d.reopen_read_only(e.node, e.read_only);
    if (!r) {
      for (auto u = undo.rbegin(); u != undo.rend(); ++u) {
        if (auto b = co_await d.reopen_read_only(u->node, u->read_only); !b)
          spdlog::error("blockdev-reopen: putting node '{}' back failed: {}", u->node,
                        b.error().desc);
      }
      co_return tl::unexpected(r.error());
    }
    undo.push_back(Entry{e.node, was});
  }
  for (const Entry& e : entries)
    if (auto it = d.nodes_.find(e.node); it != d.nodes_.end())
      it->second.options["read-only"] = e.read_only;
  co_return Json::object();
}

}  // namespace blkmirror::qmp
