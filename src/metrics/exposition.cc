#include "metrics/exposition.h"

#include <fmt/format.h>

#include <cmath>

namespace blkmirror::metrics {

namespace {

void escape(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
}

}  // namespace

void Exposition::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += fmt::format("# HELP {} ", name);
  for (char c : help) out_ += c == '\n' ? ' ' : c;
  out_ += fmt::format("\n# TYPE {} {}\n", name, type);
}

void Exposition::labels(Labels l, std::string_view extra_key, std::string_view extra_value) {
  if (l.size() == 0 && extra_key.empty()) return;
  out_ += '{';
  bool first = true;
  auto one = [&](std::string_view k, std::string_view v) {
    if (!first) out_ += ',';
    first = false;
    out_ += k;
    out_ += "=\"";
    escape(out_, v);
    out_ += '"';
  };
  for (auto& [k, v] : l) one(k, v);
  if (!extra_key.empty()) one(extra_key, extra_value);
  out_ += '}';
}

void Exposition::value(double v) {
  if (std::isinf(v))
    out_ += v > 0 ? " +Inf\n" : " -Inf\n";
  else if (v == std::floor(v) && std::fabs(v) < 1e15)
    out_ += fmt::format(" {}\n", static_cast<int64_t>(v));
  else
    out_ += fmt::format(" {}\n", v);
}

void Exposition::sample(std::string_view name, Labels l, double v) {
  out_ += name;
  labels(l);
  value(v);
}

void Exposition::sample(std::string_view name, Labels l, std::string_view extra_key,
                        std::string_view extra_value, double v) {
  out_ += name;
  labels(l, extra_key, extra_value);
  value(v);
}

}  // namespace blkmirror::metrics
