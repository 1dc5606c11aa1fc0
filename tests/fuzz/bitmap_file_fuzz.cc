// libFuzzer target: a raw image's bitmaps side file (journal/bitmap_file.h).
// The input is a side file: the parser must refuse or accept it without
// crashing, and an accepted one must encode to the same bytes and parse back
// the same contents.
// Built by scripts/fuzz; seeds in tests/fuzz/corpus/bitmap_file (side files
// written by `blkmirror bitmap --add` and by daemons with writes recorded).
#include <cstdint>
#include <cstdlib>

#include "journal/bitmap_file.h"

using namespace blkmirror;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
  auto c = parse_bitmap_file(bytes);
  if (!c) return 0;
  auto out = encode_bitmap_file(*c);
  if (!std::equal(out.begin(), out.end(), bytes.begin(), bytes.end())) std::abort();
  auto back = parse_bitmap_file(out);
  if (!back || back->entries.size() != c->entries.size() || !(back->stamp == c->stamp))
    std::abort();
  return 0;
}
