//! A client for CRIU's RPC protocol (`criu swrk`), blocking, on `libc` and
//! the message types generated from CRIU's `rpc.proto`.
//!
//! Each request spawns `criu swrk <fd>` with one end of a
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)`; CRIU reads one `criu_req` per
//! packet and answers with `criu_resp`s: zero or more `NOTIFY`s (action
//! scripts, which the client answers), then the answer to the request. See
//! [`proto`] for the messages.
//!
//! ```no_run
//! use criu_bridge::rpc::{CriuClient, Job, Notify};
//! # fn main() -> Result<(), criu_bridge::Error> {
//! let criu = CriuClient::new("/usr/local/sbin/criu");
//! let mut job = Job::new("/dev/shm/ckpt");
//! job.opts.pid = Some(1234);
//! job.opts.leave_running = Some(true);
//! let out = criu.dump(&job, Some(&mut |n: Notify<'_>| {
//!     if n.script == "post-dump" {
//!         // The tree is frozen and its images are complete: capture
//!         // whatever must match them, here.
//!     }
//!     Ok(())
//! }))?;
//! println!("frozen-window hook took {:?} ms", out.hook_duration_ms);
//! # Ok(()) }
//! ```
//!
//! For lazy (post-copy) restores, [`LazyPages`] runs CRIU's lazy-pages
//! daemon, which RPC cannot start.
//!
//! # The frozen-window hook
//!
//! CRIU's `post-dump` notification arrives after every image (memory
//! included) has been written and flushed, and *before* CRIU releases the
//! tree: the network is still locked and every task is still stopped
//! (ptrace-seized, and frozen in its freezer cgroup when
//! [`CriuOpts::freeze_cgroup`] is set). That is the one point where the
//! process state on disk is final and the processes cannot change anything:
//! whatever the callback captures there is a consistent cut with the images.
//! The callback runs inside the freeze, so it must be short. Its start
//! (unix ms) and duration are recorded in [`DumpOutcome`]. If it returns
//! `Err`, the client answers the notification with failure: CRIU aborts the
//! dump ("Dumping FAILED") and lets the tree run again, also for a dump
//! that was not asked to leave it running.
//!
//! # Failures
//!
//! Every failure is [`Error::Criu`] with a [`CriuFailure`] telling the
//! cases apart: CRIU answered "failed" ([`CriuFailure::Refused`]), a
//! callback failed ([`CriuFailure::HookFailed`]), CRIU died or closed the
//! connection before answering ([`CriuFailure::Died`]), the deadline
//! passed and CRIU was killed ([`CriuFailure::TimedOut`]), CRIU could not
//! be started ([`CriuFailure::Spawn`]) or sent garbage
//! ([`CriuFailure::Protocol`]). When CRIU dies or is killed during a dump
//! with a freezer cgroup, the client puts the cgroup back as it was before
//! the dump (thawed, or frozen if the user had paused the container: CRIU
//! can no longer do it) and says so in the error.
//! (CRIU 4.2.1 with a v1 freezer freezes the cgroup only while it seizes
//! the tasks, then thaws it and holds the tasks with ptrace alone; the
//! kernel releases ptrace-stopped tasks when CRIU dies, so the tree runs
//! on.)

mod conn;
mod lazy;
#[cfg(test)]
mod live_tests;
pub mod proto;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use proto::{
    ext_mount, CgMode, CgroupRoot, CriuOpts, CriuVersion, EnumOrUnknown, ExtMountMap, InheritFd,
    JoinNamespace, MessageField, NetworkLockMethod, PageServerInfo, PreDumpMode, ReqType,
};

pub use conn::{recv_packet, Packet};
pub use lazy::LazyPages;

use conn::{Conn, ConnError};
use proto::{request, CriuFeaturesMsg, CriuReq, CriuResp};

use crate::Error;

/// What kind of failure a CRIU request ended in (see [`Error::Criu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CriuFailure {
    /// `criu swrk` could not be started (binary missing, fork failed), or
    /// the request could not be prepared (images dir missing).
    Spawn,
    /// CRIU answered that the request failed. CRIU cleaned up after itself:
    /// a dumped tree runs again.
    Refused,
    /// A notification callback returned `Err`; CRIU was told and aborted
    /// the request (a dumped tree runs again).
    HookFailed,
    /// CRIU died or closed the connection before answering.
    Died,
    /// The deadline passed; CRIU was killed.
    TimedOut,
    /// CRIU sent a message that is not a valid answer.
    Protocol,
}

impl Error {
    /// The kind of CRIU failure, when this error is one.
    pub fn criu_failure(&self) -> Option<CriuFailure> {
        match self {
            Error::Criu { failure, .. } => Some(*failure),
            _ => None,
        }
    }
}

fn criu_err(action: &str, failure: CriuFailure, detail: impl Into<String>) -> Error {
    Error::Criu {
        action: action.to_string(),
        failure,
        detail: detail.into(),
    }
}

/// One notification from CRIU (an "action script" run over RPC).
#[derive(Debug)]
pub struct Notify<'a> {
    /// The action: `pre-dump`, `network-lock`, `post-dump`,
    /// `network-unlock`, `pre-restore`, `setup-namespaces`,
    /// `post-setup-namespaces`, `post-restore`, `pre-resume`,
    /// `post-resume`, `orphan-pts-master`, `status-ready`,
    /// `query-ext-files`.
    pub script: &'a str,
    /// The root task's pid (CRIU sends it with `setup-namespaces` and
    /// `post-restore`).
    pub pid: Option<i32>,
    /// The fd CRIU passed along (`orphan-pts-master`: the pty master).
    /// Dropping it closes it.
    pub fd: Option<OwnedFd>,
    /// The pid of the `criu swrk` serving this request.
    pub criu_pid: u32,
}

/// A notification callback. `Err(reason)` makes CRIU abort the request.
pub type NotifyFn<'a> = dyn FnMut(Notify<'_>) -> Result<(), String> + 'a;

/// One notification as it happened, for profiling where the time goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyEvent {
    /// The action name.
    pub script: String,
    /// When it arrived, ms since the request was sent.
    pub at_ms: f64,
    /// How long the callback took, ms.
    pub callback_ms: f64,
}

/// A CRIU request's directories, options and inherited fds.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// Where CRIU reads or writes its images. It must exist; the client
    /// opens it and hands CRIU the fd (`images_dir_fd`).
    pub images_dir: PathBuf,
    /// CRIU's work dir (log, `stats-dump`); the images dir when `None`.
    pub work_dir: Option<PathBuf>,
    /// Everything else CRIU is told. `images_dir_fd`, `work_dir_fd` and
    /// `notify_scripts` are filled in by the client.
    pub opts: CriuOpts,
    /// Fds of this process that CRIU must inherit under the same number
    /// (the fds named in [`CriuOpts::inherit_fd`] or
    /// [`PageServerInfo::fd`]).
    pub inherit_fds: Vec<RawFd>,
}

impl Job {
    /// A job on `images_dir` with CRIU's default options, logging at level 2
    /// to the file CRIU's CLI would use (`dump.log`, `restore.log`, ... set
    /// per request unless [`CriuOpts::log_file`] is given).
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        Job {
            images_dir: images_dir.into(),
            ..Default::default()
        }
    }

    /// Where CRIU's log for this job goes, given the default log name.
    pub fn log_path(&self, default_name: &str) -> PathBuf {
        let dir = self.work_dir.as_ref().unwrap_or(&self.images_dir);
        dir.join(self.opts.log_file.as_deref().unwrap_or(default_name))
    }
}

/// The result of a dump or pre-dump.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DumpOutcome {
    /// The pid of the `criu swrk` that did it.
    pub criu_pid: u32,
    /// Request sent to answer received, ms.
    pub wall_ms: f64,
    /// When the frozen-window (`post-dump`) callback started, unix ms.
    pub hook_started_at_unix_ms: Option<u64>,
    /// How long the frozen-window callback ran, ms.
    pub hook_duration_ms: Option<f64>,
    /// Every notification, in order.
    pub events: Vec<NotifyEvent>,
    /// CRIU's log file for this request.
    pub log_file: PathBuf,
}

/// The result of a restore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreOutcome {
    /// The restored root task's pid (in the caller's pid namespace). With
    /// [`CriuOpts::rst_sibling`] it is the caller's child and the caller
    /// must reap it.
    pub pid: i32,
    /// The pid of the `criu swrk` that did it.
    pub criu_pid: u32,
    /// Request sent to answer received, ms.
    pub wall_ms: f64,
    /// Every notification, in order.
    pub events: Vec<NotifyEvent>,
    /// CRIU's log file for this request.
    pub log_file: PathBuf,
}

/// A page server CRIU started. It serves one dump (or lazy-pages session)
/// and exits; the caller may kill it earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageServer {
    /// The daemon's pid.
    pub pid: i32,
    /// The TCP port it listens on.
    pub port: i32,
}

/// What CRIU's `FEATURE_CHECK` says works on this kernel with this CRIU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriuFeatures {
    /// Memory dirty tracking (soft-dirty): pre-dump and iterative pre-copy.
    pub mem_track: bool,
    /// userfaultfd lazy pages (post-copy restore).
    pub lazy_pages: bool,
    /// pidfd store.
    pub pidfd_store: bool,
}

type SpawnHook = Arc<dyn Fn(u32) + Send + Sync>;

/// Drives CRIU through `criu swrk`. Cheap to clone; every call is blocking
/// (call it from `spawn_blocking` in async code) and independent (one CRIU
/// process per request).
#[derive(Clone)]
pub struct CriuClient {
    binary: PathBuf,
    timeout: Option<Duration>,
    on_spawn: Option<SpawnHook>,
    helper_dir: Option<PathBuf>,
}

impl std::fmt::Debug for CriuClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriuClient")
            .field("binary", &self.binary)
            .field("timeout", &self.timeout)
            .field("helper_dir", &self.helper_dir)
            .finish_non_exhaustive()
    }
}

/// Everything a finished request produced.
struct Done {
    resp: CriuResp,
    criu_pid: u32,
    wall_ms: f64,
    events: Vec<NotifyEvent>,
    hook_started_at_unix_ms: Option<u64>,
    hook_duration_ms: Option<f64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether a freezer cgroup is thawed: cgroup v1 `freezer.state` reads
/// `THAWED`, or v2 `cgroup.freeze` reads `0`.
pub fn freezer_is_thawed(path: &Path) -> std::io::Result<bool> {
    match std::fs::read_to_string(path.join("freezer.state")) {
        Ok(s) => Ok(s.trim() == "THAWED"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(std::fs::read_to_string(path.join("cgroup.freeze"))?.trim() == "0")
        }
        Err(e) => Err(e),
    }
}

/// Freezes a freezer cgroup (v1 `FROZEN`, v2 `cgroup.freeze` = `1`).
pub fn freeze_freezer(path: &Path) -> std::io::Result<()> {
    let v1 = path.join("freezer.state");
    if v1.exists() {
        return std::fs::write(v1, "FROZEN");
    }
    std::fs::write(path.join("cgroup.freeze"), "1")
}

/// Freezes a freezer cgroup and waits until the kernel reports it frozen,
/// polling every 0.2 ms for at most `bound`; returns how long it took, ms.
pub fn freeze_freezer_and_wait(path: &Path, bound: Duration) -> std::io::Result<f64> {
    let t0 = std::time::Instant::now();
    freeze_freezer(path)?;
    let v1 = path.join("freezer.state");
    loop {
        let frozen = if v1.exists() {
            std::fs::read_to_string(&v1)?.trim() == "FROZEN"
        } else {
            std::fs::read_to_string(path.join("cgroup.events"))?
                .lines()
                .any(|l| l.trim() == "frozen 1")
        };
        if frozen {
            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if t0.elapsed() > bound {
            return Err(std::io::Error::other(format!(
                "{} not frozen after {} ms",
                path.display(),
                bound.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Thaws a freezer cgroup: cgroup v1 (`freezer.state` = `THAWED`) or v2
/// (`cgroup.freeze` = `0`). `path` is the cgroup directory.
pub fn thaw_freezer(path: &Path) -> std::io::Result<()> {
    let v1 = path.join("freezer.state");
    if v1.exists() {
        return std::fs::write(v1, "THAWED");
    }
    std::fs::write(path.join("cgroup.freeze"), "0")
}

/// This process's PATH with `dir` put first (the default search path when
/// PATH is unset).
fn path_with_first(dir: &Path) -> std::ffi::OsString {
    let rest = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut p = dir.as_os_str().to_os_string();
    p.push(":");
    p.push(rest);
    p
}

impl CriuClient {
    /// A client running `binary` (e.g. `/usr/local/sbin/criu`), without a
    /// deadline.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        CriuClient {
            binary: binary.into(),
            timeout: None,
            on_spawn: None,
            helper_dir: None,
        }
    }

    /// Puts `dir` first on the PATH of every CRIU this client starts, so
    /// the helpers CRIU executes by name (`tar` for tmpfs contents,
    /// `iptables-save`, ...) are taken from there first. ms2m installs a
    /// fast `tar` for dumps there (crate `ms2m-criu-tar`). `None` leaves
    /// CRIU's PATH as the caller's.
    pub fn with_helper_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.helper_dir = dir;
        self
    }

    /// The directory put first on CRIU's PATH, if any.
    pub fn helper_dir(&self) -> Option<&Path> {
        self.helper_dir.as_deref()
    }

    /// Sets an overall deadline per request (spawn to answer, callbacks
    /// included). When it passes, CRIU is killed and the request fails with
    /// [`CriuFailure::TimedOut`].
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Calls `f` with the pid of every `criu swrk` this client starts, right
    /// after it starts (for fault injection, or to account for it).
    pub fn on_spawn(mut self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.on_spawn = Some(Arc::new(f));
        self
    }

    /// The CRIU binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// CRIU's version (`VERSION`).
    pub fn version(&self) -> Result<CriuVersion, Error> {
        let action = "ask CRIU for its version";
        let done = self.run(action, request(ReqType::VERSION), &[], None, None)?;
        done.resp
            .version
            .into_option()
            .ok_or_else(|| criu_err(action, CriuFailure::Protocol, "answer has no version"))
    }

    /// Asks CRIU which of dirty memory tracking, lazy pages and the pidfd
    /// store work here (`FEATURE_CHECK`).
    pub fn check_features(&self) -> Result<CriuFeatures, Error> {
        let action = "check CRIU features";
        let mut req = request(ReqType::FEATURE_CHECK);
        req.features = MessageField::some(CriuFeaturesMsg {
            mem_track: Some(true),
            lazy_pages: Some(true),
            pidfd_store: Some(true),
            ..Default::default()
        });
        let done = self.run(action, req, &[], None, None)?;
        let f = done
            .resp
            .features
            .into_option()
            .ok_or_else(|| criu_err(action, CriuFailure::Protocol, "answer has no features"))?;
        Ok(CriuFeatures {
            mem_track: f.mem_track.unwrap_or(false),
            lazy_pages: f.lazy_pages.unwrap_or(false),
            pidfd_store: f.pidfd_store.unwrap_or(false),
        })
    }

    /// Runs `criu check` (`CHECK`): fails with CRIU's first error when this
    /// kernel lacks something CRIU needs.
    pub fn check(&self) -> Result<(), Error> {
        self.run("run criu check", request(ReqType::CHECK), &[], None, None)
            .map(|_| ())
    }

    /// Dumps the tree rooted at `job.opts.pid` (`DUMP`). `notify` receives
    /// every notification; its `post-dump` call is the frozen-window hook
    /// (see the module docs). With `leave_running` the tree runs on after
    /// the dump; otherwise CRIU kills it once the dump succeeded.
    pub fn dump(&self, job: &Job, notify: Option<&mut NotifyFn<'_>>) -> Result<DumpOutcome, Error> {
        let action = format!("dump pid {}", job.opts.pid.unwrap_or(0));
        if job.opts.pid.is_none() {
            return Err(criu_err(
                &action,
                CriuFailure::Spawn,
                "no pid given (CRIU would dump the caller)",
            ));
        }
        self.dump_like(&action, ReqType::DUMP, job, notify, "dump.log")
    }

    /// One memory pre-dump (`SINGLE_PRE_DUMP`, `track_mem` forced on) into
    /// `job.images_dir`; set [`CriuOpts::parent_img`] (relative to the images
    /// dir) for rounds after the first, and [`CriuOpts::pre_dump_mode`]
    /// (`VmRead` keeps the freeze shorter). Needs dirty memory tracking: CRIU
    /// refuses on kernels without soft-dirty.
    pub fn pre_dump(
        &self,
        job: &Job,
        notify: Option<&mut NotifyFn<'_>>,
    ) -> Result<DumpOutcome, Error> {
        let action = format!("pre-dump pid {}", job.opts.pid.unwrap_or(0));
        if job.opts.pid.is_none() {
            return Err(criu_err(&action, CriuFailure::Spawn, "no pid given"));
        }
        let mut job = job.clone();
        job.opts.track_mem = Some(true);
        self.dump_like(
            &action,
            ReqType::SINGLE_PRE_DUMP,
            &job,
            notify,
            "pre-dump.log",
        )
    }

    fn dump_like(
        &self,
        action: &str,
        t: ReqType,
        job: &Job,
        notify: Option<&mut NotifyFn<'_>>,
        log: &str,
    ) -> Result<DumpOutcome, Error> {
        let (req, _dirs, log_file) = self.prepare(action, t, job, notify.is_some(), log)?;
        // If CRIU dies, put the freezer cgroup back as it was: thawed when
        // it ran, frozen when the user had paused it (CRIU thaws it while it
        // seizes the tasks and would re-freeze it only at the end).
        let cgroup = job.opts.freeze_cgroup.as_deref().map(Path::new);
        let thaw = cgroup.map(|cg| (cg, freezer_is_thawed(cg).unwrap_or(true)));
        let done = self
            .run(action, req, &job.inherit_fds, notify, thaw)
            .map_err(|e| with_log(e, &log_file))?;
        Ok(DumpOutcome {
            criu_pid: done.criu_pid,
            wall_ms: done.wall_ms,
            hook_started_at_unix_ms: done.hook_started_at_unix_ms,
            hook_duration_ms: done.hook_duration_ms,
            events: done.events,
            log_file,
        })
    }

    /// Restores a tree from `job.images_dir` (`RESTORE`). CRIU detaches the
    /// restored tree; with [`CriuOpts::rst_sibling`] its root becomes the
    /// caller's child. `notify` sees `setup-namespaces`, `post-restore`
    /// (with the pid) and the rest.
    pub fn restore(
        &self,
        job: &Job,
        notify: Option<&mut NotifyFn<'_>>,
    ) -> Result<RestoreOutcome, Error> {
        let action = format!("restore from {}", job.images_dir.display());
        let (req, _dirs, log_file) = self.prepare(
            &action,
            ReqType::RESTORE,
            job,
            notify.is_some(),
            "restore.log",
        )?;
        let done = self
            .run(&action, req, &job.inherit_fds, notify, None)
            .map_err(|e| with_log(e, &log_file))?;
        let pid = done.resp.restore.pid.filter(|p| *p > 0).ok_or_else(|| {
            criu_err(&action, CriuFailure::Protocol, "answer has no restored pid")
        })?;
        Ok(RestoreOutcome {
            pid,
            criu_pid: done.criu_pid,
            wall_ms: done.wall_ms,
            events: done.events,
            log_file,
        })
    }

    /// Starts a page server writing into `job.images_dir`, listening on
    /// `job.opts.ps` (address and port; port 0 picks a free one). A dump
    /// with `opts.ps` pointing at it sends its pages there instead of
    /// writing them locally; the page server exits after that dump.
    ///
    /// Uses `PAGE_SERVER_CHLD` (CRIU forks the server and reports its real
    /// pid): CRIU 4.2.1's daemon-mode `PAGE_SERVER` always answers pid 0.
    /// The server outlives the `criu swrk` that started it, so it is
    /// reparented to the nearest subreaper or init.
    pub fn page_server(&self, job: &Job) -> Result<PageServer, Error> {
        let action = format!("start a page server on {}", job.images_dir.display());
        let (req, _dirs, log_file) = self.prepare(
            &action,
            ReqType::PAGE_SERVER_CHLD,
            job,
            false,
            "page-server.log",
        )?;
        let done = self
            .run(&action, req, &job.inherit_fds, None, None)
            .map_err(|e| with_log(e, &log_file))?;
        let ps = &done.resp.ps;
        match (ps.pid, ps.port) {
            (Some(pid), Some(port)) if pid > 0 && port > 0 => Ok(PageServer { pid, port }),
            (pid, port) => Err(criu_err(
                &action,
                CriuFailure::Protocol,
                format!("answer lacks the page server's pid or port: pid {pid:?}, port {port:?}"),
            )),
        }
    }

    /// Opens the job's directories and builds the request. The returned
    /// files must stay open until CRIU has answered (CRIU opens them as
    /// `/proc/<our pid>/fd/<n>`).
    fn prepare(
        &self,
        action: &str,
        t: ReqType,
        job: &Job,
        notify: bool,
        default_log: &str,
    ) -> Result<(CriuReq, Vec<File>, PathBuf), Error> {
        let open = |p: &Path, what: &str| {
            File::open(p).map_err(|e| {
                criu_err(
                    action,
                    CriuFailure::Spawn,
                    format!("open {what} {}: {e}", p.display()),
                )
            })
        };
        let mut opts = job.opts.clone();
        let mut files = Vec::new();
        let images = open(&job.images_dir, "images dir")?;
        opts.images_dir_fd = Some(images.as_raw_fd());
        files.push(images);
        if let Some(w) = &job.work_dir {
            let work = open(w, "work dir")?;
            opts.work_dir_fd = Some(work.as_raw_fd());
            files.push(work);
        }
        if opts.log_file.is_none() {
            opts.log_file = Some(default_log.to_string());
        }
        if notify {
            opts.notify_scripts = Some(true);
        }
        let log_file = job.log_path(default_log);
        let mut req = request(t);
        req.opts = MessageField::some(opts);
        Ok((req, files, log_file))
    }

    /// Spawns CRIU, sends `req`, answers notifications, returns the answer.
    /// `restore_freezer`: a freezer cgroup and whether it was thawed before
    /// the request, to put back if CRIU dies.
    fn run(
        &self,
        action: &str,
        req: CriuReq,
        keep_fds: &[RawFd],
        mut notify: Option<&mut NotifyFn<'_>>,
        restore_freezer: Option<(&Path, bool)>,
    ) -> Result<Done, Error> {
        let encode = |r: &CriuReq| {
            proto::encode_request(r).map_err(|e| {
                criu_err(
                    action,
                    CriuFailure::Spawn,
                    format!("cannot encode the request: {e}"),
                )
            })
        };
        let wire = encode(&req)?;
        let started = Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        let path = self.helper_dir.as_deref().map(path_with_first);
        let mut conn =
            Conn::spawn(&self.binary, keep_fds, deadline, path.as_deref()).map_err(|e| {
                criu_err(
                    action,
                    CriuFailure::Spawn,
                    format!("start {} swrk: {e}", self.binary.display()),
                )
            })?;
        let criu_pid = conn.pid();
        if let Some(f) = &self.on_spawn {
            f(criu_pid);
        }
        tracing::debug!(criu_pid, action, "criu swrk started");
        let sent = Instant::now();
        let mut events = Vec::new();
        let mut hook_started_at_unix_ms = None;
        let mut hook_duration_ms = None;
        let mut hook_error: Option<String> = None;

        // `last`: CRIU's last notification, where it was when it was lost.
        let lost = |conn: &mut Conn, e: ConnError, last: Option<&NotifyEvent>| -> Error {
            let (failure, what) = match e {
                ConnError::Io(e) => (CriuFailure::Died, format!("socket error: {e}")),
                ConnError::Eof => (
                    CriuFailure::Died,
                    "criu closed the connection before answering".to_string(),
                ),
                ConnError::TimedOut => {
                    conn.kill();
                    (
                        CriuFailure::TimedOut,
                        format!(
                            "no answer within {:?}; criu (pid {criu_pid}) killed",
                            self.timeout.unwrap_or_default()
                        ),
                    )
                }
                ConnError::Garbage(g) => {
                    conn.kill();
                    (CriuFailure::Protocol, format!("unreadable answer: {g}"))
                }
            };
            let mut detail = format!("{what} ({})", conn.exit_report());
            if let Some(n) = last {
                detail.push_str(&format!(
                    ", after its {} notification ({:.1} ms into the request)",
                    n.script, n.at_ms
                ));
            }
            if let Some((cg, was_thawed)) = restore_freezer {
                let (done, r) = if was_thawed {
                    ("thawed", thaw_freezer(cg))
                } else {
                    ("re-froze (it was paused)", freeze_freezer(cg))
                };
                match r {
                    Ok(()) => detail.push_str(&format!("; {done} {}", cg.display())),
                    Err(e) => detail.push_str(&format!(
                        "; could not restore the freezer state of {}: {e}",
                        cg.display()
                    )),
                }
            }
            tracing::warn!(criu_pid, action, %detail, "criu request lost");
            criu_err(action, failure, detail)
        };

        if let Err(e) = conn.send(&wire) {
            return Err(lost(&mut conn, e, None));
        }
        let resp = loop {
            let (resp, fd) = match conn.recv() {
                Ok(r) => r,
                Err(e) => return Err(lost(&mut conn, e, events.last())),
            };
            if resp.type_() != ReqType::NOTIFY {
                break resp;
            }
            let n = resp.notify.into_option().unwrap_or_default();
            let script = n.script.unwrap_or_default();
            let at = sent.elapsed();
            let wall = SystemTime::now();
            let t0 = Instant::now();
            let result = match notify.as_mut() {
                Some(f) => f(Notify {
                    script: &script,
                    pid: n.pid,
                    fd,
                    criu_pid,
                }),
                None => Ok(()),
            };
            let took = t0.elapsed();
            if script == "post-dump" {
                hook_started_at_unix_ms = Some(unix_ms(wall));
                hook_duration_ms = Some(ms(took));
            }
            tracing::debug!(
                criu_pid,
                script,
                at_ms = ms(at),
                callback_ms = ms(took),
                ok = result.is_ok(),
                "criu notification"
            );
            events.push(NotifyEvent {
                script: script.clone(),
                at_ms: ms(at),
                callback_ms: ms(took),
            });
            let mut answer = request(ReqType::NOTIFY);
            answer.notify_success = Some(result.is_ok());
            if let Err(reason) = result {
                hook_error = Some(format!("{script} callback failed: {reason}"));
            }
            if let Err(e) = conn.send(&encode(&answer)?) {
                return Err(lost(&mut conn, e, events.last()));
            }
        };
        let wall_ms = ms(sent.elapsed());
        // CRIU answers PAGE_SERVER_CHLD with a PAGE_SERVER response.
        let expected = match req.type_() {
            ReqType::PAGE_SERVER_CHLD => ReqType::PAGE_SERVER,
            t => t,
        };
        if resp.type_() != expected && resp.type_() != ReqType::EMPTY {
            conn.kill();
            return Err(criu_err(
                action,
                CriuFailure::Protocol,
                format!("asked {:?}, criu answered {:?}", req.type_(), resp.type_()),
            ));
        }
        if !resp.success() || resp.type_() == ReqType::EMPTY {
            let mut detail = String::new();
            if let Some(h) = &hook_error {
                detail.push_str(h);
                detail.push_str("; ");
            }
            detail.push_str("criu reported failure");
            if let Some(m) = resp
                .cr_errmsg
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty() && !harmless(m))
            {
                detail.push_str(": ");
                detail.push_str(m);
            }
            if let Some(e) = resp.cr_errno.filter(|e| *e != 0) {
                detail.push_str(&format!(
                    " (errno {e}: {})",
                    std::io::Error::from_raw_os_error(e.abs())
                ));
            }
            let report = conn.exit_report();
            detail.push_str(&format!(" ({report})"));
            let failure = if hook_error.is_some() {
                CriuFailure::HookFailed
            } else {
                CriuFailure::Refused
            };
            tracing::warn!(criu_pid, action, %detail, "criu request failed");
            return Err(criu_err(action, failure, detail));
        }
        conn.wait();
        tracing::debug!(criu_pid, action, wall_ms, "criu request done");
        Ok(Done {
            resp,
            criu_pid,
            wall_ms,
            events,
            hook_started_at_unix_ms,
            hook_duration_ms,
        })
    }
}

/// CRIU errors that are logged on every run in this kind of sandbox and
/// explain nothing (raising RLIMIT_NOFILE is refused; CRIU carries on).
fn harmless(line: &str) -> bool {
    line.contains("Can't setup RLIMIT_NOFILE")
}

/// The last `n` meaningful `Error (...)` lines of a CRIU log.
fn log_errors(log: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read(log) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&text);
    let mut errors: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Error (") && !harmless(l))
        .map(|l| {
            // drop the "(00.061867) " timestamp
            l.split_once(") ")
                .map_or(l, |(_, rest)| rest)
                .trim()
                .to_string()
        })
        .collect();
    let keep = errors.len().saturating_sub(n);
    errors.drain(..keep);
    errors
}

/// Adds CRIU's last logged errors and the log's path to a CRIU error.
fn with_log(e: Error, log: &Path) -> Error {
    match e {
        Error::Criu {
            action,
            failure,
            mut detail,
        } if failure != CriuFailure::Spawn => {
            let errors = log_errors(log, 3);
            if !errors.is_empty() {
                detail.push_str("; last errors in the log: ");
                detail.push_str(&errors.join(" | "));
            }
            detail.push_str(&format!("; log: {}", log.display()));
            Error::Criu {
                action,
                failure,
                detail,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::proto::Criu_network_lock_method;
    use super::*;
    use protobuf::Message;

    /// The request a dump sends, with the options a container dump sets and
    /// those the client fills in, survives encoding for CRIU.
    #[test]
    fn prepared_request_carries_the_options() {
        let dir = std::env::temp_dir().join(format!("ms2m-prepare-{}", std::process::id()));
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let mut job = Job::new(&dir);
        job.work_dir = Some(work.clone());
        job.opts = CriuOpts {
            pid: Some(42),
            leave_running: Some(true),
            root: Some("/run/c/rootfs".into()),
            manage_cgroups_mode: Some(CgMode::IGNORE.into()),
            network_lock: Some(NetworkLockMethod::Skip.into()),
            freeze_cgroup: Some("/sys/fs/cgroup/freezer/c".into()),
            external: vec!["net[4026531992]:extRootNetNS".into()],
            ext_mnt: vec![ext_mount("/etc/hosts", "/etc/hosts")],
            ps: MessageField::some(PageServerInfo {
                address: Some("127.0.0.1".into()),
                port: Some(27000),
                ..Default::default()
            }),
            ..Default::default()
        };
        let client = CriuClient::new("/nonexistent/criu");
        let (req, files, log) = client
            .prepare("test", ReqType::DUMP, &job, true, "dump.log")
            .unwrap();
        assert_eq!(log, work.join("dump.log"));
        let wire = proto::encode_request(&req).unwrap();
        let back = CriuReq::parse_from_bytes(&wire).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.type_(), ReqType::DUMP);
        let o = &back.opts;
        assert_eq!(o.images_dir_fd, Some(files[0].as_raw_fd()));
        assert_eq!(o.work_dir_fd, Some(files[1].as_raw_fd()));
        assert_eq!(o.log_file(), "dump.log");
        assert_eq!(o.notify_scripts, Some(true));
        assert_eq!((o.pid, o.leave_running), (Some(42), Some(true)));
        assert_eq!(o.manage_cgroups_mode(), CgMode::IGNORE);
        assert_eq!(o.network_lock(), Criu_network_lock_method::SKIP);
        assert_eq!(o.freeze_cgroup(), "/sys/fs/cgroup/freezer/c");
        assert_eq!(o.ext_mnt[0].val(), "/etc/hosts");
        assert_eq!((o.ps.address(), o.ps.port), ("127.0.0.1", Some(27000)));
        // what the job left unset stays unset: CRIU's defaults apply
        assert_eq!(
            (o.tcp_established, o.shell_job, o.track_mem),
            (None, None, None)
        );
        drop(files);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_request_that_cannot_be_encoded_never_starts_criu() {
        let dir = std::env::temp_dir().join(format!("ms2m-unencodable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut job = Job::new(&dir);
        job.opts.pid = Some(42);
        job.opts.inherit_fd.push(InheritFd {
            key: Some("pipe:[1]".into()),
            ..Default::default()
        });
        let err = CriuClient::new("/nonexistent/criu")
            .dump(&job, None)
            .unwrap_err();
        assert_eq!(err.criu_failure(), Some(CriuFailure::Spawn));
        assert!(err.to_string().contains("cannot encode"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
