// Daemon::reopen_read_only: a format node and its file node switched between
// read-only and read-write together, all or nothing, with QEMU's refusals.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "qcow2_util.h"
#include "qmp/daemon.h"

namespace blkmirror::test {
namespace {

using qmp::Daemon;
using qmp::Json;

// A daemon over a two-image chain: top.qcow2 (node "top", its file "top-file")
// over base.qcow2, which the header names (opened read-only, implicitly).
struct ChainFixture {
  TempDir dir;
  Loop loop;
  Daemon d{loop};
  std::string base = dir / "base.qcow2", top = dir / "top.qcow2";

  ChainFixture() {
    EXPECT_EQ(sh("qemu-img create -q -f qcow2 '" + base + "' 4M").status, 0);
    EXPECT_EQ(sh("qemu-io -f qcow2 -c 'write -P 0x11 0 1M' '" + base + "'").status, 0);
    EXPECT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -b '{}' -F qcow2 '{}'", base, top))
                  .status,
              0);
  }
  ~ChainFixture() { (void)loop.run(d.shutdown()); }

  std::string run(const std::string& cmd, Json args) {
    auto r = loop.run(d.execute(cmd, std::move(args)));
    return r ? "" : r.error().desc;
  }
  void add_top(bool read_only = false) {
    ASSERT_EQ(run("blockdev-add", {{"driver", "qcow2"},
                                   {"node-name", "top"},
                                   {"read-only", read_only},
                                   {"file", {{"driver", "file"}, {"filename", top}}}}),
              "");
  }
  Node& node(const std::string& n) { return *d.graph().find(n); }
  // The file node (driver file) of an image path.
  Node& file_node(const std::string& path) {
    for (Node* n : d.graph().nodes())
      if (dynamic_cast<FileDevice*>(&n->device()) && n->device().describe() == path) return *n;
    ADD_FAILURE() << "no file node for " << path;
    std::abort();
  }
  std::string reopen(const std::string& n, bool ro) {
    auto r = loop.run(d.reopen_read_only(n, ro));
    return r ? "" : r.error().desc;
  }
};

TEST(DaemonReopen, BackingNodeReadWriteAndBackWithItsFile) {
  ChainFixture f;
  f.add_top();
  Node* b = f.node("top").backing();
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(b->device().caps().read_only);
  Node& bfile = f.file_node(f.base);
  // Read-only, the base can be checked and read by others.
  EXPECT_EQ(sh("qemu-img check -f qcow2 '" + f.base + "'").status, 0);

  EXPECT_EQ(f.reopen(b->name(), false), "");
  EXPECT_FALSE(b->device().caps().read_only);
  EXPECT_FALSE(bfile.device().caps().read_only);
  // The image lock says we write it now.
  auto r = sh("qemu-img check -f qcow2 '" + f.base + "'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("Failed to get shared \"write\" lock"), std::string::npos) << r.out;
  // Written through the graph like a commit job would.
  auto edge = f.d.graph().attach(b, "test");
  std::vector<std::byte> buf(65536, std::byte{0x22});
  ASSERT_TRUE(f.loop.run(edge->write(2 << 20, buf)));
  edge.reset();

  EXPECT_EQ(f.reopen(b->name(), true), "");
  EXPECT_TRUE(b->device().caps().read_only);
  EXPECT_TRUE(bfile.device().caps().read_only);
  r = sh("qemu-img check -f qcow2 '" + f.base + "'");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(sh("qemu-io -r -f qcow2 -c 'read -P 0x22 2M 64k' -c 'read -P 0x11 0 1M' '" + f.base +
               "'")
                .status,
            0);
  // The top still reads the base's data through its backing edge.
  std::vector<std::byte> got(65536);
  auto client = f.d.graph().attach(&f.node("top"), "reader");
  ASSERT_TRUE(f.loop.run(client->read(2 << 20, got)));
  EXPECT_EQ(got, buf);
}

TEST(DaemonReopen, ReadOnlyRefusedWhileAParentWrites) {
  ChainFixture f;
  f.add_top();
  auto writer = f.d.graph().attach(&f.node("top"), "client");
  EXPECT_EQ(f.reopen("top", true), "Read-only block node 'top' cannot support read-write users");
  EXPECT_FALSE(f.node("top").device().caps().read_only);
  std::vector<std::byte> buf(4096, std::byte{1});
  EXPECT_TRUE(f.loop.run(writer->write(0, buf)));
  writer.reset();
  EXPECT_EQ(f.reopen("top", true), "");
  EXPECT_EQ(f.reopen("top", false), "");  // and back, the file node with it
  EXPECT_FALSE(f.file_node(f.top).device().caps().read_only);
}

TEST(DaemonReopen, ReadWriteRefusedByAnotherUsersLockChangesNothing) {
  ChainFixture f;
  f.add_top();
  Node* b = f.node("top").backing();
  ASSERT_NE(b, nullptr);
  // Another reader of base.qcow2 that forbids writers (a second open file).
  auto other = FileDevice::open(f.loop, f.base, FileOptions{.read_only = true});
  ASSERT_TRUE(other);
  EXPECT_EQ(f.reopen(b->name(), false),
            fmt::format("Failed to get \"write\" lock. Is another process using the image [{}]?",
                        f.base));
  EXPECT_TRUE(b->device().caps().read_only);
  EXPECT_TRUE(f.file_node(f.base).device().caps().read_only);
  other->reset();
  EXPECT_EQ(f.reopen(b->name(), false), "");
}

TEST(DaemonReopen, ReadWriteRefusedByAPermissionConflictChangesNothing) {
  ChainFixture f;
  ASSERT_EQ(f.run("blockdev-add", {{"driver", "file"},
                                   {"node-name", "bf"},
                                   {"filename", f.base},
                                   {"read-only", true}}),
            "");
  for (const char* n : {"a", "b"})
    ASSERT_EQ(f.run("blockdev-add", {{"driver", "qcow2"},
                                     {"node-name", n},
                                     {"file", "bf"},
                                     {"read-only", true}}),
              "");
  EXPECT_EQ(f.reopen("a", false),
            "Permission conflict on node 'bf': permissions 'write, resize' are both required by "
            "node 'a' (uses node 'bf' as 'file' child) and unshared by node 'b' (uses node 'bf' "
            "as 'file' child).");
  EXPECT_TRUE(f.node("a").device().caps().read_only);
  EXPECT_TRUE(f.node("bf").device().caps().read_only);
  EXPECT_EQ(f.d.graph().check_perms().has_value(), true);
  ASSERT_EQ(f.run("blockdev-del", {{"node-name", "b"}}), "");
  EXPECT_EQ(f.reopen("a", false), "");
}

TEST(DaemonReopen, UnknownNodeAndDriversThatCannotReopen) {
  ChainFixture f;
  EXPECT_EQ(f.reopen("nope", false), "Failed to find node with node-name='nope'");
  ASSERT_EQ(f.run("blockdev-add", {{"driver", "null-co"}, {"node-name", "z"}, {"size", 1 << 20},
                                   {"read-only", true}}),
            "");
  EXPECT_EQ(f.reopen("z", false), "");
  EXPECT_FALSE(f.node("z").device().caps().read_only);
}

}  // namespace
}  // namespace blkmirror::test
