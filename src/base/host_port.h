// HOST:PORT as users write it, parsed in one place for every front end: the
// CLI's --listen and --qmp-tcp, `ctl --qmp tcp:HOST:PORT`, the authority of an
// nbd:// URI, and the host/port members of QMP's InetSocketAddress.
//
//   HOST:PORT      a name or IPv4 address
//   [IPV6]:PORT    an IPv6 literal, always in brackets when a port follows
//   :PORT          no host: the caller picks (listeners use loopback)
//   HOST, [IPV6]   only where the port is optional (nbd:// URIs)
//
// A PORT is decimal, 0 to 65535 (0 = any free port, where a listener allows it).
// Errors are one-line fragments naming the bad part ("bad port '1K' (expected a
// number from 0 to 65535)"); callers prefix the option or URI they came from.
//
// Thread-safe (pure functions).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace blkmirror {

struct HostPort {
  std::string host;              // without brackets; "" for ":PORT"
  std::optional<uint16_t> port;  // empty only when the rules allow no port
};

struct HostPortRules {
  bool port_required = true;
  bool port_zero_ok = true;  // listeners: 0 picks a free port; clients need a real one
};

Result<HostPort> parse_host_port(std::string_view text, HostPortRules rules = {});

// A port alone (QMP's "port" member, the part after the colon).
Result<uint16_t> parse_port(std::string_view text, bool zero_ok = true);

// A host alone (QMP's "host" member): an IPv6 literal may come with or without
// brackets; "" and unbalanced brackets are refused.
Result<std::string> parse_host(std::string_view text);

// "h:p", or "[h]:p" when h is an IPv6 literal: the inverse of parse_host_port.
std::string format_host_port(std::string_view host, uint16_t port);

}  // namespace blkmirror
