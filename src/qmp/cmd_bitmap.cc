// Dirty bitmaps over QMP, as qemu-storage-daemon 7.2 takes them:
// block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge, and
// `transaction` with those actions (and QEMU's `abort`).
//
// Every bitmap command is one transaction action. An action is applied in two
// steps, as QEMU's transactions do: prepare() checks it and makes its change
// while keeping what undoes it; then either commit() (every action of the
// transaction prepared) or abort() (one failed: the prepared ones are undone in
// reverse order). A lone command is a transaction of one action. Later actions
// see earlier ones' changes (add then merge into the new bitmap works); a
// bitmap being removed is busy until the commit, so a second remove of it in
// the same transaction is refused with QEMU's "in use" text.
//
// Nothing here suspends between prepare and commit, so no other request can
// see a half-applied transaction.
#include <fmt/format.h>

#include <bit>
#include <functional>
#include <memory>
#include <vector>

#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kAdd = {
    {"node", Type::kString, true}, {"name", Type::kString, true}, {"granularity", Type::kInt},
    {"persistent", Type::kBool},   {"disabled", Type::kBool},
};
const Schema kNamed = {{"node", Type::kString, true}, {"name", Type::kString, true}};
const Schema kMerge = {
    {"node", Type::kString, true},
    {"target", Type::kString, true},
    {"bitmaps", Type::kAny, true},
};
const Schema kProperties = {
    {"completion-mode", Type::kEnum, false, {"individual", "grouped"}},
};
const Schema kTransaction = {
    {"actions", Type::kAny, true},
    {"properties", Type::kObject, false, {}, &kProperties},
};
const Schema kAbort = {};

// The undo and the finish of one prepared action.
struct Prepared {
  std::function<void()> commit = [] {};
  std::function<void()> abort = [] {};
};

// QEMU's bdrv_dirty_bitmap_check() flags.
enum Check : unsigned { kBusy = 1, kReadOnly = 2, kInconsistent = 4 };
constexpr unsigned kDefaultChecks = kBusy | kReadOnly | kInconsistent;
constexpr unsigned kAllowReadOnly = kBusy | kInconsistent;

QResult<void> check_usable(const NamedBitmap& b, unsigned flags) {
  if ((flags & kBusy) && b.busy)
    return generic_error(fmt::format(
        "Bitmap '{}' is currently in use by another operation and cannot be used", b.name()));
  if ((flags & kInconsistent) && b.inconsistent)
    return generic_error(fmt::format("Bitmap '{}' is inconsistent and cannot be used", b.name()));
  return {};
}

}  // namespace

struct Daemon::BitmapCommands {
  using PrepareFn = QResult<Prepared> (*)(Daemon& d, Json& data);
  struct Action {
    std::string_view type;
    const Schema* schema;
    PrepareFn prepare;
  };
  static std::span<const Action> actions();
  static const Action* find_action(std::string_view type);

  // block_dirty_bitmap_lookup(): QEMU's texts for a missing node or bitmap.
  static QResult<NamedBitmap*> lookup(Daemon& d, const std::string& node, const std::string& name,
                                      Node** out_node = nullptr);

  static QResult<Prepared> add(Daemon& d, Json& data);
  static QResult<Prepared> remove(Daemon& d, Json& data);
  static QResult<Prepared> clear(Daemon& d, Json& data);
  static QResult<Prepared> enable(Daemon& d, Json& data);
  static QResult<Prepared> disable(Daemon& d, Json& data);
  static QResult<Prepared> merge(Daemon& d, Json& data);
  static QResult<Prepared> abort_action(Daemon& d, Json& data);

  // Prepares every action, then commits them all, or aborts the prepared ones.
  static QResult<void> run(Daemon& d, std::vector<std::pair<const Action*, Json>>& list);

  static Task<QResult<Json>> single(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> transaction(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::BitmapCommands::Action> Daemon::BitmapCommands::actions() {
  static const Action table[] = {
      {"block-dirty-bitmap-add", &kAdd, &BitmapCommands::add},
      {"block-dirty-bitmap-remove", &kNamed, &BitmapCommands::remove},
      {"block-dirty-bitmap-clear", &kNamed, &BitmapCommands::clear},
      {"block-dirty-bitmap-enable", &kNamed, &BitmapCommands::enable},
      {"block-dirty-bitmap-disable", &kNamed, &BitmapCommands::disable},
      {"block-dirty-bitmap-merge", &kMerge, &BitmapCommands::merge},
      {"abort", &kAbort, &BitmapCommands::abort_action},
  };
  return table;
}

const Daemon::BitmapCommands::Action* Daemon::BitmapCommands::find_action(std::string_view type) {
  for (const Action& a : actions())
    if (a.type == type) return &a;
  return nullptr;
}

std::span<const Daemon::Command> Daemon::bitmap_commands() {
  static const Command table[] = {
      {"block-dirty-bitmap-add", &kAdd, &BitmapCommands::single},
      {"block-dirty-bitmap-remove", &kNamed, &BitmapCommands::single},
      {"block-dirty-bitmap-clear", &kNamed, &BitmapCommands::single},
      {"block-dirty-bitmap-enable", &kNamed, &BitmapCommands::single},
      {"block-dirty-bitmap-disable", &kNamed, &BitmapCommands::single},
      {"block-dirty-bitmap-merge", &kMerge, &BitmapCommands::single},
      {"transaction", &kTransaction, &BitmapCommands::transaction},
  };
  return table;
}

QResult<NamedBitmap*> Daemon::BitmapCommands::lookup(Daemon& d, const std::string& node,
                                                     const std::string& name, Node** out_node) {
  Node* n = d.graph_.find(node);
  if (!n) return generic_error(fmt::format("Node '{}' not found", node));
  NamedBitmap* b = n->bitmaps().find(name);
  if (!b) return generic_error(fmt::format("Dirty bitmap '{}' not found", name));
  if (out_node) *out_node = n;
  return b;
}

QResult<Prepared> Daemon::BitmapCommands::add(Daemon& d, Json& a) {
  const std::string node = a["node"], name = a["name"];
  if (name.empty()) return generic_error("Bitmap name cannot be empty");
  Node* n = d.graph_.find(node);
  if (!n)
    return generic_error(fmt::format("Cannot find device='{}' nor node-name='{}'", node, node));
  uint64_t granularity;
  if (a.contains("granularity")) {
    const int64_t g = a["granularity"].get<int64_t>();
    if (g < 512 || g > int64_t{1} << 31 || !std::has_single_bit(static_cast<uint64_t>(g)))
      return generic_error("Granularity must be power of 2 and at least 512");
    granularity = static_cast<uint64_t>(g);
  } else {
    // QEMU's default: the cluster size clamped to [4 KiB, 64 KiB], else 64 KiB.
    const uint64_t cluster = n->device().caps().cluster_size;
    granularity = cluster ? std::clamp<uint64_t>(cluster, 4096, 65536) : 65536;
  }
  if (a.value("persistent", false))
    return generic_error(
        fmt::format("Can't store persistent bitmaps to {}: Operation not supported", node));
  if (name.size() > kMaxBitmapNameLength)
    return generic_error(fmt::format("Bitmap name too long: {}", name));
  if (n->bitmaps().find(name)) return generic_error(fmt::format("Bitmap already exists: {}", name));
  NamedBitmap& b = n->bitmaps().add(name, granularity, n->length());
  b.enabled = !a.value("disabled", false);
  Prepared p;
  p.abort = [n, name] { n->bitmaps().remove(name); };
  return p;
}

QResult<Prepared> Daemon::BitmapCommands::remove(Daemon& d, Json& a) {
  Node* n = nullptr;
  auto b = lookup(d, a["node"], a["name"], &n);
  if (!b) return tl::unexpected(b.error());
  if (auto r = check_usable(**b, kBusy | kReadOnly); !r) return tl::unexpected(r.error());
  // Busy until the commit releases it: later actions of the transaction may not use it.
  NamedBitmap* bm = *b;
  bm->busy = true;
  Prepared p;
  p.commit = [n, name = bm->name()] { n->bitmaps().remove(name); };
  p.abort = [bm] { bm->busy = false; };
  return p;
}

QResult<Prepared> Daemon::BitmapCommands::clear(Daemon& d, Json& a) {
  auto b = lookup(d, a["node"], a["name"]);
  if (!b) return tl::unexpected(b.error());
  if (auto r = check_usable(**b, kDefaultChecks); !r) return tl::unexpected(r.error());
  NamedBitmap* bm = *b;
  auto backup = std::make_shared<DirtyBitmap>(bm->bits());
  bm->clear();
  Prepared p;
  p.abort = [bm, backup] { bm->restore(*backup); };
  return p;
}

QResult<Prepared> Daemon::BitmapCommands::enable(Daemon& d, Json& a) {
  auto b = lookup(d, a["node"], a["name"]);
  if (!b) return tl::unexpected(b.error());
  if (auto r = check_usable(**b, kAllowReadOnly); !r) return tl::unexpected(r.error());
  NamedBitmap* bm = *b;
  const bool was = bm->enabled;
  bm->enabled = true;
  Prepared p;
  p.abort = [bm, was] { bm->enabled = was; };
  return p;
}

QResult<Prepared> Daemon::BitmapCommands::disable(Daemon& d, Json& a) {
  auto b = lookup(d, a["node"], a["name"]);
  if (!b) return tl::unexpected(b.error());
  if (auto r = check_usable(**b, kAllowReadOnly); !r) return tl::unexpected(r.error());
  NamedBitmap* bm = *b;
  const bool was = bm->enabled;
  bm->enabled = false;
  Prepared p;
  p.abort = [bm, was] { bm->enabled = was; };
  return p;
}

QResult<Prepared> Daemon::BitmapCommands::merge(Daemon& d, Json& a) {
  Node* n = nullptr;
  auto dst = lookup(d, a["node"], a["target"], &n);
  if (!dst) return tl::unexpected(dst.error());
  const Json& list = a["bitmaps"];
  if (!list.is_array())
    return generic_error("Invalid parameter type for 'bitmaps', expected: array");
  // Every source first: a bad one refuses the merge before anything changes.
  std::vector<const NamedBitmap*> sources;
  for (const Json& s : list) {
    const NamedBitmap* src = nullptr;
    if (s.is_string()) {
      src = n->bitmaps().find(s.get<std::string>());
      if (!src)
        return generic_error(fmt::format("Dirty bitmap '{}' not found", s.get<std::string>()));
    } else if (s.is_object() && s.contains("node") && s["node"].is_string() && s.contains("name") &&
               s["name"].is_string() && s.size() == 2) {
      auto b = lookup(d, s["node"], s["name"]);
      if (!b) return tl::unexpected(b.error());
      src = *b;
    } else {
      return generic_error(
          "Invalid parameter type for 'bitmaps[]', expected: BlockDirtyBitmapOrStr");
    }
    sources.push_back(src);
  }
  NamedBitmap* bm = *dst;
  if (auto r = check_usable(*bm, kDefaultChecks); !r) return tl::unexpected(r.error());
  for (const NamedBitmap* src : sources) {
    if (auto r = check_usable(*src, kInconsistent); !r) return tl::unexpected(r.error());
    if (src->length() != bm->length())
      return generic_error(fmt::format(
          "Bitmaps are of different sizes (destination size is {}, source size is {}) and "
          "can't be merged",
          bm->length(), src->length()));
  }
  auto backup = std::make_shared<DirtyBitmap>(bm->bits());
  for (const NamedBitmap* src : sources) bm->merge_from(*src);
  Prepared p;
  p.abort = [bm, backup] { bm->restore(*backup); };
  return p;
}

QResult<Prepared> Daemon::BitmapCommands::abort_action(Daemon&, Json&) {
  return generic_error("Transaction aborted using Abort action");
}

QResult<void> Daemon::BitmapCommands::run(Daemon& d,
                                          std::vector<std::pair<const Action*, Json>>& list) {
  std::vector<Prepared> done;
  for (auto& [action, data] : list) {
    auto p = action->prepare(d, data);
    if (!p) {
      for (auto it = done.rbegin(); it != done.rend(); ++it) it->abort();
      return tl::unexpected(p.error());
    }
    done.push_back(std::move(*p));
  }
  for (Prepared& p : done) p.commit();
  return {};
}

Task<QResult<Json>> Daemon::BitmapCommands::single(Daemon& d, Json& args, const Call& call) {
  std::vector<std::pair<const Action*, Json>> list;
  list.emplace_back(find_action(call.name), std::move(args));
  if (auto r = run(d, list); !r) co_return tl::unexpected(r.error());
  co_return Json::object();
}

Task<QResult<Json>> Daemon::BitmapCommands::transaction(Daemon& d, Json& args, const Call&) {
  Json& actions = args["actions"];
  if (!actions.is_array())
    co_return generic_error("Invalid parameter type for 'actions', expected: array");
  const bool grouped = args.contains("properties") &&
                       args["properties"].value("completion-mode", "individual") == "grouped";
  // Every action's arguments are checked before the first one is prepared.
  std::vector<std::pair<const Action*, Json>> list;
  for (size_t i = 0; i < actions.size(); ++i) {
    Json& item = actions[i];
    const std::string at = fmt::format("actions[{}].", i);
    if (!item.is_object() || !item.contains("type"))
      co_return generic_error(fmt::format("Parameter '{}type' is missing", at));
    if (!item["type"].is_string())
      co_return generic_error(
          fmt::format("Invalid parameter type for '{}type', expected: string", at));
    const std::string type = item["type"];
    const Action* a = find_action(type);
    if (!a)
      co_return generic_error(fmt::format("Parameter 'type' does not accept value '{}'", type));
    for (auto& [key, v] : item.items())
      if (key != "type" && key != "data")
        co_return generic_error(fmt::format("Parameter '{}{}' is unexpected", at, key));
    Json data = item.contains("data") ? item["data"] : Json::object();
    if (auto r = check(data, *a->schema, at + "data."); !r) co_return tl::unexpected(r.error());
    if (grouped)
      co_return generic_error(fmt::format(
          "Action '{}' does not support Transaction property completion-mode = grouped", type));
    list.emplace_back(a, std::move(data));
  }
  if (auto r = run(d, list); !r) co_return tl::unexpected(r.error());
  co_return Json::object();
}

// query-named-block-nodes' "dirty-bitmaps" member (block_chain.cc), QEMU's
// BlockDirtyInfo.
Json dirty_bitmaps_json(const Node& n) {
  Json list = Json::array();
  for (const NamedBitmap& b : n.bitmaps()) {
    Json info = {{"name", b.name()}, {"recording", b.enabled},         {"persistent", b.persistent},
                 {"busy", b.busy},   {"granularity", b.granularity()}, {"count", b.count()}};
    if (b.inconsistent) info["inconsistent"] = true;
    list.push_back(std::move(info));
  }
  return list;
}

}  // namespace blkmirror::qmp
