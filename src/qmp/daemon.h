// Daemon: the state a QMP-driven storage daemon keeps (named block nodes, jobs,
// the NBD server and its exports) and the commands that act on it, with the
// arguments, replies, events and error texts qemu-storage-daemon 7.2 uses
// (docs/qmp.md says what a client sees). The wire (sockets, negotiation, framing) lives in
// qmp_server.h; the daemon only sees parsed commands and emits events.
//
// Command handlers are split by topic: cmd_block.cc (nodes), cmd_jobs.cc (mirror
// and job verbs), cmd_nbd.cc (NBD server and exports), commands.cc (the command
// table, version, capabilities).
//
// Threading rule: loop thread only. The Loop must outlive the Daemon; call
// shutdown() and await it before destroying the Daemon.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "base/notifier.h"
#include "blockdev/graph.h"
#include "io/loop.h"
#include "job/job.h"
#include "nbd/server/nbd_server.h"
#include "qmp/schema.h"

namespace blkmirror::qmp {

struct DaemonOptions {
  // When set, blockdev-add and blockdev-create only accept files below this
  // directory (a daemon exposed to less trusted clients; the fuzz target).
  std::string file_root;
};

class Daemon {
 public:
  using EventSink = std::function<void(const std::string& name, const Json& data)>;

  Daemon(Loop& loop, DaemonOptions opts = {});
  ~Daemon();

  // Runs one command (after capabilities negotiation, which is the wire's
  // business). Arguments are checked against the command's schema first, so a
  // refused command has no side effect.
  // from_command_line: arguments in keyval form (all strings), converted to
  // each member's type as QEMU does for --blockdev.
  Task<QResult<Json>> execute(const std::string& name, Json args, bool from_command_line = false);
  bool has_command(const std::string& name) const;
  std::vector<std::string> command_names() const;

  void set_event_sink(EventSink sink) { sink_ = std::move(sink); }

  // True once `quit` was executed; quit_requested() wakes whoever waits.
  bool quitting() const { return quitting_; }
  Task<void> wait_quit() {
    while (!quitting_) co_await quit_changed_.wait();
  }
  void request_quit() {
    quitting_ = true;
    quit_changed_.notify_all();
  }
  // Cancels running jobs (forced) and waits for them, stops the NBD server
  // (connections closed), and flushes every node. Returns the first flush error.
  Task<Result<void>> shutdown();

  Graph& graph() { return graph_; }
  size_t job_count() const { return jobs_.size(); }

 private:
  struct NodeRecord {
    std::string driver;
    std::string filename;  // file: the path; raw: its file node's
    bool read_only = false;
    bool direct = false;
    std::unique_ptr<Child> file_edge;  // raw: the edge to its file node
    std::string tls_creds;             // nbd: the TLS object it uses
  };
  // A tls-creds-x509 / tls-creds-psk object made by object-add.
  struct TlsObject {
    std::string type;  // "tls-creds-x509" | "tls-creds-psk"
    std::string dir;
    std::string endpoint = "client";
    bool verify_peer = true;
    std::string username;
  };
  struct ExportRecord {
    std::string id, node, name;
    bool writable = false;
  };
  // What a handler knows of the request besides its arguments. Passed by value
  // down each call rather than kept in members: requests of several clients
  // interleave at every co_await.
  struct Call {
    std::string name;  // the command ("block-job-pause")
    bool coerce;       // from the command line: string values convert to the member's type
  };
  using Handler = Task<QResult<Json>> (Daemon::*)(Json& args, const Call& call);
  struct Command {
    const Schema* schema;  // nullptr: the handler checks (union types)
    Handler handler;
  };
  static const std::map<std::string, Command>& commands();

  // commands.cc
  Task<QResult<Json>> cmd_query_version(Json& args, const Call& call);
  Task<QResult<Json>> cmd_query_commands(Json& args, const Call& call);
  Task<QResult<Json>> cmd_quit(Json& args, const Call& call);
  // cmd_block.cc
  Task<QResult<Json>> cmd_blockdev_add(Json& args, const Call& call);
  Task<QResult<Json>> cmd_blockdev_del(Json& args, const Call& call);
  Task<QResult<Json>> cmd_blockdev_create(Json& args, const Call& call);
  Task<QResult<Json>> cmd_query_named_block_nodes(Json& args, const Call& call);
  QResult<std::string> checked_path(const std::string& path) const;
  Task<QResult<BlockDevicePtr>> open_nbd_node(Json& args);
  // cmd_objects.cc
  Task<QResult<Json>> cmd_object_add(Json& args, const Call& call);
  Task<QResult<Json>> cmd_object_del(Json& args, const Call& call);
  // cmd_jobs.cc
  Task<QResult<Json>> cmd_blockdev_mirror(Json& args, const Call& call);
  Task<QResult<Json>> cmd_query_block_jobs(Json& args, const Call& call);
  Task<QResult<Json>> cmd_query_jobs(Json& args, const Call& call);
  Task<QResult<Json>> cmd_block_job_verb(Json& args, const Call& call);
  Task<QResult<Json>> cmd_job_verb(Json& args, const Call& call);
  Task<QResult<Json>> cmd_block_job_set_speed(Json& args, const Call& call);
  Task<QResult<Json>> cmd_block_job_cancel(Json& args, const Call& call);
  Task<QResult<Json>> cmd_block_job_change(Json& args, const Call& call);
  void add_job(std::shared_ptr<Job> job);
  void on_job_event(const JobEvent& e);
  // cmd_nbd.cc
  Task<QResult<Json>> cmd_nbd_server_start(Json& args, const Call& call);
  Task<QResult<Json>> cmd_nbd_server_stop(Json& args, const Call& call);
  Task<QResult<Json>> cmd_block_export_add(Json& args, const Call& call);
  Task<QResult<Json>> cmd_block_export_del(Json& args, const Call& call);
  Task<QResult<Json>> cmd_query_block_exports(Json& args, const Call& call);

  void emit(const std::string& name, const Json& data) {
    if (sink_) sink_(name, data);
  }

  Loop& loop_;
  DaemonOptions opts_;
  Graph graph_;
  std::map<std::string, TlsObject> objects_;
  std::map<std::string, NodeRecord> nodes_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::unique_ptr<nbd::NbdServer> nbd_;
  std::map<std::string, ExportRecord> exports_;
  EventSink sink_;
  bool quitting_ = false;
  Notifier quit_changed_;
};

}  // namespace blkmirror::qmp
