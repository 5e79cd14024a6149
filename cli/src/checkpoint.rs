//! `ms2m checkpoint`: Tasks.Checkpoint into an image directory, with
//! runc's `CheckpointOptions`, then the freeze statistics of the dump.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use containerd_client::services::v1::{CheckpointTaskRequest, WaitRequest};
use containerd_client::tonic::Code;
use criu_bridge::manifest::Manifest;
use criu_bridge::stats::DumpStats;
use serde::Serialize;

use crate::client::{self, absolute, grpc, Containerd};
use crate::options::{to_any, CheckpointOptions, CHECKPOINT_OPTIONS_TYPE_URL};

/// Where checkpoints go when no `--image-path` is given.
pub const DEFAULT_CHECKPOINT_ROOT: &str = "/var/lib/ms2m/checkpoints";

/// How long `--exit` waits for the task to stop after the dump.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// Arguments of `ms2m checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// Stop the container after the dump (default: it keeps running).
    #[arg(long)]
    pub exit: bool,
    /// Directory for CRIU's images (created if missing). Default:
    /// /var/lib/ms2m/checkpoints/<namespace>/<ID>/<UTC timestamp>.
    #[arg(long, value_name = "DIR")]
    pub image_path: Option<PathBuf>,
    /// CRIU's work directory (logs, stats-dump). Default: <image-path>-work
    /// beside the image directory, so the statistics survive with any runtime.
    #[arg(long, value_name = "DIR")]
    pub work_path: Option<PathBuf>,
    /// Dump established TCP connections.
    #[arg(long)]
    pub tcp_established: bool,
    /// Dump file locks.
    #[arg(long)]
    pub file_locks: bool,
    /// Allow external Unix sockets.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The container whose task to checkpoint.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// What a checkpoint did, as printed (text or JSON).
#[derive(Debug, Serialize)]
pub struct CheckpointReport {
    /// The container.
    pub container_id: String,
    /// Its containerd namespace.
    pub namespace: String,
    /// Its runtime, e.g. `io.containerd.ms2m.v1`.
    pub runtime: String,
    /// Where the images are.
    pub image_path: String,
    /// True when `image_path` is the default location.
    pub image_path_defaulted: bool,
    /// CRIU's work directory.
    pub work_path: String,
    /// The task was stopped by the checkpoint.
    pub exit: bool,
    /// `--tcp-established` was given.
    pub tcp_established: bool,
    /// `--file-locks` was given.
    pub file_locks: bool,
    /// `--ext-unix-sk` was given.
    pub ext_unix_sk: bool,
    /// Wall time of the Tasks.Checkpoint call, ms.
    pub checkpoint_ms: f64,
    /// With `--exit`: time from the checkpoint's return until the task was
    /// seen stopped, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_wait_ms: Option<f64>,
    /// Wall time of the whole command after connecting, ms.
    pub total_ms: f64,
    /// The task's status afterwards (`running`, `stopped`, or `deleted`).
    pub task_status: String,
    /// CRIU's dump statistics (the freeze), when found.
    pub stats: Option<DumpStats>,
    /// Where `stats` came from: `manifest` or `stats-dump`.
    pub stats_source: Option<String>,
    /// Why there are no statistics, when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_missing: Option<String>,
    /// The ms2m manifest written by the ms2m shim, when present.
    pub manifest: Option<Manifest>,
}

/// `YYYYMMDDTHHMMSS.mmmZ` in UTC: sortable and free of `:`.
pub fn timestamp_name(now: SystemTime) -> String {
    humantime::format_rfc3339_millis(now)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// The default image directory for a checkpoint of `id` taken at `now`.
pub fn default_image_path(root: &Path, namespace: &str, id: &str, now: SystemTime) -> PathBuf {
    root.join(namespace).join(id).join(timestamp_name(now))
}

/// The default CRIU work directory: `<image-dir>-work` beside the image
/// directory (outside it, so the images stay CRIU's alone).
pub fn default_work_path(image_path: &Path) -> PathBuf {
    let name = image_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".to_string());
    let parent = image_path.parent().unwrap_or(Path::new("/"));
    parent.join(format!("{name}-work"))
}

/// Builds the runc checkpoint options for these arguments and paths.
pub fn checkpoint_options(
    args: &CheckpointArgs,
    image_path: &Path,
    work_path: &Path,
) -> CheckpointOptions {
    CheckpointOptions {
        exit: args.exit,
        open_tcp: args.tcp_established,
        external_unix_sockets: args.ext_unix_sk,
        file_locks: args.file_locks,
        image_path: image_path.display().to_string(),
        work_path: work_path.display().to_string(),
        ..Default::default()
    }
}

/// A directory builder for checkpoint directories: mode 0700 (before the
/// umask), `recursive` creating missing parents 0700 too.
fn private_dir(recursive: bool) -> std::fs::DirBuilder {
    use std::os::unix::fs::DirBuilderExt;
    let mut b = std::fs::DirBuilder::new();
    b.recursive(recursive).mode(0o700);
    b
}

fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1000.0
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// True when `path` was modified at or after `since` (with slack for the
/// kernel's coarse file clock).
fn fresh(path: &Path, since: SystemTime) -> bool {
    let slack = Duration::from_millis(100);
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|m| m + slack >= since)
        .unwrap_or(false)
}

/// Statistics of the dump just taken: the ms2m manifest first, else CRIU's
/// `stats-dump` in the work directory. Files older than `since` belong to an
/// earlier checkpoint and are ignored.
pub fn find_dump_stats(
    image_path: &Path,
    work_path: &Path,
    since: SystemTime,
) -> (
    Option<Manifest>,
    Option<DumpStats>,
    Option<String>,
    Option<String>,
) {
    let mut why = Vec::new();
    let mut manifest = None;
    if Manifest::path_in(image_path).exists() {
        match Manifest::read(image_path) {
            Ok(m) if m.created_at_unix_ms + 1 >= unix_ms(since) => manifest = Some(m),
            Ok(m) => why.push(format!(
                "the manifest in {} is from an earlier checkpoint ({})",
                image_path.display(),
                m.created_at
            )),
            Err(e) => why.push(format!("{e}")),
        }
    }
    if let Some(stats) = manifest.as_ref().and_then(|m| m.stats.clone()) {
        return (manifest, Some(stats), Some("manifest".into()), None);
    }
    for dir in [work_path, image_path] {
        let file = dir.join(criu_bridge::stats::DUMP_STATS_FILE);
        if !file.exists() {
            continue;
        }
        if !fresh(&file, since) {
            why.push(format!("{} is from an earlier checkpoint", file.display()));
            continue;
        }
        match criu_bridge::stats::read_dump_stats(&file) {
            Ok(s) => return (manifest, Some(s), Some("stats-dump".into()), None),
            Err(e) => why.push(format!("{e}")),
        }
    }
    if why.is_empty() {
        why.push(format!(
            "neither {} nor {} holds a manifest or CRIU's stats-dump",
            image_path.display(),
            work_path.display()
        ));
    }
    (manifest, None, None, Some(why.join("; ")))
}

/// Runs `ms2m checkpoint`.
pub async fn run(cd: &Containerd, args: &CheckpointArgs) -> Result<CheckpointReport> {
    let start = Instant::now();
    let now = SystemTime::now();
    let id = args.id.as_str();

    let container = client::get_container(cd, id).await?;
    let runtime = container
        .runtime
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_default();
    match client::get_task(cd, id).await? {
        None => anyhow::bail!("container {id} has no task: nothing to checkpoint"),
        Some(p) if client::status_name(p.status) == "stopped" => {
            anyhow::bail!("the task of container {id} is stopped: nothing to checkpoint")
        }
        Some(_) => {}
    }

    let (image_path, defaulted) = match &args.image_path {
        Some(p) => (absolute(p)?, false),
        None => (
            default_image_path(Path::new(DEFAULT_CHECKPOINT_ROOT), cd.namespace(), id, now),
            true,
        ),
    };
    let work_path = match &args.work_path {
        Some(p) => absolute(p)?,
        None => default_work_path(&image_path),
    };
    // 0700, parents too: the images hold the container's memory.
    if defaulted {
        if let Some(parent) = image_path.parent() {
            private_dir(true)
                .create(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        private_dir(false)
            .create(&image_path)
            .with_context(|| format!("cannot create image directory {}", image_path.display()))?;
    } else {
        private_dir(true)
            .create(&image_path)
            .with_context(|| format!("cannot create image directory {}", image_path.display()))?;
    }
    private_dir(true)
        .create(&work_path)
        .with_context(|| format!("cannot create work directory {}", work_path.display()))?;

    let opts = checkpoint_options(args, &image_path, &work_path);
    let req = CheckpointTaskRequest {
        container_id: id.to_string(),
        parent_checkpoint: String::new(),
        options: Some(to_any(&opts, CHECKPOINT_OPTIONS_TYPE_URL)),
    };
    let t0 = Instant::now();
    cd.tasks()
        .checkpoint(cd.request(req))
        .await
        .map_err(grpc("Tasks.Checkpoint"))?;
    let checkpoint_ms = ms_since(t0);

    let mut exit_wait_ms = None;
    if args.exit {
        let t1 = Instant::now();
        let mut tasks = cd.tasks();
        let wait = tasks.wait(cd.request(WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }));
        match tokio::time::timeout(EXIT_WAIT, wait).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == Code::NotFound => {}
            Ok(Err(s)) => {
                return Err(grpc("Tasks.Wait")(s))
                    .context("the checkpoint succeeded, but waiting for the task to stop failed")
            }
            Err(_) => anyhow::bail!(
                "the checkpoint succeeded, but the task did not stop within {}s",
                EXIT_WAIT.as_secs()
            ),
        }
        exit_wait_ms = Some(ms_since(t1));
    }
    let task_status = match client::get_task(cd, id).await? {
        Some(p) => client::status_name(p.status).to_string(),
        None => "deleted".to_string(),
    };

    let (manifest, stats, stats_source, stats_missing) =
        find_dump_stats(&image_path, &work_path, now);

    Ok(CheckpointReport {
        container_id: id.to_string(),
        namespace: cd.namespace().to_string(),
        runtime,
        image_path: image_path.display().to_string(),
        image_path_defaulted: defaulted,
        work_path: work_path.display().to_string(),
        exit: args.exit,
        tcp_established: args.tcp_established,
        file_locks: args.file_locks,
        ext_unix_sk: args.ext_unix_sk,
        checkpoint_ms,
        exit_wait_ms,
        total_ms: ms_since(start),
        task_status,
        stats,
        stats_source,
        stats_missing,
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_names_sort_and_have_no_colons() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000_000_123);
        assert_eq!(timestamp_name(t), "20010909T014640.123Z");
        let later = timestamp_name(t + Duration::from_millis(1));
        assert!(later > timestamp_name(t));
    }

    #[test]
    fn default_paths() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(0);
        let p = default_image_path(Path::new("/var/lib/ms2m/checkpoints"), "ms2m", "c1", t);
        assert_eq!(
            p,
            Path::new("/var/lib/ms2m/checkpoints/ms2m/c1/19700101T000000.000Z")
        );
        assert_eq!(
            default_work_path(&p),
            Path::new("/var/lib/ms2m/checkpoints/ms2m/c1/19700101T000000.000Z-work")
        );
        assert_eq!(
            default_work_path(Path::new("/dev/shm/ck1")),
            Path::new("/dev/shm/ck1-work")
        );
    }

    #[test]
    fn options_follow_flags() {
        let args = CheckpointArgs {
            exit: true,
            image_path: None,
            work_path: None,
            tcp_established: true,
            file_locks: false,
            ext_unix_sk: true,
            json: false,
            id: "c1".into(),
        };
        let o = checkpoint_options(&args, Path::new("/i"), Path::new("/w"));
        assert!(o.exit && o.open_tcp && o.external_unix_sockets && !o.file_locks);
        assert_eq!((o.image_path.as_str(), o.work_path.as_str()), ("/i", "/w"));
    }

    #[test]
    fn stale_stats_are_ignored() {
        let dir = std::env::temp_dir().join(format!("ms2m-cli-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stats-dump"), b"x").unwrap();
        let later = SystemTime::now() + Duration::from_secs(10);
        let (m, s, src, why) = find_dump_stats(&dir, &dir, later);
        assert!(m.is_none() && s.is_none() && src.is_none());
        assert!(why.unwrap().contains("earlier checkpoint"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
