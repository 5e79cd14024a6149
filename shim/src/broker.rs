//! The AMQP tap of a container (crate `ms2m-tap`), as the shim runs it:
//! started inside the container's network namespace at create and after a
//! restore, quiesced and cut at checkpoint, shut down with the container.
//! See docs/broker.md for the annotation, the manifest's `broker` section
//! and the guarantees.
//!
//! Checkpoint sequence (driven by [`crate::checkpoint`]):
//! 1. [`probe_upstream`], then `quiesce(timeout)` before the freeze;
//! 2. CRIU dump with `tcp_close` and no network lock; in the frozen window
//!    the [`CutHook`] captures the cut (the consistent cut: the container
//!    is frozen, the ledger cannot move for it);
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

/// The frozen-window hook that captures the cut.
pub struct CutHook {
    tap: Tap,
    quiesce: Quiesce,
    cut: Arc<Mutex<Option<Cut>>>,
    /// Release held deliveries right after the capture (leave-running).
    release: Option<tokio::runtime::Handle>,
}

impl CutHook {
    /// A hook capturing `tap`'s cut after `quiesce`; the cut lands in the
    /// returned slot. With `release_after`, held deliveries are released as
    /// soon as the cut is taken. Must be called inside the tokio runtime.
    pub fn new(
        tap: Tap,
        quiesce: Quiesce,
        release_after: bool,
    ) -> (CutHook, Arc<Mutex<Option<Cut>>>) {
        let cut = Arc::new(Mutex::new(None));
        let release = if release_after {
            tokio::runtime::Handle::try_current().ok()
        } else {
            None
        };
        (
            CutHook {
                tap,
                quiesce,
                cut: cut.clone(),
                release,
            },
            cut,
        )
    }
}

impl FrozenWindow for CutHook {
    fn describe(&self) -> String {
        "ms2m tap cut".to_string()
    }

    fn run(&self, _ctx: &FrozenContext) -> std::result::Result<serde_json::Value, String> {
        let t0 = Instant::now();
        let cut = self.tap.capture_cut(&self.quiesce);
        let summary = serde_json::json!({
            "queues": cut.queues.len(),
            "connections": cut.connections,
            "capture_us": t0.elapsed().as_micros() as u64,
        });
        match self.cut.lock() {
            Ok(mut slot) => *slot = Some(cut),
            Err(p) => *p.into_inner() = Some(cut),
        }
        if let Some(h) = &self.release {
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
