// Test helpers for engine tests: a loop, a graph, memory devices with random
// contents, a client that writes through the graph and keeps a model of what
// the disk must hold, and an event recorder.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "blockdev/fault_device.h"
#include "blockdev/graph.h"
#include "blockdev/memory_device.h"
#include "io/loop.h"
#include "mirror/mirror_job.h"

namespace blkmirror::test {

// Fills about half of a device with random 4 KiB..256 KiB extents; the rest stays
// holes. Returns the model of its contents.
inline std::vector<std::byte> fill_random(MemoryDevice& dev, std::mt19937_64& rng) {
  std::vector<std::byte> model(dev.length());
  uint64_t pos = 0;
  while (pos < dev.length()) {
    uint64_t len = std::min<uint64_t>(4096 * (1 + rng() % 64), dev.length() - pos);
    if (rng() % 2) {
      for (uint64_t i = 0; i < len; ++i) model[pos + i] = static_cast<std::byte>(rng());
      dev.write_now(pos, {model.data() + pos, len});
    }
    pos += len;
  }
  return model;
}

inline std::vector<std::byte> contents(const MemoryDevice& dev) {
  std::vector<std::byte> out(dev.length());
  dev.read_now(0, out);
  return out;
}

// Index of the first differing byte, or -1.
inline int64_t first_difference(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  if (a.size() != b.size()) return 0;
  // memcmp a block at a time, then bytes only in the block that differs: a byte loop
  // over hundreds of MiB takes minutes in the sanitized (-O0) build.
  constexpr size_t kBlock = 4096;
  for (size_t at = 0; at < a.size(); at += kBlock) {
    const size_t n = std::min(kBlock, a.size() - at);
    if (std::memcmp(a.data() + at, b.data() + at, n) == 0) continue;
    for (size_t i = at; i < at + n; ++i)
      if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

// Writes random data (and sometimes zeroes) through a graph edge, mirroring each
// acknowledged write into model. Runs until stop is set.
struct Client {
  std::unique_ptr<Child> edge;
  std::vector<std::byte>* model = nullptr;
  std::mt19937_64 rng{1};
  bool stop = false, done = false;
  bool hold = false;  // pauses writing (a background mirror cannot converge against
                      // an unbounded writer; that is the active mode's job)
  uint64_t acked = 0, failed = 0;
  uint64_t max_len = 3 * 65536 + 1000;
  bool unaligned = true;

  Task<void> run() {
    std::vector<std::byte> buf(max_len);
    uint64_t size = model->size();
    while (!stop && size > 0) {
      if (hold) {
        co_await sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      // Mostly small writes, some large ones crossing several chunks.
      uint64_t cap = rng() % 8 == 0 ? max_len : 8192;
      uint64_t len = 1 + rng() % std::min(cap, size);
      uint64_t off = rng() % (size - len + 1);
      if (!unaligned) {
        off = off / 512 * 512;
        len = std::max<uint64_t>(512, len / 512 * 512);
        if (off + len > size) len = size - off;
      }
      bool zero = rng() % 8 == 0;
      Result<void> r;
      if (zero) {
        r = co_await edge->write_zeroes(off, len, ZeroFlags{.may_unmap = (rng() % 2) == 0});
      } else {
        for (uint64_t i = 0; i < len; ++i) buf[i] = static_cast<std::byte>(rng());
        r = co_await edge->write(off, {buf.data(), len});
      }
      if (r) {
        if (zero)
          std::memset(model->data() + off, 0, len);
        else
          std::memcpy(model->data() + off, buf.data(), len);
        ++acked;
      } else {
        ++failed;
      }
      // A busy but finite writer: a background mirror converges against it.
      co_await sleep_for(std::chrono::microseconds(100 + rng() % 1000));
    }
    done = true;
  }
};

struct Recorder {
  std::vector<JobEvent> events;
  void attach(Job& j) {
    j.subscribe([this](const JobEvent& e) { events.push_back(e); });
  }
  int count(JobEvent::Kind k) const {
    int n = 0;
    for (auto& e : events) n += e.kind == k;
    return n;
  }
  std::vector<std::string> statuses() const {
    std::vector<std::string> out;
    for (auto& e : events)
      if (e.kind == JobEvent::Kind::kStatusChange) out.push_back(to_string(e.status));
    return out;
  }
  const JobEvent* last(JobEvent::Kind k) const {
    for (auto it = events.rbegin(); it != events.rend(); ++it)
      if (it->kind == k) return &*it;
    return nullptr;
  }
};

// Waits (on the loop) until pred() holds, or fails the test after timeout.
template <class Pred>
Task<bool> wait_until(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) co_return false;
    co_await sleep_for(std::chrono::milliseconds(1));
  }
  co_return true;
}

// The second half of a model test: with `client` writing, waits for the started
// job to become ready (when can_hold, i.e. a background job that does not
// converge within 3 s, the client holds off until it does), stays ready a random
// while, completes (the same hold when the switch does not come within 5 s),
// waits for 20 more acknowledged writes after the switch, and
// stops the client. False on a timeout or a refused complete.
inline Task<bool> drive_to_switch(MirrorJob& job, Client& client, std::mt19937_64& rng,
                                  bool can_hold) {
  using namespace std::chrono_literals;
  auto ready = [&job] { return job.info().ready || job.concluded(); };
  if (!co_await wait_until(ready, can_hold ? 3s : 120s)) {
    if (!can_hold) co_return false;
    client.hold = true;
    if (!co_await wait_until(ready)) co_return false;
    client.hold = false;
  }
  co_await sleep_for(std::chrono::microseconds(rng() % 5000));
  if (!job.complete()) co_return false;
  // The same after complete: a background job switches at a moment with nothing
  // dirty, which an unthrottled writer may never leave it (slow sanitizer builds).
  auto concluded = [&job] { return job.concluded(); };
  if (!co_await wait_until(concluded, can_hold ? 5s : 60s)) {
    if (!can_hold) co_return false;
    client.hold = true;
    if (!co_await wait_until(concluded)) co_return false;
    client.hold = false;
  }
  uint64_t target = client.acked + 20;
  if (!co_await wait_until([&client, target] { return client.acked >= target; })) co_return false;
  client.stop = true;
  co_return co_await wait_until([&client] { return client.done; });
}

inline MemoryDevice::Options memory_opts(bool zero_init = true, unsigned jitter = 0,
                                         uint64_t seed = 1) {
  MemoryDevice::Options o{MemoryDevice::defaults()};
  o.caps.zero_init = zero_init;
  o.jitter = jitter;
  o.seed = seed;
  return o;
}

// One mirror under test: a source and a target memory device behind fault
// wrappers in a graph ("src", "dst"), the model of what the source holds, an
// optional client edge on the source, the jobs made on them and their events.
// Its destructor cancels (forced) every job a test left running and waits until
// it concluded, so no job outlives the graph.
struct MirrorFixture {
  struct Options {
    uint64_t size = 0;
    uint64_t seed = 1;        // data, device jitter and fault probabilities
    bool fill = true;         // random data in about half of the source; else zeroes
    bool target_zero = true;  // the target reports that it reads as zeroes
    unsigned jitter = 0;      // shuffles the order devices complete I/O in
    bool client = false;      // attach `client`, an edge on the source
  };

  Loop loop{2};
  Graph graph;
  std::shared_ptr<MemoryDevice> src, dst;
  std::shared_ptr<FaultDevice> src_fault, dst_fault;
  std::vector<std::byte> model;
  Recorder rec;
  std::vector<std::shared_ptr<MirrorJob>> jobs;
  std::shared_ptr<MirrorJob> job;  // the last one made
  std::unique_ptr<Child> client;

  explicit MirrorFixture(const Options& o) {
    std::mt19937_64 rng(o.seed);
    src = std::make_shared<MemoryDevice>(o.size, memory_opts(true, o.jitter, o.seed));
    dst = std::make_shared<MemoryDevice>(o.size, memory_opts(o.target_zero, o.jitter, o.seed + 1));
    model = o.fill ? fill_random(*src, rng) : std::vector<std::byte>(o.size);
    src_fault = std::make_shared<FaultDevice>(src, o.seed);
    dst_fault = std::make_shared<FaultDevice>(dst, o.seed + 1);
    EXPECT_TRUE(graph.add("src", src_fault));
    EXPECT_TRUE(graph.add("dst", dst_fault));
    if (o.client) client = graph.attach(graph.find("src"), "client");
  }

  ~MirrorFixture() {
    loop.run([](MirrorFixture* f) -> Task<void> {
      for (auto& j : f->jobs) {
        if (j->status() == JobStatus::kCreated) continue;
        if (!j->concluded()) (void)j->cancel(true);
        co_await j->wait_concluded();
      }
    }(this));
  }

  // job0: src -> dst, every other parameter at its default.
  MirrorParams params() const {
    MirrorParams p;
    p.job_id = "job0";
    p.device = "src";
    p.target = "dst";
    return p;
  }

  // Creates the job (not started) and records its events; nullptr (and a failed
  // expectation) when creation fails.
  std::shared_ptr<MirrorJob> make(const MirrorParams& p) {
    auto j = MirrorJob::create(loop, graph, p);
    EXPECT_TRUE(j) << j.error().message();
    if (!j) return nullptr;
    rec.attach(**j);
    jobs.push_back(*j);
    job = *j;
    return job;
  }

  // Runs fn() (a coroutine) on the loop.
  template <class F>
  bool run(F fn) {
    return loop.run(fn());
  }

  // Writes len bytes of `byte` at off through the client edge; keeps the model.
  Task<Result<void>> write(uint64_t off, uint64_t len, uint8_t byte) {
    std::vector<std::byte> data(len, std::byte{byte});
    auto r = co_await client->write(off, data);
    if (r) std::memcpy(model.data() + off, data.data(), len);
    co_return r;
  }

  bool target_has(uint64_t off, uint64_t len, uint8_t byte) const {
    std::vector<std::byte> got(len);
    dst->read_now(off, got);
    for (auto b : got)
      if (b != std::byte{byte}) return false;
    return true;
  }

  Task<bool> ready() {
    co_return co_await wait_until([this] { return job->info().ready || job->concluded(); });
  }

  // Completes once the job is (back) in the ready state: a resume takes effect
  // when the job's loop runs next.
  Task<bool> complete() {
    if (!co_await wait_until([this] { return job->status() == JobStatus::kReady; }))
      co_return false;
    if (!job->complete()) co_return false;
    co_return co_await wait_until([this] { return job->concluded(); });
  }
};

}  // namespace blkmirror::test
