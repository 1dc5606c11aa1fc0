#include "qmp/rbd_node.h"

#include <fmt/format.h>

namespace blkmirror::qmp {

namespace {

const Schema kServer = {{"host", Type::kString, true}, {"port", Type::kString, true}};

}  // namespace

Schema rbd_location_members() {
  return {{"pool", Type::kString, true},  {"namespace", Type::kString},
          {"image", Type::kString, true}, {"snapshot", Type::kString},
          {"conf", Type::kString},        {"user", Type::kString},
          {"key-secret", Type::kString},  {"auth-client-required", Type::kAny},
          {"encrypt", Type::kAny},        {"server", Type::kAny}};
}

const Schema& rbd_create_schema() {
  static const Schema location = [] {
    Schema s = rbd_location_members();
    return s;
  }();
  static const Schema create = {{"driver", Type::kString, true},
                                {"location", Type::kObject, true, {}, &location},
                                {"size", Type::kInt, true},
                                {"cluster-size", Type::kInt},
                                {"encrypt", Type::kAny}};
  return create;
}

QResult<RbdSpec> rbd_spec_from_json(const Json& o, const std::string& prefix) {
  RbdSpec s;
  s.pool = o["pool"].get<std::string>();
  s.image = o["image"].get<std::string>();
  if (s.pool.empty())
    return generic_error(fmt::format("Parameter '{}pool' must not be empty", prefix));
  if (s.image.empty())
    return generic_error(fmt::format("Parameter '{}image' must not be empty", prefix));
  s.ns = o.value("namespace", "");
  if (o.contains("snapshot")) s.snapshot = o["snapshot"].get<std::string>();
  if (o.contains("conf")) s.conf = o["conf"].get<std::string>();
  if (o.contains("user")) s.user = o["user"].get<std::string>();
  if (o.contains("encrypt"))
    return generic_error(
        fmt::format("Parameter '{}encrypt': rbd encryption is not supported", prefix));
  if (o.contains("key-secret"))
    return generic_error(fmt::format(
        "Parameter '{}key-secret': secret objects are not supported; name a keyring in the "
        "Ceph config file (conf) instead",
        prefix));
  if (o.contains("auth-client-required")) {
    const Json& a = o["auth-client-required"];
    if (!a.is_array())
      return generic_error(fmt::format(
          "Invalid parameter type for '{}auth-client-required', expected: array", prefix));
    for (const Json& m : a) {
      if (!m.is_string() || (m != "cephx" && m != "none"))
        return generic_error(bad_value(prefix + "auth-client-required", m.dump()));
      s.auth_client_required.push_back(m.get<std::string>());
    }
  }
  if (o.contains("server")) {
    // The monitors, as QEMU passes them: mon_host="[host]:port;..." over the config.
    const Json& srv = o["server"];
    if (!srv.is_array())
      return generic_error(
          fmt::format("Invalid parameter type for '{}server', expected: array", prefix));
    std::string hosts;
    for (Json m : srv) {
      if (auto r = check(m, kServer, prefix + "server."); !r) return tl::unexpected(r.error());
      std::string host = m["host"].get<std::string>();
      if (host.find(':') != std::string::npos) host = "[" + host + "]";
      hosts += (hosts.empty() ? "" : ";") + host + ":" + m["port"].get<std::string>();
    }
    if (!hosts.empty()) s.options.emplace_back("mon_host", hosts);
  }
  return s;
}

Task<QResult<BlockDevicePtr>> open_rbd_node(Loop& loop, const Json& args) {
  auto spec = rbd_spec_from_json(args, "");
  if (!spec) co_return tl::unexpected(spec.error());
  RbdOptions opts;
  opts.read_only = args.value("read-only", false);
  if (spec->snapshot && !opts.read_only)
    co_return generic_error(
        fmt::format("{}: a snapshot is read-only; add it with read-only=true", spec->describe()));
  auto dev = co_await open_rbd(loop, *spec, opts);
  if (!dev) co_return generic_error(dev.error().message());
  co_return *dev;
}

Task<Result<void>> CreateRbdJob::run() {
  progress_len_ = 1;
  auto r = co_await create_rbd_image(loop_, spec_, opts_);
  if (r) progress_offset_ = 1;
  co_return r;
}

}  // namespace blkmirror::qmp
