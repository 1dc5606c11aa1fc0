// libFuzzer target: the crash-safe state file (journal/journal_format.h,
// journal/journal.h). The input is a state file: the header parser must refuse
// or accept each slot without crashing, an accepted header must encode and
// parse back to the same fields; then the file is opened as a Journal on a
// memory device and, when accepted, marked, cleared, given a new state and
// opened again, which must read back what was written.
// Built by scripts/fuzz; seeds in tests/fuzz/corpus/journal (state files left by
// mirrors killed mid-copy, made by make_corpus.py).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "blockdev/memory_device.h"
#include "io/loop.h"
#include "journal/journal.h"

using namespace blkmirror;

namespace {

Task<void> exercise(Loop* loop, std::shared_ptr<MemoryDevice> file) {
  auto j = co_await Journal::open(file);
  if (!j) co_return;
  Journal& jr = **j;
  const uint64_t n = jr.extents(), ext = jr.extent_size();
  if (n == 0) co_return;
  (void)co_await jr.mark(0, 1);
  (void)co_await jr.mark((n - 1) * ext, ext);
  std::vector<uint64_t> clear = {n / 2, n - 1, n + 5};
  (void)co_await jr.clear(clear);
  (void)co_await jr.set_state(JournalState::kCancelled);
  auto again = co_await Journal::open(file);
  if (!again) std::abort();  // what was written must read back
  if ((*again)->header().state != JournalState::kCancelled) std::abort();
  if ((*again)->dirty(n - 1) || !(*again)->dirty(0)) std::abort();
  (void)loop;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  for (size_t slot = 0; slot + kJournalSlotSize <= size && slot < 2 * kJournalSlotSize;
       slot += kJournalSlotSize) {
    auto h = parse_journal_header(in.subspan(slot, kJournalSlotSize));
    if (!h) continue;
    auto back = parse_journal_header(encode_journal_header(*h));
    if (!back || back->seq != h->seq || back->length != h->length ||
        back->extent_size != h->extent_size || back->source.name != h->source.name ||
        !(back->target == h->target))
      std::abort();
  }
  // Huge bitmaps are refused before they are read: cap what a run allocates.
  auto h = pick_journal_header(in);
  if (h && h->file_size() > (64u << 20)) return 0;
  Loop loop(1);
  auto file = std::make_shared<MemoryDevice>(size);
  file->write_now(0, in);
  loop.run(exercise(&loop, file));
  return 0;
}
