// Collector: what the metrics endpoint reports, read from the running objects
// at each scrape (nothing is sampled in between):
// - per job: state and time in it, progress, bytes copied / zeroed / mirrored
//   by client writes, bytes still dirty, copy rate (since the previous scrape),
//   copy mode and its switches, errors by side and errno, the speed limit;
// - per NBD export: clients now and ever, requests in flight, requests, errors
//   and bytes by command, a latency histogram by command;
// - per graph node: requests, bytes, errors and time spent by kind, requests in
//   flight (what the node's users asked of it).
// Names start with blkmirror_; docs/metrics.md lists them.
//
// Threading rule: loop thread only (it reads the graph, jobs and server).
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "blockdev/graph.h"
#include "job/job.h"
#include "nbd/server/nbd_server.h"

namespace blkmirror::metrics {

struct Sources {
  Graph* graph = nullptr;
  // The NBD server now (it may start and stop under a daemon), or nullptr.
  std::function<nbd::NbdServer*()> nbd;
  std::function<std::vector<std::shared_ptr<Job>>()> jobs;
};

class Collector {
 public:
  explicit Collector(Sources s) : src_(std::move(s)) {}
  std::string render();

 private:
  struct Last {
    uint64_t bytes = 0;
    std::chrono::steady_clock::time_point at;
  };
  Sources src_;
  std::map<std::string, Last> last_;  // per job id: bytes moved at the previous scrape
};

}  // namespace blkmirror::metrics
