// NBD meta contexts end to end with libnbd: base:allocation and
// qemu:allocation-depth negotiated together, each answered in its own
// block-status chunk from one walk over a device that reports chain depths;
// and qemu:allocation-depth absent when the export does not offer it.
#include <libnbd.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "blockdev/wrapper.h"
#include "harness.h"
#include "nbd/server/nbd_server.h"

namespace blkmirror::test {
namespace {

// A device whose extents say which chain layer provides them: [0,1M) layer 1,
// [1M,2M) layer 2 (a backing file), [2M,3M) layer 3, the rest nowhere (0, a
// hole that reads as zeroes). Extents are cut at 256 KiB so that neighbouring
// equal extents must merge on the wire.
class ChainDepthDevice : public BlockDeviceWrapper {
 public:
  using BlockDeviceWrapper::BlockDeviceWrapper;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override {
    constexpr uint64_t kMiB = 1 << 20, kPiece = 256 << 10;
    uint32_t depth = off < 3 * kMiB ? static_cast<uint32_t>(off / kMiB + 1) : 0;
    uint64_t piece_end = (off / kPiece + 1) * kPiece;
    Extent e;
    e.length = std::min(len, piece_end - off);
    e.depth = depth;
    e.allocated = depth != 0;
    e.zero = depth == 0;
    co_return e;
  }
};

struct Seen {
  std::vector<std::pair<uint32_t, uint32_t>> alloc, depth;  // (length, flags)
};

int collect(void* user, const char* ctx, uint64_t, uint32_t* entries, size_t n, int*) {
  auto* seen = static_cast<Seen*>(user);
  auto& out = std::strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0 ? seen->alloc : seen->depth;
  for (size_t i = 0; i + 1 < n; i += 2) out.emplace_back(entries[i], entries[i + 1]);
  return 0;
}

std::string temp_socket(const char* tag) {
  return fmt::format("/tmp/blkmirror-test-{}-{}.sock", tag, ::getpid());
}

// Serves a ChainDepthDevice (allocation_depth as given) and runs client on a
// thread against its URI.
void serve_and_run(bool allocation_depth, const std::function<void(const std::string&)>& client) {
  Loop loop(2);
  Graph graph;
  auto dev =
      std::make_shared<ChainDepthDevice>(std::make_shared<MemoryDevice>(4 << 20, memory_opts()));
  ASSERT_TRUE(graph.add("disk", dev));
  nbd::NbdServer server(loop, graph);
  ASSERT_TRUE(server.add_export({"disk", "disk", "", false, allocation_depth}));
  std::string sock = temp_socket(allocation_depth ? "meta1" : "meta0");
  ASSERT_TRUE(server.listen_unix(sock));
  std::atomic<bool> done{false};
  std::thread t([&] {
    client(fmt::format("nbd+unix:///disk?socket={}", sock));
    done = true;
  });
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    bool ok = co_await wait_until([&] { return done.load(); });
    co_await server.stop();
    co_return ok;
  }()));
  t.join();
}

TEST(NbdMetaContext, BaseAllocationAndAllocationDepthTogether) {
  Seen seen, one;
  std::string failure;
  serve_and_run(true, [&](const std::string& uri) {
    nbd_handle* h = nbd_create();
    nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    nbd_add_meta_context(h, "qemu:allocation-depth");
    if (nbd_connect_uri(h, uri.c_str()) != 0) {
      failure = nbd_get_error();
    } else {
      if (nbd_can_meta_context(h, "qemu:allocation-depth") != 1) failure = "depth not negotiated";
      if (nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1)
        failure = "base not negotiated";
      nbd_extent_callback cb{.callback = collect, .user_data = &seen, .free = nullptr};
      if (nbd_block_status(h, 4 << 20, 0, cb, 0) != 0) failure = nbd_get_error();
      nbd_extent_callback cb1{.callback = collect, .user_data = &one, .free = nullptr};
      if (nbd_block_status(h, 1 << 20, 1536 << 10, cb1, LIBNBD_CMD_FLAG_REQ_ONE) != 0)
        failure = nbd_get_error();
      nbd_shutdown(h, 0);
    }
    nbd_close(h);
  });
  ASSERT_EQ(failure, "");
  using V = std::vector<std::pair<uint32_t, uint32_t>>;
  constexpr uint32_t kMiB = 1 << 20;
  EXPECT_EQ(seen.depth, (V{{kMiB, 1}, {kMiB, 2}, {kMiB, 3}, {kMiB, 0}}));
  EXPECT_EQ(seen.alloc, (V{{3 * kMiB, 0}, {kMiB, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO}}));
  // REQ_ONE: one extent per context, not merged past the device's extent.
  EXPECT_EQ(one.depth, (V{{256 << 10, 2}}));
  EXPECT_EQ(one.alloc, (V{{256 << 10, 0}}));
}

TEST(NbdMetaContext, AllocationDepthOnlyWhenTheExportOffersIt) {
  int can_depth = -1, can_base = -1;
  std::string listed;
  serve_and_run(false, [&](const std::string& uri) {
    nbd_handle* h = nbd_create();
    nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    nbd_add_meta_context(h, "qemu:allocation-depth");
    if (nbd_connect_uri(h, uri.c_str()) == 0) {
      can_depth = nbd_can_meta_context(h, "qemu:allocation-depth");
      can_base = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
      nbd_shutdown(h, 0);
    }
    nbd_close(h);
  });
  EXPECT_EQ(can_depth, 0);
  EXPECT_EQ(can_base, 1);
}

}  // namespace
}  // namespace blkmirror::test
