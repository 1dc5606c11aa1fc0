// BitmapStore: where a node's persistent dirty bitmaps live between opens: the
// qcow2 bitmaps extension (blockdev/qcow2/bitmap_io.cc) or, for a raw image, a
// side file next to it (journal/bitmap_file.h). docs/design/dirty-bitmaps.md
// ("Persistence") describes both.
//
// Contract, as QEMU keeps its persistent bitmaps:
//   - The store was opened with its image. A writable store marks every stored
//     bitmap in use on disk before the image takes its first write, so a crash
//     leaves them marked; load() then returns those as inconsistent (listed,
//     refused for use, removable), the others with their bits.
//   - store() writes every persistent, consistent bitmap of the set and clears
//     their in-use marks (a clean close); inconsistent ones stay as found;
//     stored bitmaps with no persistent counterpart in the set are removed.
//   - remove() takes one bitmap out of the store now (block-dirty-bitmap-remove).
//
// Threading rule: loop thread only. REQUIRES for store()/remove(): no write in
// flight on the node (its bits must not move meanwhile).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "base/task.h"
#include "bitmap/named_bitmap.h"

namespace blkmirror {

class BitmapStore {
 public:
  virtual ~BitmapStore() = default;

  // Every stored bitmap, oldest first, marked persistent (and read_only when the
  // store cannot be written).
  virtual Task<Result<std::vector<NamedBitmap>>> load() = 0;
  // Why a new persistent bitmap of that name and granularity cannot be stored
  // next to the persistent ones of `set` (QEMU's reasons), or nothing.
  virtual Result<void> can_store(const BitmapSet& set, const std::string& name,
                                 uint64_t granularity) const = 0;
  virtual Task<Result<void>> store(const BitmapSet& set) = 0;
  virtual Task<Result<void>> remove(const std::string& name) = 0;
};

using BitmapStorePtr = std::shared_ptr<BitmapStore>;

}  // namespace blkmirror
