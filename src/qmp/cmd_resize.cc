// block_resize / block-resize {device, node-name, size} as qemu-storage-daemon
// 7.2 takes it: the node is found by node-name (qemu-storage-daemon has no
// named devices, so `device` alone finds nothing, as there), refused while a
// job holds it or it is a backing file, then resized through a root edge that needs the resize
// permission, so an edge that does not share resizing (a job, a backing
// link) refuses it with the graph's permission text. Clients connected over
// NBD keep the size they negotiated; new connections see the new one (QEMU's
// NBD server behaves the same way).
//
// qcow2 nodes grow only (their L1 table grows when needed); shrinking one is
// refused, which QEMU allows when nothing is allocated past the new end.
#include <algorithm>

#include <fmt/format.h>

#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kResize = {
    {"device", Type::kString},
    {"node-name", Type::kString},
    {"size", Type::kInt, true},
};

}  // namespace

struct Daemon::ResizeCommands {
  static Task<QResult<Json>> block_resize(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::resize_commands() {
  static const Command table[] = {
      {"block_resize", &kResize, &ResizeCommands::block_resize},
      {"block-resize", &kResize, &ResizeCommands::block_resize},
  };
  return table;
}

Task<QResult<Json>> Daemon::ResizeCommands::block_resize(Daemon& d, Json& a, const Call&) {
  const std::string device = a.value("device", "");
  const std::string node_name = a.value("node-name", "");
  Node* n = a.contains("node-name") ? d.graph_.find(node_name) : nullptr;
  if (!n)
    co_return generic_error(
        fmt::format("Cannot find device='{}' nor node-name='{}'", device, node_name));
  const int64_t size = a["size"].get<int64_t>();
  if (size < 0) co_return generic_error("Parameter 'size' expects a >0 size");
  // QEMU's op blockers: a job's nodes and every backing file refuse resizing.
  const bool backing = std::ranges::any_of(
      n->parents(), [](const Child* c) { return c->kind() == EdgeKind::kBacking; });
  if (job_edge(*n) || backing)
    co_return generic_error(
        fmt::format("Device '{}' is in use", a.contains("device") ? device : "(null)"));
  auto edge = d.graph_.attach(
      n, "resize", EdgeUse{"block device", "root", Perms{kPermResize, kPermAll}});
  if (!edge) co_return generic_error(edge.error().message());
  if (n->device().caps().read_only) co_return generic_error("Image is read-only");
  if (static_cast<uint64_t>(size) == n->device().length()) co_return Json::object();
  if (auto r = co_await (*edge)->resize(static_cast<uint64_t>(size)); !r)
    co_return generic_error(r.error().message());
  co_return Json::object();
}

}  // namespace blkmirror::qmp
