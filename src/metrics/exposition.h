// Exposition: writes metrics in Prometheus's text format (version 0.0.4): a
// `# HELP` and `# TYPE` line per family, then one sample per line with its
// labels, label values escaped as the format requires (\\, \", \n).
//
// Threading rule: a plain value; one thread at a time.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

namespace blkmirror::metrics {

using Labels = std::initializer_list<std::pair<std::string_view, std::string_view>>;

class Exposition {
 public:
  // Starts a family: name, "counter" | "gauge" | "histogram", help text.
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, Labels labels, double value);
  // A sample with one more label (a histogram's `le`) after the given ones.
  void sample(std::string_view name, Labels labels, std::string_view extra_key,
              std::string_view extra_value, double value);
  const std::string& text() const { return out_; }

 private:
  void labels(Labels l, std::string_view extra_key = {}, std::string_view extra_value = {});
  void value(double v);
  std::string out_;
};

}  // namespace blkmirror::metrics
