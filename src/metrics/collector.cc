#include "metrics/collector.h"

#include <fmt/format.h>

#include <cstring>

#include "metrics/exposition.h"
#include "mirror/mirror_job.h"

namespace blkmirror::metrics {

namespace {

constexpr const char* kNodeOps[] = {"read",    "write", "write_zeroes",
                                    "discard", "flush", "block_status"};
static_assert(std::size(kNodeOps) == static_cast<size_t>(Node::Op::kCount));

std::string errno_name(int e) {
  const char* n = strerrorname_np(e);
  return n ? n : std::to_string(e);
}

double seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

void jobs(Exposition& x, const std::vector<std::shared_ptr<Job>>& all,
          const std::function<double(const std::string&, uint64_t)>& rate) {
  const auto now = std::chrono::steady_clock::now();
  x.family("blkmirror_job_state", "gauge", "1 for each job, labelled with its type and state");
  for (auto& j : all) {
    JobInfo i = j->info();
    x.sample("blkmirror_job_state",
             {{"job", i.id}, {"type", i.type}, {"state", to_string(i.status)}}, 1);
  }
  x.family("blkmirror_job_time_in_state_seconds", "gauge", "time since the job entered its state");
  for (auto& j : all)
    x.sample("blkmirror_job_time_in_state_seconds", {{"job", j->id()}},
             seconds(now - j->status_since()));
  x.family("blkmirror_job_progress_bytes", "gauge", "the job's current-progress (query-jobs)");
  for (auto& j : all)
    x.sample("blkmirror_job_progress_bytes", {{"job", j->id()}},
             static_cast<double>(j->info().offset));
  x.family("blkmirror_job_total_bytes", "gauge", "the job's total-progress (query-jobs)");
  for (auto& j : all)
    x.sample("blkmirror_job_total_bytes", {{"job", j->id()}}, static_cast<double>(j->info().len));
  x.family("blkmirror_job_speed_limit_bytes_per_second", "gauge", "the speed limit (0: none)");
  for (auto& j : all)
    x.sample("blkmirror_job_speed_limit_bytes_per_second", {{"job", j->id()}},
             static_cast<double>(j->info().speed));

  std::vector<std::pair<std::string, const MirrorJob*>> mirrors;
  for (auto& j : all)
    if (auto* m = dynamic_cast<const MirrorJob*>(j.get())) mirrors.emplace_back(j->id(), m);
  auto counter = [&](const char* name, const char* help, auto get) {
    x.family(name, "counter", help);
    for (auto& [id, m] : mirrors) x.sample(name, {{"job", id}}, static_cast<double>(get(*m)));
  };
  counter("blkmirror_job_copied_bytes_total",
          "bytes read from the source and written to the target",
          [](const MirrorJob& m) { return m.stats().bytes_copied; });
  counter("blkmirror_job_zeroed_bytes_total", "bytes made zero on the target without sending data",
          [](const MirrorJob& m) { return m.stats().bytes_zeroed; });
  counter("blkmirror_job_active_bytes_total",
          "client writes mirrored synchronously (write-blocking)",
          [](const MirrorJob& m) { return m.stats().bytes_active; });
  counter("blkmirror_job_mode_switches_total", "copy mode changes",
          [](const MirrorJob& m) { return m.stats().mode_switches; });
  x.family("blkmirror_job_dirty_bytes", "gauge", "bytes still to copy (dirty chunks)");
  for (auto& [id, m] : mirrors)
    x.sample("blkmirror_job_dirty_bytes", {{"job", id}}, static_cast<double>(m->dirty_bytes()));
  x.family("blkmirror_job_copy_rate_bytes_per_second", "gauge",
           "bytes copied, zeroed and mirrored per second since the previous scrape");
  for (auto& [id, m] : mirrors) {
    const auto& s = m->stats();
    x.sample("blkmirror_job_copy_rate_bytes_per_second", {{"job", id}},
             rate(id, s.bytes_copied + s.bytes_zeroed + s.bytes_active));
  }
  x.family("blkmirror_job_buffer_budget_bytes", "gauge",
           "copy buffer bytes the job may keep in flight now (buf-size, or the depth it chose "
           "for the target's round trip)");
  for (auto& [id, m] : mirrors)
    x.sample("blkmirror_job_buffer_budget_bytes", {{"job", id}}, static_cast<double>(m->budget()));
  x.family("blkmirror_job_target_round_trip_seconds", "gauge",
           "the fastest copy write to the target so far (jobs that choose their own depth)");
  for (auto& [id, m] : mirrors)
    if (const DepthControl* d = m->depth(); d && d->base_rtt().count() > 0)
      x.sample("blkmirror_job_target_round_trip_seconds", {{"job", id}},
               std::chrono::duration<double>(d->base_rtt()).count());
  x.family("blkmirror_job_copy_mode", "gauge", "1, labelled with the job's copy mode now");
  for (auto& [id, m] : mirrors)
    x.sample("blkmirror_job_copy_mode", {{"job", id}, {"mode", to_string(m->copy_mode())}}, 1);
  x.family("blkmirror_job_errors_total", "counter",
           "failed operations by side (source, target) and errno");
  for (auto& [id, m] : mirrors)
    for (auto& [key, n] : m->stats().errors_by)
      x.sample("blkmirror_job_errors_total",
               {{"job", id},
                {"side", key.first ? "target" : "source"},
                {"errno", errno_name(key.second)}},
               static_cast<double>(n));
}

void exports(Exposition& x, const nbd::NbdServer& server) {
  const auto& all = server.exports();
  x.family("blkmirror_export_connections", "gauge", "clients referring to the export now");
  for (auto& [name, e] : all)
    x.sample("blkmirror_export_connections", {{"export", name}},
             static_cast<double>(server.clients_of(name)));
  x.family("blkmirror_export_connections_total", "counter", "clients that chose the export");
  for (auto& [name, e] : all)
    x.sample("blkmirror_export_connections_total", {{"export", name}},
             static_cast<double>(e->connections_total));
  x.family("blkmirror_export_requests_in_flight", "gauge", "requests being served now");
  for (auto& [name, e] : all)
    x.sample("blkmirror_export_requests_in_flight", {{"export", name}},
             static_cast<double>(e->in_flight));
  auto per_command = [&](const char* family, const char* type, const char* help, auto get) {
    x.family(family, type, help);
    for (auto& [name, e] : all)
      for (size_t c = 0; c < e->stats.size(); ++c)
        if (e->stats[c].count)
          x.sample(family, {{"export", name}, {"command", nbd::Export::kCommands[c]}},
                   get(e->stats[c]));
  };
  per_command("blkmirror_export_requests_total", "counter", "requests by NBD command",
              [](const OpStats& s) { return static_cast<double>(s.count); });
  per_command("blkmirror_export_request_errors_total", "counter", "requests answered with an error",
              [](const OpStats& s) { return static_cast<double>(s.errors); });
  per_command("blkmirror_export_bytes_total", "counter", "bytes requested (the requests' lengths)",
              [](const OpStats& s) { return static_cast<double>(s.bytes); });
  const char* h = "blkmirror_export_request_duration_seconds";
  x.family(h, "histogram", "time from a request's arrival to its reply being queued");
  for (auto& [name, e] : all)
    for (size_t c = 0; c < e->stats.size(); ++c) {
      const OpStats& s = e->stats[c];
      if (!s.count) continue;
      const std::string_view cmd = nbd::Export::kCommands[c];
      uint64_t cumulative = 0;
      for (size_t b = 0; b < OpStats::kBucketsUs.size(); ++b) {
        cumulative += s.buckets[b];
        x.sample(fmt::format("{}_bucket", h), {{"export", name}, {"command", cmd}}, "le",
                 fmt::format("{}", OpStats::kBucketsUs[b] / 1e6), static_cast<double>(cumulative));
      }
      x.sample(fmt::format("{}_bucket", h), {{"export", name}, {"command", cmd}}, "le", "+Inf",
               static_cast<double>(s.count));
      x.sample(fmt::format("{}_sum", h), {{"export", name}, {"command", cmd}}, s.ns_total / 1e9);
      x.sample(fmt::format("{}_count", h), {{"export", name}, {"command", cmd}},
               static_cast<double>(s.count));
    }
}

void nodes(Exposition& x, const Graph& graph) {
  const auto all = graph.nodes();
  x.family("blkmirror_node_requests_in_flight", "gauge", "requests through the node's edges now");
  for (Node* n : all)
    x.sample("blkmirror_node_requests_in_flight", {{"node", n->name()}},
             static_cast<double>(n->in_flight()));
  auto per_op = [&](const char* family, const char* help, auto get) {
    x.family(family, "counter", help);
    for (Node* n : all)
      for (size_t o = 0; o < n->stats().size(); ++o)
        if (n->stats()[o].count)
          x.sample(family, {{"node", n->name()}, {"op", kNodeOps[o]}}, get(n->stats()[o]));
  };
  per_op("blkmirror_node_requests_total", "requests by kind",
         [](const OpStats& s) { return static_cast<double>(s.count); });
  per_op("blkmirror_node_errors_total", "requests that failed",
         [](const OpStats& s) { return static_cast<double>(s.errors); });
  per_op("blkmirror_node_bytes_total", "bytes requested",
         [](const OpStats& s) { return static_cast<double>(s.bytes); });
  per_op("blkmirror_node_request_seconds_total",
         "time spent in requests (divide by the count: mean latency)",
         [](const OpStats& s) { return s.ns_total / 1e9; });
}

}  // namespace

std::string Collector::render() {
  Exposition x;
  const auto now = std::chrono::steady_clock::now();
  std::map<std::string, Last> next;
  auto rate = [&](const std::string& id, uint64_t bytes) {
    next[id] = Last{bytes, now};
    auto it = last_.find(id);
    if (it == last_.end() || now <= it->second.at || bytes < it->second.bytes) return 0.0;
    return static_cast<double>(bytes - it->second.bytes) / seconds(now - it->second.at);
  };
  jobs(x, src_.jobs ? src_.jobs() : std::vector<std::shared_ptr<Job>>{}, rate);
  last_ = std::move(next);  // jobs gone since are forgotten
  if (nbd::NbdServer* s = src_.nbd ? src_.nbd() : nullptr) exports(x, *s);
  if (src_.graph) nodes(x, *src_.graph);
  return x.text();
}

}  // namespace blkmirror::metrics
