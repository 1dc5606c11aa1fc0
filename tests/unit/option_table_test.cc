// The mirror option table (mirror/option_table.h): one text per bad value,
// whether it came as command-line text (CLI, ctl), as a QMP value, or sat in
// MirrorParams (validate_params).
#include <gtest/gtest.h>

#include <set>

#include "mirror/mirror_params.h"
#include "mirror/option_table.h"

namespace blkmirror {
namespace {

const MirrorOption& opt(std::string_view name) {
  const MirrorOption* o = find_mirror_option(name);
  EXPECT_NE(o, nullptr) << name;
  return *o;
}

// The error a command line gets for `text`, or "" when accepted.
std::string cli_error(std::string_view name, std::string_view text) {
  const MirrorOption& o = opt(name);
  auto v = parse_option_text(o, text);
  if (!v) return v.error().message();
  MirrorParams p;
  auto r = set_option(p, o, *v, o.flag);
  return r ? "" : r.error().message();
}

// The error QMP gets for `v`, or "" when accepted.
std::string qmp_error(std::string_view name, OptionValue v) {
  const MirrorOption& o = opt(name);
  MirrorParams p;
  auto r = set_option(p, o, v, o.name);
  return r ? "" : r.error().message();
}

std::string validate_error(MirrorParams p) {
  auto r = validate_params(p);
  return r ? "" : r.error().message();
}

TEST(OptionTable, BadGranularityHasOneTextEverywhere) {
  const std::string range = "Parameter 'granularity' expects a value in range [512B, 64MB]";
  const std::string pow2 = "Parameter 'granularity' expects a power of 2";
  MirrorParams p;
  for (int64_t g : {int64_t{256}, int64_t{128} << 20, int64_t{-4096}}) {
    EXPECT_EQ(qmp_error("granularity", g), range) << g;
    EXPECT_EQ(cli_error("granularity", std::to_string(g)), range) << g;
    p.granularity = static_cast<uint64_t>(g);
    if (g > 0) {
      EXPECT_EQ(validate_error(p), range) << g;
    }
  }
  EXPECT_EQ(cli_error("granularity", "128M"), range);
  EXPECT_EQ(qmp_error("granularity", int64_t{3000}), pow2);
  EXPECT_EQ(cli_error("granularity", "3000"), pow2);
  p.granularity = 3000;
  EXPECT_EQ(validate_error(p), pow2);
}

TEST(OptionTable, GranularityZeroIsQmpsDefaultButNoCommandLineValue) {
  // QEMU's blockdev-mirror takes 0 as "the default"; a command line leaves the
  // option out for that, so its 0 is a mistake.
  EXPECT_EQ(qmp_error("granularity", int64_t{0}), "");
  EXPECT_EQ(cli_error("granularity", "0"),
            "Parameter 'granularity' expects a value in range [512B, 64MB]");
}

TEST(OptionTable, SizesTakeSuffixesAndNegativesGetTheRangeText) {
  const MirrorOption& g = opt("granularity");
  auto v = parse_option_text(g, "64K");
  ASSERT_TRUE(v);
  EXPECT_EQ(std::get<int64_t>(*v), 65536);
  MirrorParams p;
  ASSERT_TRUE(set_option(p, g, *v, g.flag));
  EXPECT_EQ(p.granularity, 65536u);
  EXPECT_EQ(cli_error("speed", "-1"), "Parameter 'speed' expects a non-negative value");
  EXPECT_EQ(qmp_error("speed", int64_t{-1}), "Parameter 'speed' expects a non-negative value");
  EXPECT_EQ(cli_error("buf-size", "-1M"), "Invalid parameter 'buf-size'");
  EXPECT_EQ(qmp_error("buf-size", int64_t{-1}), "Invalid parameter 'buf-size'");
  EXPECT_EQ(cli_error("speed", "fast"), "--speed: invalid size 'fast'");
  EXPECT_EQ(cli_error("granularity", "4Q"), "--granularity: invalid size suffix in '4Q'");
  EXPECT_EQ(cli_error("speed", "8192P"), "--speed: too large");
}

TEST(OptionTable, AdaptiveWindowIsNamedAsEachFrontEndSpellsIt) {
  EXPECT_EQ(cli_error("adaptive-window", "0"),
            "Parameter 'adaptive-window' expects a value in range [1, 3600000]");
  EXPECT_EQ(qmp_error("x-adaptive-window-ms", int64_t{0}),
            "Parameter 'x-adaptive-window-ms' expects a value in range [1, 3600000]");
  EXPECT_EQ(cli_error("adaptive-window", "3600001"),
            "Parameter 'adaptive-window' expects a value in range [1, 3600000]");
  EXPECT_EQ(cli_error("adaptive-window", "2s"), "--adaptive-window: '2s' is not a whole number");
  const MirrorOption& w = opt("adaptive-window");
  MirrorParams p;
  ASSERT_TRUE(set_option(p, w, int64_t{250}, w.flag));
  EXPECT_EQ(p.adaptive_window_ms, 250u);
  p.adaptive_window_ms = 0;
  EXPECT_EQ(validate_error(p),
            "Parameter 'x-adaptive-window-ms' expects a value in range [1, 3600000]");
}

TEST(OptionTable, WordsAreCheckedWithQemusTexts) {
  EXPECT_EQ(cli_error("copy-mode", "fast"), "Parameter 'copy-mode' does not accept value 'fast'");
  EXPECT_EQ(qmp_error("copy-mode", std::string("fast")),
            "Parameter 'copy-mode' does not accept value 'fast'");
  EXPECT_EQ(cli_error("on-target-error", "panic"),
            "Parameter 'on-target-error' does not accept value 'panic'");
  EXPECT_EQ(cli_error("sync", "incremental"), "Sync mode 'incremental' not supported");
  MirrorParams p;
  const MirrorOption& pol = opt("on-source-error");
  ASSERT_TRUE(set_option(p, pol, std::string("stop"), pol.name));
  EXPECT_EQ(p.on_source_error, ErrorPolicy::kStop);
  const MirrorOption& cm = opt("copy-mode");
  ASSERT_TRUE(set_option(p, cm, std::string("write-blocking"), cm.name));
  EXPECT_EQ(p.copy_mode, CopyMode::kWriteBlocking);
  // A word where a number belongs (QMP's schema refuses it first; the table too).
  EXPECT_EQ(qmp_error("speed", std::string("1")), "Invalid parameter type for 'speed'");
  EXPECT_EQ(qmp_error("unmap", int64_t{1}), "Invalid parameter type for 'unmap'");
}

TEST(OptionTable, EveryEntryIsComplete) {
  std::set<std::string_view> names, flags;
  for (const MirrorOption& o : mirror_options()) {
    EXPECT_TRUE(names.insert(o.name).second) << o.name;
    if (!o.flag.empty()) {
      EXPECT_TRUE(flags.insert(o.flag).second) << o.flag;
    }
    EXPECT_FALSE(o.help.empty()) << o.name;
    EXPECT_NE(o.store, nullptr) << o.name;
    bool number = o.type == OptionType::kSize || o.type == OptionType::kInteger;
    EXPECT_EQ(number, o.number != nullptr) << o.name;
    EXPECT_EQ(number, !o.range_error.empty()) << o.name;
    EXPECT_EQ(o.type == OptionType::kEnum, !o.words.empty()) << o.name;
    EXPECT_EQ(find_mirror_option(o.name), &o);
    if (!o.flag.empty()) {
      EXPECT_EQ(find_mirror_option(o.flag), &o);
    }
  }
  // The options every front end offers (issue 15: `ctl mirror` lacked the window).
  for (auto f : {"sync", "speed", "granularity", "buf-size", "on-source-error", "on-target-error",
                 "copy-mode", "adaptive-window"})
    EXPECT_TRUE(flags.count(f)) << f;
  EXPECT_EQ(find_mirror_option("no-such-option"), nullptr);
}

TEST(OptionTable, DefaultsOfTheTableAreTheJobsDefaults) {
  // An option left out leaves MirrorParams' default, which the help shows.
  MirrorParams p;
  EXPECT_EQ(opt("adaptive-window").default_text, std::to_string(kDefaultAdaptiveWindowMs));
  EXPECT_EQ(opt("copy-mode").default_text, to_string(p.copy_mode));
  EXPECT_EQ(opt("sync").default_text, to_string(p.sync));
  EXPECT_EQ(opt("speed").default_text, std::to_string(p.speed));
  EXPECT_EQ(validate_error(p), "");
}

}  // namespace
}  // namespace blkmirror
