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

use ms2m_tap::{Cut, Quiesce, Tap, TapConfig};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::frozen_window::{FrozenContext, FrozenWindow};

/// Manifest extension key of the cut.
pub const MANIFEST_KEY: &str = "broker";

/// Binds the tap's listeners in the network namespace of `pid` (bringing
/// `lo` up first: a restored namespace has it down) and starts the tap.
pub async fn start(id: &str, pid: i32, config: &TapConfig, resume: Option<Cut>) -> Result<Tap> {
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
    let resumed = resume.as_ref().map(|c| c.queues.len());
    // The tap's connection tasks carry this span: their log lines name
    // the container.
    let span = tracing::info_span!(parent: None, "tap", id);
    let tap = Tap::start(config.clone(), listeners, resume)
        .instrument(span)
        .await
        .map_err(|e| Error::Internal(format!("AMQP tap of container {id}: {e}")))?;
    tracing::info!(
        id,
        upstream = %config.upstream,
        listen = ?tap.local_addrs(),
        resumed_queues = ?resumed,
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
    serde_json::from_value::<Cut>(v.clone())
        .map(Some)
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "checkpoint {}: the manifest's {MANIFEST_KEY} section is malformed: {e}",
                images.display()
            ))
        })
}

/// Whether the upstream broker accepts TCP connections (bounded wait).
pub async fn probe_upstream(config: &TapConfig, bound: Duration) -> bool {
    let addr = (config.upstream.host.as_str(), config.upstream.port);
    matches!(
        tokio::time::timeout(bound, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The tap's part in a checkpoint: quiesce at CRIU's `pre-dump`, cut in
/// the frozen window (a [`FrozenWindow`]). Clones share one state.
#[derive(Clone)]
pub struct CutHook {
    tap: Tap,
    bound: Duration,
    quiesce: Arc<Mutex<Option<Quiesce>>>,
    cut: Arc<Mutex<Option<Cut>>>,
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
    ) -> (CutHook, Arc<Mutex<Option<Cut>>>) {
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
        let summary = serde_json::json!({
            "queues": cut.queues.len(),
            "connections": cut.connections,
            "quiesce_waited_ms": q.waited_ms,
            "capture_us": t0.elapsed().as_micros() as u64,
        });
        *lock(&self.cut) = Some(cut);
        if let (true, Some(h)) = (self.release_after, &self.runtime) {
            let tap = self.tap.clone();
            h.spawn(async move { tap.release().await });
        }
        Ok(summary)
    }
}

/// The manifest's `broker` section: the cut plus what the shim knows about
/// the checkpoint (upstream reachability, how the tap was left).
pub fn section(cut: &Cut, upstream_reachable: bool, after: &str) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(cut).map_err(|e| Error::internal("encode the cut", e))?;
    if let Some(o) = v.as_object_mut() {
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
            quiesce: Quiesce::default(),
        }
    }

    #[test]
    fn section_round_trips_through_the_manifest() {
        let v = section(&cut(), false, "released").unwrap();
        assert_eq!(v["upstream_reachable"], false);
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
}
