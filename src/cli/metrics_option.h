// `--metrics HOST:PORT` (daemon, serve, mirror): a Prometheus endpoint at
// http://HOST:PORT/metrics (src/metrics/), on loopback unless another address
// is given (":PORT" or "127.0.0.1:PORT"; port 0 picks one, printed on stderr).
#pragma once

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "base/result.h"
#include "io/loop.h"
#include "metrics/collector.h"
#include "metrics/endpoint.h"

namespace blkmirror {

struct MetricsOption {
  std::string listen;
  void add_to(CLI::App& cmd);
  // nullptr when --metrics was not given. The collector lives with the endpoint.
  Result<std::unique_ptr<metrics::Endpoint>> start(Loop& loop, metrics::Sources sources) const;
};

}  // namespace blkmirror
