//! A container: its bundle, runc driver, init process and exec processes,
//! and the preparation of a new one (runtime options, rootfs mounts, CRIU
//! configuration annotation, stdio, `runc create`).
//!
//! A container hands [`crate::checkpoint`] and [`crate::restore`] only what
//! they need ([`Container::checkpoint_target`],
//! [`Container::restore_target`]) and takes back what a restore brought up
//! ([`Container::adopt_restored`]): those two paths never see a
//! `Container`, so they depend on nothing above them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::mount::umount_recursive;
use containerd_shim::util::{mkdir, mount_rootfs, write_options};
use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::shim::oci::Options as RuncOptions;

use crate::checkpoint;
use crate::config::{Overrides, ShimConfig};
use crate::criu_conf;
use crate::error::{Error, Result};
use crate::options::parse_runc_options;
use crate::process::{Process, Status};
use crate::restore::{self, LazyDaemon, RestoreSource, Restored};
use crate::runc::{read_pid, CreateArgs, ProcessStdio, Runc};
use crate::stdio::{self, console_socket_dir, ConsoleSocket, StdioPaths};

/// Where runc keeps container state when the runtime options name no
/// root: `<RUNC_ROOT>/<namespace>`.
pub const RUNC_ROOT: &str = "/run/ms2m/runc";

/// A container managed by this shim.
pub struct Container {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// `<bundle>/rootfs` when the shim mounted the rootfs.
    pub rootfs: Option<PathBuf>,
    /// runc, configured for this container.
    pub runc: Runc,
    /// containerd's runtime options for this container.
    pub options: RuncOptions,
    /// The CRIU configuration file the shim owns, if any.
    pub criu_conf: Option<PathBuf>,
    /// Set while the container waits to be restored from a checkpoint.
    pub restore_from: Option<RestoreSource>,
    /// The init process.
    pub init: Process,
    /// Exec processes by exec id.
    pub execs: HashMap<String, Process>,
    /// Serialises lifecycle operations (start, pause, checkpoint, ...).
    pub op: Arc<tokio::sync::Mutex<()>>,
    /// The OOM watcher, stopped on delete.
    pub oom: Option<tokio::task::AbortHandle>,
    /// runc's state directory (`--root`) for this container.
    pub runc_root: PathBuf,
    /// The shim configuration this container was created with.
    pub config: Arc<ShimConfig>,
    /// The container's ms2m annotations.
    pub overrides: Overrides,
    /// The lazy-pages daemon serving a lazily restored container's memory.
    pub lazy: Option<LazyDaemon>,
    /// The AMQP tap configuration (`io.ms2m.tap.upstream`), if opted in.
    pub tap_config: Option<ms2m_tap::TapConfig>,
    /// The running AMQP tap.
    pub tap: Option<ms2m_tap::Tap>,
    /// The fence file `ms2m fence` wrote for this container's newest
    /// leave-running checkpoint; a later checkpoint removes it (it releases
    /// the hold, so the source publishes past what the fence counted).
    pub fence_file: Option<std::path::PathBuf>,
    /// The live migration this container is the source of (`ms2m migrate`).
    pub migration: Option<ms2m_tap::SourceLink>,
}

impl Container {
    /// The process `exec_id` (empty: init).
    pub fn process(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFound(format!("{}: no such process", self.describe(exec_id))))
    }

    /// The process `exec_id` (empty: init), mutably.
    pub fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let what = self.describe(exec_id);
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("{what}: no such process")))
    }

    /// The live process with host pid `pid`.
    pub fn process_by_pid_mut(&mut self, pid: i32) -> Option<&mut Process> {
        if pid <= 0 {
            return None;
        }
        if self.init.pid == pid && self.init.exit.is_none() {
            return Some(&mut self.init);
        }
        self.execs
            .values_mut()
            .find(|p| p.pid == pid && p.exit.is_none())
    }

    /// "container ID" or "exec E of container ID", for messages.
    pub fn describe(&self, exec_id: &str) -> String {
        describe(&self.id, exec_id)
    }

    /// What a checkpoint of this container needs, for containerd namespace
    /// `namespace`. Takes the fence file of the previous checkpoint: any
    /// checkpoint attempt voids it (see [`checkpoint::Target::void_fence`]).
    pub fn checkpoint_target(&mut self, namespace: &str) -> checkpoint::Target {
        checkpoint::Target {
            id: self.id.clone(),
            namespace: namespace.to_string(),
            bundle: self.bundle.clone(),
            runc: self.runc.clone(),
            runc_root: self.runc_root.clone(),
            init_pid: self.init.pid,
            was_paused: self.init.status == Status::Paused,
            criu_conf: self.criu_conf.clone(),
            config: self.config.clone(),
            overrides: self.overrides.clone(),
            tap: self.tap.clone().zip(self.tap_config.clone()),
            void_fence: self.fence_file.take(),
        }
    }

    /// What the restore of this container's init needs.
    pub fn restore_target(&self) -> restore::Target {
        restore::Target {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            runc: self.runc.clone(),
            stdio: self.init.stdio.clone(),
            no_pivot: self.options.no_pivot_root,
            criu_conf: self.criu_conf.clone(),
            config: self.config.clone(),
            overrides: self.overrides.clone(),
            tap: self.tap_config.clone(),
        }
    }

    /// Takes over what the restore of the init brought up (pid, stdio, its
    /// lazy-pages daemon and tap): the container no longer waits to be
    /// restored. A stdin containerd closed meanwhile is closed now.
    pub fn adopt_restored(&mut self, restored: Restored) {
        self.init.pid = restored.pid;
        self.lazy = restored.lazy;
        self.tap = restored.tap;
        if self.init.stdin_closed {
            restored.io.close_stdin();
        }
        self.init.io = Some(restored.io);
        self.restore_from = None;
    }
}

/// "container ID" or "exec E of container ID", for messages.
pub fn describe(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

/// runc's state directory for these options and namespace.
pub fn runc_root(options: &RuncOptions, namespace: &str) -> PathBuf {
    let base = if options.root.is_empty() {
        RUNC_ROOT
    } else {
        options.root.as_str()
    };
    Path::new(base).join(namespace)
}

/// Prepares the bundle and creates the container with `runc create`, or,
/// for a checkpoint, records where to restore it from at start.
pub async fn create(req: &CreateTaskRequest, namespace: &str) -> Result<Container> {
    let what = describe(&req.id, "");
    let options = parse_runc_options(req.options.as_ref())?;
    // A restore: the images containerd unpacked, or the directory named.
    let image_dir = [req.checkpoint.as_str(), options.criu_image_path.as_str()]
        .into_iter()
        .find(|p| !p.is_empty())
        .map(Path::new);
    let config = Arc::new(ShimConfig::for_create(req.options.as_ref(), image_dir)?);
    if let Some(src) = &config.source {
        tracing::info!(id = %req.id, config = %src.display(), "shim configuration read");
    }
    let bundle = PathBuf::from(&req.bundle);
    let overrides = Overrides::from_bundle(&bundle)?;
    // Bad tap annotations fail the create before anything is made.
    let tap_config = overrides
        .tap(&config)
        .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
    write_options(&bundle, &options)
        .await
        .map_err(|e| Error::internal(format!("{what}: write runtime options"), e))?;

    let rootfs = if req.rootfs.is_empty() {
        None
    } else {
        let rootfs = bundle.join("rootfs");
        mkdir(&rootfs, 0o711)
            .await
            .map_err(|e| Error::internal(format!("{what}: create rootfs directory"), e))?;
        for m in &req.rootfs {
            if let Err(e) = mount_rootfs(m, &rootfs).await {
                unmount(&rootfs);
                return Err(Error::internal(
                    format!(
                        "{what}: mount {} {} on {}",
                        m.type_,
                        m.source,
                        rootfs.display()
                    ),
                    e,
                ));
            }
        }
        Some(rootfs)
    };

    let mut result = create_in_bundle(req, namespace, &bundle, options, rootfs.clone())
        .await
        .map(|mut c| {
            c.config = config;
            c.overrides = overrides;
            c.tap_config = tap_config;
            c
        });
    // A new container's tap listens before the app runs (after `runc
    // create` the init and its network namespace exist; `runc start` has
    // not run yet). A restored container's tap starts after its restore.
    if let Ok(c) = &mut result {
        if let (Some(tc), true, None) = (&c.tap_config, c.init.pid > 0, &c.restore_from) {
            match crate::broker::start(&c.id, c.init.pid, tc, ms2m_tap::Resume::default()).await {
                Ok(t) => c.tap = Some(t),
                Err(e) => {
                    if let Err(d) = c.runc.delete(&c.id, true).await {
                        tracing::warn!(id = %c.id, "cleanup after the tap failed: {d}");
                    }
                    result = Err(e);
                }
            }
        }
    }
    if result.is_err() {
        if let Some(r) = &rootfs {
            unmount(r);
        }
    }
    result
}

async fn create_in_bundle(
    req: &CreateTaskRequest,
    namespace: &str,
    bundle: &Path,
    options: RuncOptions,
    rootfs: Option<PathBuf>,
) -> Result<Container> {
    let what = describe(&req.id, "");
    let criu_conf = criu_conf::ensure_annotation(bundle)
        .map_err(|e| Error::internal(format!("{what}: set up the CRIU configuration"), e))?;
    let root = runc_root(&options, namespace);
    let runc = Runc::new(&options.binary_name, &root, bundle, options.systemd_cgroup);
    let stdio = StdioPaths {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    };
    let mut init = Process::new("", stdio.clone());

    let checkpoint = if req.checkpoint.is_empty() {
        options.criu_image_path.clone()
    } else {
        req.checkpoint.clone()
    };
    let restore_from = if checkpoint.is_empty() {
        let pid_file = bundle.join("init.pid");
        let mut args = CreateArgs {
            bundle: bundle.to_path_buf(),
            pid_file: pid_file.clone(),
            console_socket: None,
            no_pivot: options.no_pivot_root,
            no_new_keyring: options.no_new_keyring,
        };
        let io = if req.terminal {
            let socket = ConsoleSocket::new(&console_socket_dir())?;
            args.console_socket = Some(socket.path().to_path_buf());
            runc.create(&req.id, &args, ProcessStdio::default()).await?;
            let master = socket.receive_master().await?;
            stdio::attach_console(&stdio, master)?
        } else {
            let (child, io) = stdio::pipes(&stdio)?;
            if let Err(e) = runc.create(&req.id, &args, child).await {
                io.tasks.abort().await;
                return Err(e);
            }
            io
        };
        init.pid = read_pid(&pid_file)?;
        init.io = Some(io);
        None
    } else {
        Some(RestoreSource {
            image_path: PathBuf::from(checkpoint),
            work_path: Some(options.criu_work_path.clone())
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            parent_path: Some(req.parent_checkpoint.clone())
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        })
    };

    Ok(Container {
        id: req.id.clone(),
        bundle: bundle.to_path_buf(),
        rootfs,
        runc,
        options,
        criu_conf,
        restore_from,
        init,
        execs: HashMap::new(),
        op: Arc::new(tokio::sync::Mutex::new(())),
        oom: None,
        runc_root: root,
        config: Arc::new(ShimConfig::default()),
        overrides: Overrides::default(),
        lazy: None,
        tap_config: None,
        tap: None,
        fence_file: None,
        migration: None,
    })
}

/// Unmounts everything at and below `rootfs`, logging failures.
pub fn unmount(rootfs: &Path) {
    if let Some(p) = rootfs.to_str() {
        if let Err(e) = umount_recursive(Some(p), 0) {
            tracing::warn!(rootfs = p, "unmount rootfs: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_root_of_options() {
        let opts = RuncOptions {
            root: "/run/x".into(),
            ..Default::default()
        };
        assert_eq!(runc_root(&opts, "ms2m"), PathBuf::from("/run/x/ms2m"));
        assert_eq!(
            runc_root(&RuncOptions::default(), "ms2m"),
            PathBuf::from("/run/ms2m/runc/ms2m")
        );
    }
}
