// Daemon::reopen_read_only: a node and its file node switched between
// read-only and read-write as one step, all or nothing (QEMU's bdrv_reopen of
// the read-only flag with its file child following).
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

constexpr uint32_t kWriting = kPermWrite | kPermResize;

// Holds a node drained for the scope: no request of its parents in flight
// while its device swaps descriptors and caps.
struct DrainScope {
  Node* node = nullptr;
  ~DrainScope() {
    if (node) node->undrain();
  }
};

// The device of x reopened with x drained alone. A format node's own requests
// to its file go through that file's node: draining the file for the whole
// reopen would stall the format's write-back (and its header read).
Task<Result<void>> set_device_read_only(Node* x, bool ro) {
  co_await x->drain();
  DrainScope scope{x};
  co_return co_await x->device().set_read_only(ro);
}

// The edges of node `n` that write, except `skip` (the format node's own file
// edge, which follows the format).
bool has_writer(const Node& n, const Child* skip) {
  for (const Child* c : n.parents())
    if (c != skip && (c->perms().need & kWriting)) return true;
  return false;
}

}  // namespace

QmpError Daemon::reopen_error(const Node& n, const Error& e) const {
  if (e.errnum() == ENOTSUP) {
    auto it = nodes_.find(n.name());
    std::string drv = it != nodes_.end() ? it->second.driver : "file";
    return QmpError{"GenericError",
                    fmt::format("Block format '{}' used by node '{}' does not support reopening "
                                "files",
                                drv, n.name())};
  }
  // Lock conflicts and qcow2's refusals are worded already; a failed open()
  // reads as QEMU's file-posix reopen.
  if (e.plain) return QmpError{"GenericError", e.message()};
  return QmpError{"GenericError", fmt::format("Could not reopen file: {}", e.reason())};
}

Task<QResult<void>> Daemon::reopen_read_only(const std::string& name, bool read_only) {
  Node* n = graph_.find(name);
  if (!n)
    co_return generic_error(fmt::format("Failed to find node with node-name='{}'", name));
  if (n->device().caps().read_only == read_only) co_return QResult<void>{};
  auto it = nodes_.find(name);
  if (it == nodes_.end())
    co_return generic_error(fmt::format("Block format 'file' used by node '{}' does not support "
                                        "reopening files",
                                        name));
  NodeRecord& rec = it->second;
  Node* file = rec.file_edge ? &rec.file_edge->node() : nullptr;
  // if/else, not ?: (GCC 12 rule 1, base/task.h).
  QResult<void> r;
  if (read_only)
    r = co_await reopen_to_read_only(*n, rec, file);
  else
    r = co_await reopen_read_write(*n, rec, file);
  if (r) {
    if (auto p = graph_.check_perms(); !p)  // cannot happen: every step was checked
      spdlog::error("after reopening node '{}': {}", name, p.error().message());
  }
  co_return r;
}

Task<QResult<void>> Daemon::reopen_read_write(Node& n, NodeRecord& rec, Node* file) {
  // A format node's own edge to its file (qcow2's, declared) asks for write
  // now: refused here, before any device changes, when another parent of the
  // file does not share it. raw's derived edge follows the node by itself.
  Child* fe = rec.file_edge.get();
  const bool declared = fe && fe->kind() == EdgeKind::kRoot;
  const Perms old_perms = declared ? fe->perms() : Perms{};
  if (declared) {
    Perms p = old_perms;
    p.need |= kPermWrite | kPermResize;
    if (auto s = fe->set_perms(p); !s) co_return generic_error(s.error().message());
  }
  auto undo_perms = [&] {
    if (declared) (void)fe->set_perms(old_perms);
  };
  co_await n.drain();
  DrainScope scope{&n};
  const bool file_was_ro = file && file->device().caps().read_only;
  if (file_was_ro) {
    if (auto r = co_await set_device_read_only(file, false); !r) {
      undo_perms();
      co_return tl::unexpected(reopen_error(*file, r.error()));
    }
  }
  if (auto r = co_await n.device().set_read_only(false); !r) {
    QmpError e = reopen_error(n, r.error());
    if (file_was_ro) {
      if (auto b = co_await set_device_read_only(file, true); !b)
        spdlog::error("reopen of '{}' failed and its file '{}' stays read-write: {}", n.name(),
                      file->name(), b.error().message());
    }
    undo_perms();
    co_return tl::unexpected(e);
  }
  rec.read_only = false;
  // The image marked its bitmaps in use again (set_read_only): they record.
  for (NamedBitmap& b : n.bitmaps()) b.read_only = false;
  if (file_was_ro)
    if (auto f = nodes_.find(file->name()); f != nodes_.end()) f->second.read_only = false;
  co_return QResult<void>{};
}

Task<QResult<void>> Daemon::reopen_to_read_only(Node& n, NodeRecord& rec, Node* file) {
  Child* fe = rec.file_edge.get();
  // QEMU's bdrv_node_refresh_perm text for a node that would lose a writer.
  auto writers = [](const Node& x) {
    return generic_error(
        fmt::format("Read-only block node '{}' cannot support read-write users", x.name()));
  };
  if (has_writer(n, nullptr)) co_return writers(n);
  // The file follows to read-only unless something else writes it (then it
  // stays read-write, as QEMU keeps a child whose other parents write it).
  const bool file_follows = file && !file->device().caps().read_only && !has_writer(*file, fe);
  co_await n.drain();
  DrainScope scope{&n};
  // Persistent bitmaps are written back while the image still takes writes,
  // then kept read-only, as QEMU's qcow2_reopen_bitmaps_ro().
  if (auto r = co_await store_bitmaps(n); !r)
    co_return tl::unexpected(reopen_error(n, r.error()));
  if (auto r = co_await n.device().set_read_only(true); !r)
    co_return tl::unexpected(reopen_error(n, r.error()));
  for (NamedBitmap& b : n.bitmaps()) b.read_only = b.read_only || b.persistent;
  const bool declared = fe && fe->kind() == EdgeKind::kRoot;
  const Perms old_perms = declared ? fe->perms() : Perms{};
  if (declared) {
    // Fewer needs than before: cannot conflict.
    (void)fe->set_perms(Perms{old_perms.need & ~kWriting, old_perms.shared});
  }
  if (file_follows) {
    if (auto r = co_await set_device_read_only(file, true); !r) {
      QmpError e = reopen_error(*file, r.error());
      if (declared) (void)fe->set_perms(old_perms);
      if (auto b = co_await n.device().set_read_only(false); !b)
        spdlog::error("reopen of '{}' failed half-way: it stays read-only: {}", n.name(),
                      b.error().message());
      co_return tl::unexpected(e);
    }
    if (auto f = nodes_.find(file->name()); f != nodes_.end()) f->second.read_only = true;
  }
  rec.read_only = true;
  co_return QResult<void>{};
}

}  // namespace blkmirror::qmp
