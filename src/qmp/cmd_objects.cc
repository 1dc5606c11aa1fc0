// object-add / object-del for the objects blkmirror uses: TLS credentials
// (tls-creds-x509 and tls-creds-psk, QEMU's flat form since 6.0), which
// blockdev-add driver nbd and nbd-server-start name in tls-creds, and
// authorization lists (authz-simple, authz-list) for nbd-server-start's
// tls-authz.
#include <fmt/format.h>
#include <sys/stat.h>

#include "qmp/daemon.h"

namespace blkmirror::qmp {

namespace {

const Schema kX509 = {{"qom-type", Type::kString, true},
                      {"id", Type::kString, true},
                      {"dir", Type::kString},
                      {"endpoint", Type::kEnum, false, {"client", "server"}},
                      {"verify-peer", Type::kBool},
                      {"priority", Type::kString}};
const Schema kPsk = {{"qom-type", Type::kString, true},
                     {"id", Type::kString, true},
                     {"dir", Type::kString},
                     {"endpoint", Type::kEnum, false, {"client", "server"}},
                     {"verify-peer", Type::kBool},
                     {"username", Type::kString},
                     {"priority", Type::kString}};

const Schema kId = {{"id", Type::kString, true}};
const Schema kAuthzSimple = {{"qom-type", Type::kString, true},
                             {"id", Type::kString, true},
                             {"identity", Type::kString, true}};
const Schema kAuthzRule = {{"match", Type::kString, true},
                           {"policy", Type::kEnum, true, {"deny", "allow"}},
                           {"format", Type::kEnum, false, {"exact", "glob"}}};
const Schema kAuthzList = {{"qom-type", Type::kString, true},
                           {"id", Type::kString, true},
                           {"policy", Type::kEnum, false, {"deny", "allow"}},
                           {"rules", Type::kAny}};

const Schema* schema_for(const std::string& type) {
  if (type == "tls-creds-x509") return &kX509;
  if (type == "tls-creds-psk") return &kPsk;
  if (type == "authz-simple") return &kAuthzSimple;
  if (type == "authz-list") return &kAuthzList;
  return nullptr;
}

// authz-list's rules: [{match, policy, format}], checked member by member.
QResult<nbd::TlsAuthz> authz_list(Json& a, bool coerce) {
  nbd::TlsAuthz z;
  z.allow_by_default = a.value("policy", "deny") == "allow";
  if (!a.contains("rules")) return z;
  Json& rules = a["rules"];
  if (!rules.is_array())
    return generic_error("Invalid parameter type for 'rules', expected: array");
  for (size_t i = 0; i < rules.size(); ++i) {
    const std::string prefix = fmt::format("rules[{}].", i);
    if (!rules[i].is_object())
      return generic_error(
          fmt::format("Invalid parameter type for 'rules[{}]', expected: object", i));
    if (auto r = check(rules[i], kAuthzRule, prefix, coerce); !r) return tl::unexpected(r.error());
    z.rules.push_back({rules[i]["match"].get<std::string>(), rules[i]["policy"] == "allow",
                       rules[i].value("format", "exact") == "glob"});
  }
  return z;
}

}  // namespace

struct Daemon::ObjectCommands {
  static Task<QResult<Json>> object_add(Daemon& d, Json& args, const Call& call);
  static Task<QResult<Json>> object_del(Daemon& d, Json& args, const Call& call);
};

std::span<const Daemon::Command> Daemon::object_commands() {
  static const Command table[] = {
      {"object-add", nullptr, &ObjectCommands::object_add},  // members depend on qom-type
      {"object-del", &kId, &ObjectCommands::object_del},
  };
  return table;
}

Task<QResult<Json>> Daemon::ObjectCommands::object_add(Daemon& d, Json& a, const Call& call) {
  auto t = a.find("qom-type");
  if (t == a.end()) co_return generic_error("Parameter 'qom-type' is missing");
  if (!t->is_string())
    co_return generic_error("Invalid parameter type for 'qom-type', expected: string");
  std::string type = t->get<std::string>();
  const Schema* schema = schema_for(type);
  if (!schema) co_return generic_error(bad_value("qom-type", type));
  if (auto r = check(a, *schema, "", call.coerce); !r) co_return tl::unexpected(r.error());
  std::string id = a["id"].get<std::string>();
  if (!id_wellformed(id)) co_return generic_error(fmt::format("Invalid object ID '{}'", id));
  if (d.objects_.count(id))
    co_return generic_error(
        fmt::format("attempt to add duplicate property '{}' to object (type 'container')", id));
  QomObject o;
  o.type = type;
  if (type == "authz-simple" || type == "authz-list") {
    if (type == "authz-simple") {
      o.authz.rules.push_back({a["identity"].get<std::string>(), true, false});
    } else {
      auto z = authz_list(a, call.coerce);
      if (!z) co_return tl::unexpected(z.error());
      o.authz = std::move(*z);
    }
    d.objects_.emplace(id, std::move(o));
    co_return Json::object();
  }
  o.dir = a.value("dir", "");
  o.endpoint = a.value("endpoint", "client");
  o.verify_peer = a.value("verify-peer", true);
  o.username = a.value("username", "");
  if (!o.dir.empty()) {
    auto p = d.checked_path(o.dir);
    if (!p) co_return tl::unexpected(p.error());
    struct stat st {};
    if (::stat(p->c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
      co_return generic_error(fmt::format("Unable to access credentials directory '{}'", o.dir));
    o.dir = *p;
  } else if (type == "tls-creds-psk") {
    co_return generic_error("Parameter 'dir' is missing (the directory holding keys.psk)");
  }
  d.objects_.emplace(id, std::move(o));
  co_return Json::object();
}

QResult<const Daemon::QomObject*> Daemon::tls_creds(const std::string& id) const {
  auto it = objects_.find(id);
  if (it == objects_.end())
    return generic_error(fmt::format("No TLS credentials with id '{}'", id));
  if (!it->second.is_tls_creds())
    return generic_error(fmt::format("Object with id '{}' is not TLS credentials", id));
  return &it->second;
}

Task<QResult<Json>> Daemon::ObjectCommands::object_del(Daemon& d, Json& a, const Call& call) {
  std::string id = a["id"].get<std::string>();
  if (!d.objects_.count(id)) co_return generic_error(fmt::format("object '{}' not found", id));
  const bool server_uses = d.nbd_ && (d.nbd_tls_creds_ == id || d.nbd_tls_authz_ == id);
  if (server_uses)
    co_return generic_error(fmt::format("object '{}' is in use, can not be deleted", id));
  for (auto& [name, rec] : d.nodes_)
    if (rec.tls_creds == id)
      co_return generic_error(fmt::format("object '{}' is in use, can not be deleted", id));
  d.objects_.erase(id);
  co_return Json::object();
}

}  // namespace blkmirror::qmp
