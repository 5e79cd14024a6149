//! Dumps in flight, so that a shim told to stop (SIGTERM, SIGINT) never
//! leaves a container frozen: it kills the `criu swrk` of every dump in
//! flight, thaws the container's freezer cgroup (unless the container was
//! paused before the dump) and the checkpoint's error reaches containerd.
//!
//! The shim then keeps serving its containers: were it to exit, containerd
//! would clean up after the "dead shim" by deleting its containers with
//! `runc delete --force` (verified with containerd 2.1.9: "cleaning up
//! dead shim" ~300 ms after the shim exited killed the thawed container),
//! which breaks "a checkpoint never leaves a container dead unless exit
//! was asked". Stopping a shim is containerd's job (Shutdown, after the
//! last container is deleted).
//!
//! The containerd-shim crate only logs SIGTERM/SIGINT; [`watch_signals`]
//! adds the shim's own listener.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use criu_bridge::rpc::{freezer_is_thawed, thaw_freezer};

#[derive(Debug, Default)]
struct Entry {
    container_id: String,
    criu_pid: Option<u32>,
    freezer: Option<PathBuf>,
    /// The freezer was thawed before the dump (else the user paused it).
    was_thawed: bool,
    aborted: Option<String>,
}

static INFLIGHT: LazyLock<Mutex<HashMap<u64, Entry>>> = LazyLock::new(Default::default);
static SEQ: AtomicU64 = AtomicU64::new(1);

fn lock() -> std::sync::MutexGuard<'static, HashMap<u64, Entry>> {
    INFLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// One dump in flight; forgotten on drop.
pub struct Dump {
    key: u64,
}

impl Dump {
    /// Registers a dump of `container_id` whose tasks are frozen in
    /// `freezer`.
    pub fn begin(container_id: &str, freezer: Option<PathBuf>) -> Arc<Dump> {
        let key = SEQ.fetch_add(1, Ordering::Relaxed);
        let was_thawed = freezer
            .as_deref()
            .map(|f| freezer_is_thawed(f).unwrap_or(true))
            .unwrap_or(true);
        lock().insert(
            key,
            Entry {
                container_id: container_id.to_string(),
                freezer,
                was_thawed,
                ..Default::default()
            },
        );
        Arc::new(Dump { key })
    }

    /// Records the pid of the `criu swrk` doing the dump.
    pub fn set_criu_pid(&self, pid: u32) {
        if let Some(e) = lock().get_mut(&self.key) {
            e.criu_pid = Some(pid);
        }
    }

    /// Why the dump was aborted by the shim, if it was.
    pub fn aborted(&self) -> Option<String> {
        lock().get(&self.key).and_then(|e| e.aborted.clone())
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        lock().remove(&self.key);
    }
}

/// Number of dumps in flight.
pub fn count() -> usize {
    lock().len()
}

/// Aborts every dump in flight: kills its CRIU and thaws its container
/// (unless the user had paused it). Returns how many were aborted.
pub fn abort_all(reason: &str) -> usize {
    let mut map = lock();
    for e in map.values_mut() {
        e.aborted = Some(reason.to_string());
        if let Some(pid) = e.criu_pid {
            // SAFETY: kill(2) on a pid this shim spawned and has not reaped
            // yet (the entry is dropped only after the dump returned).
            let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            tracing::warn!(id = %e.container_id, criu_pid = pid, ok = r == 0, "{reason}: killed CRIU mid-dump");
        }
        if let (Some(cg), true) = (&e.freezer, e.was_thawed) {
            match thaw_freezer(cg) {
                Ok(()) => {
                    tracing::warn!(id = %e.container_id, cgroup = %cg.display(), "{reason}: container thawed")
                }
                Err(err) => {
                    tracing::error!(id = %e.container_id, cgroup = %cg.display(), "{reason}: thaw failed: {err}")
                }
            }
        }
    }
    map.len()
}

/// Listens for SIGTERM and SIGINT. With a dump in flight: aborts it (its
/// error goes back to containerd) and the shim carries on serving. Without
/// one: logs and carries on, as the containerd-shim crate does.
pub fn watch_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot listen for SIGTERM/SIGINT: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if count() == 0 {
                tracing::info!("{name} received with no checkpoint in flight: ignored");
                continue;
            }
            let reason = format!("the shim received {name}");
            let n = abort_all(&reason);
            tracing::warn!(
                dumps = n,
                "{reason}: checkpoints aborted, containers thawed; the shim keeps serving \
                 (exiting would make containerd delete its containers)"
            );
            let t0 = Instant::now();
            while count() > 0 && t0.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
}
