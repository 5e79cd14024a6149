//! The checkpoint path: decode containerd's checkpoint options, choose the
//! CRIU configuration, run `runc checkpoint`, and write the ms2m manifest
//! (options, strategy, CRIU's dump statistics, timings) beside the images.
//!
//! A failed checkpoint leaves the container as it was: CRIU thaws it on
//! failure, and the shim checks and resumes it if it is still frozen.

use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::CheckpointOptions;
use criu_bridge::config::{netns_has_tcp, CriuConfig, NetworkLock};
use criu_bridge::manifest::{describe_dump, Manifest};
use criu_bridge::stats::read_dump_stats;
use tokio::sync::OnceCell;

use crate::container::type_name;
use crate::criu_conf;
use crate::error::{Error, Result};
use crate::runc::{CheckpointArgs, Runc};

/// The type of containerd's checkpoint options for runc runtimes.
const CHECKPOINT_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";

/// Name of the strategy recorded in the manifest.
pub const STRATEGY: &str = "runc-criu-dump";

/// The CRIU binary whose version goes into the manifest.
const CRIU_BINARY: &str = "criu";

/// Decodes the request's checkpoint options (none: defaults).
pub fn parse_options(any: Option<&Any>) -> Result<CheckpointOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
        return Ok(CheckpointOptions::default());
    };
    if type_name(&any.type_url) != CHECKPOINT_OPTIONS_TYPE {
        return Err(Error::InvalidArgument(format!(
            "checkpoint options of type {:?} are not supported (expected {CHECKPOINT_OPTIONS_TYPE})",
            any.type_url
        )));
    }
    CheckpointOptions::parse_from_bytes(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("decode {CHECKPOINT_OPTIONS_TYPE}: {e}")))
}

/// The network lock to ask CRIU for, and why. `None` keeps CRIU's default.
pub fn plan_network_lock(has_tcp: &std::io::Result<bool>) -> (Option<NetworkLock>, String) {
    match has_tcp {
        Ok(false) => (
            Some(NetworkLock::Skip),
            "no TCP socket in the container's network namespace: nothing to lock, \
             network lock skipped"
                .to_string(),
        ),
        Ok(true) => (
            None,
            "TCP sockets in the container's network namespace: CRIU's default network lock"
                .to_string(),
        ),
        Err(e) => (
            None,
            format!("network namespace not inspectable ({e}): CRIU's default network lock"),
        ),
    }
}

/// The container being checkpointed, as the checkpoint needs it.
pub struct Target {
    /// Container id.
    pub id: String,
    /// containerd namespace.
    pub namespace: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// runc for the container.
    pub runc: Runc,
    /// Host pid of the init process.
    pub init_pid: i32,
    /// The container was paused before the checkpoint (it stays paused).
    pub was_paused: bool,
    /// The CRIU configuration file the shim owns, if any.
    pub criu_conf: Option<PathBuf>,
}

/// Checkpoints `target` into `image_path` and returns the manifest written
/// there.
pub async fn checkpoint(
    target: &Target,
    image_path: &Path,
    opts: &CheckpointOptions,
) -> Result<Manifest> {
    let started = Instant::now();
    let id = &target.id;
    let what = format!("checkpoint of container {id} into {}", image_path.display());
    if image_path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint of container {id}: no image path given"
        )));
    }
    std::fs::create_dir_all(image_path)
        .map_err(|e| Error::internal(format!("{what} failed: cannot create image directory"), e))?;
    let (work_path, temp_work) = if opts.work_path.is_empty() {
        (target.bundle.join("criu-work"), true)
    } else {
        (PathBuf::from(&opts.work_path), false)
    };
    if temp_work {
        let _ = std::fs::remove_dir_all(&work_path);
    }
    std::fs::create_dir_all(&work_path).map_err(|e| {
        Error::internal(
            format!(
                "{what} failed: cannot create work directory {}",
                work_path.display()
            ),
            e,
        )
    })?;

    // The CRIU configuration: network lock only when there is something to lock.
    let (lock, mut reason) = plan_network_lock(&netns_has_tcp(target.init_pid as u32));
    let network_lock = match (&target.criu_conf, lock) {
        (Some(conf), lock) => {
            let mut config = CriuConfig::new();
            if let Some(l) = lock {
                config = config.network_lock(l);
            }
            criu_conf::write(conf, &config)?;
            lock.map(|l| l.to_string())
                .unwrap_or_else(|| NetworkLock::Iptables.to_string())
        }
        (None, _) => {
            reason = "the container names its own CRIU configuration (org.criu.config): \
                      used as it is"
                .to_string();
            "configured".to_string()
        }
    };

    let args = CheckpointArgs {
        image_path: image_path.to_path_buf(),
        work_path: work_path.clone(),
        parent_path: None,
        leave_running: !opts.exit,
        tcp_established: opts.open_tcp,
        external_unix_sockets: opts.external_unix_sockets,
        shell_job: opts.terminal,
        file_locks: opts.file_locks,
        empty_namespaces: opts.empty_namespaces.clone(),
        cgroups_mode: Some(opts.cgroups_mode.clone()).filter(|m| !m.is_empty()),
    };
    let dump_started = Instant::now();
    let dumped = target.runc.checkpoint(id, &args).await;
    let dump_ms = dump_started.elapsed().as_secs_f64() * 1000.0;

    if let Err(e) = dumped {
        let criu_errors = std::fs::read_to_string(work_path.join("dump.log"))
            .map(|log| criu_errors(&log))
            .unwrap_or_default();
        let log = keep_dump_log(&work_path, image_path, &target.bundle);
        let state = ensure_running(target).await;
        return Err(Error::Internal(format!(
            "{what} failed: {e}{}{}{state}",
            if criu_errors.is_empty() {
                String::new()
            } else {
                format!("; CRIU: {criu_errors}")
            },
            log.map(|l| format!("; CRIU log: {}", l.display()))
                .unwrap_or_default()
        )));
    }

    let stats = match read_dump_stats(&work_path) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(id = %id, "no CRIU dump statistics: {e}");
            None
        }
    };
    let mut m = Manifest::new(id);
    m.namespace = Some(target.namespace.clone());
    m.runtime.shim = crate::SHIM_BINARY.to_string();
    m.runtime.shim_version = env!("CARGO_PKG_VERSION").to_string();
    m.runtime.oci_runtime = "runc".to_string();
    m.runtime.oci_runtime_version = runc_version(&target.runc).await;
    m.runtime.criu_version = criu_bridge::criu::criu_version(CRIU_BINARY)
        .map_err(|e| tracing::warn!("CRIU version unknown: {e}"))
        .ok();
    m.options.exit = opts.exit;
    m.options.tcp_established = opts.open_tcp;
    m.options.tcp_close = false;
    m.options.external_unix_sockets = opts.external_unix_sockets;
    m.options.shell_job = opts.terminal;
    m.options.file_locks = opts.file_locks;
    m.options.network_lock = network_lock;
    m.options.image_path = image_path.display().to_string();
    m.options.work_path = (!temp_work).then(|| work_path.display().to_string());
    m.options.cgroups_mode = args.cgroups_mode.clone();
    m.options.empty_namespaces = opts.empty_namespaces.clone();
    m.strategy.name = STRATEGY.to_string();
    m.strategy.reason = reason;
    m.stats = stats;
    m.timings.dump_ms = dump_ms;
    m.timings.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    m.write(image_path)
        .map_err(|e| Error::internal(format!("{what}: images written, but the manifest not"), e))?;
    if temp_work {
        let _ = std::fs::remove_dir_all(&work_path);
    }
    if let Some(s) = &m.stats {
        tracing::info!(id = %id, "CRIU dump: {}", describe_dump(s));
    }
    Ok(m)
}

/// The last error lines of a CRIU log, joined (at most three).
pub fn criu_errors(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .map(str::trim)
        .collect();
    errors[errors.len().saturating_sub(3)..].join(" | ")
}

/// runc's version, asked once per shim.
async fn runc_version(runc: &Runc) -> Option<String> {
    static VERSION: OnceCell<Option<String>> = OnceCell::const_new();
    VERSION
        .get_or_init(|| async {
            runc.version()
                .await
                .map_err(|e| tracing::warn!("runc version unknown: {e}"))
                .ok()
        })
        .await
        .clone()
}

/// Copies CRIU's dump.log from the work directory into the image directory
/// and the bundle (as criu-dump.log). Returns where it can be read.
fn keep_dump_log(work: &Path, images: &Path, bundle: &Path) -> Option<PathBuf> {
    let log = work.join("dump.log");
    if !log.exists() {
        return None;
    }
    let mut kept = None;
    let in_bundle = bundle.join("criu-dump.log");
    if std::fs::copy(&log, &in_bundle).is_ok() {
        kept = Some(in_bundle);
    }
    if work != images {
        let in_images = images.join("dump.log");
        if std::fs::copy(&log, &in_images).is_ok() {
            kept = Some(in_images);
        }
    } else {
        kept = Some(log);
    }
    kept
}

/// After a failed dump: makes sure the container is not left frozen.
/// Returns a note for the error message when something was done or is wrong.
async fn ensure_running(target: &Target) -> String {
    match target.runc.status(&target.id).await {
        Ok(s) if s == "paused" && !target.was_paused => {
            match target.runc.resume(&target.id).await {
                Ok(()) => {
                    tracing::warn!(id = %target.id, "container was left frozen by the failed checkpoint: resumed");
                    "; the container was left frozen and has been resumed".to_string()
                }
                Err(e) => format!("; the container is left frozen and resuming it failed: {e}"),
            }
        }
        Ok(s) if s == "running" || s == "paused" => String::new(),
        Ok(s) => format!("; the container is now {s}"),
        Err(e) => format!("; container state unknown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_checkpoint_options() {
        let opts = CheckpointOptions {
            exit: true,
            open_tcp: true,
            image_path: "/dev/shm/x".into(),
            work_path: "/dev/shm/w".into(),
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert_eq!(parse_options(Some(&any)).unwrap(), opts);
        assert_eq!(parse_options(None).unwrap(), CheckpointOptions::default());
    }

    #[test]
    fn rejects_foreign_options() {
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        };
        assert!(matches!(
            parse_options(Some(&any)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn network_lock_only_when_tcp() {
        assert_eq!(plan_network_lock(&Ok(false)).0, Some(NetworkLock::Skip));
        assert_eq!(plan_network_lock(&Ok(true)).0, None);
        assert_eq!(
            plan_network_lock(&Err(std::io::Error::other("gone"))).0,
            None
        );
    }

    #[test]
    fn picks_criu_errors() {
        let log = "(00.1) info\n(00.2) Error (criu/image.c:1): can't write: No space left\n\
                   (00.3) Error (criu/cr-dump.c:2): Dumping failed\n(00.4) Unfreezing tasks\n";
        assert_eq!(
            criu_errors(log),
            "(00.2) Error (criu/image.c:1): can't write: No space left | \
             (00.3) Error (criu/cr-dump.c:2): Dumping failed"
        );
        assert_eq!(criu_errors("all fine\n"), "");
    }

    #[test]
    fn dump_log_is_kept() {
        let base = std::env::temp_dir().join(format!("ms2m-shim-test-{}", std::process::id()));
        let (work, images, bundle) = (base.join("w"), base.join("i"), base.join("b"));
        for d in [&work, &images, &bundle] {
            std::fs::create_dir_all(d).unwrap();
        }
        assert_eq!(keep_dump_log(&work, &images, &bundle), None);
        std::fs::write(work.join("dump.log"), "Error (criu/cr-dump.c)").unwrap();
        assert_eq!(
            keep_dump_log(&work, &images, &bundle),
            Some(images.join("dump.log"))
        );
        assert!(bundle.join("criu-dump.log").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
