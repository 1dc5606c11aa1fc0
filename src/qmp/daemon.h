// Daemon: the state a QMP-driven storage daemon keeps (named block nodes, jobs,
// the NBD server and its exports) and the commands that act on it, with the
// arguments, replies, events and error texts qemu-storage-daemon 7.2 uses
// (docs/qmp.md says what a client sees). The wire (sockets, negotiation, framing) lives in
// qmp_server.h; the daemon only sees parsed commands and emits events.
//
// Commands are split by topic into cmd_*.cc files, each with the table of its
// commands (name, argument schema, handler, job verb); commands.cc joins the
// tables and runs execute(). block_chain.cc holds what qcow2 nodes and backing
// chains add to the block commands (see BlockCommands); reopen.cc switches a
// node between read-only and read-write.
//
// Threading rule: loop thread only. The Loop must outlive the Daemon; call
// shutdown() and await it before destroying the Daemon.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "base/notifier.h"
#include "blockdev/graph.h"
#include "blockdev/image_format.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "io/loop.h"
#include "job/job.h"
#include "mirror/mirror_state.h"
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
  // Every job not yet dismissed, and the NBD server if started (the metrics).
  std::vector<std::shared_ptr<Job>> jobs() const {
    std::vector<std::shared_ptr<Job>> out;
    for (auto& [id, j] : jobs_) out.push_back(j);
    return out;
  }
  nbd::NbdServer* nbd_server() const { return nbd_.get(); }
  // The job of that id, or nullptr (an in-process caller drives it: the CLI).
  std::shared_ptr<Job> find_job(const std::string& id) const {
    auto it = jobs_.find(id);
    return it == jobs_.end() ? nullptr : it->second;
  }

  // Switches a node between read-only and read-write, with the node it holds as
  // `file` (raw, qcow2, blkdebug) reopened alongside: going read-write the file
  // first, then the format (qcow2 checks its header as on a writable open);
  // going read-only the format first (qcow2 writes its metadata back, image
  // clean), then the file. Files reopen O_RDWR/O_RDONLY and move their image
  // locks. The node is drained meanwhile (its file only while the file's own
  // device reopens: the format writes back through it). A file that another
  // parent writes stays read-write. Refused, with QEMU's texts and nothing
  // changed: a parent of the node that writes while going read-only ("Read-only
  // block node 'X' cannot support read-write users"); a permission conflict of
  // the format's file edge, an image lock conflict or a qcow2 image that cannot
  // be written (dirty, corrupt) while going read-write; a driver that cannot
  // reopen (nbd). blockdev-reopen and block-commit (a read-only base) use it.
  Task<QResult<void>> reopen_read_only(const std::string& node, bool read_only);

 private:
  struct NodeRecord {
    std::string driver;
    std::string filename;  // file: the path; raw, qcow2: its file node's
    bool read_only = false;
    bool direct = false;
    bool local = false;                   // filename is a local path (file, or over one)
    std::unique_ptr<Child> file_edge;     // raw, qcow2: the edge to its file node
    std::unique_ptr<Child> backing_edge;  // qcow2: the edge to its backing node
    std::shared_ptr<Qcow2Device> qcow2;   // qcow2: the device (info, close)
    std::string full_backing;             // qcow2: the header's backing file, resolved
    // Nodes made for this one (an inline file object, a backing file opened from
    // the header): deleted with it, as QEMU does.
    std::vector<std::string> implicit;
    std::string tls_creds;  // nbd: the TLS object it uses
    // The blockdev-add arguments as checked (inline children named):
    // blockdev-reopen compares what it is given against them.
    Json options;
  };
  // An object made by object-add: TLS credentials (tls-creds-x509,
  // tls-creds-psk) or an authorization list (authz-simple, authz-list).
  struct QomObject {
    std::string type;
    bool is_tls_creds() const { return type.starts_with("tls-creds-"); }
    // TLS credentials.
    std::string dir;
    std::string endpoint = "client";
    bool verify_peer = true;
    std::string username;
    // Authorization: whom it lets in.
    nbd::TlsAuthz authz;
  };
  struct ExportRecord {
    std::string id, node, name;
    bool writable = false;
  };
  // What a handler knows of the request besides its arguments. Passed by
  // reference down each call rather than kept in members: requests of several
  // clients interleave at every co_await.
  struct Call {
    std::string name;  // the command ("block-job-pause")
    bool coerce;       // from the command line: string values convert to the member's type
    std::optional<JobVerb> verb;  // the job verb the command applies (its table entry's)
  };
  using Handler = Task<QResult<Json>> (*)(Daemon& d, Json& args, const Call& call);
  // One QMP command. Each cmd_*.cc lists its own commands in a table of these,
  // so adding a command touches that file only.
  struct Command {
    std::string_view name;
    const Schema* schema;  // nullptr: the handler checks (union types)
    Handler handler;
    std::optional<JobVerb> verb = std::nullopt;  // block-job-pause, job-cancel, ...
  };
  // Every command, by name: the tables of the files below joined.
  static const std::map<std::string_view, const Command*>& commands();

  // The command files. Each defines a nested class (so its handlers reach the
  // daemon's state) holding its handlers, and the table of its commands.
  struct CoreCommands;    // commands.cc: query-version, query-commands, quit
  struct BlockCommands;   // cmd_block.cc: blockdev-add/del/create, query-named-block-nodes
  struct ObjectCommands;  // cmd_objects.cc: object-add/del
  struct JobCommands;     // cmd_jobs.cc: blockdev-mirror, job queries, block-job-* and job-* verbs
  struct NbdCommands;     // cmd_nbd.cc: nbd-server-start/stop, block-export-*
  struct CommitCommands;  // cmd_commit.cc: block-commit
  struct ReopenCommands;  // cmd_reopen.cc: blockdev-reopen
  struct ResizeCommands;  // cmd_resize.cc: block_resize / block-resize
  struct DriveMirrorCommands;  // cmd_drive_mirror.cc: drive-mirror
  struct BitmapCommands;  // cmd_bitmap.cc: block-dirty-bitmap-*, transaction
  struct VerifyCommands;       // cmd_verify.cc: x-blockdev-verify, x-query-verify
  static std::span<const Command> core_commands();
  static std::span<const Command> block_commands();
  static std::span<const Command> object_commands();
  static std::span<const Command> job_commands();
  static std::span<const Command> nbd_commands();
  static std::span<const Command> commit_commands();
  static std::span<const Command> reopen_commands();
  static std::span<const Command> resize_commands();
  static std::span<const Command> drive_mirror_commands();
  static std::span<const Command> bitmap_commands();
  static std::span<const Command> verify_commands();
  // blockdev-add's schema for a driver, or nullptr (cmd_block.cc).
  static const Schema* node_schema(std::string_view driver);

  // Shared by several command files.
  QResult<std::string> checked_path(const std::string& path) const;  // cmd_block.cc
  // The TLS credentials object of that id, with QEMU's texts for a missing id
  // or another kind of object (cmd_objects.cc).
  QResult<const QomObject*> tls_creds(const std::string& id) const;
  void add_job(std::shared_ptr<Job> job);  // cmd_jobs.cc
  // blockdev-mirror's x-persistent-state: opens or creates the state file
  // (mirror/mirror_state.h) and sets p.journal and p.resume (cmd_jobs.cc).
  Task<QResult<MirrorState>> open_state(const std::string& path, MirrorParams& p,
                                        bool granularity_given);
  const BlockDevice& backing_store(const Node& n) const;
  void on_job_event(const JobEvent& e);  // cmd_jobs.cc

  // Block nodes and chains: blockdev-add's body and its children (cmd_block.cc),
  // qcow2 nodes, implicit backing nodes, image info (block_chain.cc).
  // guard: the chain being opened (a backing file opened from a header), else
  // nullptr. implicit_name: the node name was made here (#blockN), so QEMU's
  // rule for user names does not apply.
  Task<QResult<Json>> add_node(Json& args, const Call& call, ChainGuard* guard, bool implicit_name);
  // A format's child given as a node name or an inline object (added, named
  // after the parent, and recorded in rec.implicit). Returns its node name.
  // trusted: the parent's name was made here, so are its children's.
  Task<QResult<std::string>> child_ref(Json& ref, const std::string& parent,
                                       const std::string& member, bool parent_read_only,
                                       NodeRecord& rec, const Call& call, ChainGuard* guard,
                                       bool trusted);
  Task<QResult<BlockDevicePtr>> open_qcow2_node(Json& args, const std::string& name,
                                                NodeRecord& rec, const Call& call,
                                                ChainGuard* guard, bool trusted);
  // Opens the backing file a qcow2 header names (read-only, format from the
  // header or probed) as two implicit nodes; returns the format node's name,
  // recorded in rec.implicit.
  Task<QResult<std::string>> open_backing_from_header(NodeRecord& rec, const Qcow2Info& info,
                                                      const Call& call, ChainGuard* guard);
  std::string implicit_node_name();
  // Removes a node and, after it, the implicit nodes it made that nobody else
  // uses. Closes qcow2 devices (metadata written back, image marked clean).
  Task<void> remove_node_tree(const std::string& name);
  Json image_info(const Node& n, bool flat) const;
  Json named_block_nodes(bool flat) const;  // query-named-block-nodes' reply
  Task<QResult<Json>> create_qcow2(Json& args, Json& o, const Call& call);
  // reopen.cc: reopen_read_only's steps.
  Task<QResult<void>> reopen_read_write(Node& n, NodeRecord& rec, Node* file);
  Task<QResult<void>> reopen_to_read_only(Node& n, NodeRecord& rec, Node* file);
  QmpError reopen_error(const Node& n, const Error& e) const;

  // What block-commit does to the graph once its job concluded (cmd_commit.cc).
  struct CommitAftermath {
    bool active = false;
    std::string top, base, overlay;     // overlay: intermediate commit only
    std::vector<std::string> removed;   // the layers leaving the chain, top first
    std::string backing_file;           // written into the overlay's header
    std::vector<std::string> reopened;  // made read-write for the job
  };
  Task<void> after_commit(std::shared_ptr<Job> job, CommitAftermath a);
  // A refused block-commit puts back the flags it changed.
  Task<void> restore_read_only(const std::vector<std::string>& names);
  Task<void> drop_committed_layers(const CommitAftermath& a);

  void emit(const std::string& name, const Json& data) {
    if (sink_) sink_(name, data);
  }

  Loop& loop_;
  DaemonOptions opts_;
  Graph graph_;
  std::map<std::string, QomObject> objects_;
  // The objects the NBD server was started with (object-del refuses them).
  std::string nbd_tls_creds_, nbd_tls_authz_;
  std::map<std::string, NodeRecord> nodes_;
  uint64_t implicit_counter_ = 0;  // for #blockN names
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::unique_ptr<nbd::NbdServer> nbd_;
  std::map<std::string, ExportRecord> exports_;
  EventSink sink_;
  unsigned aftermaths_ = 0;  // after_commit() and drive-mirror clean-ups still running
  Notifier aftermaths_done_;
  bool quitting_ = false;
  Notifier quit_changed_;
};

// A node's dirty bitmaps as query-named-block-nodes lists them (cmd_bitmap.cc).
Json dirty_bitmaps_json(const Node& n);

}  // namespace blkmirror::qmp
