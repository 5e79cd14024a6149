//! `ms2m agent`: the target side of a migration. Listens on TCP, receives
//! checkpoint directories ([`crate::transfer`]'s protocol) into
//! DIR/<migration_id>, checks their digests, and on `restore` creates the
//! container (spec, runtime, image, snapshot from the image's unpacked
//! rootfs) and a task restored from the directory on its own containerd,
//! and starts it. An `abort`, an error or a connection that drops before
//! `commit` kills and deletes whatever the session created.
//!
//! Sessions are served concurrently; each logs its phases with timings to
//! stderr.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest, GetImageRequest,
};
use containerd_client::tonic::Code;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::client::{self, grpc, Containerd};
use crate::options::{to_any, RuncOptions, RUNC_OPTIONS_TYPE_URL};
use crate::transfer::{self, check_hello, receive_files, Conn, Message, Offer, IO_TIMEOUT};

/// Type URL containerd stores a container's OCI runtime spec under (JSON).
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The spec annotation naming the tap's upstream broker.
pub const TAP_UPSTREAM_ANNOTATION: &str = "io.ms2m.tap.upstream";
/// How long a session may sit idle between requests (e.g. between
/// `received` and `restore`) before it is aborted.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an abort on a new connection waits for the session's cleanup.
const ABORT_WAIT: Duration = Duration::from_secs(80);

/// Arguments of `ms2m agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on, e.g. 10.88.0.2:7100.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Received checkpoints go to DIR/<migration_id> (created 0700).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Replace the spec annotation io.ms2m.tap.upstream (when the received
    /// spec has it) with this broker URL.
    #[arg(long, value_name = "URL")]
    pub tap_upstream: Option<String>,
    /// runc's root directory for the containers created here (runtime and
    /// task option `root`), so runc state does not collide with the source's.
    #[arg(long, value_name = "DIR")]
    pub runc_root: Option<PathBuf>,
    /// Put the containers created here under this cgroup parent
    /// (cgroupfs path, e.g. /ms2m-b): `linux.cgroupsPath` becomes
    /// PARENT/<id>. Needed when this host shares a kernel with the source's
    /// (two hosts on one machine), where the same container id would
    /// otherwise name the same cgroup.
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<String>,
    /// A file holding the shared secret senders must present (first line).
    /// Without it, anyone who reaches --listen can have containers created
    /// here: give one on any network others share.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// What finished a session's cleanup: `Some(lines)` once it ran.
type Done = watch::Receiver<Option<Vec<String>>>;

struct Agent {
    cd: Containerd,
    dir: PathBuf,
    tap_upstream: Option<String>,
    runc_root: Option<String>,
    cgroup_parent: Option<String>,
    token: Option<String>,
    /// Live sessions by migration id.
    sessions: Mutex<HashMap<String, Done>>,
}

/// One session's state: what it made, so cleanup removes exactly that.
struct Session {
    peer: String,
    t0: Instant,
    offer: Option<Offer>,
    done: Option<watch::Sender<Option<Vec<String>>>>,
    dir: Option<PathBuf>,
    work: Option<PathBuf>,
    container_created: bool,
    snapshot_created: bool,
    cleaned: Vec<String>,
}

impl Session {
    fn name(&self) -> String {
        match &self.offer {
            Some(o) => format!("{} ({} from {})", o.migration_id, o.container_id, self.peer),
            None => self.peer.clone(),
        }
    }

    fn log(&self, what: &str) {
        log(&format!(
            "[{}] {what} (t+{:.1} ms)",
            self.name(),
            self.t0.elapsed().as_secs_f64() * 1000.0
        ));
    }
}

fn log(line: &str) {
    eprintln!(
        "{} ms2m agent: {line}",
        humantime::format_rfc3339_millis(SystemTime::now())
    );
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

/// How a session ended without an error.
enum End {
    Committed,
    Aborted,
    /// A connection that only waited for another session's abort.
    AbortWait,
}

/// Runs `ms2m agent` until killed.
pub async fn run(address: &Path, namespace: &str, args: &AgentArgs) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let cd = Containerd::connect(address, namespace).await?;
    let dir = client::absolute(&args.dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let runc_root = args
        .runc_root
        .as_ref()
        .map(|p| client::absolute(p).map(|p| p.display().to_string()))
        .transpose()?;
    let token = args
        .token_file
        .as_deref()
        .map(transfer::read_token)
        .transpose()?;
    if token.is_none() {
        log(&format!(
            "warning: no --token-file: anyone who reaches {} can have containers created here",
            args.listen
        ));
    }
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    log(&format!(
        "listening on {local} (containerd {}, namespace {namespace}, dir {}, runc root {}, tap upstream {})",
        address.display(),
        dir.display(),
        runc_root.as_deref().unwrap_or("(runtime default)"),
        args.tap_upstream.as_deref().unwrap_or("(unchanged)"),
    ));
    let agent = Arc::new(Agent {
        cd,
        dir,
        tap_upstream: args.tap_upstream.clone(),
        runc_root,
        cgroup_parent: args.cgroup_parent.clone(),
        token,
        sessions: Mutex::new(HashMap::new()),
    });
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let agent = agent.clone();
                tokio::spawn(async move { agent.serve(stream, peer.to_string()).await });
            }
            Err(e) => {
                log(&format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Checks an id used as a container id and a directory name.
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        bail!("{kind} {id:?} is not valid (1-76 of [A-Za-z0-9_.-], starting alphanumeric)");
    }
    Ok(())
}

/// The cgroups path of the target container: the source's with its last
/// element (cgroupfs `/a/b/ID`, systemd `slice:prefix:ID`) set to `id`.
pub fn target_cgroups_path(path: &str, id: &str, parent: Option<&str>) -> String {
    if let Some(parent) = parent {
        return format!("{}/{id}", parent.trim_end_matches('/'));
    }
    if path.contains(':') {
        let mut parts: Vec<&str> = path.splitn(3, ':').collect();
        if parts.len() == 3 {
            parts[2] = id;
            return parts.join(":");
        }
        return path.to_string();
    }
    match path.rsplit_once('/') {
        Some((parent, _)) => format!("{parent}/{id}"),
        None => id.to_string(),
    }
}

/// Adapts the source's spec to this host: the tap's upstream broker, the
/// cgroups path for the target's container id. Returns what was changed.
pub fn adapt_spec(
    spec: &mut serde_json::Value,
    id: &str,
    tap_upstream: Option<&str>,
    cgroup_parent: Option<&str>,
) -> Result<Vec<String>> {
    let mut changes = Vec::new();
    if !spec.is_object() {
        bail!("the offered spec is not a JSON object");
    }
    if let Some(url) = tap_upstream {
        if let Some(a) = spec
            .get_mut("annotations")
            .and_then(|a| a.as_object_mut())
            .and_then(|a| a.get_mut(TAP_UPSTREAM_ANNOTATION))
        {
            *a = serde_json::Value::String(url.to_string());
            changes.push(format!("{TAP_UPSTREAM_ANNOTATION}={url}"));
        }
    }
    if let Some(p) = spec.get_mut("linux").and_then(|l| l.get_mut("cgroupsPath")) {
        if let Some(old) = p.as_str().filter(|s| !s.is_empty()) {
            let new = target_cgroups_path(old, id, cgroup_parent);
            if new != old {
                changes.push(format!("cgroupsPath {old} -> {new}"));
                *p = serde_json::Value::String(new);
            }
        }
    }
    Ok(changes)
}

/// Refuses a cgroupfs path that already holds processes on this kernel (a
/// source container on a shared kernel): killing the target would kill it.
fn check_cgroup_free(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Ok(());
    }
    let rel = path.trim_start_matches('/');
    let mut candidates = vec![Path::new("/sys/fs/cgroup").join(rel).join("cgroup.procs")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            candidates.push(e.path().join(rel).join("cgroup.procs"));
        }
    }
    for c in candidates {
        if let Ok(procs) = std::fs::read_to_string(&c) {
            if !procs.trim().is_empty() {
                bail!(
                    "cgroup {path} already has processes on this kernel ({}): another container uses it; use another container id",
                    c.display()
                );
            }
        }
    }
    Ok(())
}

/// The chain ID of a stack of layers (the snapshot name of the image's
/// top layer): `chain(L0) = diff(L0)`, `chain(Ln) = sha256(chain(Ln-1) + " " + diff(Ln))`.
pub fn chain_id(diff_ids: &[String]) -> Result<String> {
    let mut it = diff_ids.iter();
    let mut chain = it.next().context("the image has no layers")?.clone();
    for d in it {
        chain = format!(
            "sha256:{}",
            transfer::sha256_hex(format!("{chain} {d}").as_bytes())
        );
    }
    Ok(chain)
}

/// This host's platform architecture, as OCI names it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Picks the manifest for linux/<this arch> from an image index.
pub fn pick_manifest(index: &serde_json::Value) -> Result<String> {
    let arch = oci_arch();
    let manifests = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .context("the index lists no manifests")?;
    manifests
        .iter()
        .find(|m| {
            let p = m.get("platform");
            p.and_then(|p| p.get("os")).and_then(|o| o.as_str()) == Some("linux")
                && p.and_then(|p| p.get("architecture"))
                    .and_then(|a| a.as_str())
                    == Some(arch)
        })
        .and_then(|m| m.get("digest").and_then(|d| d.as_str()))
        .map(str::to_string)
        .with_context(|| format!("the index has no manifest for linux/{arch}"))
}

/// SIGKILL to the task's init process only, then waits (bounded) until it
/// stopped. Killing the init of the container's PID namespace ends every
/// process in it; unlike a kill of all processes of the container's cgroup,
/// it cannot reach the source container when both share a kernel (and,
/// after a restore, possibly a cgroup).
async fn kill_init_and_wait(cd: &Containerd, id: &str) -> Result<()> {
    crate::fence::kill_and_wait(cd, id, false).await
}

impl Agent {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: String) {
        let mut conn = Conn::new(stream);
        let mut s = Session {
            peer,
            t0: Instant::now(),
            offer: None,
            done: None,
            dir: None,
            work: None,
            container_created: false,
            snapshot_created: false,
            cleaned: Vec::new(),
        };
        let outcome = self.drive(&mut conn, &mut s).await;
        let mut error = None;
        match outcome {
            Ok(End::Committed) => s.log("committed: the target keeps running, session forgotten"),
            Ok(End::Aborted) => {}
            Ok(End::AbortWait) => {}
            Err(e) => {
                let message = format!("{e:#}");
                if s.offer.is_some() {
                    s.log(&format!("failed: {message}; cleaning up"));
                } else {
                    s.log(&format!("refused: {message}"));
                }
                self.cleanup(&mut s).await;
                error = Some(message);
            }
        }
        if let Some(offer) = &s.offer {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&offer.migration_id);
        }
        if let Some(done) = s.done.take() {
            let _ = done.send(Some(std::mem::take(&mut s.cleaned)));
        }
        if let Some(message) = error {
            if conn.send(&Message::Error { message }).await.is_ok() {
                conn.close_and_drain(Duration::from_secs(5)).await;
            }
        }
    }

    async fn drive(&self, conn: &mut Conn, s: &mut Session) -> Result<End> {
        let hello = conn.recv(IO_TIMEOUT).await?;
        check_hello(&hello)?;
        transfer::check_token(&hello, self.token.as_deref())?;
        conn.send(&Message::hello()).await?;
        let (files, bytes) = match conn.recv(IO_TIMEOUT).await? {
            Message::Abort {
                migration_id,
                reason,
            } => {
                self.wait_for_abort(conn, s, &migration_id, &reason).await?;
                return Ok(End::AbortWait);
            }
            Message::Offer {
                offer,
                files,
                bytes,
            } => {
                self.accept(conn, s, offer, files, bytes).await?;
                (files, bytes)
            }
            m => bail!("expected offer or abort, got {}", m.kind()),
        };
        let dir = s.dir.clone().context("no directory")?;
        let r = receive_files(conn, &dir, files, bytes).await?;
        s.log(&format!(
            "received and verified {} files, {} bytes in {:.1} ms ({:.0} MiB/s), set sha256 {}",
            r.files,
            r.bytes,
            r.elapsed_ms,
            r.bytes as f64 / (1 << 20) as f64 / (r.elapsed_ms.max(0.001) / 1000.0),
            r.sha256
        ));
        conn.send(&Message::Received {
            files: r.files,
            bytes: r.bytes,
            sha256: r.sha256,
            elapsed_ms: r.elapsed_ms,
        })
        .await?;
        let mut restored = false;
        loop {
            match conn.recv(IDLE_TIMEOUT).await? {
                Message::Restore if !restored => {
                    let reply = self.restore(s).await?;
                    conn.send(&reply).await?;
                    restored = true;
                }
                Message::Commit if restored => {
                    if let Some(dir) = s.dir.take() {
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("cannot remove {}", dir.display()))?;
                        s.log(&format!("removed the images {}", dir.display()));
                    }
                    // Keep the work directory: the task's log and CRIU's.
                    s.work = None;
                    s.container_created = false;
                    s.snapshot_created = false;
                    conn.send(&Message::Committed).await?;
                    return Ok(End::Committed);
                }
                Message::Abort {
                    migration_id,
                    reason,
                } => {
                    let mine = s.offer.as_ref().map(|o| o.migration_id.as_str());
                    if mine != Some(migration_id.as_str()) {
                        bail!("abort names migration {migration_id}, this session is {mine:?}");
                    }
                    s.log(&format!("abort requested: {reason}"));
                    self.cleanup(s).await;
                    let _ = conn
                        .send(&Message::Aborted {
                            cleaned: s.cleaned.clone(),
                        })
                        .await;
                    return Ok(End::Aborted);
                }
                m => bail!("unexpected {} (restored: {restored})", m.kind()),
            }
        }
    }

    async fn accept(
        &self,
        conn: &mut Conn,
        s: &mut Session,
        offer: Offer,
        files: u64,
        bytes: u64,
    ) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        check_id("migration id", &offer.migration_id)?;
        check_id("container id", &offer.container_id)?;
        let mid = offer.migration_id.clone();
        let id = offer.container_id.clone();
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if sessions.contains_key(&mid) {
                bail!("migration {mid} is already in progress on this agent");
            }
            let (tx, rx) = watch::channel(None);
            sessions.insert(mid.clone(), rx);
            s.done = Some(tx);
        }
        s.offer = Some(offer);
        s.log(&format!("offer: {files} files, {bytes} bytes"));
        let cd = &self.cd;
        match cd
            .containers()
            .get(cd.request(GetContainerRequest { id: id.clone() }))
            .await
        {
            Ok(_) => bail!(
                "container {id} already exists on the target (namespace {}): refusing to replace it",
                cd.namespace()
            ),
            Err(st) if st.code() == Code::NotFound => {}
            Err(st) => return Err(grpc("Containers.Get")(st)),
        }
        let dir = self.dir.join(&mid);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| {
                format!(
                    "cannot create {} (a leftover of an earlier migration {mid}?)",
                    dir.display()
                )
            })?;
        s.dir = Some(dir.clone());
        conn.send(&Message::Accepted {
            dir: dir.display().to_string(),
        })
        .await
    }

    /// Waits, for a client whose stream broke, until the session of
    /// `mid` has cleaned up, then answers `aborted`.
    async fn wait_for_abort(
        &self,
        conn: &mut Conn,
        s: &mut Session,
        mid: &str,
        reason: &str,
    ) -> Result<()> {
        let waiting = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mid)
            .cloned();
        let cleaned = match waiting {
            None => {
                s.log(&format!(
                    "abort of migration {mid} ({reason}): no such session (already cleaned up)"
                ));
                vec![format!("no session {mid} on this agent: nothing left")]
            }
            Some(mut rx) => {
                s.log(&format!(
                    "abort of migration {mid} ({reason}): waiting for its session to clean up"
                ));
                match tokio::time::timeout(ABORT_WAIT, rx.wait_for(|v| v.is_some())).await {
                    Err(_) => bail!(
                        "the session of migration {mid} did not finish within {}s",
                        ABORT_WAIT.as_secs()
                    ),
                    Ok(Ok(v)) => v.clone().unwrap_or_default(),
                    Ok(Err(_)) => vec![format!("session {mid} ended")],
                }
            }
        };
        conn.send(&Message::Aborted { cleaned }).await
    }

    /// Creates the container and its restored task, and starts it.
    async fn restore(&self, s: &mut Session) -> Result<Message> {
        let offer = s.offer.clone().context("no offer")?;
        let id = offer.container_id.as_str();
        let dir = s.dir.clone().context("no directory")?;
        let what = format!("restore of container {id} from {}", dir.display());
        self.restore_inner(s, &offer, &dir)
            .await
            .with_context(|| what)
    }

    async fn restore_inner(&self, s: &mut Session, offer: &Offer, dir: &Path) -> Result<Message> {
        use std::os::unix::fs::DirBuilderExt;
        let cd = &self.cd;
        let id = offer.container_id.as_str();
        let t0 = Instant::now();
        if !dir.join("inventory.img").exists() {
            bail!("{} holds no CRIU images (no inventory.img)", dir.display());
        }
        let mut spec = offer.spec.clone();
        let changes = adapt_spec(
            &mut spec,
            id,
            self.tap_upstream.as_deref(),
            self.cgroup_parent.as_deref(),
        )?;
        if let Some(p) = spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str()) {
            check_cgroup_free(p)?;
        }
        if !changes.is_empty() {
            s.log(&format!("spec adapted: {}", changes.join(", ")));
        }
        let chain = self
            .image_chain_id(&offer.image)
            .await
            .with_context(|| format!("image {} on the target", offer.image))?;
        let t_image = ms(t0);

        let options = self.runc_root.as_ref().map(|root| {
            to_any(
                &RuncOptions {
                    root: root.clone(),
                    ..Default::default()
                },
                RUNC_OPTIONS_TYPE_URL,
            )
        });
        let container = Container {
            id: id.to_string(),
            labels: offer.labels.clone(),
            image: offer.image.clone(),
            runtime: Some(Runtime {
                name: offer.runtime.clone(),
                options,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.to_string(),
                value: serde_json::to_vec(&spec)?,
            }),
            snapshotter: offer.snapshotter.clone(),
            snapshot_key: id.to_string(),
            ..Default::default()
        };
        let t1 = Instant::now();
        match cd
            .containers()
            .create(cd.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
        {
            Ok(_) => s.container_created = true,
            Err(st) if st.code() == Code::AlreadyExists => bail!(
                "container {id} already exists on the target (namespace {})",
                cd.namespace()
            ),
            Err(st) => return Err(grpc("Containers.Create")(st)),
        }
        let t_container = ms(t1);
        let t2 = Instant::now();
        match cd
            .snapshots()
            .prepare(cd.request(PrepareSnapshotRequest {
                snapshotter: offer.snapshotter.clone(),
                key: id.to_string(),
                parent: chain.clone(),
                labels: HashMap::new(),
            }))
            .await
        {
            Ok(_) => s.snapshot_created = true,
            Err(st) if st.code() == Code::NotFound => bail!(
                "the layers of image {} are not unpacked for snapshotter {} on the target (no snapshot {chain}): unpack the image there first",
                offer.image,
                offer.snapshotter
            ),
            Err(st) if st.code() == Code::AlreadyExists => bail!(
                "snapshot {id} already exists in snapshotter {} on the target",
                offer.snapshotter
            ),
            Err(st) => return Err(grpc("Snapshots.Prepare")(st)),
        }
        let t_snapshot = ms(t2);
        let created = client::get_container(cd, id).await?;

        let work = self.dir.join(format!("{}.work", offer.migration_id));
        if work.exists() {
            std::fs::remove_dir_all(&work)
                .with_context(|| format!("cannot empty {}", work.display()))?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        s.work = Some(work.clone());
        let log_file = work.join("task.log");
        let task =
            crate::restore::create_restored_task(cd, &created, Some(dir), None, &work, &log_file)
                .await?;
        s.log(&format!(
            "restored: pid {}, image {t_image} ms, container {t_container} ms, snapshot {t_snapshot} ms, task create {:.1} ms, start {:.1} ms, total {:.1} ms; log {}",
            task.pid,
            task.create_ms,
            task.start_ms,
            ms(t0),
            log_file.display()
        ));
        Ok(Message::Restored {
            pid: task.pid,
            restore_ms: task.time_to_running_ms,
            image_dir: dir.display().to_string(),
        })
    }

    /// The chain ID of `image`'s unpacked rootfs (Images.Get, then the
    /// manifest, for this platform when the image is an index, then the
    /// config's `rootfs.diff_ids`).
    async fn image_chain_id(&self, image: &str) -> Result<String> {
        let cd = &self.cd;
        let target = match cd
            .images()
            .get(cd.request(GetImageRequest {
                name: image.to_string(),
            }))
            .await
        {
            Ok(r) => r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .context("the image has no target")?,
            Err(st) if st.code() == Code::NotFound => bail!(
                "it does not exist in namespace {}: pull or import it there first",
                cd.namespace()
            ),
            Err(st) => return Err(grpc("Images.Get")(st)),
        };
        let mut digest = target.digest;
        for _ in 0..4 {
            let blob = crate::restore::read_blob(cd, &digest)
                .await
                .with_context(|| format!("cannot read {digest}"))?;
            let v: serde_json::Value =
                serde_json::from_slice(&blob).with_context(|| format!("{digest} is not JSON"))?;
            if v.get("manifests").is_some() {
                digest = pick_manifest(&v).with_context(|| format!("index {digest}"))?;
                continue;
            }
            let config = v
                .pointer("/config/digest")
                .and_then(|d| d.as_str())
                .with_context(|| format!("manifest {digest} has no config"))?
                .to_string();
            let blob = crate::restore::read_blob(cd, &config)
                .await
                .with_context(|| format!("cannot read the config {config}"))?;
            let v: serde_json::Value = serde_json::from_slice(&blob)
                .with_context(|| format!("the config {config} is not JSON"))?;
            let diff_ids: Vec<String> = v
                .pointer("/rootfs/diff_ids")
                .and_then(|d| d.as_array())
                .with_context(|| format!("the config {config} has no rootfs.diff_ids"))?
                .iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect();
            return chain_id(&diff_ids);
        }
        Err(anyhow!("nested indexes too deep"))
    }

    /// Removes what the session created: the task (SIGKILL first), the
    /// container, its snapshot, the received images and the work directory.
    /// Runs once; what was done goes to `s.cleaned` and the log.
    async fn cleanup(&self, s: &mut Session) {
        let cd = &self.cd;
        let id = s
            .offer
            .as_ref()
            .map(|o| o.container_id.clone())
            .unwrap_or_default();
        let snapshotter = s
            .offer
            .as_ref()
            .map(|o| o.snapshotter.clone())
            .unwrap_or_default();
        let mut lines = Vec::new();
        let note = |lines: &mut Vec<String>, r: Result<Option<String>>, what: &str| match r {
            Ok(Some(line)) => lines.push(line),
            Ok(None) => {}
            Err(e) => lines.push(format!("FAILED to {what}: {e:#}")),
        };
        if std::mem::take(&mut s.container_created) {
            let r = async {
                match client::get_task(cd, &id).await? {
                    None => Ok(None),
                    Some(p) => {
                        kill_init_and_wait(cd, &id).await?;
                        crate::restore::delete_task(cd, &id).await?;
                        Ok(Some(format!(
                            "killed (SIGKILL) and deleted the task of {id} (pid {})",
                            p.pid
                        )))
                    }
                }
            }
            .await;
            let task_gone = r.is_ok();
            note(&mut lines, r, &format!("kill and delete the task of {id}"));
            // A container whose task could not be deleted stays, so the task
            // is not orphaned (containerd cannot reach it without it).
            let r = if !task_gone {
                Err(anyhow!("its task is still there"))
            } else {
                match cd
                    .containers()
                    .delete(cd.request(DeleteContainerRequest { id: id.clone() }))
                    .await
                {
                    Ok(_) => Ok(Some(format!("deleted container {id}"))),
                    Err(st) if st.code() == Code::NotFound => Ok(None),
                    Err(st) => Err(grpc("Containers.Delete")(st)),
                }
            };
            note(&mut lines, r, &format!("delete container {id}"));
        }
        if std::mem::take(&mut s.snapshot_created) {
            let r = match cd
                .snapshots()
                .remove(cd.request(RemoveSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: id.clone(),
                }))
                .await
            {
                Ok(_) => Ok(Some(format!("removed snapshot {id} ({snapshotter})"))),
                Err(st) if st.code() == Code::NotFound => Ok(None),
                Err(st) => Err(grpc("Snapshots.Remove")(st)),
            };
            note(&mut lines, r, &format!("remove snapshot {id}"));
        }
        for d in [s.dir.take(), s.work.take()].into_iter().flatten() {
            let r = match std::fs::remove_dir_all(&d) {
                Ok(()) => Ok(Some(format!("removed {}", d.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow::Error::new(e)),
            };
            note(&mut lines, r, &format!("remove {}", d.display()));
        }
        for l in &lines {
            s.log(&format!("cleanup: {l}"));
        }
        s.cleaned.extend(lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        assert_eq!(chain_id(std::slice::from_ref(&a)).unwrap(), a);
        assert_eq!(
            chain_id(&[a.clone(), b.clone()]).unwrap(),
            format!(
                "sha256:{}",
                transfer::sha256_hex(b"sha256:aaaa sha256:bbbb")
            )
        );
        assert!(chain_id(&[]).is_err());
    }

    #[test]
    fn picks_this_platform() {
        let idx = serde_json::json!({"manifests": [
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        if oci_arch() == "amd64" {
            assert_eq!(pick_manifest(&idx).unwrap(), "sha256:amd");
        }
        assert!(pick_manifest(&serde_json::json!({"manifests": []})).is_err());
    }

    #[test]
    fn adapts_the_spec() {
        let mut spec = serde_json::json!({
            "annotations": {"io.ms2m.tap.upstream": "amqp://127.0.0.1:5672/%2f", "x": "y"},
            "linux": {"cgroupsPath": "/ms2m/src"}
        });
        let ch = adapt_spec(&mut spec, "dst", Some("amqp://10.88.0.1:5672/%2f"), None).unwrap();
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert_eq!(
            spec["annotations"]["io.ms2m.tap.upstream"],
            "amqp://10.88.0.1:5672/%2f"
        );
        assert_eq!(spec["annotations"]["x"], "y");
        assert_eq!(spec["linux"]["cgroupsPath"], "/ms2m/dst");
        // No annotation: none added.
        let mut spec = serde_json::json!({"linux": {"cgroupsPath": "/ms2m/dst"}});
        assert!(adapt_spec(&mut spec, "dst", Some("amqp://x"), None)
            .unwrap()
            .is_empty());
        assert!(spec.get("annotations").is_none());
        assert_eq!(
            target_cgroups_path("system.slice:ms2m:src", "dst", None),
            "system.slice:ms2m:dst"
        );
        assert_eq!(target_cgroups_path("src", "dst", None), "dst");
        assert_eq!(
            target_cgroups_path("/ms2m/a", "a", Some("/ms2m-b/")),
            "/ms2m-b/a"
        );
        assert!(adapt_spec(&mut serde_json::json!([]), "x", None, None).is_err());
    }

    #[test]
    fn ids() {
        assert!(check_id("id", "mig-1.a_b").is_ok());
        for bad in ["", "../x", "a/b", ".x", "-x", &"x".repeat(77)] {
            assert!(check_id("id", bad).is_err(), "{bad}");
        }
    }
}
