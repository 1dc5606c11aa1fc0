#include "commit/commit_plan.h"

#include <cerrno>

#include <fmt/format.h>

#include "blockdev/image_format.h"

namespace blkmirror {

namespace {

Result<CommitPlan> fail(int err, std::string msg) {
  return make_plain_error(err, std::move(msg));
}

// True when only edges from outside the graph (exports, jobs) use n.
bool is_root(const Node& n) {
  for (const Child* c : n.parents())
    if (c->owner()) return false;
  return true;
}

bool chain_contains(const Node* top, const Node* n) {
  for (const Node* i = top; i; i = i->backing())
    if (i == n) return true;
  return false;
}

// The image of `top`'s chain (top included when include_top) opened from
// `name`: the same string, or the same file once both are made absolute.
Node* find_by_filename(Node* top, const std::string& name, const FilenameOf& filename_of,
                       bool include_top) {
  for (Node* i = include_top ? top : top->backing(); i; i = i->backing()) {
    std::string f = filename_of(*i);
    if (f.empty()) continue;
    if (f == name || absolute_path(f) == absolute_path(name)) return i;
  }
  return nullptr;
}

}  // namespace

Result<CommitPlan> plan_commit(Graph& graph, const CommitRequest& req,
                               const FilenameOf& filename_of) {
  CommitPlan p;
  // The device is looked up before anything else can fail: libvirt tells
  // commit support apart by the DeviceNotFound class of this error.
  p.device = graph.find(req.device);
  if (!p.device) return fail(ENODEV, fmt::format("Device '{}' not found", req.device));
  if (!is_root(*p.device)) return fail(EINVAL, "Need a root block node");
  p.top = p.device;
  if (req.top_node && req.top) return fail(EINVAL, "'top-node' and 'top' are mutually exclusive");
  if (req.top_node) {
    p.top = graph.find(*req.top_node);
    if (!p.top)
      return fail(EINVAL, fmt::format("Cannot find device='' nor node-name='{}'", *req.top_node));
    if (!chain_contains(p.device, p.top))
      return fail(EINVAL, fmt::format("'{}' is not in this backing file chain", *req.top_node));
  } else if (req.top) {
    p.top = find_by_filename(p.device, *req.top, filename_of, true);
    if (!p.top) return fail(EINVAL, fmt::format("Top image file {} not found", *req.top));
  }
  if (req.base_node && req.base)
    return fail(EINVAL, "'base-node' and 'base' are mutually exclusive");
  if (req.base_node) {
    p.base = graph.find(*req.base_node);
    if (!p.base)
      return fail(EINVAL, fmt::format("Cannot find device='' nor node-name='{}'", *req.base_node));
    if (!chain_contains(p.top, p.base))
      return fail(EINVAL, fmt::format("'{}' is not in this backing file chain", *req.base_node));
  } else if (req.base) {
    p.base = find_by_filename(p.top, *req.base, filename_of, true);
    if (!p.base)
      return fail(EINVAL, fmt::format("Can't find '{}' in the backing chain", *req.base));
  } else {
    p.base = p.top;  // the bottom of the chain; top itself when it has no backing
    while (p.base->backing()) p.base = p.base->backing();
  }
  for (Node* i = p.top;; i = i->backing()) {
    if (const Child* c = job_edge(*i)) return fail(EBUSY, busy_message(*i, *c));
    if (i == p.base) break;
  }
  if (p.top == p.base) return fail(EINVAL, "cannot commit an image into itself");
  // As QEMU: active commit when top is the device or someone writes to it
  // (copying under a writer needs the mirror's dirty tracking).
  p.active = p.top == p.device || (p.top->cumulative_perms().need & kPermWrite);
  if (p.active && req.backing_file_given)
    return fail(EINVAL, p.top == p.device
                            ? "'backing-file' specified, but 'top' is the active layer"
                            : "'backing-file' specified, but 'top' has a writer on it");
  if (!p.active) {
    for (Node* i = p.device; i; i = i->backing()) {
      if (i->backing() == p.top) {
        p.overlay = i;
        break;
      }
    }
    if (const Child* c = job_edge(*p.overlay)) return fail(EBUSY, busy_message(*p.overlay, *c));
  }
  p.base_depth = 1;
  for (Node* i = p.top; i != p.base; i = i->backing()) {
    p.removed.push_back(i);
    ++p.base_depth;
  }
  return p;
}

}  // namespace blkmirror
