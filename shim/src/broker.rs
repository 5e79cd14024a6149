//! The AMQP tap of a container (crate `ms2m-tap`), as the shim runs it:
//! started inside the container's network namespace at create and after a
//! restore, quiesced and cut at checkpoint, shut down with the container.
//! See docs/broker.md for the annotation, the manifest's `broker` section
//! and the guarantees.
//!
//! Checkpoint sequence (driven by [`crate::checkpoint`]):
//! 1. [`probe_upstream`];
//! 2. CRIU dump with `tcp_close` and no network lock. At CRIU's `pre-dump`
//!    notification, the instant before the freeze, the [`CutHook`]
//!    quiesces the tap (holds new deliveries, waits for the app's acks):
//!    holding only from there keeps CRIU's start-up out of the app's
//!    pause. In the frozen window it captures the cut (the consistent cut:
//!    the container is frozen, the ledger cannot move for it) and, when
//!    the container keeps running, releases what it held;
//! 3. `release()` (leave-running) or `close_for_exit()` (exit), and
//!    `release()` on any failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criu_bridge::manifest::{Manifest, FENCE_FILE};
use ms2m_tap::{Cut, Fence, Quiesce, Resume, Tap, TapConfig};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::frozen_window::{FrozenContext, FrozenWindow};

/// Manifest extension key of the cut.
pub const MANIFEST_KEY: &str = "broker";

/// Binds the tap's listeners in the network namespace of `pid` (bringing
/// `lo` up first: a restored namespace has it down) and starts the tap,
/// resumed as `resume` says (see [`resume_of`]).
pub async fn start(id: &str, pid: i32, config: &TapConfig, resume: Resume) -> Result<Tap> {
    let t0 = Instant::now();
    let port = config.listen_port;
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let ns = netns.clone();
    let listeners = tokio::task::spawn_blocking(move || {
        let lo = crate::netns::bring_up_loopback(pid);
        Tap::listen_in_netns(&ns, port).map(|l| (l, lo))
    })
    .await
    .map_err(|e| Error::internal("the tap listener thread failed", e))?
    .map_err(|e| {
        Error::Internal(format!(
            "AMQP tap of container {id}: cannot listen on port {port} in {}: {e}",
            netns.display()
        ))
    })?;
    let (listeners, lo) = listeners;
    if let Err(e) = lo {
        tracing::warn!(id, "tap: cannot bring lo up in the container: {e}");
    }
    let resumed = resume.cut.as_ref().map(|c| c.queues.len());
    let suppress = resume.suppress_publishes;
    // The tap's connection tasks carry this span: their log lines name
    // the container.
    let span = tracing::info_span!(parent: None, "tap", id);
    let tap = Tap::start_with(config.clone(), listeners, resume)
        .instrument(span)
        .await
        .map_err(|e| Error::Internal(format!("AMQP tap of container {id}: {e}")))?;
    tracing::info!(
        id,
        upstream = %config.upstream,
        listen = ?tap.local_addrs(),
        resumed_queues = ?resumed,
        suppress_publishes = suppress,
        elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0,
        "AMQP tap started"
    );
    Ok(tap)
}

/// The cut recorded in a checkpoint's manifest, if any. A malformed
/// `broker` section is an error (restoring without it would silently lose
/// the position).
pub fn cut_of(manifest: &criu_bridge::manifest::Manifest, images: &Path) -> Result<Option<Cut>> {
    let Some(v) = manifest.extensions.get(MANIFEST_KEY) else {
        return Ok(None);
    };
    let malformed = |e: String| {
        Error::InvalidArgument(format!(
            "checkpoint {}: the manifest's {MANIFEST_KEY} section is malformed: {e}",
            images.display()
        ))
    };
    let cut = serde_json::from_value::<Cut>(v.clone()).map_err(|e| malformed(e.to_string()))?;
    cut.validate().map_err(malformed)?;
    Ok(Some(cut))
}

/// Manifest `broker` key of the publishes a restored tap still had to
/// suppress when this checkpoint's cut was taken.
const SUPPRESS_PENDING_KEY: &str = "suppress_pending";

/// How a restored tap resumes: at the manifest's cut, suppressing the
/// publishes the fence in `images` (if any) says the source made after it,
/// plus any still pending from an earlier fence. A fence that is malformed
/// or belongs to another cut is an error: restoring past it would publish
/// twice or drop results.
pub fn resume_of(manifest: &Manifest, cut: Option<Cut>, images: &Path) -> Result<Resume> {
    let pending = manifest
        .extensions
        .get(MANIFEST_KEY)
        .and_then(|b| b.get(SUPPRESS_PENDING_KEY))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let file = images.join(FENCE_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Error::internal(
                format!("read the fence {}", file.display()),
                e,
            ))
        }
    };
    let mut resume = match (text, cut) {
        (None, cut) => Resume::from_cut(cut),
        (Some(_), None) => {
            return Err(Error::InvalidArgument(format!(
                "checkpoint {}: it has a fence ({FENCE_FILE}) but no broker cut",
                images.display()
            )))
        }
        (Some(t), Some(cut)) => {
            let fence: Fence = serde_json::from_str(&t).map_err(|e| {
                Error::InvalidArgument(format!("the fence {} is malformed: {e}", file.display()))
            })?;
            Resume::after_fence(cut, &fence).map_err(|e| {
                Error::InvalidArgument(format!(
                    "checkpoint {}: the fence in {FENCE_FILE} does not close this checkpoint's cut: {e}",
                    images.display()
                ))
            })?
        }
    };
    resume.suppress_publishes += pending;
    resume.shadow = shadow_of(&resume, images)?;
    Ok(resume)
}

/// The cut of the checkpoint in `images`, checked for a fence or a
/// migration: a checkpoint of container `id`, whose cut is `tap`'s last
/// one, of stream queues only. `what` names the operation in errors.
/// `mirror_of`: a live migration whose classic-queue mirror (armed by its
/// `check`) may cover the cut's classic queues.
fn check_last_stream_cut(
    id: &str,
    tap: &Tap,
    images: &Path,
    what: &str,
    mirror_of: Option<&str>,
) -> Result<Cut> {
    let manifest = Manifest::read(images)
        .map_err(|e| Error::InvalidArgument(format!("{what}: no readable ms2m manifest: {e}")))?;
    let cut = cut_of(&manifest, images)?.ok_or_else(|| {
        Error::FailedPrecondition(format!("{what}: the checkpoint has no broker cut"))
    })?;
    if manifest.container_id != id {
        return Err(Error::InvalidArgument(format!(
            "{what}: the checkpoint is of container {}",
            manifest.container_id
        )));
    }
    let last = tap.last_cut_at_unix_ms();
    if last != Some(cut.captured_at_unix_ms) {
        return Err(Error::FailedPrecondition(format!(
            "{what}: that checkpoint's cut (taken at {} ms) is not the tap's last cut ({last:?}); \
             fence the newest leave-running checkpoint (the container keeps running)",
            cut.captured_at_unix_ms
        )));
    }
    // A restore replays from the cut only on streams: what the source
    // acked on a classic queue after the cut is gone from the broker, so
    // suppressing the restored instance's first publishes would drop the
    // results of *new* messages.
    // A live migration's mirror copies them (see ms2m_tap::mirror), when
    // it was armed for this migration before this very cut.
    let mirror = tap.mirror_status();
    let mirrored = |q: &str| {
        mirror_of.is_some()
            && mirror.migration_id.as_deref() == mirror_of
            && mirror.cut_taken_at_unix_ms == Some(cut.captured_at_unix_ms)
            && mirror.streams.contains_key(q)
    };
    let classic: Vec<&str> = cut
        .queues
        .iter()
        .filter(|q| q.kind == ms2m_tap::QueueKind::Classic && !mirrored(&q.name))
        .map(|q| q.name.as_str())
        .collect();
    if !classic.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "{what}: the container consumes classic queue(s) {classic:?} that no mirror of \
             this checkpoint covers, so what the source settles there after the cut cannot be \
             replayed (the mirror is armed before a leave-running checkpoint, or by `ms2m \
             migrate`'s check, for the classic queues consumed then with manual acks and a \
             prefetch limit; see the shim log for why it was not). The container keeps running."
        )));
    }
    Ok(cut)
}

/// The live-migration ticket in `images` ([`ms2m_tap::migration::TICKET_FILE`],
/// written by `ms2m migrate`), if any: the restore is then the shadow of a
/// migration. A malformed ticket, one for another cut, or one beside a
/// fence is an error (the restore would publish twice or drop results).
fn shadow_of(resume: &Resume, images: &Path) -> Result<Option<ms2m_tap::Shadow>> {
    let file = images.join(ms2m_tap::migration::TICKET_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::internal(
                format!("read the migration ticket {}", file.display()),
                e,
            ))
        }
    };
    let bad = |why: String| {
        Error::InvalidArgument(format!(
            "checkpoint {}: the migration ticket: {why}",
            images.display()
        ))
    };
    let ticket: ms2m_tap::Ticket =
        serde_json::from_str(&text).map_err(|e| bad(format!("malformed: {e}")))?;
    ticket.validate().map_err(|e| bad(e.to_string()))?;
    let Some(cut) = &resume.cut else {
        return Err(bad("the checkpoint has no broker cut".into()));
    };
    if cut.captured_at_unix_ms != ticket.cut_taken_at_unix_ms {
        return Err(bad(format!(
            "it is for the cut taken at {} ms, the checkpoint's was taken at {} ms",
            ticket.cut_taken_at_unix_ms, cut.captured_at_unix_ms
        )));
    }
    if resume.suppress_publishes > 0 {
        return Err(bad(format!(
            "the checkpoint also has a fence ({FENCE_FILE}) or pending suppression"
        )));
    }
    Ok(Some(ms2m_tap::Shadow { ticket }))
}

/// The fence of a leave-running checkpoint's source (`ms2m fence`): holds
/// the tap's deliveries, waits (bounded) for the app's acks, and writes
/// into `images` how many publishes the source made since the cut of the
/// checkpoint there, which a restore of it then suppresses; returns the
/// fence file. Deliveries stay held: the source is to be stopped next.
///
/// Refused, with nothing held that was not held before, when `images` is
/// not a checkpoint of this container with this tap's last cut, when the
/// container consumes a classic queue, or when the quiesce does not
/// complete (the app may then still publish results the fence would not
/// count). The caller holds the container's operation lock, so no
/// checkpoint moves the cut or releases the hold meanwhile.
pub async fn fence(id: &str, tap: &Tap, config: &TapConfig, images: &Path) -> Result<PathBuf> {
    let what = format!(
        "fence of container {id} for the checkpoint in {}",
        images.display()
    );
    // Classic queues are fenced through the checkpoint's mirror, if any.
    let mirror = tap.mirror_status().migration_id;
    check_last_stream_cut(id, tap, images, &what, mirror.as_deref())?;
    let was_holding = tap.holding();
    let undo = || async {
        if !was_holding {
            tap.release().await;
        }
    };
    let fence = tap.fence(config.quiesce_timeout).await;
    if !fence.quiesce.complete {
        undo().await;
        return Err(Error::FailedPrecondition(format!(
            "{what}: the app did not settle its deliveries within {} ms ({} unsettled), so it \
             could still publish results the fence would not count; nothing was written and \
             the container keeps running (retry, or move it with an exit checkpoint)",
            fence.quiesce.timeout_ms, fence.quiesce.unsettled
        )));
    }
    let file = images.join(FENCE_FILE);
    let written = serde_json::to_vec_pretty(&fence)
        .map_err(std::io::Error::other)
        .and_then(|body| write_atomically(&file, &body));
    if let Err(e) = written {
        undo().await;
        return Err(Error::internal(
            format!("{what}: write {}", file.display()),
            e,
        ));
    }
    tracing::info!(
        id,
        publishes_after_cut = fence.publishes_after_cut,
        file = %file.display(),
        "fenced: deliveries held, the source may be stopped"
    );
    Ok(file)
}

/// The source's part of a live migration (`ms2m migrate`), first step:
/// checks that `images` holds this container's newest leave-running
/// checkpoint (its cut is the tap's last, stream queues only) and opens the
/// tap's link into the migration's broker room, announcing the source's
/// progress there until the cutover (see docs/migration.md). The caller
/// holds the container's operation lock.
pub async fn migrate_start(
    id: &str,
    tap: &Tap,
    images: &Path,
    migration_id: &str,
) -> Result<ms2m_tap::SourceLink> {
    let what = format!(
        "migration {migration_id} of container {id} from the checkpoint in {}",
        images.display()
    );
    let cut = check_last_stream_cut(id, tap, images, &what, Some(migration_id))?;
    let mut ticket = ms2m_tap::Ticket::new(migration_id, id, cut.captured_at_unix_ms);
    ticket.mirrors = tap.mirror_status().streams;
    ticket
        .validate()
        .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
    tap.migration_source(&ticket)
        .await
        .map_err(|e| Error::FailedPrecondition(format!("{what}: cannot open the broker link: {e}")))
}

/// Before a leave-running checkpoint: arms a classic-queue mirror for its
/// cut (see [`ms2m_tap::mirror`]), so that a later restore of it replays
/// what the source settles on classic queues after the cut. Without one
/// (the broker unreachable, a no-ack consumer, no prefetch limit) the
/// checkpoint goes on, and says so in the log.
pub async fn arm_checkpoint_mirror(id: &str, tap: &Tap) {
    match tap.prepare_checkpoint_mirror(id).await {
        Ok(q) if q.is_empty() => {}
        Ok(q) => tracing::info!(id, queues = ?q, "classic-queue mirror armed for the checkpoint"),
        Err(e) => tracing::warn!(
            id,
            "no classic-queue mirror for this checkpoint: a restore of it will lack what the \
             source settles on classic queues after the cut: {e}"
        ),
    }
}

/// Writes `body` to `path` through a temporary file beside it and a rename;
/// the temporary file does not survive a failure.
fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let r = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Whether the upstream broker accepts TCP connections (bounded wait).
pub async fn probe_upstream(config: &TapConfig, bound: Duration) -> bool {
    let addr = (config.upstream.host.as_str(), config.upstream.port);
    matches!(
        tokio::time::timeout(bound, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// What the frozen window captured: the cut, and the publishes a restored
/// tap still had to suppress then (from an earlier fence).
#[derive(Debug, Clone)]
pub struct Captured {
    /// The broker cut.
    pub cut: Cut,
    /// Publishes still to be suppressed at the cut.
    pub suppress_pending: u64,
}

/// The tap's part in a checkpoint: quiesce at CRIU's `pre-dump`, cut in
/// the frozen window (a [`FrozenWindow`]). Clones share one state.
#[derive(Clone)]
pub struct CutHook {
    tap: Tap,
    bound: Duration,
    quiesce: Arc<Mutex<Option<Quiesce>>>,
    cut: Arc<Mutex<Option<Captured>>>,
    /// Runs the quiesce from CRIU's callback thread; releases held
    /// deliveries right after the capture (leave-running).
    runtime: Option<tokio::runtime::Handle>,
    release_after: bool,
}

impl CutHook {
    /// A hook for `tap`, quiescing for at most `bound` at [`Self::quiesce`]
    /// unless `quiesced` already holds the quiesce (a paused container,
    /// see [`crate::checkpoint`]); the cut lands in the returned slot. With
    /// `release_after`, held deliveries are released as soon as the cut is
    /// taken. Must be called inside the tokio runtime.
    pub fn new(
        tap: Tap,
        quiesced: Option<Quiesce>,
        bound: Duration,
        release_after: bool,
    ) -> (CutHook, Arc<Mutex<Option<Captured>>>) {
        let cut = Arc::new(Mutex::new(None));
        (
            CutHook {
                tap,
                bound,
                quiesce: Arc::new(Mutex::new(quiesced)),
                cut: cut.clone(),
                runtime: tokio::runtime::Handle::try_current().ok(),
                release_after,
            },
            cut,
        )
    }

    /// Quiesces the tap, unless done already. Blocking: called from CRIU's
    /// `pre-dump` notification (a blocking thread, not a runtime worker),
    /// while the container still runs so it can ack what it holds.
    pub fn quiesce(&self, id: &str) {
        let mut slot = lock(&self.quiesce);
        if slot.is_some() {
            return;
        }
        let Some(rt) = &self.runtime else {
            tracing::warn!(id = %id, "no runtime to quiesce the tap: the cut will list in-doubt deliveries");
            return;
        };
        let q = rt.block_on(self.tap.quiesce(self.bound));
        tracing::info!(
            id = %id,
            complete = q.complete,
            waited_ms = q.waited_ms,
            unsettled = q.unsettled,
            "tap quiesced at CRIU's pre-dump"
        );
        *slot = Some(q);
    }
}

/// The guarded value, also after a panic elsewhere poisoned the lock.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FrozenWindow for CutHook {
    fn describe(&self) -> String {
        "ms2m tap cut".to_string()
    }

    fn run(&self, _ctx: &FrozenContext) -> std::result::Result<serde_json::Value, String> {
        let t0 = Instant::now();
        // No quiesce (no pre-dump seen): nothing was held, every unsettled
        // delivery is in doubt, which the cut then says.
        let q = (*lock(&self.quiesce)).unwrap_or_else(|| Quiesce {
            complete: false,
            waited_ms: 0,
            timeout_ms: self.bound.as_millis() as u64,
            unsettled: self.tap.stats().unsettled,
        });
        let cut = self.tap.capture_cut(&q);
        let suppress_pending = self.tap.suppress_remaining();
        let summary = serde_json::json!({
            "queues": cut.queues.len(),
            "connections": cut.connections,
            "quiesce_waited_ms": q.waited_ms,
            "suppress_pending": suppress_pending,
            "capture_us": t0.elapsed().as_micros() as u64,
        });
        *lock(&self.cut) = Some(Captured {
            cut,
            suppress_pending,
        });
        if let (true, Some(h)) = (self.release_after, &self.runtime) {
            let tap = self.tap.clone();
            h.spawn(async move { tap.release().await });
        }
        Ok(summary)
    }
}

/// The manifest's `broker` section: the cut plus what the shim knows about
/// the checkpoint (upstream reachability, how the tap was left).
pub fn section(
    captured: &Captured,
    upstream_reachable: bool,
    after: &str,
) -> Result<serde_json::Value> {
    let mut v =
        serde_json::to_value(&captured.cut).map_err(|e| Error::internal("encode the cut", e))?;
    if let Some(o) = v.as_object_mut() {
        if captured.suppress_pending > 0 {
            o.insert(
                SUPPRESS_PENDING_KEY.into(),
                serde_json::Value::from(captured.suppress_pending),
            );
        }
        o.insert(
            "upstream_reachable".into(),
            serde_json::Value::Bool(upstream_reachable),
        );
        o.insert("after_checkpoint".into(), serde_json::Value::from(after));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut() -> Cut {
        Cut {
            schema: ms2m_tap::cut::CUT_SCHEMA.into(),
            upstream: "amqp://127.0.0.1:5672/%2f".into(),
            captured_at: "2026-01-01T00:00:00.000Z".into(),
            captured_at_unix_ms: 1,
            connections: 1,
            queues: vec![],
            mirrors: Default::default(),
            quiesce: Quiesce::default(),
        }
    }

    #[test]
    fn section_round_trips_through_the_manifest() {
        let captured = Captured {
            cut: cut(),
            suppress_pending: 0,
        };
        let v = section(&captured, false, "released").unwrap();
        assert_eq!(v["upstream_reachable"], false);
        assert!(v.get(SUPPRESS_PENDING_KEY).is_none(), "{v}");
        assert_eq!(v["after_checkpoint"], "released");
        let mut m = criu_bridge::manifest::Manifest::new("c1");
        m.extensions.insert(MANIFEST_KEY.into(), v);
        let back = cut_of(&m, Path::new("/x")).unwrap().unwrap();
        assert_eq!(back, cut());
        m.extensions
            .insert(MANIFEST_KEY.into(), serde_json::json!({"schema": 1}));
        let e = cut_of(&m, Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
        m.extensions.remove(MANIFEST_KEY);
        assert!(cut_of(&m, Path::new("/x")).unwrap().is_none());
    }

    fn fence(publishes: u64, cut_at: u64) -> Fence {
        Fence {
            schema: ms2m_tap::FENCE_SCHEMA.into(),
            taken_at: "2026-01-01T00:00:01.000Z".into(),
            taken_at_unix_ms: 1001,
            publishes_after_cut: publishes,
            cut_taken_at_unix_ms: Some(cut_at),
            quiesce: Quiesce::default(),
            queues: vec![],
        }
    }

    #[test]
    fn resume_counts_the_fence_and_what_was_pending() {
        let dir = std::env::temp_dir().join(format!("ms2m-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Manifest::new("c1");
        let captured = Captured {
            cut: cut(),
            suppress_pending: 2,
        };
        m.extensions.insert(
            MANIFEST_KEY.into(),
            section(&captured, true, "released").unwrap(),
        );
        // No fence: resume at the cut, still suppressing what was pending.
        let r = resume_of(&m, Some(cut()), &dir).unwrap();
        assert_eq!((r.cut.as_ref(), r.suppress_publishes), (Some(&cut()), 2));
        // The fence of this cut adds what the source published after it.
        let f = dir.join(FENCE_FILE);
        std::fs::write(&f, serde_json::to_vec(&fence(7, 1)).unwrap()).unwrap();
        assert_eq!(
            resume_of(&m, Some(cut()), &dir).unwrap().suppress_publishes,
            9
        );
        // A fence of another cut, a malformed one, or one without a cut: errors.
        std::fs::write(&f, serde_json::to_vec(&fence(7, 99)).unwrap()).unwrap();
        let e = resume_of(&m, Some(cut()), &dir).unwrap_err().to_string();
        assert!(e.contains("does not close"), "{e}");
        std::fs::write(&f, b"{not json").unwrap();
        let e = resume_of(&m, Some(cut()), &dir).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        let e = resume_of(&m, None, &dir).unwrap_err().to_string();
        assert!(e.contains("no broker cut"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
