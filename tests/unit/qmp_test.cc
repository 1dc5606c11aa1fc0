// Unit tests for the QMP pieces that need no daemon: argument checking, the
// keyval parser, and request parsing.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "qmp/schema.h"
#include "qmp/wire.h"

namespace blkmirror::qmp {
namespace {

const Schema kInner = {{"path", Type::kString, true}, {"tight", Type::kBool}};
const Schema kOuter = {{"name", Type::kString, true},
                       {"size", Type::kInt},
                       {"mode", Type::kEnum, false, {"a", "b"}},
                       {"addr", Type::kObject, false, {}, &kInner},
                       {"tags", Type::kStringList}};

std::string err(Json j, bool coerce = false) {
  auto r = check(j, kOuter, "", coerce);
  return r ? "" : r.error().desc;
}

TEST(QmpSchema, AcceptsWellFormed) {
  EXPECT_EQ(
      err({{"name", "x"}, {"size", 3}, {"mode", "b"}, {"addr", {{"path", "/p"}}}, {"tags", {"t"}}}),
      "");
  EXPECT_EQ(err({{"name", "x"}}), "");
  Json none;  // no arguments at all
  EXPECT_FALSE(check(none, kOuter).has_value());
}

TEST(QmpSchema, RefusesWithQemuTexts) {
  EXPECT_EQ(err(Json::object()), "Parameter 'name' is missing");
  EXPECT_EQ(err({{"name", 1}}), "Invalid parameter type for 'name', expected: string");
  EXPECT_EQ(err({{"name", "x"}, {"size", "1"}}),
            "Invalid parameter type for 'size', expected: integer");
  EXPECT_EQ(err({{"name", "x"}, {"size", 1.5}}),
            "Invalid parameter type for 'size', expected: integer");
  EXPECT_EQ(err({{"name", "x"}, {"mode", "c"}}), "Parameter 'mode' does not accept value 'c'");
  EXPECT_EQ(err({{"name", "x"}, {"bogus", 1}}), "Parameter 'bogus' is unexpected");
  EXPECT_EQ(err({{"name", "x"}, {"addr", Json::object()}}), "Parameter 'addr.path' is missing");
  EXPECT_EQ(err({{"name", "x"}, {"addr", {{"path", "/p"}, {"x", 1}}}}),
            "Parameter 'addr.x' is unexpected");
  EXPECT_EQ(err({{"name", "x"}, {"addr", 5}}),
            "Invalid parameter type for 'addr', expected: object");
  EXPECT_EQ(err({{"name", "x"}, {"tags", {1}}}),
            "Invalid parameter type for 'tags', expected: array");
}

TEST(QmpSchema, CoercesCommandLineStrings) {
  Json j = {{"name", "x"}, {"size", "42"}, {"addr", {{"path", "/p"}, {"tight", "on"}}}};
  ASSERT_TRUE(check(j, kOuter, "", true).has_value());
  EXPECT_EQ(j["size"], 42);
  EXPECT_EQ(j["addr"]["tight"], true);
  EXPECT_EQ(err({{"name", "x"}, {"size", "4x"}}, true),
            "Invalid parameter type for 'size', expected: integer");
  EXPECT_EQ(err({{"name", "x"}, {"addr", {{"path", "/p"}, {"tight", "maybe"}}}}, true),
            "Invalid parameter type for 'addr.tight', expected: boolean");
}

TEST(QmpKeyval, ParsesNestingAndEscapedCommas) {
  auto j = parse_keyval("driver=file,node-name=a,filename=/x,,y,cache.direct=on");
  ASSERT_TRUE(j) << j.error().desc;
  EXPECT_EQ((*j)["filename"], "/x,y");
  EXPECT_EQ((*j)["cache"]["direct"], "on");
  auto js = parse_keyval(R"({"driver": "file", "size": 3})");
  ASSERT_TRUE(js);
  EXPECT_EQ((*js)["size"], 3);
  EXPECT_FALSE(parse_keyval("driver"));
  EXPECT_FALSE(parse_keyval("a=1,a=2"));
  EXPECT_FALSE(parse_keyval("a=1,a.b=2"));
  EXPECT_FALSE(parse_keyval("=1"));
  EXPECT_FALSE(parse_keyval("{not json"));
}

TEST(QmpIds, WellFormed) {
  EXPECT_TRUE(id_wellformed("job-1.a_b"));
  EXPECT_FALSE(id_wellformed(""));
  EXPECT_FALSE(id_wellformed("1job"));
  EXPECT_FALSE(id_wellformed("a b"));
  EXPECT_FALSE(id_wellformed("#block1"));
}

TEST(QmpWire, ParsesRequestsAndKeepsIdOnErrors) {
  std::optional<Json> id;
  auto r = parse_request(R"({"execute": "quit", "id": [1, "x"]})", &id);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->execute, "quit");
  EXPECT_EQ(*r->id, Json::parse(R"([1, "x"])"));
  id.reset();
  auto bad = parse_request(R"({"execute": 1, "id": 7})", &id);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().desc, "QMP input member 'execute' must be a string");
  EXPECT_EQ(*id, 7);
  id.reset();
  EXPECT_EQ(parse_request("{", &id).error().desc.rfind("JSON parse error", 0), 0u);
  EXPECT_FALSE(id);
  EXPECT_EQ(parse_request("3", &id).error().desc, "QMP input must be a JSON object");
  EXPECT_EQ(parse_request("{}", &id).error().desc, "QMP input lacks member 'execute'");
}

// Issue 17 item 4: 60,000 nested arrays as id crashed the daemon (stack
// overflow copying the JSON) before negotiation.
TEST(QmpWire, RefusesNestingDeeperThanTheLimit) {
  auto nested = [](const char* field, int depth) {
    std::string open(depth, '['), close(depth, ']');
    return fmt::format(R"({{"execute": "query-version", "{}": {}1{}}})", field, open, close);
  };
  std::optional<Json> id;
  auto r = parse_request(nested("id", 60000), &id);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().desc, "JSON parse error, nesting deeper than 1024 levels");
  EXPECT_FALSE(id);
  // The limit counts the request object itself: 1023 more levels are fine.
  EXPECT_TRUE(parse_request(nested("id", kMaxJsonDepth - 1), &id));
  EXPECT_FALSE(parse_request(nested("id", kMaxJsonDepth), &id));
  // Brackets inside strings are text, not nesting.
  std::string in_string = R"({"execute": "x", "id": ")" + std::string(5000, '[') + R"(\"[["})";
  EXPECT_TRUE(parse_request(in_string, &id));
  EXPECT_FALSE(json_nesting_exceeds(R"({"a": "\"{{{"})", 1));
  EXPECT_TRUE(json_nesting_exceeds("[[]]", 1));
}

// Issue 17 item 5: a number beyond double range threw out of the parser and
// hung the session.
TEST(QmpWire, RefusesNumbersBeyondDoubleRange) {
  for (const char* line : {R"({"execute": "query-version", "arguments": {"x": 1e400}})",
                           R"({"execute": "query-version", "arguments": {"x": [1e400]}})",
                           R"({"execute": "query-version", "id": 1e400})",
                           R"({"execute": "query-version", "id": -1e400})"}) {
    std::optional<Json> id;
    auto r = parse_request(line, &id);
    ASSERT_FALSE(r) << line;
    EXPECT_EQ(r.error().cls, "GenericError");
    EXPECT_EQ(r.error().desc.rfind("JSON parse error, number overflow", 0), 0u) << r.error().desc;
  }
}

// Issue 17 item 7: a non-UTF-8 file name in --json aborted the CLI (uncaught
// type_error). File names are bytes: the invalid ones appear as \xNN.
TEST(QmpWire, DumpLineEscapesBytesThatAreNotUtf8) {
  Json j = {{"message", "mirroring a\xff\xfe.img -> b\xc3.img"},
            {"ok", "caf\xc3\xa9 \xf0\x9f\x98\x80"}};
  std::string line = dump_line(j);
  auto back = Json::parse(line);
  EXPECT_EQ(back["message"], "mirroring a\\xff\\xfe.img -> b\\xc3.img");
  EXPECT_EQ(back["ok"], "caf\xc3\xa9 \xf0\x9f\x98\x80");  // valid UTF-8 kept as is
  // Overlong forms and surrogates are not UTF-8 either.
  EXPECT_EQ(Json::parse(dump_line(Json("\xc0\xaf\xed\xa0\x80"))).get<std::string>(),
            "\\xc0\\xaf\\xed\\xa0\\x80");
  EXPECT_EQ(Json::parse(dump_line(Json{{"k\xff", 1}})).begin().key(), "k\\xff");
}

TEST(QmpWire, RepliesAreSingleLines) {
  std::string e = error_reply(QmpError{"GenericError", "bad\nthing \xff"}, Json(3));
  EXPECT_EQ(e.find('\n'), e.size() - 1);
  auto j = Json::parse(e);
  EXPECT_EQ(j["id"], 3);
  EXPECT_EQ(j["error"]["class"], "GenericError");
  std::string ev = event("X", {{"a", 1}});
  auto je = Json::parse(ev);
  EXPECT_TRUE(je["timestamp"]["seconds"].is_number_integer());
  EXPECT_EQ(je["data"]["a"], 1);
}

}  // namespace
}  // namespace blkmirror::qmp
