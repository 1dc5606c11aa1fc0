// `blkmirror daemon --qmp PATH`: a storage daemon driven over QMP, compatible
// with qemu-storage-daemon for the commands it has (docs/qmp.md). Nodes, the
// NBD server and exports can also come up from the command line, in QEMU's
// keyval or JSON form:
//   blkmirror daemon --qmp /run/bm.sock
//     --blockdev driver=file,node-name=disk,filename=disk.img
//     --nbd-server addr.type=unix,addr.path=/run/disk.sock
//     --export type=nbd,id=e0,node-name=disk,writable=on
// The same options can come from a file (--config, cli/daemon_config.h). Under
// systemd (Type=notify) it reports READY=1 once everything listens.
// `quit`, SIGINT or SIGTERM: running jobs are cancelled (forced), the NBD server
// stops, nodes are flushed.
#include <csignal>

#include <fmt/format.h>
#include <systemd/sd-daemon.h>

#include "base/host_port.h"
#include "cli/commands.h"
#include "cli/daemon_config.h"
#include "cli/exit_codes.h"
#include "cli/metrics_option.h"
#include "cli/mirror_options.h"
#include "cli/serve_options.h"
#include "cli/signals.h"
#include "qmp/daemon.h"
#include "qmp/qmp_server.h"

namespace blkmirror {

namespace {

struct DaemonArgs {
  std::string config;
  MetricsOption metrics;
  std::string qmp, qmp_tcp, file_root;
  std::vector<std::string> blockdevs, exports;
  std::string nbd_server;
};

// The command line over the config file: single values given on the command
// line win; repeatable ones (blockdev, export) come from the file first.
Result<DaemonArgs> merged(const DaemonArgs& cmdline) {
  if (cmdline.config.empty()) return cmdline;
  auto c = load_daemon_config(cmdline.config);
  if (!c) return tl::unexpected(c.error());
  DaemonArgs a = cmdline;
  auto pick = [](std::string& mine, const std::string& theirs) {
    if (mine.empty()) mine = theirs;
  };
  pick(a.qmp, c->qmp);
  pick(a.qmp_tcp, c->qmp_tcp);
  pick(a.file_root, c->file_root);
  pick(a.nbd_server, c->nbd_server);
  a.blockdevs = c->blockdevs;
  a.blockdevs.insert(a.blockdevs.end(), cmdline.blockdevs.begin(), cmdline.blockdevs.end());
  a.exports = c->exports;
  a.exports.insert(a.exports.end(), cmdline.exports.begin(), cmdline.exports.end());
  return a;
}

// --nbd-server uses QEMU's flat address (addr.type=unix,addr.path=P); the QMP
// command takes the legacy form with the members under "data".
qmp::Json nbd_server_args(qmp::Json j) {
  if (!j.contains("addr") || !j["addr"].is_object() || j["addr"].contains("data")) return j;
  qmp::Json flat = j["addr"];
  qmp::Json addr = {{"data", qmp::Json::object()}};
  for (auto it = flat.begin(); it != flat.end(); ++it) {
    if (it.key() == "type") addr["type"] = it.value();
    else addr["data"][it.key()] = it.value();
  }
  j["addr"] = addr;
  return j;
}

int run_daemon(const DaemonArgs& cmdline) {
  auto parsed = merged(cmdline);
  if (!parsed) {
    fmt::print(stderr, "{}\n", parsed.error().message());
    return exit_code::kBadInput;
  }
  const DaemonArgs& a = *parsed;
  if (a.qmp.empty()) return fail_input("daemon: --qmp (or qmp = PATH in --config) is required");
  Loop loop;
  StraySignalGuard stray_signals(loop);  // before any other signal_set: outlives them
  qmp::Daemon daemon(loop, qmp::DaemonOptions{a.file_root});
  qmp::QmpServer server(loop, daemon);
  if (auto r = server.listen_unix(a.qmp); !r) return fail_input(r.error().message());
  if (!a.qmp_tcp.empty()) {
    auto hp = parse_host_port(a.qmp_tcp);
    if (!hp) return fail_input(fmt::format("--qmp-tcp '{}': {}", a.qmp_tcp, hp.error().message()));
    if (auto r = server.listen_tcp(hp->host.empty() ? "127.0.0.1" : hp->host, *hp->port); !r)
      return fail_input(r.error().message());
  }
  auto metrics = a.metrics.start(
      loop, metrics::Sources{&daemon.graph(), [&daemon] { return daemon.nbd_server(); },
                             [&daemon] { return daemon.jobs(); }});
  if (!metrics) return fail_input(metrics.error().message());
  return loop.run([&]() -> Task<int> {
    // Startup objects, in the order a QMP client would make them.
    std::vector<std::tuple<std::string, std::string, std::string>> steps;
    for (auto& b : a.blockdevs) steps.emplace_back("--blockdev", "blockdev-add", b);
    if (!a.nbd_server.empty()) steps.emplace_back("--nbd-server", "nbd-server-start", a.nbd_server);
    for (auto& e : a.exports) steps.emplace_back("--export", "block-export-add", e);
    for (auto& [opt, cmd, text] : steps) {
      std::string err;
      auto j = qmp::parse_keyval(text);
      if (!j) {
        err = j.error().desc;
      } else {
        if (cmd == "nbd-server-start") *j = nbd_server_args(*j);
        auto r = co_await daemon.execute(cmd, *j, true);
        if (!r) err = r.error().desc;
      }
      if (!err.empty()) {
        fmt::print(stderr, "blkmirror: {} {}: {}\n", opt, text, err);
        co_await daemon.shutdown();
        co_await server.stop();
        if (*metrics) co_await (*metrics)->stop();
        co_return exit_code::kBadInput;
      }
    }
    const std::string where =
        a.qmp + (a.qmp_tcp.empty() ? "" : fmt::format(" and tcp:{}", server.tcp_port()));
    fmt::print(stderr, "blkmirror daemon: QMP at {}\n", where);
    // Type=notify units: `systemctl start` returns once QMP, the NBD server and
    // the exports are up (a no-op outside systemd: NOTIFY_SOCKET unset).
    sd_notifyf(0, "READY=1\nSTATUS=QMP at %s", where.c_str());
    asio::co_spawn(
        loop.executor(),
        [](Loop* l, qmp::Daemon* d) -> Task<void> {
          if (co_await wait_stop_signal(*l)) d->request_quit();
        }(&loop, &daemon),
        asio::detached);
    co_await daemon.wait_quit();
    if (*metrics) co_await (*metrics)->stop();
    sd_notify(0, "STOPPING=1\nSTATUS=stopping: jobs cancelled, nodes flushed");
    auto flushed = co_await daemon.shutdown();
    co_await server.stop();
    if (!flushed) {
      fmt::print(stderr, "blkmirror daemon: flush failed: {}\n", flushed.error().message());
      co_return exit_code::kJobFailed;
    }
    fmt::print(stderr, "blkmirror daemon: stopped\n");
    co_return exit_code::kOk;
  }());
}

}  // namespace

CommandRunner add_daemon_command(CLI::App& app) {
  auto args = std::make_shared<DaemonArgs>();
  auto* cmd = app.add_subcommand(
      "daemon", "Run a storage daemon driven over QMP (qemu-storage-daemon compatible)");
  cmd->add_option("--config", args->config,
                  "read startup options from FILE: KEY = VALUE lines with the keys qmp, "
                  "qmp-tcp, file-root, blockdev, nbd-server, export (docs/cli.md)");
  cmd->add_option("--qmp", args->qmp, "UNIX socket path for QMP (created with mode 0600)");
  cmd->add_option("--qmp-tcp", args->qmp_tcp,
                  "also serve QMP on loopback TCP HOST:PORT (port 0: any)");
  cmd->add_option("--blockdev", args->blockdevs,
                  "add a node at startup (keyval or JSON, as blockdev-add)");
  cmd->add_option("--nbd-server", args->nbd_server,
                  "start the NBD server (addr.type=unix,addr.path=P or "
                  "addr.type=inet,addr.host=H,addr.port=N)");
  cmd->add_option("--export", args->exports,
                  "export a node at startup (type=nbd,id=ID,node-name=N[,writable=on])");
  args->metrics.add_to(*cmd);
  cmd->add_option("--file-root", args->file_root,
                  "only open or create image files below this directory");
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_daemon(*args);
  };
}

}  // namespace blkmirror
