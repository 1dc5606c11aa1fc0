// Permissions on graph edges (blockdev/permissions.h): conflicts refused with
// QEMU's text, derived permissions through filter edges, a mirror's target
// refusing other writers, replace() checked, `replaces` validated.
#include <gtest/gtest.h>

#include "blockdev/raw_device.h"
#include "harness.h"

namespace blkmirror::test {
namespace {

constexpr uint64_t kSize = 1 << 20;

Perms reader() { return Perms{kPermConsistentRead, kPermAll & ~kPermResize}; }
Perms writer() { return Perms{kPermConsistentRead | kPermWrite, kPermAll & ~kPermResize}; }

struct G {
  Loop loop{1};
  Graph graph;
  Node* add(const std::string& name) {
    auto n = graph.add(name, std::make_shared<MemoryDevice>(kSize));
    EXPECT_TRUE(n);
    return *n;
  }
};

TEST(Permissions, Names) {
  EXPECT_EQ(perm_names(kPermWrite), "write");
  EXPECT_EQ(perm_names(kPermConsistentRead | kPermWrite | kPermResize),
            "consistent read, write, resize");
  EXPECT_EQ(perm_names(0), "");
}

TEST(Permissions, WriterRefusedWhereWritesAreNotShared) {
  G g;
  Node* n = g.add("copy");
  auto job = g.graph.attach(n, "job j",
                            EdgeUse{"mirror job 'j'", "target",
                                    Perms{kPermWrite, kPermConsistentRead | kPermWriteUnchanged}});
  ASSERT_TRUE(job);
  auto exp = g.graph.attach(n, "export e", EdgeUse{"NBD export 'e'", "root", writer()});
  ASSERT_FALSE(exp);
  EXPECT_EQ(
      exp.error().message(),
      "Permission conflict on node 'copy': permissions 'write' are both required by NBD export 'e' "
      "(uses node 'copy' as 'root' child) and unshared by mirror job 'j' (uses node 'copy' as "
      "'target' child).");
  EXPECT_EQ(n->parents().size(), 1u);  // the refused edge is gone
  // A reader is fine.
  EXPECT_TRUE(g.graph.attach(n, "export r", EdgeUse{"NBD export 'r'", "root", reader()}));
}

TEST(Permissions, SameTextWhicheverCameFirst) {
  G g;
  Node* n = g.add("copy");
  auto exp = g.graph.attach(n, "export e", EdgeUse{"NBD export 'e'", "root", writer()});
  ASSERT_TRUE(exp);
  auto job = g.graph.attach(n, "job j",
                            EdgeUse{"mirror job 'j'", "target",
                                    Perms{kPermWrite, kPermConsistentRead | kPermWriteUnchanged}});
  ASSERT_FALSE(job);
  EXPECT_NE(job.error().message().find("permissions 'write' are both required by NBD export 'e'"),
            std::string::npos)
      << job.error().message();
}

TEST(Permissions, FilterEdgePassesNeedsThrough) {
  G g;
  Node* file = g.add("file");
  // A raw node over `file`, as blockdev-add builds it.
  auto edge = g.graph.attach_child(file, "raw node raw", EdgeUse{"node 'raw'", "file", {}},
                                   EdgeKind::kFilteredFile);
  auto raw = g.graph.add("raw", std::make_shared<RawDevice>(edge.get(), false));
  ASSERT_TRUE(raw);
  g.graph.adopt(*raw, edge.get());
  EXPECT_EQ(edge->perms().need, 0u);  // nobody uses raw yet
  // A mirror writing raw forbids other writers on file too.
  auto job = g.graph.attach(
      *raw, "job j", EdgeUse{"mirror job 'j'", "target", Perms{kPermWrite, kPermConsistentRead}});
  ASSERT_TRUE(job);
  EXPECT_EQ(edge->perms().need, kPermWrite);
  auto exp = g.graph.attach(file, "export e", EdgeUse{"NBD export 'e'", "root", writer()});
  ASSERT_FALSE(exp);
  EXPECT_NE(exp.error().message().find("unshared by node 'raw' (uses node 'file' as 'file' child)"),
            std::string::npos)
      << exp.error().message();
  job->reset();
  EXPECT_TRUE(g.graph.attach(file, "export e", EdgeUse{"NBD export 'e'", "root", writer()}));
}

TEST(Permissions, BackingEdgeOnlyReads) {
  Perms p = derive_child_perms(EdgeKind::kBacking, writer(), true);
  EXPECT_EQ(p.need, kPermConsistentRead);
  // Parents that accept others' writes accept a changing backing file too;
  // parents that forbid them (a mirror target) forbid writes to it.
  EXPECT_EQ(p.shared & kPermWrite, kPermWrite);
  Perms strict =
      derive_child_perms(EdgeKind::kBacking, Perms{kPermWrite, kPermConsistentRead}, true);
  EXPECT_EQ(strict.need, 0u);
  EXPECT_EQ(strict.shared & (kPermWrite | kPermResize), 0u);
  Perms ro = derive_child_perms(EdgeKind::kFilteredFile, writer(), false);
  EXPECT_EQ(ro.need, kPermConsistentRead);  // a read-only node never writes its file
}

TEST(Permissions, SetPermsRefusedAndRestored) {
  G g;
  Node* n = g.add("n");
  auto a = g.graph.attach(n, "a", EdgeUse{"a", "root", reader()});
  auto b = g.graph.attach(n, "b", EdgeUse{"b", "root", writer()});
  ASSERT_TRUE(a && b);
  EXPECT_FALSE((*a)->set_perms(Perms{kPermConsistentRead, kPermConsistentRead}));
  EXPECT_EQ((*a)->perms().shared, reader().shared);
  EXPECT_TRUE((*b)->set_perms(reader()));
  EXPECT_TRUE((*a)->set_perms(Perms{kPermConsistentRead, kPermConsistentRead}));
}

TEST(Permissions, ReplaceRefusesAConflictAndMovesNothing) {
  G g;
  Node* from = g.add("from");
  Node* to = g.add("to");
  auto exp = g.graph.attach(from, "export e", EdgeUse{"NBD export 'e'", "root", writer()});
  auto hold = g.graph.attach(
      to, "job j", EdgeUse{"mirror job 'j'", "target", Perms{kPermWrite, kPermConsistentRead}});
  ASSERT_TRUE(exp && hold);
  g.loop.run([&]() -> Task<void> {
    co_await from->drain();
    co_await to->drain();
    auto r = g.graph.replace(from, to, {});
    EXPECT_FALSE(r);
    EXPECT_EQ(&(*exp)->node(), from);
    (void)(*hold)->set_perms(Perms{});
    EXPECT_TRUE(g.graph.replace(from, to, {}));
    EXPECT_EQ(&(*exp)->node(), to);
    from->undrain();
    to->undrain();
  }());
}

#ifndef NDEBUG
TEST(PermissionsDeathTest, ReplaceRequiresBothNodesDrained) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        G g;
        Node* from = g.add("from");
        Node* to = g.add("to");
        (void)g.graph.replace(from, to, {});
      },
      "REQUIRES both nodes drained");
}
#endif

// blockdev-mirror's `replaces`: only the source or a node below it through
// filters (QEMU's bdrv_recurse_can_replace).
struct MirrorG : G {
  MirrorParams params(const std::string& src, const std::string& tgt) {
    MirrorParams p;
    p.job_id = "j";
    p.device = src;
    p.target = tgt;
    return p;
  }
};

TEST(MirrorReplaces, UnrelatedNodeRefused) {
  MirrorG g;
  g.add("one");
  g.add("two");
  g.add("copy");
  auto p = g.params("one", "copy");
  p.replaces = "two";
  auto j = MirrorJob::create(g.loop, g.graph, p);
  ASSERT_FALSE(j);
  EXPECT_EQ(
      j.error().message(),
      "Cannot replace 'two' by a node mirrored from 'one', because it cannot be guaranteed that "
      "doing so would not lead to an abrupt change of visible data");
  EXPECT_TRUE(g.graph.find("two")->parents().empty());
}

TEST(MirrorReplaces, NodeBelowAFilterSourceAccepted) {
  MirrorG g;
  Node* file = g.add("file");
  auto edge = g.graph.attach_child(file, "raw node raw", EdgeUse{"node 'raw'", "file", {}},
                                   EdgeKind::kFilteredFile);
  auto raw = g.graph.add("raw", std::make_shared<RawDevice>(edge.get(), false));
  g.graph.adopt(*raw, edge.get());
  g.add("copy");
  auto p = g.params("raw", "copy");
  p.replaces = "file";
  auto j = MirrorJob::create(g.loop, g.graph, p);
  EXPECT_TRUE(j) << j.error().message();
  // And the other way round is refused: raw is above file, not below it.
  auto q = g.params("file", "copy");
  q.job_id = "k";
  q.replaces = "raw";
  j->reset();
  auto k = MirrorJob::create(g.loop, g.graph, q);
  ASSERT_FALSE(k);
  EXPECT_NE(k.error().message().find("Cannot replace 'raw' by a node mirrored from 'file'"),
            std::string::npos);
}

TEST(MirrorTarget, OtherWritersRefusedReadersAllowed) {
  MirrorG g;
  g.add("src");
  Node* copy = g.add("copy");
  auto j = MirrorJob::create(g.loop, g.graph, g.params("src", "copy"));
  ASSERT_TRUE(j);
  auto w = g.graph.attach(copy, "export w", EdgeUse{"NBD export 'w'", "root", writer()});
  ASSERT_FALSE(w);
  EXPECT_EQ(
      w.error().message(),
      "Permission conflict on node 'copy': permissions 'write' are both required by NBD export 'w' "
      "(uses node 'copy' as 'root' child) and unshared by mirror job 'j' (uses node 'copy' as "
      "'target' child).");
  EXPECT_TRUE(g.graph.attach(copy, "export r", EdgeUse{"NBD export 'r'", "root", reader()}));
}

}  // namespace
}  // namespace blkmirror::test
