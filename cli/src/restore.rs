//! `ms2m restore`: a new task for an existing container, created from a
//! checkpoint directory (runc `Options.criu_image_path`) or a checkpoint
//! reference in containerd's image store (the CRIU tar descriptor), then
//! started.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::{
    CreateTaskRequest, DeleteTaskRequest, GetImageRequest, ReadContentRequest, StartRequest,
};
use containerd_client::tonic::Code;
use containerd_client::types::{Descriptor, Mount};
use criu_bridge::manifest::Manifest;
use criu_bridge::stats::RestoreStats;
use serde::Serialize;

use crate::client::{self, absolute, grpc, Containerd};
use crate::options::{runc_options_from, to_any, RUNC_OPTIONS_TYPE_URL};

/// Media type of the CRIU image tarball in a checkpoint made by
/// `ctr c checkpoint --task` (containerd's `MediaTypeContainerd1Checkpoint`).
pub const CRIU_CHECKPOINT_MEDIA_TYPE: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";

/// Where CRIU's restore work directories go when no `--work-path` is given
/// (one per container, emptied on each restore).
pub const DEFAULT_RESTORE_WORK_ROOT: &str = "/run/ms2m/restore-work";

/// Arguments of `ms2m restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Kill and delete the container's task if it is still running.
    #[arg(long)]
    pub force: bool,
    /// Append the restored task's stdout and stderr to this file (default:
    /// /dev/null), as a `file://` URI. Its stdin is a FIFO nobody writes.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// CRIU's work directory for the restore (logs, stats-restore). Default:
    /// /run/ms2m/restore-work/<namespace>/<ID>, emptied first.
    #[arg(long, value_name = "DIR")]
    pub work_path: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The container to restore (it must exist; its task is replaced).
    #[arg(value_name = "ID")]
    pub id: String,
    /// A checkpoint directory (an image path), or a checkpoint reference in
    /// containerd's image store (made by `ctr c checkpoint --task ID REF`).
    /// An existing directory wins over a reference of the same name.
    #[arg(value_name = "FROM")]
    pub from: String,
}

/// What FROM names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory holding CRIU images.
    Directory(PathBuf),
    /// An image name in containerd's image store.
    Reference(String),
}

/// What is at a path, for [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A directory.
    Dir,
    /// Something other than a directory.
    Other,
    /// Nothing.
    Missing,
}

/// What is at `path` on this machine.
pub fn path_kind(path: &Path) -> PathKind {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => PathKind::Dir,
        Ok(_) => PathKind::Other,
        Err(_) => PathKind::Missing,
    }
}

/// Decides whether FROM is a checkpoint directory or an image reference. An
/// existing directory is a directory; something that is spelled as a path
/// (`/…`, `./…`, `../…`) but is not a directory is an error; anything else
/// is a reference.
pub fn classify(from: &str, kind: impl Fn(&Path) -> PathKind) -> Result<Source> {
    if from.is_empty() {
        anyhow::bail!("FROM is empty: give a checkpoint directory or a checkpoint reference");
    }
    let path = Path::new(from);
    match kind(path) {
        PathKind::Dir => return Ok(Source::Directory(path.to_path_buf())),
        PathKind::Other => anyhow::bail!("{from} is not a directory of checkpoint images"),
        PathKind::Missing => {}
    }
    let looks_like_path = from.starts_with('/')
        || from.starts_with("./")
        || from.starts_with("../")
        || from == "."
        || from == "..";
    if looks_like_path {
        anyhow::bail!("checkpoint directory {from} does not exist");
    }
    Ok(Source::Reference(from.to_string()))
}

/// Finds the CRIU tarball's descriptor in a checkpoint index (the JSON blob
/// a checkpoint reference's target points at).
pub fn checkpoint_descriptor(index_json: &[u8]) -> Result<Descriptor> {
    let index: serde_json::Value =
        serde_json::from_slice(index_json).context("the checkpoint index is not valid JSON")?;
    let manifests = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .context("the image is not a checkpoint: its target is not an index")?;
    let entry = manifests
        .iter()
        .find(|d| d.get("mediaType").and_then(|m| m.as_str()) == Some(CRIU_CHECKPOINT_MEDIA_TYPE))
        .with_context(|| {
            format!(
                "the image is not a checkpoint: its index lists no {CRIU_CHECKPOINT_MEDIA_TYPE}"
            )
        })?;
    let digest = entry
        .get("digest")
        .and_then(|d| d.as_str())
        .context("the CRIU checkpoint entry has no digest")?;
    let size = entry
        .get("size")
        .and_then(|s| s.as_i64())
        .context("the CRIU checkpoint entry has no size")?;
    let annotations = entry
        .get("annotations")
        .and_then(|a| a.as_object())
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Descriptor {
        media_type: CRIU_CHECKPOINT_MEDIA_TYPE.to_string(),
        digest: digest.to_string(),
        size,
        annotations,
    })
}

/// The default restore work directory for container `id`.
pub fn default_restore_work_path(root: &Path, namespace: &str, id: &str) -> PathBuf {
    root.join(namespace).join(id)
}

/// The stdout/stderr URI for `--log FILE` (a `file://` URI, which
/// containerd's shims open in append mode).
pub fn log_uri(file: &Path) -> String {
    format!("file://{}", file.display())
}

/// Name of the stdin FIFO ms2m creates in the restore work directory.
pub const STDIN_FIFO: &str = "stdin";

/// Where the restored task's output goes when no `--log` is given.
pub const DEFAULT_LOG: &str = "/dev/null";

/// Creates (or replaces) the FIFO the restored task's stdin is read from.
///
/// Empty stdio paths would hand the task the host's `/dev/null`, which CRIU
/// cannot dump ("Can't lookup mount ... path=/dev/null"): the restored task
/// could never be checkpointed again. With a FIFO that nobody writes, the
/// shim gives the task a pipe that reads end-of-file, as `ctr run -d` does.
fn make_stdin_fifo(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove old FIFO {}", path.display()))
        }
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot create stdin FIFO {}", path.display()));
    }
    Ok(())
}

/// What a restore did, as printed (text or JSON).
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    /// The container.
    pub container_id: String,
    /// Its containerd namespace.
    pub namespace: String,
    /// Its runtime.
    pub runtime: String,
    /// `directory` or `reference`.
    pub source_kind: String,
    /// The directory (absolute) or the reference.
    pub source: String,
    /// The CRIU tarball's digest, for a reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_digest: Option<String>,
    /// What was done to a task the container already had.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_task: Option<String>,
    /// CRIU's work directory for the restore.
    pub work_path: String,
    /// Where stdout/stderr go (a `file://` URI).
    pub log: String,
    /// The stdin FIFO (nobody writes it: the task reads end-of-file).
    pub stdin: String,
    /// PID of the restored task.
    pub pid: u32,
    /// The task's status after start.
    pub task_status: String,
    /// Wall time of Tasks.Create (CRIU's restore), ms.
    pub create_ms: f64,
    /// Wall time of Tasks.Start, ms.
    pub start_ms: f64,
    /// From Tasks.Create until the task runs, ms.
    pub time_to_running_ms: f64,
    /// Wall time of the whole command after connecting, ms.
    pub total_ms: f64,
    /// CRIU's restore statistics, when found.
    pub restore_stats: Option<RestoreStats>,
    /// Why there are no restore statistics, when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_stats_missing: Option<String>,
    /// The checkpoint's ms2m manifest (from the directory, or from inside a
    /// reference's tarball), when it has one.
    pub manifest: Option<Manifest>,
    /// Why there is no manifest, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_missing: Option<String>,
}

fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1000.0
}

/// Deletes container `id`'s task; no task is not an error.
pub async fn delete_task(cd: &Containerd, id: &str) -> Result<()> {
    match cd
        .tasks()
        .delete(cd.request(DeleteTaskRequest {
            container_id: id.to_string(),
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(grpc("Tasks.Delete")(s)),
    }
}

/// Reads a whole blob from the content store.
pub async fn read_blob(cd: &Containerd, digest: &str) -> Result<Vec<u8>> {
    read_blob_range(cd, digest, 0, 0).await
}

/// One tar header block: the entry's name, its size and its type flag.
/// `None` for the all-zero block that ends an archive.
pub fn parse_tar_header(block: &[u8]) -> Result<Option<(String, u64, u8)>> {
    if block.len() < 512 {
        anyhow::bail!("short tar header ({} bytes)", block.len());
    }
    if block[..512].iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let field = |range: std::ops::Range<usize>| {
        let raw = &block[range];
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    };
    let mut name = field(0..100);
    if &block[257..262] == b"ustar" {
        let prefix = field(345..500);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    let size_field = field(124..136);
    let size = u64::from_str_radix(size_field.trim(), 8)
        .with_context(|| format!("bad size {size_field:?} in tar header of {name:?}"))?;
    Ok(Some((name, size, block[156])))
}

/// Reads `len` bytes at `offset` of a blob (`len` 0: to the end).
async fn read_blob_range(cd: &Containerd, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut stream = cd
        .content()
        .read(cd.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: i64::try_from(offset).context("blob offset too large")?,
            size: i64::try_from(len).context("blob range too large")?,
        }))
        .await
        .map_err(grpc("Content.Read"))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(grpc("Content.Read"))? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

/// Finds the ms2m manifest inside a checkpoint's CRIU tarball by walking
/// its tar headers (the manifest sorts before CRIU's large page images, so
/// only a few small reads are needed). `None` when the tarball has none.
async fn manifest_from_tarball(cd: &Containerd, desc: &Descriptor) -> Result<Option<Manifest>> {
    const MAX_ENTRIES: usize = 4096;
    let total = u64::try_from(desc.size).unwrap_or(0);
    let mut offset = 0u64;
    for _ in 0..MAX_ENTRIES {
        if offset + 512 > total {
            break;
        }
        let block = read_blob_range(cd, &desc.digest, offset, 512).await?;
        let Some((name, size, kind)) = parse_tar_header(&block)? else {
            break;
        };
        let data_at = offset + 512;
        let name = name.trim_start_matches("./");
        if name == criu_bridge::manifest::MANIFEST_FILE && (kind == b'0' || kind == 0) {
            let data = read_blob_range(cd, &desc.digest, data_at, size).await?;
            let manifest = Manifest::from_slice(&data)
                .map_err(|e| anyhow::anyhow!("the manifest in the checkpoint: {e}"))?;
            return Ok(Some(manifest));
        }
        offset = data_at + size.div_ceil(512) * 512;
    }
    Ok(None)
}

/// Resolves a checkpoint reference to its CRIU tarball descriptor.
async fn resolve_reference(cd: &Containerd, name: &str) -> Result<Descriptor> {
    let image = match cd
        .images()
        .get(cd.request(GetImageRequest {
            name: name.to_string(),
        }))
        .await
    {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == Code::NotFound => anyhow::bail!(
            "checkpoint reference {name} is neither a directory nor an image in namespace {}",
            cd.namespace()
        ),
        Err(s) => return Err(grpc("Images.Get")(s)),
    };
    let target = image
        .and_then(|i| i.target)
        .with_context(|| format!("image {name} has no target"))?;
    if target.media_type == CRIU_CHECKPOINT_MEDIA_TYPE {
        return Ok(target);
    }
    let index = read_blob(cd, &target.digest)
        .await
        .with_context(|| format!("cannot read the index {} of {name}", target.digest))?;
    checkpoint_descriptor(&index).with_context(|| format!("image {name} ({})", target.media_type))
}

/// The task [`create_restored_task`] created and started.
#[derive(Debug, Clone)]
pub struct RestoredTask {
    /// PID of the restored task (from Tasks.Start, else Tasks.Create).
    pub pid: u32,
    /// Wall time of Tasks.Create (CRIU's restore), ms.
    pub create_ms: f64,
    /// Wall time of Tasks.Start, ms.
    pub start_ms: f64,
    /// From Tasks.Create until the task runs, ms.
    pub time_to_running_ms: f64,
    /// Where stdout/stderr go (a `file://` URI).
    pub log: String,
    /// The stdin FIFO (nobody writes it: the task reads end-of-file).
    pub stdin: PathBuf,
}

/// Gives `container` (which has no task) a new task restored from a
/// checkpoint, and starts it: from the CRIU images in `image_dir` (runc
/// `Options.criu_image_path`) or from `checkpoint`, a CRIU tarball in the
/// content store. The task's options are the container's runc runtime
/// options (binary, root, cgroup driver) plus the CRIU paths; CRIU works in
/// `work_path` (which must exist), where the stdin FIFO is created too;
/// stdout and stderr are appended to `log_file`. A task that was created but
/// fails to start is deleted. Used by `ms2m restore` and `ms2m agent`.
pub async fn create_restored_task(
    cd: &Containerd,
    container: &containerd_client::services::v1::Container,
    image_dir: Option<&Path>,
    checkpoint: Option<Descriptor>,
    work_path: &Path,
    log_file: &Path,
) -> Result<RestoredTask> {
    let id = container.id.as_str();
    let runtime = container.runtime.as_ref();
    let mut opts = runc_options_from(runtime.and_then(|r| r.options.as_ref()));
    opts.criu_work_path = work_path.display().to_string();
    if let Some(dir) = image_dir {
        opts.criu_image_path = dir.display().to_string();
    }

    let rootfs: Vec<Mount> = if container.snapshot_key.is_empty() {
        Vec::new()
    } else {
        cd.snapshots()
            .mounts(cd.request(MountsRequest {
                snapshotter: container.snapshotter.clone(),
                key: container.snapshot_key.clone(),
            }))
            .await
            .map_err(grpc("Snapshots.Mounts"))
            .with_context(|| format!("cannot get the rootfs mounts of container {id}"))?
            .into_inner()
            .mounts
    };

    let log = log_uri(log_file);
    let stdin = work_path.join(STDIN_FIFO);
    make_stdin_fifo(&stdin)?;
    let req = CreateTaskRequest {
        container_id: id.to_string(),
        rootfs,
        stdin: stdin.display().to_string(),
        stdout: log.clone(),
        stderr: log.clone(),
        terminal: false,
        checkpoint,
        options: Some(to_any(&opts, RUNC_OPTIONS_TYPE_URL)),
        runtime_path: String::new(),
    };
    let t0 = Instant::now();
    let created = cd
        .tasks()
        .create(cd.request(req))
        .await
        .map_err(grpc("Tasks.Create"))?
        .into_inner();
    let create_ms = ms_since(t0);
    let t1 = Instant::now();
    let started = match cd
        .tasks()
        .start(cd.request(StartRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let err = grpc("Tasks.Start")(s);
            // Do not leave a created-but-dead task behind.
            let _ = delete_task(cd, id).await;
            return Err(err);
        }
    };
    let start_ms = ms_since(t1);
    let time_to_running_ms = ms_since(t0);
    Ok(RestoredTask {
        pid: if started.pid != 0 {
            started.pid
        } else {
            created.pid
        },
        create_ms,
        start_ms,
        time_to_running_ms,
        log,
        stdin,
    })
}

/// Runs `ms2m restore`.
pub async fn run(cd: &Containerd, args: &RestoreArgs) -> Result<RestoreReport> {
    let start = Instant::now();
    let since = SystemTime::now();
    let id = args.id.as_str();
    let source = classify(&args.from, path_kind)?;
    let container = client::get_container(cd, id).await?;
    let runtime = container.runtime.as_ref();
    let runtime_name = runtime.map(|r| r.name.clone()).unwrap_or_default();

    // Check the checkpoint before touching the container's current task.
    let (source, checkpoint, manifest) = match source {
        Source::Directory(dir) => {
            let dir = absolute(&dir)?;
            if !dir.join("inventory.img").exists() {
                anyhow::bail!("{} holds no CRIU images (no inventory.img)", dir.display());
            }
            let manifest = if Manifest::path_in(&dir).exists() {
                Some(Manifest::read(&dir).context("the checkpoint's manifest is unreadable")?)
            } else {
                None
            };
            (Source::Directory(dir), None, manifest)
        }
        Source::Reference(name) => {
            let desc = resolve_reference(cd, &name).await?;
            (Source::Reference(name), Some(desc), None)
        }
    };

    let previous_task = match client::get_task(cd, id).await? {
        None => None,
        Some(p) => {
            let status = client::status_name(p.status);
            if status != "stopped" {
                if !args.force {
                    anyhow::bail!(
                        "container {id} already has a {status} task (pid {}); stop it first or pass --force",
                        p.pid
                    );
                }
                crate::fence::kill_and_wait(cd, id, true)
                    .await
                    .with_context(|| format!("cannot kill the {status} task of container {id}"))?;
            }
            delete_task(cd, id)
                .await
                .with_context(|| format!("cannot delete the old task of container {id}"))?;
            Some(if status == "stopped" {
                "deleted the stopped task".to_string()
            } else {
                format!("killed and deleted the {status} task (pid {})", p.pid)
            })
        }
    };

    let work_path = match &args.work_path {
        Some(p) => absolute(p)?,
        None => {
            let p =
                default_restore_work_path(Path::new(DEFAULT_RESTORE_WORK_ROOT), cd.namespace(), id);
            if p.exists() {
                std::fs::remove_dir_all(&p)
                    .with_context(|| format!("cannot empty work directory {}", p.display()))?;
            }
            p
        }
    };
    std::fs::create_dir_all(&work_path)
        .with_context(|| format!("cannot create work directory {}", work_path.display()))?;

    let log_file = match &args.log {
        Some(f) => absolute(f)?,
        None => PathBuf::from(DEFAULT_LOG),
    };
    let checkpoint_digest = checkpoint.as_ref().map(|d| d.digest.clone());
    let checkpoint_desc = checkpoint.clone();
    let image_dir = match &source {
        Source::Directory(dir) => Some(dir.as_path()),
        Source::Reference(_) => None,
    };
    let task =
        create_restored_task(cd, &container, image_dir, checkpoint, &work_path, &log_file).await?;
    let RestoredTask {
        pid,
        create_ms,
        start_ms,
        time_to_running_ms,
        log,
        stdin,
    } = task;
    let task_status = match client::get_task(cd, id).await? {
        Some(p) => client::status_name(p.status).to_string(),
        None => "deleted".to_string(),
    };

    // After the task runs, so it costs the restore nothing: the manifest of
    // a checkpoint reference is inside its tarball.
    let (manifest, manifest_missing) = match (&manifest, &checkpoint_desc) {
        (None, Some(desc)) => match manifest_from_tarball(cd, desc).await {
            Ok(Some(m)) => (Some(m), None),
            Ok(None) => (
                None,
                Some("the checkpoint holds no ms2m manifest".to_string()),
            ),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        (None, None) => (
            None,
            Some("the checkpoint directory holds no ms2m manifest".to_string()),
        ),
        (Some(_), _) => (manifest, None),
    };

    let stats_file = work_path.join(criu_bridge::stats::RESTORE_STATS_FILE);
    let (restore_stats, restore_stats_missing) = if !stats_file.exists() {
        (
            None,
            Some(format!("{} was not written", stats_file.display())),
        )
    } else if std::fs::metadata(&stats_file)
        .and_then(|m| m.modified())
        .map(|m| m + Duration::from_millis(100) < since)
        .unwrap_or(true)
    {
        (
            None,
            Some(format!(
                "{} is from an earlier restore",
                stats_file.display()
            )),
        )
    } else {
        match criu_bridge::stats::read_restore_stats(&stats_file) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        }
    };

    let (source_kind, source) = match source {
        Source::Directory(d) => ("directory", d.display().to_string()),
        Source::Reference(r) => ("reference", r),
    };
    Ok(RestoreReport {
        container_id: id.to_string(),
        namespace: cd.namespace().to_string(),
        runtime: runtime_name,
        source_kind: source_kind.to_string(),
        source,
        checkpoint_digest,
        previous_task,
        work_path: work_path.display().to_string(),
        log,
        stdin: stdin.display().to_string(),
        pid,
        task_status,
        create_ms,
        start_ms,
        time_to_running_ms,
        total_ms: ms_since(start),
        restore_stats,
        restore_stats_missing,
        manifest,
        manifest_missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(
        dirs: &'static [&'static str],
        files: &'static [&'static str],
    ) -> impl Fn(&Path) -> PathKind {
        move |p: &Path| {
            let s = p.to_str().unwrap_or_default();
            if dirs.contains(&s) {
                PathKind::Dir
            } else if files.contains(&s) {
                PathKind::Other
            } else {
                PathKind::Missing
            }
        }
    }

    #[test]
    fn classifies_from() {
        let k = kinds(&["/dev/shm/ck1", "ck2"], &["/etc/passwd"]);
        assert_eq!(
            classify("/dev/shm/ck1", &k).unwrap(),
            Source::Directory("/dev/shm/ck1".into())
        );
        assert_eq!(
            classify("ck2", &k).unwrap(),
            Source::Directory("ck2".into())
        );
        assert_eq!(
            classify("docker.io/library/ck:1", &k).unwrap(),
            Source::Reference("docker.io/library/ck:1".into())
        );
        assert_eq!(
            classify("ck3", &k).unwrap(),
            Source::Reference("ck3".into())
        );
        let e = classify("/dev/shm/missing", &k).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = classify("./missing", &k).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = classify("/etc/passwd", &k).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert!(classify("", &k).is_err());
    }

    #[test]
    fn finds_the_criu_tar_in_a_checkpoint_index() {
        let index = br#"{
          "schemaVersion": 2,
          "mediaType": "application/vnd.oci.image.index.v1+json",
          "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:aa", "size": 10},
            {"mediaType": "application/vnd.containerd.container.criu.checkpoint.criu.tar",
             "digest": "sha256:bb", "size": 4096, "annotations": {"k": "v"}},
            {"mediaType": "application/vnd.containerd.container.checkpoint.config.v1+proto", "digest": "sha256:cc", "size": 5}
          ]
        }"#;
        let d = checkpoint_descriptor(index).unwrap();
        assert_eq!(d.media_type, CRIU_CHECKPOINT_MEDIA_TYPE);
        assert_eq!(d.digest, "sha256:bb");
        assert_eq!(d.size, 4096);
        assert_eq!(d.annotations.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn rejects_images_that_are_not_checkpoints() {
        let index = br#"{"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:aa", "size": 1}]}"#;
        let e = checkpoint_descriptor(index).unwrap_err().to_string();
        assert!(e.contains("not a checkpoint"), "{e}");
        assert!(checkpoint_descriptor(b"{}").is_err());
        assert!(checkpoint_descriptor(b"nope").is_err());
    }

    fn tar_header(name: &str, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let size = format!("{size:011o}");
        h[124..135].copy_from_slice(size.as_bytes());
        h[156] = b'0';
        h[257..262].copy_from_slice(b"ustar");
        h
    }

    #[test]
    fn parses_tar_headers() {
        let h = tar_header("ms2m-manifest.json", 1234);
        assert_eq!(
            parse_tar_header(&h).unwrap(),
            Some(("ms2m-manifest.json".to_string(), 1234, b'0'))
        );
        let mut p = tar_header("x.img", 1);
        p[345..348].copy_from_slice(b"dir");
        assert_eq!(parse_tar_header(&p).unwrap().unwrap().0, "dir/x.img");
        assert_eq!(parse_tar_header(&[0u8; 512]).unwrap(), None);
        assert!(parse_tar_header(&[1u8; 10]).is_err());
    }

    #[test]
    fn default_paths_and_log_uri() {
        assert_eq!(
            default_restore_work_path(Path::new("/run/ms2m/restore-work"), "ms2m", "c1"),
            Path::new("/run/ms2m/restore-work/ms2m/c1")
        );
        assert_eq!(log_uri(Path::new("/tmp/c1.log")), "file:///tmp/c1.log");
    }
}
