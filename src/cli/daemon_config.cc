#include "cli/daemon_config.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace blkmirror {

namespace {

std::string trim(std::string s) {
  const char* blanks = " \t\r";
  s.erase(0, s.find_first_not_of(blanks));
  s.erase(s.find_last_not_of(blanks) + 1);
  return s;
}

constexpr const char* kKeys = "qmp, qmp-tcp, file-root, blockdev, nbd-server, export";

}  // namespace

Result<DaemonConfig> parse_daemon_config(const std::string& text, const std::string& name) {
  DaemonConfig c;
  std::vector<std::string> errors;
  std::istringstream in(text);
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    auto where = [&](const std::string& what) {
      errors.push_back(fmt::format("{}:{}: {}", name, n, what));
    };
    std::string l = trim(line);
    if (l.empty() || l[0] == '#') continue;
    auto eq = l.find('=');
    if (eq == std::string::npos) {
      where(fmt::format("expected KEY = VALUE, got '{}'", l));
      continue;
    }
    std::string key = trim(l.substr(0, eq)), value = trim(l.substr(eq + 1));
    if (value.empty()) {
      where(fmt::format("'{}' has no value", key));
      continue;
    }
    auto once = [&](std::string& slot) {
      if (!slot.empty())
        where(fmt::format("'{}' given twice", key));
      else
        slot = value;
    };
    if (key == "qmp")
      once(c.qmp);
    else if (key == "qmp-tcp")
      once(c.qmp_tcp);
    else if (key == "file-root")
      once(c.file_root);
    else if (key == "nbd-server")
      once(c.nbd_server);
    else if (key == "blockdev")
      c.blockdevs.push_back(value);
    else if (key == "export")
      c.exports.push_back(value);
    else
      where(fmt::format("unknown key '{}' (known: {})", key, kKeys));
  }
  if (!errors.empty()) {
    std::string all;
    for (auto& e : errors) all += (all.empty() ? "" : "\n") + e;
    return make_plain_error(EINVAL, all);
  }
  return c;
}

Result<DaemonConfig> load_daemon_config(const std::string& path) {
  std::ifstream f(path);
  if (!f)
    return make_plain_error(errno, fmt::format("--config '{}': {}", path, std::strerror(errno)));
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_daemon_config(ss.str(), path);
}

}  // namespace blkmirror
