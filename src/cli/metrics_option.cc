#include "cli/metrics_option.h"

#include <fmt/format.h>

#include "base/host_port.h"

namespace blkmirror {

void MetricsOption::add_to(CLI::App& cmd) {
  cmd.add_option("--metrics", listen,
                 "serve Prometheus metrics at http://HOST:PORT/metrics (loopback unless given; "
                 "port 0: any)");
}

Result<std::unique_ptr<metrics::Endpoint>> MetricsOption::start(Loop& loop,
                                                                metrics::Sources sources) const {
  if (listen.empty()) return std::unique_ptr<metrics::Endpoint>();
  auto hp = parse_host_port(listen);
  if (!hp)
    return make_plain_error(EINVAL,
                            fmt::format("--metrics '{}': {}", listen, hp.error().message()));
  auto collector = std::make_shared<metrics::Collector>(std::move(sources));
  auto ep = std::make_unique<metrics::Endpoint>(loop, [collector] { return collector->render(); });
  if (auto r = ep->listen(hp->host, *hp->port); !r) return tl::unexpected(r.error());
  fmt::print(stderr, "metrics at http://{}/metrics\n",
             format_host_port(hp->host.empty() ? "127.0.0.1" : hp->host, ep->port()));
  return ep;
}

}  // namespace blkmirror
