// The persistent dirty bitmaps of the images a CLI command opened: its qcow2
// bitmaps extension, or a local raw file's side file (journal/bitmap_file.h).
// An NBD export, an rbd image or a block device keeps none.
//
// Every CLI command that may write an image it opened itself (mirror's DST, and
// SRC when served; serve's IMAGE; verify --repair's DST; bitmap's IMAGE) goes
// through one CliImageBitmaps, so what it writes is recorded in the image's
// enabled bitmaps and the bitmaps are left consistent at a clean end:
//   1. attach() when the image's node joins the command's graph: a writable
//      open marks the stored bitmaps in use on disk first, then they load into
//      the node, which records every write from then on;
//   2. store() at the clean end, before the images close: written back,
//      in-use cleared. A command that gives up on bad input before its work
//      (nothing written) has them stored by the destructor.
// A crash between the two leaves them in use: the next open loads them
// inconsistent (QEMU's rule). `blkmirror commit` opens its chain through the
// in-process QMP daemon, whose blockdev-add and shutdown do the same.
//
// Threading rule: the thread that runs the Loop; attach() and the destructor
// between Loop::run calls, store() inside one.
#pragma once

#include <string>

#include "bitmap/bitmap_store.h"
#include "blockdev/graph.h"
#include "cli/device_spec.h"
#include "io/loop.h"

namespace blkmirror {

// The image's store, or nullptr when it cannot keep bitmaps. writable: the
// image was opened read-write (its bitmaps are then marked in use until
// stored). One-line errors naming the image. Which store an image has:
// CliImageBitmaps::attach() asks here.
Result<BitmapStorePtr> open_image_bitmaps(const OpenedDevice& d, const std::string& spec,
                                          bool writable);

class CliImageBitmaps {
 public:
  // graph: the command's; declare this after the graph and the opened images
  // (it is destroyed first).
  CliImageBitmaps(Loop& loop, Graph& graph) : loop_(loop), graph_(graph) {}
  ~CliImageBitmaps();
  CliImageBitmaps(const CliImageBitmaps&) = delete;
  CliImageBitmaps& operator=(const CliImageBitmaps&) = delete;

  // Opens d's store (spec: the path d was opened from) and loads its bitmaps
  // into node, which keeps the store. writable as d was opened. An image
  // without a store: nothing. One-line errors naming the image.
  Result<void> attach(Node& node, const OpenedDevice& d, const std::string& spec, bool writable);

  // Stores the bitmaps of every node of the graph that has a store. Every node
  // is tried; the first error, naming its image.
  Task<Result<void>> store();

 private:
  Loop& loop_;
  Graph& graph_;
  bool attached_ = false;
  bool stored_ = false;
};

}  // namespace blkmirror
