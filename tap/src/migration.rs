//! Live migration (MS2M) between two taps, coordinated through the broker.
//!
//! The source container keeps serving while its leave-running checkpoint is
//! restored on another host (the *target*, or shadow). The two taps never
//! talk directly: each opens its own small AMQP connection
//! ([`crate::link`]) into a per-migration room on the broker both already
//! reach, and they exchange [`Signal`]s there:
//!
//! ```text
//! source tap                          broker room                    target tap
//! SourceProgress{next,publishes} ───▶  (every 2 ms while it moves) ───▶ gate := next
//!                                     ◀─── TargetProgress{next,suppressed} (every 20 ms)
//! (ms2m migrate: lag small) fence:
//!   hold + wait acks, count P
//! Fence{next=F, publishes=P} ───────▶                              ───▶ gate := F,
//!                                                                      suppress P in all
//!                                                                      replay up to F-1
//!                                     ◀─── Live{next=F}                gate open, publish
//! source killed by ms2m migrate
//! ```
//!
//! The target's tap (started with [`Shadow`] in its
//! [`Resume`](crate::Resume)) never lets its app run ahead of the source: a
//! stream delivery at or past the source's acked position (the *gate*) is
//! held until the source has acked it, so everything the target processes
//! before the fence the source processed too, and every publish the target
//! makes meanwhile is suppressed (confirmed to the app by the tap). At the
//! fence the target knows the source's last position `F` and its publish
//! count `P` since the cut; it finishes replaying up to `F`, its suppressed
//! count reaches `P`, and it goes live: deliveries from `F` on flow, and its
//! publishes go to the broker. Nothing is processed twice downstream and
//! nothing is skipped, as long as the app is deterministic (see
//! [`crate::fence`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::fence::Fence;
use crate::link::{self, LinkSender};
use crate::state::{wake, OrderKind, Shared};
use crate::TapError;

pub use crate::ledger::Positions;
pub use crate::ticket::{
    id_for, room_of, validate_migration_id, Shadow, Ticket, TICKET_FILE, TICKET_SCHEMA,
};

/// How often the source announces its progress while it moves.
const SOURCE_TICK: Duration = Duration::from_millis(2);
/// The source repeats an unchanged position this often (a target that joins
/// late learns it).
const SOURCE_HEARTBEAT: Duration = Duration::from_millis(100);
/// How often the target reports its replay.
const TARGET_TICK: Duration = Duration::from_millis(20);
/// The target repeats an unchanged report this often (its liveness for
/// `ms2m migrate`).
const TARGET_HEARTBEAT: Duration = Duration::from_millis(250);
/// How often the target checks for the end of its replay after the fence.
const CUTOVER_TICK: Duration = Duration::from_micros(500);
/// Bound on the connections carrying out a handover, reconsume or switch.
const ORDER_BOUND: Duration = Duration::from_secs(2);

/// The source's acked position per queue: stream queues by their offset,
/// mirrored classic queues by the number of messages copied to their
/// mirror since the cut (the target's offset on the mirror stream).
fn source_positions(shared: &Shared) -> Positions {
    let mut p = shared.ledger().stream_positions();
    p.extend(shared.mirror.counts());
    p
}

/// Who sent a [`Signal`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The source container's tap.
    Source,
    /// The target container's tap.
    Target,
    /// `ms2m migrate`.
    Controller,
}

/// A message in a migration's room.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Signal {
    /// The source has processed (acked) everything before `next`; the target
    /// may replay up to there. `publishes`: since the checkpoint's cut.
    SourceProgress {
        /// Acked position per stream queue.
        next: Positions,
        /// Publishes forwarded since the cut.
        publishes: u64,
    },
    /// Where the target's replay stands.
    TargetProgress {
        /// Acked position per stream queue.
        next: Positions,
        /// Publishes suppressed so far.
        suppressed: u64,
        /// Deliveries held at the gate now.
        held: u64,
        /// Queues the target's app consumes now: the target only follows
        /// the source on those (it may still be reconnecting after the
        /// restore).
        #[serde(default)]
        consuming: Vec<String>,
    },
    /// The source is fenced: it processes nothing more. The target goes
    /// live once it acked everything before `next` and suppressed
    /// `publishes` publishes in all.
    Fence {
        /// The source's final acked position per stream queue.
        next: Positions,
        /// Publishes the source forwarded since the cut.
        publishes: u64,
        /// When the fence completed, µs since the Unix epoch.
        at_unix_us: u64,
    },
    /// The target is live: deliveries flow past the fence, publishes go out.
    Live {
        /// The target's acked position at going live.
        next: Positions,
        /// Publishes it suppressed in all.
        suppressed: u64,
        /// When it went live, µs since the Unix epoch.
        at_unix_us: u64,
    },
    /// The target cannot go live (it stays held; remove it).
    TargetFailed {
        /// Why.
        reason: String,
    },
    /// The migration is abandoned: the source goes on, the target is removed.
    Abort {
        /// Why.
        reason: String,
    },
}

/// A [`Signal`] with its sender, as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    /// The migration.
    pub migration_id: String,
    /// The sender.
    pub from: Role,
    /// The message.
    #[serde(flatten)]
    pub signal: Signal,
}

impl Envelope {
    /// JSON bytes of this envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings, integers and maps: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses an envelope; `None` for anything else in the room.
    pub fn from_bytes(b: &[u8]) -> Option<Envelope> {
        serde_json::from_slice(b).ok()
    }
}

/// Sends `signal` as `from` into `migration_id`'s room.
pub async fn send(
    tx: &LinkSender,
    migration_id: &str,
    from: Role,
    signal: Signal,
) -> Result<(), TapError> {
    let env = Envelope {
        migration_id: migration_id.to_string(),
        from,
        signal,
    };
    tx.send(&env.to_bytes()).await
}

/// µs since the Unix epoch.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The source side of a live migration: announces the source's progress
/// into the room until the fence or an abort. Dropping it stops the
/// announcements.
#[derive(Debug)]
pub struct SourceLink {
    shared: Arc<Shared>,
    ticket: Ticket,
    tx: LinkSender,
    progress: JoinHandle<()>,
    /// The fence handed the classic consumers over (an abort takes them
    /// back).
    handed_over: std::sync::atomic::AtomicBool,
}

impl Drop for SourceLink {
    fn drop(&mut self) {
        self.progress.abort();
    }
}

impl SourceLink {
    /// Opens the tap's control link (the upstream URL's credentials) and
    /// announces the acked position every few ms while it moves, so the
    /// target's replay follows (see [`crate::Tap::migration_source`]).
    pub(crate) async fn open(shared: Arc<Shared>, ticket: &Ticket) -> Result<SourceLink, TapError> {
        ticket.validate()?;
        let cfg =
            shared.config.control.clone().ok_or_else(|| {
                TapError::Config("the tap has no control link configuration".into())
            })?;
        let (tx, mut rx) = link::open(&cfg, &ticket.room()).await?;
        let me = shared.clone();
        let id = ticket.migration_id.clone();
        let ptx = tx.clone();
        let progress = tokio::spawn(
            async move {
                let mut last: Option<(Positions, u64)> = None;
                let mut last_sent = Instant::now();
                let mut tick = tokio::time::interval(SOURCE_TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        // The room echoes everything; drain it so the
                        // broker never blocks the link on a full socket.
                        r = rx.recv() => match r {
                            Ok(_) => continue,
                            Err(e) => {
                                warn!(migration = %id, "ms2m tap: migration link closed: {e}");
                                return;
                            }
                        },
                    }
                    let now = (
                        source_positions(&shared),
                        shared.counters.publishes_since_cut.load(Ordering::SeqCst),
                    );
                    if last.as_ref() == Some(&now) && last_sent.elapsed() < SOURCE_HEARTBEAT {
                        continue;
                    }
                    let sig = Signal::SourceProgress {
                        next: now.0.clone(),
                        publishes: now.1,
                    };
                    if let Err(e) = send(&ptx, &id, Role::Source, sig).await {
                        warn!(migration = %id, "ms2m tap: cannot announce progress: {e}");
                        return;
                    }
                    last = Some(now);
                    last_sent = Instant::now();
                }
            }
            .in_current_span(),
        );
        info!(migration = %ticket.migration_id, "ms2m tap: migration source link open");
        Ok(SourceLink {
            shared: me,
            ticket: ticket.clone(),
            tx,
            progress,
            handed_over: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl SourceLink {
    /// The migration.
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// Cutover on the source: [`crate::Tap::fence`] (hold, wait at most `timeout`
    /// for the app's acks, count publishes since the cut), then the
    /// [`Signal::Fence`] into the room. Deliveries stay held. Fails, with
    /// the hold released, when the quiesce did not complete (the source
    /// goes on) or the fence cannot be sent.
    pub async fn fence(&self, timeout: Duration) -> Result<Fence, TapError> {
        let tap = &*self.shared;
        self.progress.abort();
        let q = tap.quiesce(timeout).await;
        let fence = tap.fence_now(&q);
        if !fence.quiesce.complete {
            tap.release().await;
            return Err(TapError::Config(format!(
                "the app did not settle its deliveries within {} ms ({} unsettled); \
                 not fenced, the source goes on",
                fence.quiesce.timeout_ms, fence.quiesce.unsettled
            )));
        }
        if fence.cut_taken_at_unix_ms != Some(self.ticket.cut_taken_at_unix_ms) {
            tap.release().await;
            return Err(TapError::Config(format!(
                "the tap's last cut ({:?} ms) is not the migration's checkpoint cut ({} ms): \
                 another checkpoint was taken meanwhile; not fenced, the source goes on",
                fence.cut_taken_at_unix_ms, self.ticket.cut_taken_at_unix_ms
            )));
        }
        let mirror = tap.mirror.status();
        if mirror.migration_id.is_some() {
            let refuse = if let Some(why) = mirror.broken {
                Some(format!("the classic-queue mirror is incomplete ({why})"))
            } else if mirror.migration_id.as_deref() != Some(&self.ticket.migration_id)
                || mirror.cut_taken_at_unix_ms != Some(self.ticket.cut_taken_at_unix_ms)
            {
                Some("the classic-queue mirror is not this migration's".to_string())
            } else {
                None
            };
            if let Some(why) = refuse {
                tap.release().await;
                return Err(TapError::Config(format!(
                    "{why}; not fenced, the source goes on"
                )));
            }
            self.handed_over.store(true, Ordering::SeqCst);
            tap.mirror.handed_over();
            if !tap.order(OrderKind::Handover, ORDER_BOUND).await {
                self.take_back(tap).await;
                tap.release().await;
                return Err(TapError::Config(
                    "the classic consumers could not be handed over in time; not fenced, \
                     the source goes on"
                        .into(),
                ));
            }
        }
        let sig = Signal::Fence {
            next: source_positions(tap),
            publishes: fence.publishes_after_cut,
            at_unix_us: unix_us(),
        };
        if let Err(e) = send(&self.tx, &self.ticket.migration_id, Role::Source, sig).await {
            self.take_back(tap).await;
            tap.release().await;
            return Err(e);
        }
        info!(
            migration = %self.ticket.migration_id,
            publishes_after_cut = fence.publishes_after_cut,
            "ms2m tap: migration fence sent"
        );
        Ok(fence)
    }

    /// Abandons the migration: tells the room (best effort) and releases a
    /// hold the fence took, so the source goes on.
    pub async fn abort(self, reason: &str) {
        let tap = &*self.shared;
        let sig = Signal::Abort {
            reason: reason.to_string(),
        };
        let _ = send(&self.tx, &self.ticket.migration_id, Role::Source, sig).await;
        self.take_back(tap).await;
        if tap.holding() {
            tap.release().await;
        }
        // The target is gone: its mirror streams too.
        tap.mirror.disarm(true);
        info!(migration = %self.ticket.migration_id, reason, "ms2m tap: migration aborted");
    }

    /// After a handover: the app's classic consumers consume again.
    async fn take_back(&self, tap: &Shared) {
        if self.handed_over.swap(false, Ordering::SeqCst) {
            tap.order(OrderKind::Reconsume, ORDER_BOUND).await;
        }
    }
}

/// Runs the target side: follows the source's progress, and at the fence
/// replays up to it and goes live.
pub(crate) fn spawn_target(shared: Arc<Shared>, shadow: Shadow) {
    let id = shadow.ticket.migration_id.clone();
    tokio::spawn(
        async move {
            if let Err(e) = run_target(&shared, &shadow).await {
                warn!(migration = %id, "ms2m tap: shadow replay stopped, the target stays held: {e}");
            }
        }
        .in_current_span(),
    );
}

async fn run_target(shared: &Arc<Shared>, shadow: &Shadow) -> Result<(), TapError> {
    let id = shadow.ticket.migration_id.as_str();
    let cfg = shared
        .config
        .control
        .clone()
        .ok_or_else(|| TapError::Config("the tap has no control link configuration".into()))?;
    let (tx, mut rx) = link::open(&cfg, &shadow.ticket.room()).await?;
    info!(migration = %id, "ms2m tap: shadow replay following the source");
    let mut fence: Option<(Positions, u64)> = None;
    let mut tick = tokio::time::interval(TARGET_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report: Option<(Positions, u64, u64, Vec<String>)> = None;
    let mut last_sent = Instant::now();
    loop {
        let msg = tokio::select! {
            r = rx.recv() => Some(r?),
            _ = tick.tick() => None,
        };
        if let Some(b) = msg {
            let Some(env) = Envelope::from_bytes(&b) else {
                continue;
            };
            if env.migration_id != id || env.from != Role::Source && env.from != Role::Controller {
                continue;
            }
            match env.signal {
                Signal::SourceProgress { next, .. } if shared.gate.raise(&next) => wake(shared),
                Signal::Fence {
                    next, publishes, ..
                } => {
                    // The suppression so far was "everything"; from now on
                    // it is exactly what is left of the source's count.
                    let r = shared.suppress_remaining.fetch_update(
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                        |r| publishes.checked_sub(u64::MAX - r),
                    );
                    if r.is_err() {
                        let done = shared.counters.suppressed.load(Ordering::SeqCst);
                        return fail(
                            &tx,
                            id,
                            format!(
                                "the target suppressed {done} publishes, more than the \
                                 {publishes} the source made: the app is not deterministic"
                            ),
                        )
                        .await;
                    }
                    shared.gate.raise(&next);
                    wake(shared);
                    info!(
                        migration = %id,
                        publishes,
                        next = ?next,
                        target_next = ?shared.ledger().stream_positions(),
                        suppressed = shared.counters.suppressed.load(Ordering::SeqCst),
                        held = shared.counters.held_deliveries.load(Ordering::Relaxed),
                        "ms2m tap: fence received, finishing the replay"
                    );
                    fence = Some((next, publishes));
                    tick = tokio::time::interval(CUTOVER_TICK);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                Signal::Abort { reason } => {
                    info!(migration = %id, reason, "ms2m tap: migration aborted; the target stays held");
                    return Ok(());
                }
                _ => {}
            }
            continue;
        }
        if shared.exited.load(Ordering::SeqCst) {
            return fail(&tx, id, "the target container exited".into()).await;
        }
        let next = shared.ledger().stream_positions();
        if let Some((f, publishes)) = &fence {
            let caught_up = f
                .iter()
                .all(|(q, &n)| next.get(q).copied().unwrap_or(0) >= n);
            if caught_up && shared.suppress_remaining.load(Ordering::SeqCst) == 0 {
                if !shadow.ticket.mirrors.is_empty() {
                    // Replayed every mirror to the source's end: consume
                    // the classic queues themselves (the source handed
                    // them over at its fence).
                    if !shared.order(OrderKind::Switch, ORDER_BOUND).await {
                        return fail(
                            &tx,
                            id,
                            "the app's consumers could not be moved from the mirror streams \
                             to their queues in time"
                                .into(),
                        )
                        .await;
                    }
                    let queues = shared.ledger().switch_mirrors();
                    info!(migration = %id, ?queues, "ms2m tap: classic queues taken over from the mirror");
                }
                go_live(shared);
                let suppressed = shared.counters.suppressed.load(Ordering::SeqCst);
                let at = unix_us();
                info!(migration = %id, suppressed, source_publishes = publishes, "ms2m tap: the target is live");
                send(
                    &tx,
                    id,
                    Role::Target,
                    Signal::Live {
                        next,
                        suppressed,
                        at_unix_us: at,
                    },
                )
                .await?;
                return Ok(());
            }
        }
        let report = (
            next,
            shared.counters.suppressed.load(Ordering::SeqCst),
            shared.counters.held_deliveries.load(Ordering::Relaxed),
            shared
                .ledger()
                .consumed_queues()
                .into_iter()
                .collect::<Vec<_>>(),
        );
        if fence.is_none()
            && (last_report.as_ref() != Some(&report) || last_sent.elapsed() >= TARGET_HEARTBEAT)
        {
            let sig = Signal::TargetProgress {
                next: report.0.clone(),
                suppressed: report.1,
                held: report.2,
                consuming: report.3.clone(),
            };
            send(&tx, id, Role::Target, sig).await?;
            last_report = Some(report);
            last_sent = Instant::now();
        }
    }
}

/// Tells the room the target cannot go live (it stays held), and returns
/// that as the error.
async fn fail(tx: &LinkSender, id: &str, reason: String) -> Result<(), TapError> {
    let sig = Signal::TargetFailed {
        reason: reason.clone(),
    };
    let _ = send(tx, id, Role::Target, sig).await;
    Err(TapError::Config(reason))
}

/// Opens the gate and stops suppressing: deliveries past the fence flow.
fn go_live(shared: &Shared) {
    shared.suppress_remaining.store(0, Ordering::SeqCst);
    shared.gate.open();
    shared.shadow_active.store(false, Ordering::SeqCst);
    wake(shared);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_foreign_messages() {
        let env = Envelope {
            migration_id: "m-1".into(),
            from: Role::Source,
            signal: Signal::Fence {
                next: [("orders".to_string(), 42)].into(),
                publishes: 7,
                at_unix_us: 1,
            },
        };
        let b = env.to_bytes();
        let s = String::from_utf8(b.clone()).unwrap();
        assert!(s.contains("\"kind\":\"fence\""), "{s}");
        assert!(s.contains("\"from\":\"source\""), "{s}");
        assert_eq!(Envelope::from_bytes(&b), Some(env));
        assert_eq!(Envelope::from_bytes(b"{\"kind\":\"nope\"}"), None);
        assert_eq!(Envelope::from_bytes(b"not json"), None);
    }
}
