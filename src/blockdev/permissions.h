// Permissions on graph edges, as QEMU's block layer has them (BLK_PERM_*): each
// Child edge declares what its parent needs from the node (`need`) and what it
// lets the node's other parents do meanwhile (`shared`). A node is consistent
// when, for every two parents a and b, everything b needs is shared by a.
// The graph checks this whenever an edge is attached, changes its permissions or
// moves (Graph::replace), and refuses the change with QEMU's text otherwise.
//
// Edges a node holds to other nodes (raw's `file`, later qcow2's `backing`) do
// not declare fixed permissions: their EdgeKind derives them from what the
// node's own parents need (docs/design/permissions.md has the table).
//
// The same bits name the byte-range locks on image files (image_lock.h):
// bit i locks byte 100 + i ("I use it") or 200 + i ("I do not share it").
//
// Plain data and pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>

namespace blkmirror {

// Bit values are QEMU's (include/block/block-common.h), in the same order, so
// lock byte offsets agree with QEMU's file-posix driver.
enum Perm : uint32_t {
  kPermConsistentRead = 1u << 0,  // reads return the node's real, consistent data
  kPermWrite = 1u << 1,           // writes that change what readers see
  kPermWriteUnchanged = 1u << 2,  // writes that never change the data (copy-on-read)
  kPermResize = 1u << 3,          // changes the node's length
  kPermAll = (1u << 4) - 1,
};
inline constexpr unsigned kPermCount = 4;

struct Perms {
  uint32_t need = 0;
  uint32_t shared = kPermAll;
};

// What an edge from a node to its child is for; decides the child's permissions
// from the node's cumulative ones (EdgeKind::kRoot: an edge from outside the
// graph, an export or a job, with its own declared Perms).
enum class EdgeKind {
  kRoot,
  kFilteredFile,  // raw / blkdebug image: passes its parents' needs through
  kBacking,       // a backing file read through a copy-on-write format
};

// "consistent read, write": QEMU's bdrv_perm_names.
std::string perm_names(uint32_t perms);

// The child's permissions for an edge of `kind` from a node whose parents need
// `parent` (cumulative: need ORed, shared ANDed), and which may write only when
// `node_writable`. kRoot edges keep their declared Perms: never call it for them.
Perms derive_child_perms(EdgeKind kind, Perms parent, bool node_writable);

}  // namespace blkmirror
