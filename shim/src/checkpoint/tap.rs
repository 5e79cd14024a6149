//! The container's AMQP tap around a checkpoint, as the checkpoint path
//! drives it (the tap's own part, the quiesce at CRIU's `pre-dump` and the
//! cut in the frozen window, is [`crate::broker::CutHook`], run by the
//! direct dump): before the dump, void fences are removed and the tap is
//! readied; after it, the tap is let go.

use std::path::Path;
use std::time::{Duration, Instant};

use containerd_shim_protos::shim::oci::CheckpointOptions;
use criu_bridge::config::CRIU_CONFIG_ANNOTATION;

use super::plan::{Method, Plan};
use super::Target;
use crate::broker;
use crate::config::TAP_UPSTREAM_ANNOTATION;
use crate::error::{Error, Result};

/// The container's tap, readied for the dump.
pub(super) struct TapAtCheckpoint {
    /// The tap.
    pub(super) tap: ms2m_tap::Tap,
    /// The quiesce of a paused container, done before the dump; `None`:
    /// the [`crate::broker::CutHook`] quiesces at CRIU's `pre-dump`.
    pub(super) quiesced: Option<ms2m_tap::Quiesce>,
    /// Bound on the quiesce.
    pub(super) bound: Duration,
    /// Whether the upstream broker accepted a connection before the dump
    /// (recorded in the manifest's `broker` section).
    pub(super) upstream_reachable: bool,
    /// A leave-running checkpoint of a container that asks for it
    /// ([`crate::after_checkpoint`]): deliveries stay held after the cut.
    pub(super) hold: bool,
}

/// Removes the fences that no longer hold: the one the container's
/// previous checkpoint was fenced with (any checkpoint attempt may release
/// the tap's hold), and one an earlier checkpoint left in `image_path` (it
/// belongs to that one's cut, not to this one).
pub(super) fn remove_void_fences(target: &Target, image_path: &Path, what: &str) -> Result<()> {
    let id = &target.id;
    let fences = target
        .void_fence
        .iter()
        .cloned()
        .chain([image_path.join(criu_bridge::manifest::FENCE_FILE)]);
    for f in fences {
        // Not there: nothing to remove (on a read-only file system unlink
        // fails with EROFS even then, and the error would blame the fence).
        if matches!(std::fs::symlink_metadata(&f), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        {
            continue;
        }
        match std::fs::remove_file(&f) {
            Ok(()) => tracing::warn!(id = %id, fence = %f.display(), "void fence removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::internal(
                    format!(
                        "{what} failed: cannot remove the void fence {}",
                        f.display()
                    ),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Readies the container's tap, if it has one, for the dump: refused with
/// the runc strategy (the cut is taken in CRIU's frozen window) and with a
/// CRIU configuration file of the user's (the restore needs tcp-close);
/// probes the upstream broker; quiesces a paused container now (a running
/// one is quiesced at CRIU's `pre-dump`, see [`crate::broker::CutHook`]).
pub(super) async fn prepare(
    target: &Target,
    opts: &CheckpointOptions,
    plan: &Plan,
) -> Result<Option<TapAtCheckpoint>> {
    let id = &target.id;
    // A leave-running checkpoint of a tap whose container asks for it
    // keeps deliveries held after the cut (crate::after_checkpoint).
    let hold = target.tap.is_some()
        && !opts.exit
        && crate::after_checkpoint::hold(&target.bundle)
            .map_err(|e| Error::InvalidArgument(format!("checkpoint of container {id}: {e}")))?;
    Ok(match &target.tap {
        None => None,
        Some((tap, tc)) => {
            if plan.method == Method::Runc {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint of container {id}: its AMQP tap ({}) needs the direct strategy \
                     (the broker cut is captured in CRIU's frozen window), but runc was forced",
                    TAP_UPSTREAM_ANNOTATION
                )));
            }
            if target.criu_conf.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "checkpoint of container {id}: its AMQP tap needs CRIU's tcp-close on \
                     restore, which the shim passes through its own CRIU configuration file, \
                     but the container names its own ({})",
                    CRIU_CONFIG_ANNOTATION
                )));
            }
            if !opts.exit {
                crate::broker::arm_checkpoint_mirror(id, tap).await;
            }
            let reachable = broker::probe_upstream(tc, Duration::from_millis(500)).await;
            if !reachable {
                tracing::warn!(
                    id = %id,
                    upstream = %tc.upstream,
                    "the upstream broker is unreachable: the cut is the tap's ledger as it stands"
                );
            }
            let quiesced = if target.was_paused && tap.stats().unsettled > 0 {
                // A paused container cannot ack what it was handed (`ctr
                // task checkpoint` and `ctr c checkpoint --task` pause
                // before they checkpoint). With new deliveries held, let it
                // run until it has settled them (at most the bound), then
                // pause it again: its state then advances only by work on
                // messages it already had, which the cut accounts for.
                Some(quiesce_paused(target, tap, tc.quiesce_timeout).await?)
            } else if target.was_paused {
                // Nothing to settle: hold from now on, so that nothing is
                // handed to the paused app while CRIU starts (it could not
                // ack it at pre-dump).
                Some(tap.quiesce(tc.quiesce_timeout).await)
            } else {
                None
            };
            Some(TapAtCheckpoint {
                tap: tap.clone(),
                quiesced,
                bound: tc.quiesce_timeout,
                upstream_reachable: reachable,
                hold,
            })
        }
    })
}

/// The quiesce of a paused container: resumed with deliveries held, paused
/// again once settled or at `bound`; on failure the tap is released.
async fn quiesce_paused(
    target: &Target,
    tap: &ms2m_tap::Tap,
    bound: Duration,
) -> Result<ms2m_tap::Quiesce> {
    let id = &target.id;
    let t0 = Instant::now();
    if let Err(e) = target.runc.resume(id).await {
        tap.release().await;
        return Err(Error::Internal(format!(
            "checkpoint of container {id}: resuming the paused container so that it can \
             settle its deliveries failed: {e}"
        )));
    }
    let q = tap.quiesce(bound).await;
    if let Err(e) = target.runc.pause(id).await {
        tap.release().await;
        return Err(Error::Internal(format!(
            "checkpoint of container {id}: pausing it again after the quiesce failed \
             (it is running): {e}"
        )));
    }
    tracing::info!(
        id = %id,
        complete = q.complete,
        elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0,
        "paused container resumed for the quiesce and paused again"
    );
    Ok(q)
}

/// Lets go of the tap after the dump: closed for good when the container
/// exits with a successful checkpoint, still holding after a successful one
/// that asked for it ([`TapAtCheckpoint::hold`]), else released
/// (deliveries flow again).
pub(super) async fn after_dump(id: &str, b: &TapAtCheckpoint, dumped_ok: bool, exit: bool) {
    let tap = &b.tap;
    let t0 = Instant::now();
    let after = if dumped_ok && exit {
        tap.close_for_exit().await;
        // Restores of this checkpoint need no mirror (nothing is settled
        // after its cut); an earlier checkpoint's is of no use now.
        tap.disarm_mirror();
        "closed for exit"
    } else if dumped_ok && b.hold {
        "holding deliveries (io.ms2m.tap.after-checkpoint=hold)"
    } else {
        tap.release().await;
        "released"
    };
    tracing::info!(
        id = %id,
        elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0,
        "tap {after} after the checkpoint"
    );
}
