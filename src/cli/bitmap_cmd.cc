// `blkmirror bitmap [ACTION] IMAGE [NAME]`: lists, adds, removes, clears,
// enables or disables the persistent dirty bitmaps of an image without a
// daemon: a qcow2 image's bitmaps extension (as `qemu-img bitmap` does) or a
// raw file's side file, IMAGE.blkmirror-bitmaps (journal/bitmap_file.h). The
// checks and texts are the daemon's block-dirty-bitmap-* ones. Listing opens
// the image read-only; every other action opens it read-write, changes the
// bitmaps and stores them (a bad action changes nothing).
#include <fmt/format.h>

#include <bit>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "base/size_parse.h"
#include "cli/commands.h"
#include "cli/device_spec.h"
#include "cli/exit_codes.h"
#include "cli/image_bitmaps.h"
#include "cli/mirror_options.h"

namespace blkmirror {

namespace {

struct BitmapArgs {
  std::string image, name, format, granularity;
  std::string locking = "auto";
  bool add = false, remove = false, clear = false, enable = false, disable = false;
  bool json = false;
};

const char* action_of(const BitmapArgs& a) {
  return a.add       ? "add"
         : a.remove  ? "remove"
         : a.clear   ? "clear"
         : a.enable  ? "enable"
         : a.disable ? "disable"
                     : nullptr;
}

nlohmann::json list_json(const BitmapSet& set) {
  nlohmann::json out = nlohmann::json::array();
  for (const NamedBitmap& b : set) {
    nlohmann::json j = {{"name", b.name()},
                        {"granularity", b.granularity()},
                        {"recording", b.enabled},
                        {"count", b.count()}};
    if (b.inconsistent) j["inconsistent"] = true;
    out.insert(out.begin(), j);  // oldest first, as qemu-img info lists them
  }
  return out;
}

// Applies the action to the loaded bitmaps; nothing changes on error.
Result<void> apply(const BitmapArgs& a, const std::string& action, BitmapSet& set,
                   const BitmapStore& store, uint64_t length) {
  auto fail = [](const std::string& text) { return make_plain_error(EINVAL, text); };
  NamedBitmap* b = set.find(a.name);
  if (action == "add") {
    uint64_t g = 65536;
    if (!a.granularity.empty()) {
      auto v = parse_size(a.granularity);
      if (!v) return fail("--granularity: " + v.error().message());
      g = *v;
      if (g < 512 || g > (uint64_t{1} << 31) || !std::has_single_bit(g))
        return fail("Granularity must be power of 2 and at least 512");
    }
    if (b) return fail(fmt::format("Bitmap already exists: {}", a.name));
    if (auto r = store.can_store(set, a.name, g); !r)
      return fail(fmt::format("Can't make bitmap '{}' persistent in '{}': {}", a.name, a.image,
                              r.error().message()));
    NamedBitmap& n = set.add(a.name, g, length);
    n.persistent = true;
    return {};
  }
  if (!b) return fail(fmt::format("Dirty bitmap '{}' not found", a.name));
  if (action == "remove") {
    set.remove(a.name);
    return {};
  }
  if (b->inconsistent)
    return fail(fmt::format("Bitmap '{}' is inconsistent and cannot be used", a.name));
  if (action == "clear") b->clear();
  if (action == "enable") b->enabled = true;
  if (action == "disable") b->enabled = false;
  return {};
}

// The image as the node of a one-node graph, its bitmaps attached (the CLI's
// one way, cli/image_bitmaps.h). Members in destruction order: the bitmaps
// (stored if finish() did not run), the graph, the image.
struct Opened {
  OpenedDevice img;
  Graph graph;
  Node* node = nullptr;
  std::optional<CliImageBitmaps> bitmaps;
  BitmapSet& set() { return node->bitmaps(); }
  const BitmapStore& store() const { return *node->bitmap_store(); }
};

Result<std::unique_ptr<Opened>> open_bitmaps(Loop& loop, const BitmapArgs& a,
                                             std::optional<ImageFormat> format, bool writable) {
  const FileOptions o{.read_only = !writable,
                      .locking = parse_lock_mode(a.locking).value_or(LockMode::kAuto)};
  // The note about a detected format once, on the first (read-only) open.
  auto img = open_device_spec(loop, a.image, o, format, writable ? nullptr : "IMAGE");
  if (!img) return make_error(img.error());
  auto out = std::make_unique<Opened>();
  out->img = std::move(*img);
  auto node = out->graph.add("image", out->img.dev);
  if (!node) return make_error(node.error());
  out->node = *node;
  out->bitmaps.emplace(loop, out->graph);
  if (auto r = out->bitmaps->attach(*out->node, out->img, a.image, writable); !r)
    return make_error(r.error());
  if (!out->node->bitmap_store())
    return make_plain_error(EINVAL, a.image + ": cannot keep persistent bitmaps (not a file)");
  return out;
}

// Stores the bitmaps (writable) and closes the image; the first error.
Result<void> finish(Loop& loop, Opened& o) {
  return loop.run([](Opened* x) -> Task<Result<void>> {
    auto r = co_await x->bitmaps->store();
    auto c = co_await x->img.image.close();
    co_return r ? c : r;
  }(&o));
}

int run_bitmap(const BitmapArgs& a) {
  const char* act = action_of(a);
  if (act && a.name.empty()) return fail_input(fmt::format("--{} needs the bitmap's NAME", act));
  if (!act && !a.name.empty())
    return fail_input("give an action (--add, --remove, --clear, --enable, --disable) for NAME");
  if (!a.granularity.empty() && !a.add) return fail_input("--granularity goes with --add");
  if (is_nbd_spec(a.image))
    return fail_input(a.image + ": an NBD export keeps no persistent bitmaps here");
  auto format = parse_format_option(a.format, "--format");
  if (!format) return fail_input(format.error().message());
  Loop loop;
  // Read-only first: listing needs no more, and an action is checked there,
  // so bad input never writes the image.
  auto ro = open_bitmaps(loop, a, *format, false);
  if (!ro) return fail_input(ro.error().message());
  if (!act) {
    if (a.json) {
      fmt::print("{}\n", list_json((*ro)->set()).dump());
    } else {
      for (const auto& j : list_json((*ro)->set()))
        fmt::print("{}  granularity {}  {}  {} dirty bytes{}\n", j["name"].get<std::string>(),
                   j["granularity"].get<uint64_t>(),
                   j["recording"].get<bool>() ? "recording" : "disabled",
                   j["count"].get<uint64_t>(), j.contains("inconsistent") ? "  INCONSISTENT" : "");
    }
    (void)finish(loop, **ro);
    return exit_code::kOk;
  }
  auto checked = apply(a, act, (*ro)->set(), (*ro)->store(), (*ro)->img.dev->length());
  (void)finish(loop, **ro);
  ro->reset();  // its image lock goes before the writable open
  if (!checked) return fail_input(checked.error().message());
  auto rw = open_bitmaps(loop, a, *format, true);
  if (!rw) return fail_input(rw.error().message());
  auto applied = apply(a, act, (*rw)->set(), (*rw)->store(), (*rw)->img.dev->length());
  // Stored even if the image changed under us meanwhile: the writable open
  // marked the bitmaps in use, and storing them clears that again.
  auto done = finish(loop, **rw);
  if (!applied) return fail_input(applied.error().message());
  if (!done) {
    fmt::print(stderr, "blkmirror: {}: storing its bitmaps: {}\n", a.image, done.error().message());
    return exit_code::kJobFailed;
  }
  return exit_code::kOk;
}

}  // namespace

CommandRunner add_bitmap_command(CLI::App& app) {
  auto args = std::make_shared<BitmapArgs>();
  auto* cmd =
      app.add_subcommand("bitmap",
                         "List or change the persistent dirty bitmaps of IMAGE (qcow2, or raw with "
                         "IMAGE.blkmirror-bitmaps)");
  cmd->add_option("IMAGE", args->image, "a qcow2 image or raw file")->required();
  cmd->add_option("NAME", args->name, "the bitmap an action applies to");
  auto* acts = cmd->add_option_group("action", "at most one; none lists the bitmaps");
  acts->add_flag("--add", args->add, "add a persistent bitmap NAME (recording)");
  acts->add_flag("--remove", args->remove, "remove bitmap NAME");
  acts->add_flag("--clear", args->clear, "clear bitmap NAME (nothing dirty)");
  acts->add_flag("--enable", args->enable, "bitmap NAME records writes");
  acts->add_flag("--disable", args->disable, "bitmap NAME stops recording");
  acts->require_option(0, 1);
  cmd->add_option("-g,--granularity", args->granularity,
                  "with --add: bytes per bit, a power of 2 in [512, 2G] (default 64K)");
  cmd->add_option("-f,--format", args->format, "IMAGE's format: raw | qcow2 (default: detected)");
  cmd->add_flag("--json", args->json, "list as a JSON array");
  add_locking_option(*cmd, args->locking);
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_bitmap(*args);
  };
}

}  // namespace blkmirror
