//! The handle the shim uses: start, quiesce, capture, release, exit, stats.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::cut::{rfc3339_utc, Cut, QuiesceReport, CUT_SCHEMA};
use crate::fence::{Fence, Resume};
use crate::ledger::Ledger;
use crate::migration::SourceLink;
use crate::state::{unix_ms, Counters, Gate, Mode, OrderKind, Orders, Shared};
use crate::{listener, proxy, TapConfig, TapError};

/// Outcome of [`Tap::quiesce`] (also recorded in the cut).
pub type Quiesce = QuiesceReport;

/// Counters of a tap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Client connections accepted since start.
    pub connections_total: u64,
    /// Client connections open now.
    pub connections_active: usize,
    /// Connection pairs closed because of an error (bad frames, upstream down).
    pub connection_errors: u64,
    /// Frames read from clients.
    pub frames_from_client: u64,
    /// Frames read from the broker.
    pub frames_from_broker: u64,
    /// Deliveries handed to clients.
    pub deliveries: u64,
    /// Deliveries acked by clients.
    pub acks: u64,
    /// Deliveries nacked, rejected or recovered by clients.
    pub nacks: u64,
    /// Delivered and not yet settled.
    pub unsettled: u64,
    /// basic.publish from clients.
    pub publishes: u64,
    /// Publisher confirms from the broker.
    pub confirms: u64,
    /// basic.publish from clients suppressed (dropped) after a restore
    /// ([`Resume::suppress_publishes`]); not in `publishes`.
    pub suppressed: u64,
    /// Deliveries held now (quiesce).
    pub held: u64,
}

/// Handle to a running tap (cheap to clone).
#[derive(Debug, Clone)]
pub struct Tap {
    pub(crate) shared: Arc<Shared>,
    addrs: Arc<Vec<SocketAddr>>,
}

impl Tap {
    /// Start serving on already-bound listeners (from
    /// [`Tap::listen_in_netns`] or [`Tap::listen_loopback`]). Must be called
    /// inside a tokio runtime (a current_thread runtime is fine). With
    /// `resume`, the first basic.consume on each stream queue of the cut is
    /// rewritten to start at the cut. Same as [`Tap::start_with`] with
    /// [`Resume::from_cut`] (no publish suppression).
    pub async fn start(
        config: TapConfig,
        listeners: Vec<std::net::TcpListener>,
        resume: Option<Cut>,
    ) -> Result<Tap, TapError> {
        Tap::start_with(config, listeners, Resume::from_cut(resume)).await
    }

    /// [`Tap::start`] with the full restore options: besides the cut,
    /// [`Resume::suppress_publishes`] drops the app's first publishes (the
    /// ones the source already made after the cut; see [`crate::fence`]).
    /// Build it with [`Resume::after_fence`] to check that the fence belongs
    /// to the cut.
    pub async fn start_with(
        config: TapConfig,
        listeners: Vec<std::net::TcpListener>,
        resume: Resume,
    ) -> Result<Tap, TapError> {
        if listeners.is_empty() {
            return Err(TapError::Config("no listeners to serve on".into()));
        }
        let Resume {
            cut: resume,
            shadow,
            suppress_publishes,
        } = resume;
        // A shadow suppresses every publish until the source's fence says
        // how many (see crate::migration), and replays no further than the
        // cut until the source's progress arrives.
        let suppress_publishes = if shadow.is_some() {
            u64::MAX
        } else {
            suppress_publishes
        };
        // A plain restore of a cut with classic-queue mirrors replays them
        // to their end (a marker it appends now: the source is gone), each
        // delivery held until its header shows whether it is the marker.
        let replay = match (&shadow, &resume) {
            (None, Some(cut)) if !cut.mirrors.is_empty() => {
                let cfg = config.control.clone().ok_or_else(|| {
                    TapError::Config("the tap has no control link configuration".into())
                })?;
                Some(crate::mirror::Replay::prepare(&cfg, &cut.mirrors).await?)
            }
            _ => None,
        };
        let gate = shadow.as_ref().map(|_| {
            resume
                .as_ref()
                .map(|c| {
                    c.queues
                        .iter()
                        .filter_map(|q| q.next_offset.map(|n| (q.name.clone(), n)))
                        .collect()
                })
                .unwrap_or_default()
        });
        let (mode, _) = watch::channel(Mode::Open);
        let shared = Arc::new(Shared {
            ledger: Mutex::new(Ledger::new(resume.as_ref())),
            config,
            counters: Counters::default(),
            mode,
            next_conn: AtomicU64::new(1),
            suppress_remaining: AtomicU64::new(suppress_publishes),
            suppress_total: suppress_publishes,
            last_cut_ms: Mutex::new(None),
            shadow_active: AtomicBool::new(gate.is_some() || replay.is_some()),
            exited: AtomicBool::new(false),
            gate: Gate::new(gate),
            mirror: Default::default(),
            orders: watch::channel(Orders::default()).0,
            orders_done: Mutex::new(Default::default()),
            mirror_ends: Mutex::new(Default::default()),
        });
        if let Some(m) = shadow.as_ref().map(|s| &s.ticket.mirrors) {
            if !m.is_empty() {
                shared.ledger().replay_mirrors(m);
            }
        }
        if let Some(replay) = replay {
            shared.ledger().replay_mirrors(&replay.streams);
            spawn_replay_end(shared.clone(), replay);
        }
        if let Some(shadow) = shadow {
            crate::migration::spawn_target(shared.clone(), shadow);
        }
        let mut addrs = Vec::new();
        for l in listeners {
            l.set_nonblocking(true)
                .map_err(|e| TapError::io("making a listener non-blocking", e))?;
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| TapError::io("registering a listener with tokio", e))?;
            let addr = l
                .local_addr()
                .map_err(|e| TapError::io("reading a listener's address", e))?;
            addrs.push(addr);
            tokio::spawn(proxy::accept_loop(shared.clone(), l, addr).in_current_span());
        }
        info!(
            upstream = %shared.config.upstream,
            listen = ?addrs,
            resume = resume.is_some(),
            suppress_publishes,
            "ms2m tap: started"
        );
        Ok(Tap {
            shared,
            addrs: Arc::new(addrs),
        })
    }

    /// Bind `127.0.0.1:port` and `[::1]:port` inside the network namespace
    /// named by `netns` (`/proc/<pid>/ns/net` or a bind-mounted path). Runs a
    /// short-lived thread that joins the namespace; the calling thread's
    /// namespace is untouched. Blocking but quick (no I/O beyond bind).
    pub fn listen_in_netns(
        netns: &Path,
        port: u16,
    ) -> Result<Vec<std::net::TcpListener>, TapError> {
        listener::listen_in_netns(netns, port)
    }

    /// Bind `127.0.0.1:port` (and `[::1]:port` when available) in the
    /// caller's own network namespace; port 0 picks an ephemeral port.
    pub fn listen_loopback(port: u16) -> Result<Vec<std::net::TcpListener>, TapError> {
        listener::bind_loopback(port)
    }

    /// Addresses the tap listens on.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Hold new deliveries (buffered in order per connection) and wait,
    /// at most `timeout`, until every delivery already handed to the app is
    /// acked, nacked or rejected. Holding continues after this returns, until
    /// [`Tap::release`] or [`Tap::close_for_exit`].
    pub async fn quiesce(&self, timeout: Duration) -> Quiesce {
        self.shared.quiesce(timeout).await
    }

    /// Capture the broker cut from the ledger. Synchronous and cheap: meant
    /// for CRIU's frozen window. Deliveries still unsettled are listed as
    /// in doubt when the quiesce did not complete.
    ///
    /// Also restarts the publish count of [`Tap::publishes_since_cut`] (the
    /// app is frozen then, so no publish of its can fall between).
    pub fn capture_cut(&self, quiesce: &Quiesce) -> Cut {
        let now = unix_ms();
        let queues = self.shared.ledger().queue_cuts(!quiesce.complete);
        let mirrors = self.shared.mirror.cut_taken(now);
        {
            let mut last = self.shared.last_cut();
            *last = Some(now);
            self.shared
                .counters
                .publishes_since_cut
                .store(0, Ordering::SeqCst);
        }
        Cut {
            schema: CUT_SCHEMA.to_string(),
            upstream: self.shared.config.upstream.to_string(),
            captured_at: rfc3339_utc(now),
            captured_at_unix_ms: now,
            connections: self
                .shared
                .counters
                .connections_active
                .load(Ordering::Relaxed),
            queues,
            quiesce: *quiesce,
            mirrors,
        }
    }

    /// When this tap last captured a cut ([`Cut::captured_at_unix_ms`]), if
    /// ever: a fence can only close that cut.
    pub fn last_cut_at_unix_ms(&self) -> Option<u64> {
        *self.shared.last_cut()
    }

    /// Whether new deliveries are held now (by a quiesce or a fence not yet
    /// released).
    pub fn holding(&self) -> bool {
        self.shared.holding()
    }

    /// basic.publish commands forwarded upstream (all connections and
    /// channels; suppressed ones not included) since the last
    /// [`Tap::capture_cut`]; 0 before any cut.
    ///
    /// A publish counts when the tap reads its method frame. Publishes the app
    /// wrote just before the freeze but the tap had not read yet when the cut
    /// was captured count as after the cut. An app that publishes its results
    /// *before* acking the input they come from (on the same connection) has
    /// none such once the quiesce completed: the tap reads a connection in
    /// order and the quiesce waited for the acks.
    pub fn publishes_since_cut(&self) -> u64 {
        let last = self.shared.last_cut();
        match *last {
            Some(_) => self
                .shared
                .counters
                .publishes_since_cut
                .load(Ordering::SeqCst),
            None => 0,
        }
    }

    /// The MS2M fence, for stopping the source after a leave-running
    /// checkpoint: quiesce (hold new deliveries, wait at most `timeout` for
    /// the app to settle those it has, exactly as [`Tap::quiesce`]) and
    /// record [`Tap::publishes_since_cut`]. Deliveries stay held afterwards:
    /// stop the container next, then [`Tap::close_for_exit`] (or
    /// [`Tap::release`] to abort and let the source go on).
    ///
    /// Publishes the tap reads after the fence (the app still finishing a
    /// delivery when the quiesce timed out, or publishing on its own) are
    /// forwarded and not counted: stop the source promptly.
    pub async fn fence(&self, timeout: Duration) -> Fence {
        let q = self.quiesce(timeout).await;
        self.fence_now(&q)
    }

    /// The fence record without quiescing, for a caller that ran
    /// [`Tap::quiesce`] itself (e.g. around other work); takes the count at
    /// this instant. Synchronous and cheap. Without a quiesce before it,
    /// the count is of little use: the app may be publishing meanwhile.
    pub fn fence_now(&self, quiesce: &Quiesce) -> Fence {
        self.shared.fence_now(quiesce)
    }

    /// The container's init process exited: a live migration's shadow
    /// stops and tells the room (its app is gone); a source's classic-queue
    /// mirror is deleted (its target went live, or the migration is over).
    pub fn container_exited(&self) {
        self.shared.exited.store(true, Ordering::SeqCst);
        self.shared.mirror.container_exited();
    }

    /// Becomes the source of migration `ticket`: opens the tap's control
    /// link (the upstream URL's credentials) and announces the acked
    /// position every few ms while it moves, so the target's replay
    /// follows. The returned link fences or aborts the migration.
    pub async fn migration_source(
        &self,
        ticket: &crate::migration::Ticket,
    ) -> Result<SourceLink, TapError> {
        SourceLink::open(self.shared.clone(), ticket).await
    }

    /// Arms the classic-queue mirror for live migration `migration_id` (see
    /// [`crate::mirror`]): call before the migration's leave-running
    /// checkpoint. From then on the tap keeps the content of classic
    /// deliveries until the app settles them, and from that checkpoint's
    /// cut on it copies every one the app acks into the migration's mirror
    /// stream before forwarding the ack. Returns the mirrored queues (none:
    /// nothing armed, the app consumes only streams).
    ///
    /// Refused (nothing armed) for a no-ack consumer of a classic queue
    /// (the broker forgets its messages on delivery), for one on a channel
    /// without a prefetch limit (the target replays the mirror stream
    /// through the app's channel, and RabbitMQ streams need one), and when
    /// the broker cannot be reached.
    pub async fn prepare_mirror(&self, migration_id: &str) -> Result<Vec<String>, TapError> {
        self.arm_mirror(migration_id, true).await
    }

    /// Arms a classic-queue mirror for the coming leave-running checkpoint
    /// of this container (`id`), so that a restore of it after the source
    /// is gone replays what the source settled after the cut (see
    /// [`crate::mirror`]); the previous checkpoint's mirror is deleted.
    /// Nothing is armed while a live migration's mirror is armed or in use,
    /// or when the app consumes no classic queue. Errors as
    /// [`Tap::prepare_mirror`].
    pub async fn prepare_checkpoint_mirror(&self, id: &str) -> Result<Vec<String>, TapError> {
        if self.shared.mirror.status().for_migration {
            return Ok(Vec::new());
        }
        let mirror_id = format!("ck-{}", crate::migration::id_for(id, unix_ms().into()));
        self.arm_mirror(&mirror_id, false).await
    }

    async fn arm_mirror(
        &self,
        mirror_id: &str,
        for_migration: bool,
    ) -> Result<Vec<String>, TapError> {
        crate::migration::validate_migration_id(mirror_id)?;
        let migration_id = mirror_id;
        let classic = self.consumed_classic_queues();
        if classic.is_empty() {
            return Ok(classic);
        }
        self.shared.ledger().check_mirrorable(&classic)?;
        let streams: std::collections::BTreeMap<String, String> = classic
            .iter()
            .map(|q| {
                (
                    q.clone(),
                    crate::mirror::mirror_stream_name(migration_id, q),
                )
            })
            .collect();
        let cfg =
            self.shared.config.control.clone().ok_or_else(|| {
                TapError::Config("the tap has no control link configuration".into())
            })?;
        let names: Vec<String> = streams.values().cloned().collect();
        let publisher = crate::mirror::Publisher::open(&cfg, &names).await?;
        self.shared
            .mirror
            .arm(migration_id, streams, publisher, for_migration);
        info!(mirror = migration_id, queues = ?classic, "ms2m tap: classic-queue mirror armed");
        Ok(classic)
    }

    /// Disarms the classic-queue mirror and deletes its streams (a
    /// migration aborted before its `start`).
    pub fn disarm_mirror(&self) {
        self.shared.mirror.disarm(true);
    }

    /// The classic-queue mirror's state: the migration it is armed for, the
    /// cut it copies from, why it is incomplete (a failed copy), and its
    /// streams per queue.
    pub fn mirror_status(&self) -> crate::mirror::MirrorStatus {
        self.shared.mirror.status()
    }

    /// Publishes suppressed so far (see [`Resume::suppress_publishes`]).
    pub fn suppressed_publishes(&self) -> u64 {
        self.shared.counters.suppressed.load(Ordering::Relaxed)
    }

    /// Publishes still to suppress (0 once suppression is complete). A
    /// checkpoint of a restored container taken while this is not 0 must
    /// carry it over: the app behind it has not re-made those publishes yet.
    pub fn suppress_remaining(&self) -> u64 {
        self.shared.suppress_remaining.load(Ordering::SeqCst)
    }

    /// Leave-running: forward held deliveries in order and stop holding.
    /// Waits (at most 1 s) until the connections have written them.
    pub async fn release(&self) {
        self.shared.release().await
    }

    /// Exit checkpoint: drop held deliveries and close every connection (to
    /// the broker with connection.close), so unacked messages return to the
    /// broker. New connections are refused afterwards.
    pub async fn close_for_exit(&self) {
        self.shared.mode.send_replace(Mode::Exit);
        self.wait_closed(Duration::from_secs(2)).await;
        info!("ms2m tap: closed for exit checkpoint");
    }

    async fn wait_closed(&self, bound: Duration) {
        let t0 = Instant::now();
        while self
            .shared
            .counters
            .connections_active
            .load(Ordering::Relaxed)
            > 0
            && t0.elapsed() < bound
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Classic (non-stream) queues the app consumes now: a live migration
    /// cannot replay them (see [`crate::migration`]).
    pub fn consumed_classic_queues(&self) -> Vec<String> {
        let ledger = self.shared.ledger();
        let streams: std::collections::BTreeSet<String> = ledger
            .queue_cuts(false)
            .into_iter()
            .filter(|q| q.kind == crate::cut::QueueKind::Stream)
            .map(|q| q.name)
            .collect();
        ledger
            .consumed_queues()
            .into_iter()
            .filter(|q| !streams.contains(q))
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> TapStats {
        let c = &self.shared.counters;
        let t = self.shared.ledger().totals();
        TapStats {
            connections_total: c.connections_total.load(Ordering::Relaxed),
            connections_active: c.connections_active.load(Ordering::Relaxed),
            connection_errors: c.connection_errors.load(Ordering::Relaxed),
            frames_from_client: c.frames_from_client.load(Ordering::Relaxed),
            frames_from_broker: c.frames_from_broker.load(Ordering::Relaxed),
            deliveries: t.deliveries,
            acks: t.acks,
            nacks: t.nacks,
            unsettled: t.unsettled,
            publishes: t.publishes,
            confirms: t.confirms,
            suppressed: c.suppressed.load(Ordering::Relaxed),
            held: c.held_deliveries.load(Ordering::Relaxed),
        }
    }

    /// Stop accepting and close every connection.
    pub async fn shutdown(&self) {
        self.shared.mode.send_replace(Mode::Shutdown);
        self.wait_closed(Duration::from_secs(2)).await;
        info!("ms2m tap: shut down");
    }
}

/// Waits until the app reached every mirror's end marker and settled what
/// it got from the mirrors, then moves its consumers to the queues, stops
/// holding deliveries, and deletes the mirror streams.
fn spawn_replay_end(shared: Arc<Shared>, replay: crate::mirror::Replay) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            if shared.exited.load(Ordering::SeqCst) {
                replay.publisher.close().await;
                return;
            }
            let ends = shared
                .mirror_ends
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if !replay.streams.keys().all(|q| ends.contains(q)) {
                continue;
            }
            let open = shared
                .ledger()
                .unsettled_of(&|q| replay.streams.contains_key(q));
            if open > 0 {
                continue;
            }
            if !shared
                .order(OrderKind::Switch, std::time::Duration::from_secs(2))
                .await
            {
                warn!("ms2m tap: not every consumer moved from its mirror to its queue in time");
            }
            let queues = shared.ledger().switch_mirrors();
            shared.shadow_active.store(false, Ordering::SeqCst);
            shared.mode.send_if_modified(|m| *m == Mode::Open);
            info!(
                ?queues,
                "ms2m tap: mirrors replayed; consuming the classic queues"
            );
            let names: Vec<String> = replay.streams.values().cloned().collect();
            replay.publisher.delete(&names).await;
            replay.publisher.close().await;
            return;
        }
    });
}
