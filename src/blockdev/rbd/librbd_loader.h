// librbd and librados, loaded on first use rather than linked.
//
// Linked, they cost every blkmirror process about 50 ms before main(): thirty
// more libraries are mapped and relocated, and libceph-common builds its whole
// table of configuration options in static constructors - for a copy of a local
// file or a `blkmirror --version` just the same (measured: `blkmirror --version`
// took 68 ms of wall time, 4 ms of it the dynamic loader's own work and most of
// the rest Ceph's constructors and the page faults of mapping them).
//
// The rbd code calls librbd's C API as <rbd/librbd.h> and <rados/librados.h>
// declare it. librbd_loader.cc defines each function it uses as a forwarder
// into librbd.so.1 / librados.so.2, opened with dlopen() the first time
// load_librbd() runs. rbd_connect_blocking() calls it before anything else, so
// a machine without the libraries gets one clear line on the first rbd: image
// and never a failed start-up.
//
// Threading rule: any thread (the load runs once, under a function-local static).
#pragma once

#include <string>

#include "base/result.h"

namespace blkmirror {

// Opens librados and librbd and resolves every function blkmirror calls; the
// error names the library and dlopen's or dlsym's reason. Later calls return
// the first call's result.
Result<void> load_librbd();

}  // namespace blkmirror
