//! The checkpoint path, top to bottom in [`checkpoint`]: void the previous
//! fence, plan the dump, ready the AMQP tap, dump, let go of the tap, and
//! write the ms2m manifest (options, strategy, CRIU's dump statistics,
//! timings, the broker cut) beside the images.
//!
//! A failed checkpoint leaves the container as it was: CRIU thaws it on
//! failure, and the shim checks and resumes it if it is still frozen.
//!
//! Each step has its file, in the order the path takes them:
//! - [`plan`]: the strategy (direct, pre-copy, runc), network lock and
//!   cgroups mode, from the configuration, the annotations and the
//!   detected features;
//! - [`tap`]: the container's AMQP tap before and after the dump (void
//!   fences, upstream probe, the quiesce of a paused container, release);
//! - [`dump_direct`]: a dump through CRIU's RPC (pre-copy rounds first for
//!   pre-copy), with the frozen-window hooks and the broker cut;
//! - [`dump_runc`]: `runc checkpoint`;
//! - [`failure`]: what a failed dump leaves (CRIU's log kept, the container
//!   running);
//! - [`manifest`]: the manifest written beside the images.
//!
//! The path sees the container only through [`Target`], so it depends on
//! nothing above it (not on `crate::container` or the service).

mod dump_direct;
mod dump_runc;
mod failure;
mod manifest;
mod plan;
mod tap;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use containerd_shim_protos::shim::oci::CheckpointOptions;
use criu_bridge::config::netns_has_tcp;
use criu_bridge::manifest::{describe_dump, Manifest};
use criu_bridge::stats::DumpStats;

use crate::config::{Overrides, ShimConfig};
use crate::error::{Error, Result};
use crate::frozen_window::FrozenRecord;
use crate::runc::Runc;
use plan::{Method, Plan};

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
    /// runc's state directory (`--root`).
    pub runc_root: PathBuf,
    /// Host pid of the init process.
    pub init_pid: i32,
    /// The container was paused before the checkpoint (it stays paused).
    pub was_paused: bool,
    /// The CRIU configuration file the shim owns, if any.
    pub criu_conf: Option<PathBuf>,
    /// The shim configuration of the container.
    pub config: Arc<ShimConfig>,
    /// The container's ms2m annotations.
    pub overrides: Overrides,
    /// The container's AMQP tap and its configuration, if it has one.
    pub tap: Option<(ms2m_tap::Tap, ms2m_tap::TapConfig)>,
    /// The fence `ms2m fence` wrote for the container's previous
    /// checkpoint: this checkpoint releases the tap's hold, so the source
    /// publishes past what it counted, and it is removed.
    pub void_fence: Option<PathBuf>,
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
    let what = describe(id, image_path);
    if image_path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint of container {id}: no image path given"
        )));
    }
    check_path(id, "image path", image_path)?;
    if !opts.work_path.is_empty() {
        check_path(id, "work path", Path::new(&opts.work_path))?;
    }
    tap::remove_void_fences(target, image_path, &what)?;
    let has_tcp = netns_has_tcp(target.init_pid as u32);
    let mut plan = plan::plan(target, opts, *has_tcp.as_ref().unwrap_or(&true)).await?;
    if target.tap.is_some() {
        plan.reason.push_str(
            "; AMQP tap: quiesce at CRIU's pre-dump, cut in the frozen window, TCP restored \
             closed (tcp-close), so no network lock after all",
        );
    }
    tracing::info!(
        id = %id,
        strategy = plan.method.name(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "checkpoint planned: {}",
        plan.reason
    );
    create_private_dir(image_path)
        .map_err(|e| Error::internal(format!("{what} failed: cannot create image directory"), e))?;
    let work = WorkDir::create(target, opts, &what)?;

    // The tap: quiesced at CRIU's pre-dump notification (holding new
    // deliveries, waiting for the app to ack what it has), cut in the
    // frozen window.
    let broker = tap::prepare(target, opts, &plan).await?;

    let before = failure::Before::take(image_path);
    let dump_started = Instant::now();
    let job = DumpJob {
        target,
        image_path,
        work_path: &work.path,
        opts,
        plan: &plan,
    };
    let dumped = match plan.method {
        Method::Runc => dump_runc::dump(&job, &has_tcp).await,
        Method::Direct | Method::PreCopy(_) => dump_direct::dump(&job, broker.as_ref()).await,
    };
    let dump_ms = dump_started.elapsed().as_secs_f64() * 1000.0;

    // Holding does not outlive the checkpoint, unless the container asks.
    if let Some(b) = &broker {
        tap::after_dump(id, b, dumped.is_ok(), opts.exit).await;
    }

    let dumped = match dumped {
        Ok(d) => d,
        Err(e) => {
            let log = failure::keep_dump_log(&work.path, image_path, &target.bundle);
            let state = failure::ensure_running(target).await;
            let network = failure::release_network_lock(target).await;
            let images = failure::discard_images(image_path, &before, log.as_deref());
            return Err(Error::Internal(format!(
                "{what} failed: {e}{}{state}{network}{images}",
                log.map(|l| format!("; CRIU log: {}", l.display()))
                    .unwrap_or_default()
            )));
        }
    };

    let mut m = manifest::build(
        target,
        image_path,
        opts,
        &plan,
        dumped,
        broker.as_ref(),
        &work,
    )
    .await?;
    m.timings.dump_ms = dump_ms;
    m.timings.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    m.write(image_path)
        .map_err(|e| Error::internal(format!("{what}: images written, but the manifest not"), e))?;
    if work.temporary {
        let _ = std::fs::remove_dir_all(&work.path);
    }
    if let Some(s) = &m.stats {
        tracing::info!(id = %id, strategy = %m.strategy.name, "CRIU dump: {}", describe_dump(s));
    }
    Ok(m)
}

/// One dump, as either method gets it.
#[derive(Clone, Copy)]
struct DumpJob<'a> {
    target: &'a Target,
    image_path: &'a Path,
    work_path: &'a Path,
    opts: &'a CheckpointOptions,
    plan: &'a Plan,
}

/// What a dump produced, whatever the method.
struct Dumped {
    stats: Option<DumpStats>,
    network_lock: String,
    frozen: Option<FrozenRecord>,
    criu_events: Option<serde_json::Value>,
    cgroups_mode: Option<String>,
    rounds: Option<serde_json::Value>,
    /// The broker cut captured in the frozen window.
    cut: Option<crate::broker::Captured>,
}

/// CRIU's work directory for one checkpoint: the request's, or a temporary
/// one in the bundle, emptied first and removed after a success.
struct WorkDir {
    path: PathBuf,
    temporary: bool,
}

impl WorkDir {
    fn create(target: &Target, opts: &CheckpointOptions, what: &str) -> Result<WorkDir> {
        let (work_path, temp_work) = if opts.work_path.is_empty() {
            (target.bundle.join("criu-work"), true)
        } else {
            (PathBuf::from(&opts.work_path), false)
        };
        if temp_work {
            let _ = std::fs::remove_dir_all(&work_path);
        }
        create_private_dir(&work_path).map_err(|e| {
            Error::internal(
                format!(
                    "{what} failed: cannot create work directory {}",
                    work_path.display()
                ),
                e,
            )
        })?;
        Ok(WorkDir {
            path: work_path,
            temporary: temp_work,
        })
    }
}

/// "checkpoint of container ID into DIR", for messages.
/// An image or work path must be absolute and plain: a relative one would
/// be taken from the shim's working directory (the bundle, inside
/// containerd's state), and `..` hides where the images go.
fn check_path(id: &str, what: &str, p: &Path) -> Result<()> {
    if p.is_absolute() && !p.components().any(|c| c == Component::ParentDir) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "checkpoint of container {id}: the {what} {:?} must be an absolute path without `..`",
        p.display().to_string()
    )))
}

/// Creates `p` and its missing parents, 0700: the images hold the
/// container's memory. An existing directory keeps its mode.
fn create_private_dir(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
}

fn describe(id: &str, image_path: &Path) -> String {
    format!("checkpoint of container {id} into {}", image_path.display())
}
