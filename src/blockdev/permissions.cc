#include "blockdev/permissions.h"

namespace blkmirror {

std::string perm_names(uint32_t perms) {
  static constexpr const char* kNames[kPermCount] = {"consistent read", "write", "write unchanged",
                                                     "resize"};
  std::string out;
  for (unsigned i = 0; i < kPermCount; ++i) {
    if (!(perms & (1u << i))) continue;
    if (!out.empty()) out += ", ";
    out += kNames[i];
  }
  return out;
}

Perms derive_child_perms(EdgeKind kind, Perms parent, bool node_writable) {
  constexpr uint32_t kPassThrough = kPermConsistentRead | kPermWrite | kPermResize;
  Perms p;
  switch (kind) {
    case EdgeKind::kRoot:
      return parent;
    case EdgeKind::kFilteredFile:
      // The node's data is the child's data: whatever its parents need of it,
      // the child must allow, and what they forbid others, the child forbids.
      // Writes that change nothing are always fine (QEMU's filter default).
      p.need = parent.need & kPassThrough;
      p.shared = (parent.shared & kPassThrough) | kPermWriteUnchanged;
      break;
    case EdgeKind::kBacking:
      // A copy-on-write format only reads its backing file. The backing data
      // shows through every unallocated cluster, so others may change it only
      // when the node's own parents accept changing data (QEMU's COW default).
      p.need = parent.need & kPermConsistentRead;
      p.shared = kPermConsistentRead | kPermWriteUnchanged;
      if (parent.shared & kPermWrite) p.shared |= kPermWrite | kPermResize;
      break;
  }
  if (!node_writable) p.need &= ~(kPermWrite | kPermResize);
  return p;
}

}  // namespace blkmirror
