// The persistent dirty bitmaps of an image the CLI opened (mirror's SRC and
// DST, bitmap's IMAGE): its qcow2 bitmaps extension, or a local raw file's side
// file (journal/bitmap_file.h). An NBD export or a block device keeps none.
//
// Threading rule: call on the thread that runs the Loop, between Loop::run calls.
#pragma once

#include <string>

#include "bitmap/bitmap_store.h"
#include "blockdev/graph.h"
#include "cli/device_spec.h"
#include "io/loop.h"

namespace blkmirror {

// The image's store, or nullptr when it cannot keep bitmaps. writable: the
// image was opened read-write (its bitmaps are then marked in use until
// store_image_bitmaps). One-line errors naming the image.
Result<BitmapStorePtr> open_image_bitmaps(const OpenedDevice& d, const std::string& spec,
                                          bool writable);

// Loads the store's bitmaps into node (which keeps the store). No store: nothing.
Result<void> load_image_bitmaps(Loop& loop, Node& node, BitmapStorePtr store);

}  // namespace blkmirror
