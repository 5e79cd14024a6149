//! The restore path. A task created from a checkpoint (containerd's Create
//! with `checkpoint` set, or runtime options naming `criu_image_path`)
//! waits in the created state; its Start runs `runc restore --detach`
//! with the process's stdio set up as for a create, then reads CRIU's
//! restore statistics.
//!
//! [`restore`] reads top to bottom; the helpers follow it in the order it
//! calls them. The path sees the container only through [`Target`] and
//! hands back [`Restored`], so it depends on nothing above it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criu_bridge::config::CriuConfig;
use criu_bridge::features::Features;
use criu_bridge::manifest::{describe_restore, Manifest};
use criu_bridge::rpc::LazyPages;
use criu_bridge::stats::read_restore_stats;

use crate::config::{LazyChoice, Overrides, ShimConfig};
use crate::criu_conf;
use crate::criu_log::{criu_errors, last_stage};
use crate::error::{Error, Result};
use crate::exits::ExitHub;
use crate::runc::{read_pid, ProcessStdio, RestoreArgs, Runc};
use crate::stdio::{self, console_socket_dir, ConsoleSocket, ProcessIo, StdioPaths};

/// A checkpoint a container is to be restored from at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSource {
    /// CRIU images.
    pub image_path: PathBuf,
    /// CRIU work directory, if the runtime options name one.
    pub work_path: Option<PathBuf>,
    /// Parent images (incremental checkpoints).
    pub parent_path: Option<PathBuf>,
}

/// What the restore needs to know about the container (copied out of it,
/// so the restore runs without the service's state lock).
pub struct Target {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// runc for the container.
    pub runc: Runc,
    /// The process's stdio.
    pub stdio: StdioPaths,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// The CRIU configuration file the shim owns, if any.
    pub criu_conf: Option<PathBuf>,
    /// The shim configuration.
    pub config: Arc<ShimConfig>,
    /// The container's ms2m annotations.
    pub overrides: Overrides,
    /// The AMQP tap configuration, when the container opted in.
    pub tap: Option<ms2m_tap::TapConfig>,
}

/// A restored container, as the restore hands it back.
pub struct Restored {
    /// The restored init's host pid.
    pub pid: i32,
    /// Its stdio.
    pub io: ProcessIo,
    /// The lazy-pages daemon serving its memory, if restored lazily.
    pub lazy: Option<LazyDaemon>,
    /// Its AMQP tap, resumed at the checkpoint's cut, when it has one.
    pub tap: Option<ms2m_tap::Tap>,
}

/// Restores the container (see [`Restored`] for what it hands back).
pub async fn restore(target: &Target, from: &RestoreSource) -> Result<Restored> {
    let id = target.id.as_str();
    let images = &from.image_path;
    let what = format!("restore of container {id} from {}", images.display());
    let started = Instant::now();

    // The manifest, when there is one, says how the dump was taken; the
    // restore must match (TCP, unix sockets, terminal, locks).
    let manifest = match Manifest::read(images) {
        Ok(m) => {
            tracing::info!(
                id,
                checkpointed = %m.container_id,
                at = %m.created_at,
                "restoring an ms2m checkpoint"
            );
            Some(m)
        }
        Err(e) => {
            if Manifest::path_in(images).exists() {
                return Err(Error::InvalidArgument(format!("{what}: {e}")));
            }
            tracing::info!(
                id,
                "checkpoint has no ms2m manifest: restoring with defaults"
            );
            None
        }
    };
    let dumped = manifest
        .as_ref()
        .map(|m| m.options.clone())
        .unwrap_or_default();
    let resume = match &manifest {
        Some(m) => crate::broker::resume_of(m, crate::broker::cut_of(m, images)?, images)?,
        None => ms2m_tap::Resume::default(),
    };
    if resume.cut.is_some() && target.tap.is_none() {
        tracing::warn!(
            id,
            "the checkpoint has a broker cut, but the container has no {} annotation: \
             no tap, the app connects wherever its URL points",
            crate::config::TAP_UPSTREAM_ANNOTATION
        );
    }
    if let Some(conf) = &target.criu_conf {
        criu_conf::write(conf, &CriuConfig::new().tcp_close(dumped.tcp_close))?;
    }

    let criu = target.config.criu_binary();
    let features = {
        let criu = criu.clone();
        tokio::task::spawn_blocking(move || Features::cached(&criu))
            .await
            .map_err(|e| Error::internal("detect restore features", e))?
    };
    let (lazy, lazy_reason) = plan_lazy(target, manifest.as_ref(), Some(&features))?;
    // The source's cgroups, if gone, for CRIU to restore the tasks into
    // until they are adopted below (crate::source_cgroups).
    let stand_ins = crate::source_cgroups::stand_in(manifest.as_ref(), id, &target.bundle);
    tracing::info!(id, lazy, "restore: {lazy_reason}");

    let (work, temp_work) = match &from.work_path {
        Some(w) => (w.clone(), false),
        None => (target.bundle.join("criu-restore-work"), true),
    };
    std::fs::create_dir_all(&work).map_err(|e| {
        Error::internal(
            format!("{what}: create work directory {}", work.display()),
            e,
        )
    })?;
    let pid_file = target.bundle.join("init.pid");
    let mut args = RestoreArgs {
        image_path: images.clone(),
        work_path: work.clone(),
        bundle: target.bundle.to_path_buf(),
        pid_file: pid_file.clone(),
        console_socket: None,
        tcp_established: dumped.tcp_established,
        external_unix_sockets: dumped.external_unix_sockets,
        shell_job: dumped.shell_job,
        file_locks: dumped.file_locks,
        no_pivot: target.no_pivot,
        cgroups_mode: dumped.cgroups_mode.clone(),
        lazy_pages: lazy,
    };
    let daemon = if lazy {
        Some(LazyDaemon::start(id, &criu, images, &work, &what).await?)
    } else {
        None
    };
    if from.parent_path.is_some() {
        tracing::debug!(
            id,
            "parent checkpoint is found by CRIU through the images' parent link"
        );
    }

    let runc = target.runc.with_criu(&criu);
    let inits_before = namespace_inits();
    let failed = |e: Error| async {
        let e = with_log(e, &work);
        let left = kill_half_restored(id, &inits_before, manifest.as_ref()).await;
        let yards = unmount_cgroup_yards(&work);
        match (left, yards) {
            (l, y) if l.is_empty() && y.is_empty() => e,
            (l, y) => Error::Internal(format!("{e}{l}{y}")),
        }
    };
    let io = if target.stdio.terminal {
        let socket = ConsoleSocket::new(&console_socket_dir())?;
        args.console_socket = Some(socket.path().to_path_buf());
        if let Err(e) = runc.restore(id, &args, ProcessStdio::default()).await {
            return Err(failed(e).await);
        }
        let master = socket.receive_master().await?;
        stdio::attach_console(&target.stdio, master)?
    } else {
        let (child, io) = stdio::pipes(&target.stdio)?;
        if let Err(e) = runc.restore(id, &args, child).await {
            io.tasks.abort().await;
            return Err(failed(e).await);
        }
        io
    };
    let pid = read_pid(&pid_file)?;
    adopt_cgroups(target.runc.root(), id, pid);
    drop(stand_ins);
    let running_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(id, pid, lazy, elapsed_ms = running_ms, "restored: running");

    // runc restores an empty network namespace: its lo is down.
    match tokio::task::spawn_blocking(move || crate::netns::bring_up_loopback(pid)).await {
        Ok(Ok(was_up)) => tracing::debug!(id, was_up, "loopback of the restored container is up"),
        Ok(Err(e)) => tracing::warn!(id, "cannot bring lo up in the restored container: {e}"),
        Err(e) => tracing::warn!(id, "cannot bring lo up in the restored container: {e}"),
    }

    // The app's broker connection was restored closed: its client
    // reconnects to the tap in this new namespace, resumed at the cut.
    let tap = match &target.tap {
        Some(tc) => match crate::broker::start(id, pid, tc, resume).await {
            Ok(t) => Some(t),
            Err(e) => {
                // Without its tap the restored app cannot reach the broker
                // (and would skip the cut): it does not run.
                if let Err(k) = target.runc.kill(id, libc::SIGKILL as u32, true).await {
                    tracing::warn!(
                        id,
                        "killing the restored container after the tap failed: {k}"
                    );
                }
                return Err(Error::Internal(format!(
                    "{what}: restored, but its AMQP tap did not start: {e}"
                )));
            }
        },
        None => None,
    };

    match read_restore_stats(&work) {
        Ok(s) => tracing::info!(
            id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "CRIU restore: {}",
            describe_restore(&s)
        ),
        Err(e) => tracing::warn!(id, "no CRIU restore statistics: {e}"),
    }
    if temp_work && daemon.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(Restored {
        pid,
        io,
        lazy: daemon,
        tap,
    })
}

/// Whether to restore lazily, and why.
fn plan_lazy(
    target: &Target,
    manifest: Option<&Manifest>,
    features: Option<&Features>,
) -> Result<(bool, String)> {
    let choice = target.overrides.lazy_pages(&target.config)?;
    let min = target.config.restore.lazy_min_rss_mib * 1024 * 1024;
    let bytes = manifest
        .and_then(|m| m.stats.as_ref())
        .map(|s| s.pages_written * 4096);
    let can = features.is_some_and(Features::lazy_pages);
    Ok(match choice {
        LazyChoice::Never => (false, "lazy pages off (configuration)".into()),
        LazyChoice::Always if can => (true, "lazy pages forced".into()),
        LazyChoice::Always => {
            return Err(Error::FailedPrecondition(format!(
                "restore of container {}: lazy pages were forced, but they cannot work here                  (userfaultfd or CRIU support missing)",
                target.id
            )))
        }
        LazyChoice::Auto => match bytes {
            Some(b) if b >= min && can => (
                true,
                format!("{} MiB of pages >= {} MiB", b >> 20, min >> 20),
            ),
            Some(b) if b >= min => (false, "large, but lazy pages cannot work here".into()),
            Some(b) => (false, format!("{} MiB of pages < {} MiB", b >> 20, min >> 20)),
            None => (false, "checkpoint size unknown (no manifest statistics)".into()),
        },
    })
}

/// A lazy-pages daemon serving a restored container's memory. The shim's
/// reaper reaps it; the daemon is killed when this is dropped (task
/// delete) while it still runs.
pub struct LazyDaemon {
    pid: u32,
    done: Arc<std::sync::atomic::AtomicBool>,
    _daemon: LazyPages,
}

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        if !self.done.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: kill(2) on our own child, not yet reaped (the reaper
            // sets `done` when it reaps it).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            tracing::info!(pid = self.pid, "lazy-pages daemon killed (task deleted)");
        }
    }
}

impl LazyDaemon {
    /// Starts CRIU's lazy-pages daemon on `images` (ready to serve when
    /// this returns) and watches for its exit. `what` names the restore in
    /// errors.
    async fn start(id: &str, criu: &Path, images: &Path, work: &Path, what: &str) -> Result<Self> {
        let (images, work2, criu2) = (images.to_path_buf(), work.to_path_buf(), criu.to_path_buf());
        let lp = tokio::task::spawn_blocking(move || {
            LazyPages::start(&criu2, &images, Some(&work2), None, Duration::from_secs(10))
        })
        .await
        .map_err(|e| Error::internal("start the lazy-pages daemon", e))?
        .map_err(|e| Error::internal(format!("{what}: lazy pages"), e))?;
        let pid = lp.pid();
        let exited = ExitHub::global().register(pid as i32);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let cid = id.to_string();
        let log = lp.log_file().to_path_buf();
        let t0 = Instant::now();
        tracing::info!(id, pid, ready_ms = lp.ready_ms, "lazy-pages daemon ready");
        tokio::spawn(async move {
            let status = exited.await.ok();
            d.store(true, std::sync::atomic::Ordering::SeqCst);
            let elapsed_ms = t0.elapsed().as_millis() as u64;
            match status {
                Some(0) => {
                    tracing::info!(id = %cid, pid, elapsed_ms, "lazy-pages daemon has served all pages and exited")
                }
                s => {
                    tracing::warn!(id = %cid, pid, elapsed_ms, status = ?s, log = %log.display(), "lazy-pages daemon ended abnormally")
                }
            }
        });
        Ok(LazyDaemon {
            pid,
            done,
            _daemon: lp,
        })
    }
}

/// After a failed `runc restore`: unmounts the cgroup yards CRIU left in
/// its work directory. During a restore CRIU mounts a tmpfs there
/// (`.criu.cgyard.*`) with every cgroup controller mounted inside, and
/// unmounts it at the end; a CRIU killed before that leaves eleven mounts
/// behind in the host's mount namespace, and the work directory cannot be
/// removed (`ms2m restore` then fails to empty it). Returns a note for the
/// error message.
fn unmount_cgroup_yards(work: &Path) -> String {
    let Ok(dir) = std::fs::read_dir(work) else {
        return String::new();
    };
    let mut gone = Vec::new();
    for yard in dir.flatten().map(|e| e.path()).filter(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".criu.cgyard."))
    }) {
        let Some(path) = yard.to_str() else { continue };
        match containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&yard);
                gone.push(yard.display().to_string());
            }
            Err(e) => tracing::warn!(yard = path, "unmount CRIU's cgroup yard: {e}"),
        }
    }
    if gone.is_empty() {
        return String::new();
    }
    tracing::warn!(yards = ?gone, "unmounted the cgroup yards a failed CRIU restore left");
    format!(
        "; the shim unmounted the cgroup yard CRIU left mounted ({})",
        gone.join(", ")
    )
}

/// The children of this shim that are the init of a PID namespace of
/// their own: the containers' inits, and a tree CRIU restored (its root is
/// a sibling of CRIU, so runc's child, then the shim's once runc exits).
fn namespace_inits() -> std::collections::HashSet<i32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                return false;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().collect::<Vec<_>>())
                    .unwrap_or_default()
            };
            let nspid = field("NSpid:");
            field("PPid:") == [me.as_str()] && nspid.len() > 1 && nspid.last() == Some(&"1")
        })
        .collect()
}

/// After a failed `runc restore`: kills what CRIU restored. CRIU killed
/// late (at `pre-resume`: every task restored, stopped by CRIU's ptrace)
/// leaves the tree to run on when its tracer dies, and runc's cleanup
/// misses it: CRIU put it into the cgroups the checkpoint recorded (the
/// source's), not the new container's. It would run unmanaged, the task
/// never created. The tree is the init of a new PID namespace among this
/// shim's children that was not there before the restore (and, when the
/// manifest records the source's freezer cgroup, in that cgroup): killing
/// it ends the namespace. Returns a note for the error message.
async fn kill_half_restored(
    id: &str,
    before: &std::collections::HashSet<i32>,
    manifest: Option<&Manifest>,
) -> String {
    let source_freezer = manifest
        .and_then(|m| m.extensions.get(crate::source_cgroups::MANIFEST_KEY))
        .and_then(|v| v.pointer("/paths/freezer"))
        .and_then(|v| v.as_str())
        .and_then(|p| p.strip_prefix("/sys/fs/cgroup/freezer"))
        .map(str::to_string);
    let in_source_cgroup = |pid: i32| {
        let Some(want) = &source_freezer else {
            return true;
        };
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cg| {
            cg.lines()
                .filter_map(|l| l.split_once(':').and_then(|(_, r)| r.split_once(':')))
                .any(|(ctrl, path)| ctrl.split(',').any(|c| c == "freezer") && path == want)
        })
    };
    let left: Vec<i32> = namespace_inits()
        .into_iter()
        .filter(|p| !before.contains(p) && in_source_cgroup(*p))
        .collect();
    if left.is_empty() {
        return String::new();
    }
    for &pid in &left {
        // SAFETY: kill(2) on a child of this shim, not reaped yet (its
        // /proc entry was just read); the shim's reaper reaps it.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    tracing::warn!(
        id,
        ?left,
        "the failed restore left restored processes running: killed"
    );
    // Dead once a zombie (the reaper, on this same thread, reaps it).
    let t0 = Instant::now();
    let dead = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(true)
    };
    while !left.iter().all(dead) && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    format!(
        "; CRIU had restored the container's processes (init pid {left:?}), which the failed \
         restore left running outside the container's cgroups: killed"
    )
}

/// Adds where CRIU's restore log is to a restore error.
fn with_log(e: Error, work: &Path) -> Error {
    let log: PathBuf = work.join("restore.log");
    match std::fs::read_to_string(&log) {
        Ok(text) => {
            let errors = criu_errors(&text);
            let errors = if errors.is_empty() {
                String::new()
            } else {
                format!("; CRIU: {errors}")
            };
            // A CRIU that was killed logs no error: where it was says more.
            let stage = last_stage(&text)
                .map(|s| format!("; CRIU's last stage: {s}"))
                .unwrap_or_default();
            Error::Internal(format!("{e}{errors}{stage}; CRIU log: {}", log.display()))
        }
        Err(_) => e,
    }
}

/// Moves the restored processes into the cgroups runc made for this
/// container. CRIU puts restored tasks back into the cgroup paths recorded
/// at dump time (runc asks for its soft mode, and a dump that recorded
/// paths only gives it nothing to rewrite them with), which after a
/// migration or under another container id are the *source's* cgroups:
/// freezing, killing or checkpointing this container would then reach
/// them, and miss its own processes. Best effort: a failure is logged.
fn adopt_cgroups(runc_root: &Path, id: &str, pid: i32) {
    let rc = match criu_bridge::container::RuncContainer::load(runc_root, id) {
        Ok(rc) => rc,
        Err(e) => {
            tracing::warn!(
                id,
                "restore: cannot read runc's state to check cgroups: {e}"
            );
            return;
        }
    };
    let Some(own) = rc.freezer_cgroup() else {
        return;
    };
    let procs = |p: &Path| std::fs::read_to_string(p.join("cgroup.procs")).unwrap_or_default();
    if procs(own).split_whitespace().any(|p| p == pid.to_string()) {
        return;
    }
    // Every process of the container: those in its init's PID namespace.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let Some(init_ns) = ns(&pid.to_string()) else {
        return;
    };
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .filter(|n| ns(n).as_ref() == Some(&init_ns))
                .collect()
        })
        .unwrap_or_default();
    let mut failed = Vec::new();
    for (controller, path) in rc.cgroup_paths() {
        for p in &pids {
            if let Err(e) = std::fs::write(path.join("cgroup.procs"), p) {
                failed.push(format!("{p} -> {} ({controller}): {e}", path.display()));
            }
        }
    }
    if failed.is_empty() {
        tracing::info!(
            id,
            processes = pids.len(),
            "restore: moved the restored processes into the container's own cgroups"
        );
    } else {
        tracing::warn!(
            id,
            ?failed,
            "restore: could not move every restored process into the container's cgroups"
        );
    }
}
