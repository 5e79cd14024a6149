//! `ms2m migrate`: live migration of a tapped consumer to another containerd
//! host, in one command, while the source keeps serving (MS2M).
//!
//! Phases (see docs/migration.md for the protocol and where each failure
//! leaves the system):
//! 1. **checkpoint**: a leave-running checkpoint of the source into a local
//!    directory; the ticket ([`ms2m_tap::migration::TICKET_FILE`]) is added
//!    beside the manifest, and the source's shim starts announcing its
//!    progress into the migration's broker room (Tasks.Update with a
//!    [`MigrateRequest::Start`]).
//! 2. **transfer**: the directory goes over TCP to `ms2m agent` on the
//!    target host, which checks every file's digest ([`crate::transfer`]).
//! 3. **restore**: the agent creates the container and a task restored from
//!    it; its tap is the source's shadow: it replays from the cut behind the
//!    source, publishes suppressed.
//! 4. **catch-up**: this command follows both taps' progress in the room
//!    until the target's lag is at most `--max-lag` messages.
//! 5. **cutover**: the source is fenced ([`MigrateRequest::Cutover`]); the
//!    target finishes the replay up to the fence and goes live.
//! 6. **source stopped**: the source task is killed; the agent is told the
//!    target is final.
//!
//! Any failure or Ctrl-C before the target is live aborts: the target is
//! removed (the agent kills and deletes it) and only then the source is
//! released, so the source serves on and nothing is doubled.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use containerd_client::services::v1::UpdateTaskRequest;
use criu_bridge::manifest::{MigrateRequest, MIGRATE_REQUEST_TYPE_URL};
use ms2m_tap::link::{self, LinkConfig, LinkReceiver, LinkSender};
use ms2m_tap::migration::{self, Envelope, Positions, Role, Signal, Ticket, TICKET_FILE};
use serde::Serialize;

use crate::checkpoint::{self, CheckpointArgs};
use crate::client::{self, grpc, Containerd};
use crate::transfer::{Offer, TargetSession};

/// Where the source's checkpoint for a migration goes by default (tmpfs on
/// Debian: the images only live until the target confirmed them).
pub const DEFAULT_MIGRATION_ROOT: &str = "/run/ms2m/migrations";
/// The agent token `ms2m migrate` presents when no --token-file is given.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/ms2m/agent-token";
/// The annotation that opts a container into the tap (its broker URL).
const TAP_UPSTREAM_ANNOTATION: &str = "io.ms2m.tap.upstream";
/// A target that reported once and then stays silent this long is gone.
const TARGET_SILENCE: Duration = Duration::from_secs(3);

/// Arguments of `ms2m migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The target host's agent (`ms2m agent --listen`), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// The broker for the migration's signals, as seen from this host
    /// (default: the container's `io.ms2m.tap.upstream`).
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// Cut over once the target is at most this many messages behind.
    #[arg(long, default_value_t = 5)]
    pub max_lag: u64,
    /// Keep the target in shadow (replaying behind the source) at least this
    /// long before cutting over, e.g. to warm it up.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub min_catch_up: Duration,
    /// Give up (and abort) when the target has not caught up by then.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub catch_up_timeout: Duration,
    /// Bound on the cutover: the source's quiesce plus the target going live.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub cutover_timeout: Duration,
    /// Directory for the source's checkpoint (default
    /// /run/ms2m/migrations/<migration id>); removed afterwards unless --keep.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The target agent's shared secret (its `--token-file`): a file whose
    /// first line is the token. Default: /etc/ms2m/agent-token when it
    /// exists.
    #[arg(long, value_name = "FILE", env = "MS2M_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Keep the source's checkpoint directory.
    #[arg(long)]
    pub keep: bool,
    /// Keep the stopped source container (by default its task, the
    /// container and its snapshot are removed once the target runs).
    #[arg(long)]
    pub keep_source: bool,
    /// Stop-and-copy instead of live migration (the baseline): an exit
    /// checkpoint, the transfer, a restore on the target that resumes at
    /// the cut. The consumer processes nothing from the checkpoint until
    /// the target runs. On failure the source is restored where it was.
    #[arg(long)]
    pub stop_and_copy: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The source container (on this host's containerd).
    #[arg(value_name = "ID")]
    pub id: String,
}

/// One phase of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Phase name.
    pub name: &'static str,
    /// Start, ms after the command connected.
    pub start_ms: f64,
    /// Duration, ms.
    pub ms: f64,
}

/// The catch-up, as measured from the taps' signals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatchUp {
    /// Target lag (messages) at its first report.
    pub initial_lag: Option<u64>,
    /// Target lag when the cutover started.
    pub final_lag: Option<u64>,
    /// Messages the target replayed per second (first to last report).
    pub replay_rate: Option<f64>,
    /// Messages the source processed per second meanwhile.
    pub live_rate: Option<f64>,
}

/// What a migration did, as printed.
#[derive(Debug, Serialize)]
pub struct MigrateReport {
    /// The migration id (also the broker room's suffix).
    pub migration_id: String,
    /// The container.
    pub container_id: String,
    /// The target agent.
    pub to: String,
    /// `migrated` or `aborted`.
    pub outcome: String,
    /// Why it was aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The timeline.
    pub phases: Vec<Phase>,
    /// The checkpoint's freeze as CRIU measured it, ms.
    pub frozen_ms: Option<f64>,
    /// Bytes sent to the target.
    pub transfer_bytes: u64,
    /// Transfer rate, MiB/s.
    pub transfer_mib_per_s: f64,
    /// Catch-up figures.
    pub catch_up: CatchUp,
    /// Publishes the source made after the cut (the fence's count).
    pub fence_publishes: Option<u64>,
    /// Publishes the target suppressed in all.
    pub target_suppressed: Option<u64>,
    /// From the source's fence to the target going live (the taps' clocks), ms.
    pub fence_to_live_ms: Option<f64>,
    /// Position (next stream offset per queue) where the target went live.
    pub live_at: Positions,
    /// When the source's fence completed, µs since the Unix epoch.
    pub fence_at_unix_us: Option<u64>,
    /// When the target went live (stop-and-copy: was started), µs since
    /// the Unix epoch.
    pub live_at_unix_us: Option<u64>,
    /// `live` or `stop-and-copy`.
    pub mode: String,
    /// Wall time of the whole command, ms.
    pub total_ms: f64,
}

/// The timeline being recorded.
struct Timeline {
    t0: Instant,
    phases: Vec<Phase>,
    current: Option<(&'static str, Instant)>,
}

impl Timeline {
    fn begin(&mut self, name: &'static str) {
        self.end();
        self.current = Some((name, Instant::now()));
    }
    fn end(&mut self) {
        if let Some((name, t)) = self.current.take() {
            self.phases.push(Phase {
                name,
                start_ms: ms(t.duration_since(self.t0)),
                ms: ms(t.elapsed()),
            });
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The controller's view of the room.
struct Room {
    id: String,
    tx: LinkSender,
    rx: LinkReceiver,
    source: Option<(Positions, Instant)>,
    first_source: Option<(Positions, Instant)>,
    target: Option<(Positions, Instant)>,
    /// Queues the target's app consumes (it reconnects after the restore).
    target_consuming: Vec<String>,
    first_target: Option<(Positions, Instant)>,
    fence: Option<(u64, u64)>,
    live: Option<(Positions, u64, u64)>,
    failed: Option<String>,
}

impl Room {
    async fn open(url: &str, migration_id: &str) -> Result<Room> {
        let cfg = LinkConfig::from_url(url, Duration::from_secs(5))
            .map_err(|e| anyhow!("the broker URL for the migration's signals: {e}"))?;
        let (tx, rx) = link::open(&cfg, &migration::room_of(migration_id))
            .await
            .map_err(|e| anyhow!("joining the migration's broker room: {e}"))?;
        Ok(Room {
            id: migration_id.to_string(),
            tx,
            rx,
            source: None,
            first_source: None,
            target: None,
            target_consuming: Vec::new(),
            first_target: None,
            fence: None,
            live: None,
            failed: None,
        })
    }

    /// Waits at most `wait` for the next signal and records it.
    async fn poll(&mut self, wait: Duration) -> Result<()> {
        let b = match tokio::time::timeout(wait, self.rx.recv()).await {
            Err(_) => return Ok(()),
            Ok(r) => r.map_err(|e| anyhow!("the migration's broker room: {e}"))?,
        };
        let Some(env) = Envelope::from_bytes(&b) else {
            return Ok(());
        };
        if env.migration_id != self.id {
            return Ok(());
        }
        let now = Instant::now();
        match (env.from, env.signal) {
            (Role::Source, Signal::SourceProgress { next, .. }) => {
                if self.first_source.is_none() {
                    self.first_source = Some((next.clone(), now));
                }
                self.source = Some((next, now));
            }
            (
                Role::Source,
                Signal::Fence {
                    publishes,
                    at_unix_us,
                    next,
                },
            ) => {
                self.fence = Some((publishes, at_unix_us));
                self.source = Some((next, now));
            }
            (
                Role::Target,
                Signal::TargetProgress {
                    next, consuming, ..
                },
            ) => {
                if self.first_target.is_none() {
                    self.first_target = Some((next.clone(), now));
                }
                self.target = Some((next, now));
                self.target_consuming = consuming;
            }
            (
                Role::Target,
                Signal::Live {
                    next,
                    suppressed,
                    at_unix_us,
                },
            ) => self.live = Some((next, suppressed, at_unix_us)),
            (Role::Target, Signal::TargetFailed { reason }) => self.failed = Some(reason),
            _ => {}
        }
        Ok(())
    }

    /// Messages the target is behind the source (over the source's
    /// queues); `None` until the target's app consumes every one of them
    /// (before that a small lag only means no traffic).
    fn lag(&self) -> Option<u64> {
        let (s, _) = self.source.as_ref()?;
        let (t, _) = self.target.as_ref()?;
        if !s.keys().all(|q| self.target_consuming.contains(q)) {
            return None;
        }
        Some(lag(s, t))
    }

    async fn say(&self, signal: Signal) {
        let _ = migration::send(&self.tx, &self.id, Role::Controller, signal).await;
    }
}

/// Σ over the source's queues of how far the target is behind.
pub fn lag(source: &Positions, target: &Positions) -> u64 {
    source
        .iter()
        .map(|(q, &s)| s.saturating_sub(target.get(q).copied().unwrap_or(0)))
        .sum()
}

/// Messages between two position maps (Σ of per-queue advances).
fn advanced(from: &Positions, to: &Positions) -> u64 {
    to.iter()
        .map(|(q, &n)| n.saturating_sub(from.get(q).copied().unwrap_or(n)))
        .sum()
}

/// What has to be undone when the migration stops before the target is live.
#[derive(Default)]
struct Undo {
    source_started: bool,
    session: Option<TargetSession>,
    /// Stop-and-copy after the exit checkpoint: restore the source from here.
    restore_source_from: Option<PathBuf>,
}

/// A migration id for `id` now: the container id (sanitized) and the time.
pub fn migration_id(id: &str, now: SystemTime) -> String {
    let ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    migration::id_for(id, ms)
}

async fn source_request(cd: &Containerd, id: &str, req: &MigrateRequest) -> Result<()> {
    let body = serde_json::to_vec(req)?;
    cd.tasks()
        .update(cd.request(UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(prost_types::Any {
                type_url: MIGRATE_REQUEST_TYPE_URL.to_string(),
                value: body,
            }),
            annotations: Default::default(),
        }))
        .await
        .map_err(grpc("Tasks.Update (migrate)"))?;
    Ok(())
}

/// Runs `ms2m migrate`. Returns the report also when the migration was
/// aborted (outcome `aborted`, with the error); `Err` only when nothing had
/// started yet or the abort itself failed.
pub async fn run(cd: &Containerd, args: &MigrateArgs) -> Result<MigrateReport> {
    let id = args.id.as_str();
    let mid = migration_id(id, SystemTime::now());
    let mut tl = Timeline {
        t0: Instant::now(),
        phases: Vec::new(),
        current: None,
    };
    let mut report = MigrateReport {
        migration_id: mid.clone(),
        container_id: id.to_string(),
        to: args.to.clone(),
        outcome: "aborted".into(),
        error: None,
        phases: Vec::new(),
        frozen_ms: None,
        transfer_bytes: 0,
        transfer_mib_per_s: 0.0,
        catch_up: CatchUp::default(),
        fence_publishes: None,
        target_suppressed: None,
        fence_to_live_ms: None,
        live_at: Positions::new(),
        fence_at_unix_us: None,
        live_at_unix_us: None,
        mode: if args.stop_and_copy {
            "stop-and-copy"
        } else {
            "live"
        }
        .into(),
        total_ms: 0.0,
    };

    // What the target needs of the source container.
    let container = client::get_container(cd, id).await?;
    let spec: serde_json::Value = match &container.spec {
        Some(any) => serde_json::from_slice(&any.value)
            .with_context(|| format!("container {id}: its OCI spec is not JSON"))?,
        None => bail!("container {id} has no OCI spec"),
    };
    let broker = match &args.broker {
        Some(b) => b.clone(),
        None => spec
            .pointer("/annotations")
            .and_then(|a| a.get(TAP_UPSTREAM_ANNOTATION))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow!(
                    "container {id} has no AMQP tap ({TAP_UPSTREAM_ANNOTATION}): live migration \
                     replays its message stream, so it needs one (use `ms2m checkpoint --exit` \
                     and `ms2m restore` to move other containers)"
                )
            })?,
    };
    let offer = Offer {
        migration_id: mid.clone(),
        container_id: id.to_string(),
        image: container.image.clone(),
        snapshotter: container.snapshotter.clone(),
        runtime: container
            .runtime
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default(),
        spec,
        labels: container.labels.clone().into_iter().collect(),
    };
    let dir = match &args.work_dir {
        Some(d) => client::absolute(d)?,
        None => Path::new(DEFAULT_MIGRATION_ROOT).join(&mid),
    };
    if dir.exists() {
        bail!(
            "{} exists: give the migration an empty --work-dir",
            dir.display()
        );
    }

    let mut room = Room::open(&broker, &mid).await?;
    let mut undo = Undo::default();
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = tokio::select! {
        r = migrate(cd, args, &offer, &dir, &mut room, &mut tl, &mut report, &mut undo) => r,
        _ = interrupted => Err(anyhow!("interrupted (Ctrl-C)")),
    };
    tl.end();
    match result {
        Ok(()) => report.outcome = "migrated".into(),
        Err(e) => {
            let reason = format!("{e:#}");
            report.error = Some(reason.clone());
            tl.begin("abort");
            abort(cd, id, &mid, &mut room, &mut undo, &reason).await?;
            tl.end();
        }
    }
    // A failed stop-and-copy keeps its checkpoint: it may be all that is
    // left of the source if restoring it failed too.
    if !(args.keep || args.stop_and_copy && report.error.is_some()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report.phases = tl.phases;
    report.total_ms = ms(tl.t0.elapsed());
    Ok(report)
}

/// Removes the target (first) and releases the source (then): the source
/// never runs on while a target might still go live.
async fn abort(
    cd: &Containerd,
    id: &str,
    mid: &str,
    room: &mut Room,
    undo: &mut Undo,
    reason: &str,
) -> Result<()> {
    room.say(Signal::Abort {
        reason: reason.to_string(),
    })
    .await;
    let mut problems = Vec::new();
    if let Some(s) = undo.session.take() {
        if let Err(e) = s.abort(reason).await {
            problems.push(format!("removing the target: {e:#}"));
        }
    }
    if let Some(dir) = undo.restore_source_from.take() {
        if let Err(e) = restore_source(cd, id, &dir).await {
            problems.push(format!(
                "restoring the source from {} (do it by hand: ms2m restore {id} {}): {e:#}",
                dir.display(),
                dir.display()
            ));
        }
    }
    if undo.source_started {
        let req = MigrateRequest::Abort {
            migration_id: mid.to_string(),
            reason: reason.to_string(),
        };
        if let Err(e) = source_request(cd, id, &req).await {
            problems.push(format!("releasing the source: {e:#}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "the migration failed ({reason}) and so did its abort: {}",
            problems.join("; ")
        )
    }
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    cd: &Containerd,
    args: &MigrateArgs,
    offer: &Offer,
    dir: &Path,
    room: &mut Room,
    tl: &mut Timeline,
    report: &mut MigrateReport,
    undo: &mut Undo,
) -> Result<()> {
    let id = args.id.as_str();
    let mid = offer.migration_id.as_str();

    if !args.stop_and_copy {
        // Refused at once (no tap, a no-ack classic consumer) without
        // freezing the source; arms the classic-queue mirror, which an
        // abort disarms.
        source_request(
            cd,
            id,
            &MigrateRequest::Check {
                migration_id: mid.to_string(),
            },
        )
        .await
        .context("checking the source")?;
        undo.source_started = true;
    }
    tl.begin("checkpoint");
    std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("/")))
        .with_context(|| format!("create {}", dir.display()))?;
    let ck = checkpoint::run(
        cd,
        &CheckpointArgs {
            exit: args.stop_and_copy,
            image_path: Some(dir.to_path_buf()),
            work_path: None,
            tcp_established: false,
            file_locks: false,
            ext_unix_sk: false,
            json: true,
            id: id.to_string(),
        },
    )
    .await
    .context("leave-running checkpoint of the source")?;
    report.frozen_ms = ck.stats.as_ref().map(|s| s.frozen_time_us as f64 / 1000.0);
    let cut_at = ck
        .manifest
        .as_ref()
        .and_then(|m| m.extensions.get("broker"))
        .and_then(|b| b.get("captured_at_unix_ms"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| anyhow!("the checkpoint has no broker cut (is the tap running?)"))?;
    // Classic queues replay from the mirror streams the source's tap
    // fills from the cut on (armed by the check).
    let classic: Vec<String> = ck
        .manifest
        .as_ref()
        .and_then(|m| m.extensions.get("broker"))
        .and_then(|b| b.get("queues"))
        .and_then(|q| q.as_array())
        .map(|qs| {
            qs.iter()
                .filter(|q| q.get("kind").and_then(|k| k.as_str()) == Some("classic"))
                .filter_map(|q| q.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if args.stop_and_copy {
        // The source is stopped: from here on a failure restores it here.
        undo.restore_source_from = Some(dir.to_path_buf());
        return stop_and_copy(cd, args, offer, dir, tl, report, undo).await;
    }
    let mut ticket = Ticket::new(mid, id, cut_at);
    ticket.mirrors = classic
        .iter()
        .map(|q| (q.clone(), ms2m_tap::mirror::mirror_stream_name(mid, q)))
        .collect();
    let ticket_file = dir.join(TICKET_FILE);
    std::fs::write(&ticket_file, serde_json::to_vec_pretty(&ticket)?)
        .with_context(|| format!("write {}", ticket_file.display()))?;
    source_request(
        cd,
        id,
        &MigrateRequest::Start {
            migration_id: mid.to_string(),
            image_path: dir.display().to_string(),
        },
    )
    .await
    .context("starting the source's part")?;
    undo.source_started = true;

    transfer_and_restore(args, offer, dir, tl, report, undo).await?;

    tl.begin("catch-up");
    catch_up(args, room, report).await?;

    tl.begin("cutover");
    let deadline = Instant::now() + args.cutover_timeout;
    source_request(
        cd,
        id,
        &MigrateRequest::Cutover {
            migration_id: mid.to_string(),
            timeout_ms: args.cutover_timeout.as_millis() as u64,
        },
    )
    .await
    .context("fencing the source")?;
    while room.live.is_none() {
        if let Some(r) = &room.failed {
            bail!("the target cannot go live: {r}");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the target did not go live within {:?} of the fence",
                args.cutover_timeout
            );
        }
        room.poll(left.min(Duration::from_millis(100))).await?;
    }
    let (live_at, suppressed, live_us) = room.live.clone().unwrap_or_default();
    report.live_at = live_at;
    report.target_suppressed = Some(suppressed);
    report.live_at_unix_us = Some(live_us);
    if let Some((publishes, fence_us)) = room.fence {
        report.fence_publishes = Some(publishes);
        report.fence_at_unix_us = Some(fence_us);
        report.fence_to_live_ms = Some(live_us.saturating_sub(fence_us) as f64 / 1000.0);
    }

    // The target is live: from here on there is no going back.
    tl.begin("source stopped");
    // Init only: on one kernel the target may share the source's cgroup
    // (same container id), and a kill of the whole cgroup would hit it.
    let stopped = crate::fence::kill_and_wait(cd, id, false).await;
    undo.source_started = false;
    finish(cd, args, undo, stopped).await?;
    tl.end();
    Ok(())
}

/// The target runs for good: confirms it to its agent, checks that the
/// source stopped (`source_stopped`), and removes the stopped source
/// container unless --keep-source.
async fn finish(
    cd: &Containerd,
    args: &MigrateArgs,
    undo: &mut Undo,
    source_stopped: Result<()>,
) -> Result<()> {
    if let Some(s) = undo.session.take() {
        s.commit()
            .await
            .context("confirming the target to its agent")?;
    }
    source_stopped.context("stopping the source (the target runs: stop it by hand)")?;
    if !args.keep_source {
        client::remove_stopped_container(cd, &args.id)
            .await
            .context("removing the stopped source container (the target runs)")?;
    }
    Ok(())
}

/// The rest of a stop-and-copy move: transfer, restore on the target
/// (resuming at the cut), done.
async fn stop_and_copy(
    cd: &Containerd,
    args: &MigrateArgs,
    offer: &Offer,
    dir: &Path,
    tl: &mut Timeline,
    report: &mut MigrateReport,
    undo: &mut Undo,
) -> Result<()> {
    transfer_and_restore(args, offer, dir, tl, report, undo).await?;
    report.live_at_unix_us = Some(migration::unix_us());
    undo.restore_source_from = None;
    finish(cd, args, undo, Ok(())).await?;
    tl.end();
    Ok(())
}

/// The transfer and restore phases (both kinds of move): the checkpoint to
/// the target's agent, checked there, then a task restored from it. The
/// session goes into `undo` as soon as it exists, so an abort removes
/// whatever the agent made.
async fn transfer_and_restore(
    args: &MigrateArgs,
    offer: &Offer,
    dir: &Path,
    tl: &mut Timeline,
    report: &mut MigrateReport,
    undo: &mut Undo,
) -> Result<()> {
    tl.begin("transfer");
    let token = match &args.token_file {
        Some(f) => Some(crate::transfer::read_token(f)?),
        None if Path::new(DEFAULT_TOKEN_FILE).exists() => {
            Some(crate::transfer::read_token(Path::new(DEFAULT_TOKEN_FILE))?)
        }
        None => None,
    };
    let mut session = TargetSession::connect_with_token(&args.to, Duration::from_secs(10), token)
        .await
        .with_context(|| format!("connecting to the target agent {}", args.to))?;
    let sent = session.send(offer, dir).await;
    undo.session = Some(session);
    let sent = sent.context("sending the checkpoint")?;
    report.transfer_bytes = sent.bytes;
    report.transfer_mib_per_s = sent.mib_per_s;
    tl.begin("restore");
    let session = undo.session.as_mut().ok_or_else(|| anyhow!("no session"))?;
    session.restore().await.context("restoring on the target")?;
    Ok(())
}

/// Gives the stopped source a task again from its exit checkpoint (a
/// stop-and-copy that could not finish).
async fn restore_source(cd: &Containerd, id: &str, dir: &Path) -> Result<()> {
    let container = client::get_container(cd, id).await?;
    let _ = crate::restore::delete_task(cd, id).await;
    let work = dir.with_extension("restore-work");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    crate::restore::create_restored_task(
        cd,
        &container,
        Some(dir),
        None,
        &work,
        &work.join("task.log"),
    )
    .await
    .map(|_| ())
}

/// Follows the room until the target's lag is at most `--max-lag`, with a
/// progress line on stderr.
async fn catch_up(args: &MigrateArgs, room: &mut Room, report: &mut MigrateReport) -> Result<()> {
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now();
    let mut printed = false;
    let result = loop {
        room.poll(Duration::from_millis(50)).await?;
        if let Some(r) = &room.failed {
            break Err(anyhow!("the target failed: {r}"));
        }
        let lag = room.lag();
        if report.catch_up.initial_lag.is_none() {
            report.catch_up.initial_lag = lag;
        }
        if let (Some((first, t1)), Some((now, t2))) = (&room.first_target, &room.target) {
            let secs = t2.duration_since(*t1).as_secs_f64();
            if secs > 0.05 {
                report.catch_up.replay_rate = Some(advanced(first, now) as f64 / secs);
            }
        }
        if let (Some((first, t1)), Some((now, t2))) = (&room.first_source, &room.source) {
            let secs = t2.duration_since(*t1).as_secs_f64();
            if secs > 0.05 {
                report.catch_up.live_rate = Some(advanced(first, now) as f64 / secs);
            }
        }
        if last_print.elapsed() >= Duration::from_millis(if tty { 200 } else { 1000 }) {
            let line = format!(
                "catch-up {:>6.1}s  target lag {:>8}  replay {:>8.0} msg/s  live {:>8.0} msg/s",
                t0.elapsed().as_secs_f64(),
                lag.map_or("?".to_string(), |l| l.to_string()),
                report.catch_up.replay_rate.unwrap_or(0.0),
                report.catch_up.live_rate.unwrap_or(0.0),
            );
            if !args.json || tty {
                if tty {
                    eprint!("\r{line}");
                } else {
                    eprintln!("{line}");
                }
                printed = true;
            }
            last_print = Instant::now();
        }
        if let Some(l) = lag.filter(|_| t0.elapsed() >= args.min_catch_up) {
            if l <= args.max_lag {
                report.catch_up.final_lag = Some(l);
                break Ok(());
            }
        }
        if let Some((_, t)) = &room.target {
            if t.elapsed() > TARGET_SILENCE {
                break Err(anyhow!(
                    "the target stopped reporting (silent for {:?}): it is gone",
                    t.elapsed()
                ));
            }
        }
        if t0.elapsed() > args.catch_up_timeout {
            break Err(anyhow!(
                "the target did not catch up within {:?} (lag {})",
                args.catch_up_timeout,
                lag.map_or("unknown".into(), |l| l.to_string())
            ));
        }
    };
    if printed && tty {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
    result
}

/// Text output of a migration report.
pub fn text(r: &MigrateReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} container {} to {} (migration {})",
        if r.outcome == "migrated" {
            "migrated"
        } else {
            "did NOT migrate"
        },
        r.container_id,
        r.to,
        r.migration_id
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  aborted: {e}");
        let _ = writeln!(s, "  the source keeps serving; the target was removed");
    }
    for p in &r.phases {
        let _ = writeln!(
            s,
            "  {:<15} {:>9.1} ms  (at {:.1} ms)",
            p.name, p.ms, p.start_ms
        );
    }
    if let Some(f) = r.frozen_ms {
        let _ = writeln!(s, "  source frozen   {f:>9.1} ms (CRIU)");
    }
    let _ = writeln!(
        s,
        "  transferred     {:>9.1} MiB at {:.0} MiB/s",
        r.transfer_bytes as f64 / 1048576.0,
        r.transfer_mib_per_s
    );
    if let (Some(rr), Some(lr)) = (r.catch_up.replay_rate, r.catch_up.live_rate) {
        let _ = writeln!(s, "  replay {rr:.0} msg/s vs live {lr:.0} msg/s");
    }
    if let (Some(p), Some(sup)) = (r.fence_publishes, r.target_suppressed) {
        let _ = writeln!(
            s,
            "  publishes after the cut {p}, suppressed on the target {sup}"
        );
    }
    if let Some(g) = r.fence_to_live_ms {
        let _ = writeln!(s, "  fence to target live {g:.1} ms at {:?}", r.live_at);
    }
    let _ = writeln!(s, "  total {:.1} ms", r.total_ms);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(v: &[(&str, u64)]) -> Positions {
        v.iter().map(|(q, n)| (q.to_string(), *n)).collect()
    }

    #[test]
    fn lag_over_the_source_queues() {
        assert_eq!(
            lag(&pos(&[("a", 10), ("b", 5)]), &pos(&[("a", 7), ("b", 5)])),
            3
        );
        assert_eq!(lag(&pos(&[("a", 10)]), &pos(&[])), 10);
        assert_eq!(lag(&pos(&[("a", 10)]), &pos(&[("a", 12)])), 0);
        assert_eq!(
            advanced(&pos(&[("a", 10)]), &pos(&[("a", 15), ("b", 3)])),
            5
        );
    }

    #[test]
    fn migration_ids_are_valid_room_names() {
        let t = UNIX_EPOCH + Duration::from_millis(1_733_500_000_123);
        assert_eq!(migration_id("consumer1", t), "consumer1-1733500000123");
        for id in ["a/b c", ".x", "", &"y".repeat(300)] {
            let m = migration_id(id, t);
            assert!(
                migration::validate_migration_id(&m).is_ok(),
                "{id:?} -> {m:?}"
            );
        }
    }
}
