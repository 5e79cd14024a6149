//! The restore path. A task created from a checkpoint (containerd's Create
//! with `checkpoint` set, or runtime options naming `criu_image_path`)
//! waits in the created state; its Start runs `runc restore --detach`
//! with the process's stdio set up as for a create, then reads CRIU's
//! restore statistics.

use std::path::{Path, PathBuf};
use std::time::Instant;

use criu_bridge::config::CriuConfig;
use criu_bridge::manifest::{describe_restore, Manifest};
use criu_bridge::stats::read_restore_stats;

use crate::checkpoint::criu_errors;
use crate::container::{console_socket_dir, read_pid, RestoreSource};
use crate::criu_conf;
use crate::error::{Error, Result};
use crate::runc::{ProcessStdio, RestoreArgs, Runc};
use crate::stdio::{self, ConsoleSocket, ProcessIo, StdioPaths};

/// What the restore needs to know about the container.
pub struct Target<'a> {
    /// Container id.
    pub id: &'a str,
    /// Bundle directory.
    pub bundle: &'a Path,
    /// runc for the container.
    pub runc: &'a Runc,
    /// The process's stdio.
    pub stdio: &'a StdioPaths,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// The CRIU configuration file the shim owns, if any.
    pub criu_conf: Option<&'a Path>,
}

/// Restores the container; returns the restored init's pid and its stdio.
pub async fn restore(target: &Target<'_>, from: &RestoreSource) -> Result<(i32, ProcessIo)> {
    let id = target.id;
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
    if let Some(conf) = target.criu_conf {
        criu_conf::write(conf, &CriuConfig::new().tcp_close(dumped.tcp_close))?;
    }

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
    };
    if from.parent_path.is_some() {
        tracing::debug!(
            id,
            "parent checkpoint is found by CRIU through the images' parent link"
        );
    }

    let io = if target.stdio.terminal {
        let socket = ConsoleSocket::new(&console_socket_dir())?;
        args.console_socket = Some(socket.path().to_path_buf());
        target
            .runc
            .restore(id, &args, ProcessStdio::default())
            .await
            .map_err(|e| with_log(e, &work))?;
        let master = socket.receive_master().await?;
        stdio::attach_console(target.stdio, master)?
    } else {
        let (child, io) = stdio::pipes(target.stdio)?;
        if let Err(e) = target.runc.restore(id, &args, child).await {
            io.tasks.abort().await;
            return Err(with_log(e, &work));
        }
        io
    };
    let pid = read_pid(&pid_file)?;

    match read_restore_stats(&work) {
        Ok(s) => tracing::info!(
            id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "CRIU restore: {}",
            describe_restore(&s)
        ),
        Err(e) => tracing::warn!(id, "no CRIU restore statistics: {e}"),
    }
    if temp_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok((pid, io))
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
            Error::Internal(format!("{e}{errors}; CRIU log: {}", log.display()))
        }
        Err(_) => e,
    }
}
