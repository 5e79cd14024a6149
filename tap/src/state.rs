//! The state one tap's parts share, and the operations on it that more
//! than one part needs.
//!
//! [`Shared`] is owned (in an `Arc`) by the [`crate::Tap`] handle, every
//! connection pair ([`crate::proxy`]) and the live-migration tasks
//! ([`crate::migration`]). They reach each other only through it: the
//! handle and the migration tasks set the [`Mode`], raise the [`Gate`] and
//! issue [`Orders`]; the connections read them and keep the ledger and the
//! counters. Nothing here depends on the proxy or on the handle.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::cut::{rfc3339_utc, QuiesceReport};
use crate::fence::{Fence, FENCE_SCHEMA};
use crate::ledger::{Ledger, Positions};
use crate::TapConfig;

/// What the connections should do with deliveries from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Forward everything.
    Open,
    /// Hold new deliveries (and whatever follows them on their channel).
    Hold,
    /// Drop held deliveries and close both sides (checkpoint with exit).
    Exit,
    /// Tap shutting down: close everything.
    Shutdown,
}

/// One-off orders to every connection, as generation counters: each
/// connection carries out every increase once and records it in
/// [`Shared::orders_done`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Orders {
    /// Source fence (classic-queue mirror): cancel the app's consumers of
    /// mirrored queues upstream and requeue the deliveries held for them.
    pub handover: u64,
    /// Source abort after a handover: consume those queues again.
    pub reconsume: u64,
    /// Target going live: move the app's consumers from the mirror streams
    /// to their queues.
    pub switch: u64,
}

/// Which order an [`Orders`] field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderKind {
    Handover,
    Reconsume,
    Switch,
}

impl Orders {
    pub fn get(&self, k: OrderKind) -> u64 {
        match k {
            OrderKind::Handover => self.handover,
            OrderKind::Reconsume => self.reconsume,
            OrderKind::Switch => self.switch,
        }
    }
    pub fn set(&mut self, k: OrderKind, v: u64) {
        match k {
            OrderKind::Handover => self.handover = v,
            OrderKind::Reconsume => self.reconsume = v,
            OrderKind::Switch => self.switch = v,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicUsize,
    pub frames_from_client: AtomicU64,
    pub frames_from_broker: AtomicU64,
    pub held_deliveries: AtomicU64,
    pub connection_errors: AtomicU64,
    /// Broker→client batches being processed right now.
    pub batches_active: AtomicUsize,
    /// basic.publish forwarded upstream since the last cut (reset by
    /// [`Tap::capture_cut`]).
    pub publishes_since_cut: AtomicU64,
    /// basic.publish suppressed (dropped) so far.
    pub suppressed: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub config: TapConfig,
    pub ledger: Mutex<Ledger>,
    pub counters: Counters,
    pub mode: watch::Sender<Mode>,
    pub next_conn: AtomicU64,
    /// Publishes still to suppress.
    pub suppress_remaining: AtomicU64,
    /// Publishes to suppress in all ([`Resume::suppress_publishes`]).
    pub suppress_total: u64,
    /// `captured_at_unix_ms` of the last cut captured.
    pub last_cut_ms: Mutex<Option<u64>>,
    /// The shadow of a live migration: stream deliveries at or past the
    /// gate are held (see [`crate::migration`]).
    pub gate: Gate,
    /// The container's init process exited (see [`Tap::container_exited`]).
    pub exited: AtomicBool,
    /// Fast-path flag: the gate is closed somewhere (false once live, and
    /// always for an ordinary tap).
    pub shadow_active: AtomicBool,
    /// The classic-queue mirror of a live migration's source (see
    /// [`crate::mirror`]).
    pub mirror: crate::mirror::MirrorState,
    /// Orders to the connections.
    pub orders: watch::Sender<Orders>,
    /// The orders each open connection has carried out.
    pub orders_done: Mutex<std::collections::HashMap<u64, Orders>>,
    /// A restore replaying classic queues from their mirrors: the queues
    /// whose end marker the app's consumer reached.
    pub mirror_ends: Mutex<std::collections::BTreeSet<String>>,
}

impl Shared {
    /// The ledger; a poisoned lock (a panic elsewhere) still yields the data.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decide for a basic.publish from the app, in arrival order: true when
    /// it is one of the first [`Resume::suppress_publishes`] and must be
    /// dropped.
    pub fn take_suppression(&self) -> bool {
        let r = self
            .suppress_remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1));
        match r {
            Ok(before) => {
                self.counters.suppressed.fetch_add(1, Ordering::Relaxed);
                if before == 1 {
                    info!(
                        suppressed = self.suppress_total,
                        "ms2m tap: suppressed {} publishes the source had made after the cut",
                        self.suppress_total
                    );
                }
                true
            }
            Err(_) => false,
        }
    }

    pub fn last_cut(&self) -> MutexGuard<'_, Option<u64>> {
        self.last_cut_ms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A mirror replay reached the end marker of `queue`'s mirror.
    pub fn mirror_end_seen(&self, queue: &str) {
        info!(queue, "ms2m tap: end of the classic queue's mirror reached");
        self.mirror_ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_string());
    }

    /// Connection `conn` carried out order `kind` up to generation `gen`.
    pub fn order_done(&self, conn: u64, kind: OrderKind, gen: u64) {
        let mut d = self.orders_done.lock().unwrap_or_else(|p| p.into_inner());
        d.entry(conn).or_default().set(kind, gen);
    }

    /// Issues order `kind` to every connection and waits (at most
    /// `bound`) until each open one has carried it out. False on timeout.
    pub async fn order(&self, kind: OrderKind, bound: Duration) -> bool {
        let mut gen = 0;
        self.orders.send_modify(|o| {
            gen = o.get(kind) + 1;
            o.set(kind, gen);
        });
        let t0 = Instant::now();
        loop {
            let done = {
                let d = self.orders_done.lock().unwrap_or_else(|p| p.into_inner());
                d.values().all(|o| o.get(kind) >= gen)
            };
            if done {
                return true;
            }
            if t0.elapsed() >= bound {
                warn!(
                    ?kind,
                    "ms2m tap: not every connection carried out the order in time"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Hold new deliveries (buffered in order per connection) and wait,
    /// at most `timeout`, until every delivery already handed to the app is
    /// acked, nacked or rejected. Holding continues after this returns, until
    /// [`crate::Tap::release`] or [`crate::Tap::close_for_exit`].
    pub async fn quiesce(&self, timeout: Duration) -> QuiesceReport {
        let t0 = Instant::now();
        self.mode.send_replace(Mode::Hold);
        // Check "no batch in progress" *before* reading the ledger: a batch
        // that started before the hold has then recorded its deliveries, and
        // any later batch sees the hold.
        let settled = || {
            let idle = self.counters.batches_active.load(Ordering::SeqCst) == 0;
            let unsettled = self.ledger().unsettled();
            (idle && unsettled == 0, unsettled)
        };
        let (mut done, mut unsettled) = settled();
        while !done && t0.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(1)).await;
            (done, unsettled) = settled();
        }
        let q = QuiesceReport {
            complete: done,
            waited_ms: t0.elapsed().as_millis() as u64,
            timeout_ms: timeout.as_millis() as u64,
            unsettled,
        };
        if q.complete {
            info!(waited_ms = q.waited_ms, "ms2m tap: quiesced");
        } else {
            warn!(
                waited_ms = q.waited_ms,
                unsettled, "ms2m tap: quiesce timed out; unsettled deliveries are in doubt"
            );
        }
        q
    }

    /// Whether new deliveries are held now (by a quiesce or a fence not yet
    /// released).
    pub fn holding(&self) -> bool {
        *self.mode.borrow() == Mode::Hold
    }

    /// The fence record without quiescing, for a caller that ran
    /// [`crate::Tap::quiesce`] itself (e.g. around other work); takes the count at
    /// this instant. Synchronous and cheap. Without a quiesce before it,
    /// the count is of little use: the app may be publishing meanwhile.
    pub fn fence_now(&self, quiesce: &QuiesceReport) -> Fence {
        let now = unix_ms();
        let queues = self.ledger().queue_cuts(!quiesce.complete);
        let (cut_at, publishes) = {
            let last = self.last_cut();
            let n = self.counters.publishes_since_cut.load(Ordering::SeqCst);
            (*last, if last.is_some() { n } else { 0 })
        };
        info!(
            publishes_after_cut = publishes,
            cut_taken_at_unix_ms = ?cut_at,
            quiesce_complete = quiesce.complete,
            "ms2m tap: fence"
        );
        if cut_at.is_none() {
            warn!("ms2m tap: fence without a cut: there is nothing to count publishes from");
        }
        Fence {
            schema: FENCE_SCHEMA.to_string(),
            taken_at: rfc3339_utc(now),
            taken_at_unix_ms: now,
            publishes_after_cut: publishes,
            cut_taken_at_unix_ms: cut_at,
            quiesce: *quiesce,
            queues,
        }
    }

    /// Leave-running: forward held deliveries in order and stop holding.
    /// Waits (at most 1 s) until the connections have written them.
    pub async fn release(&self) {
        self.mode.send_replace(Mode::Open);
        let t0 = Instant::now();
        while self.counters.held_deliveries.load(Ordering::Relaxed) > 0
            && t0.elapsed() < Duration::from_secs(1)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        info!("ms2m tap: released");
    }
}

/// The target's gate: per stream queue, deliveries at or past this offset
/// are held. `None` once live.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    limits: Mutex<Option<Positions>>,
}

impl Gate {
    /// A gate at `limits` (the cut), or an open one.
    pub fn new(limits: Option<Positions>) -> Gate {
        Gate {
            limits: Mutex::new(limits),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Positions>> {
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits now (`None`: open).
    pub fn limits(&self) -> Option<Positions> {
        self.lock().clone()
    }

    /// Raise limits (never lowers one). False when the gate is open.
    pub fn raise(&self, next: &Positions) -> bool {
        let mut g = self.lock();
        let Some(l) = g.as_mut() else { return false };
        let mut moved = false;
        for (q, &n) in next {
            let e = l.entry(q.clone()).or_insert(0);
            if n > *e {
                *e = n;
                moved = true;
            }
        }
        moved
    }

    pub fn open(&self) {
        *self.lock() = None;
    }
}

/// Wakes the connections so they re-check the gate (only while no quiesce
/// or exit is in progress: those have their own wake-ups).
pub(crate) fn wake(shared: &Shared) {
    shared.mode.send_if_modified(|m| *m == Mode::Open);
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_only_rises_and_opens() {
        let g = Gate::new(Some([("q".to_string(), 10)].into()));
        assert!(!g.raise(&[("q".to_string(), 5)].into()));
        assert!(g.raise(&[("q".to_string(), 12), ("r".to_string(), 1)].into()));
        assert_eq!(
            g.limits(),
            Some([("q".to_string(), 12), ("r".to_string(), 1)].into())
        );
        g.open();
        assert_eq!(g.limits(), None);
        assert!(!g.raise(&[("q".to_string(), 20)].into()));
    }
}
