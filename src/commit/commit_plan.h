// CommitPlan: the nodes a block-commit acts on, resolved from its arguments by
// QEMU 7.2's rules and with its error texts (qmp_block_commit): the device (a
// root node), the top layer to commit (default: the device itself), the base
// it goes into (default: the bottom of the chain), and whether this is an
// active commit (top is the device, or someone writes to it: the mirror engine
// with a ready/complete step) or an intermediate one (a one-pass copy, then the
// overlay's backing link moves to the base). Shared by QMP and the CLI.
//
// Threading rule: loop thread (reads the graph).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "blockdev/graph.h"

namespace blkmirror {

struct CommitRequest {
  std::string device;
  std::optional<std::string> top_node, top;    // top: an image's file name
  std::optional<std::string> base_node, base;  // base: an image's file name
  bool backing_file_given = false;
};

struct CommitPlan {
  Node* device = nullptr;
  Node* top = nullptr;
  Node* base = nullptr;
  // Intermediate commit: the node whose backing is `top` (its backing link
  // moves to the base). nullptr for an active commit.
  Node* overlay = nullptr;
  bool active = false;
  // The layers that leave the chain: top down to the base's overlay.
  std::vector<Node*> removed;
  // The base's depth below top (top = 1), as block_status counts it.
  uint32_t base_depth = 0;
};

// The file name a node's image was opened from ("" when it has none): the
// caller's record (the daemon's node records).
using FilenameOf = std::function<std::string(const Node&)>;

// Errors (errnum, QEMU's text): ENODEV "Device 'x' not found" (QMP's
// DeviceNotFound class), EINVAL for the rest: "Need a root block node",
// "'top-node' and 'top' are mutually exclusive", "Top image file x not found",
// "'x' is not in this backing file chain", "Can't find 'x' in the backing chain",
// "cannot commit an image into itself", "'backing-file' specified, but 'top' is
// the active layer" / "... but 'top' has a writer on it", and EBUSY for a node
// a job holds.
Result<CommitPlan> plan_commit(Graph& graph, const CommitRequest& req,
                               const FilenameOf& filename_of);

}  // namespace blkmirror
