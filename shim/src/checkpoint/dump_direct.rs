//! The direct and pre-copy strategies: the shim drives CRIU's RPC itself
//! (through `criu_bridge::container`, building the dump the way `runc
//! checkpoint` does, so `runc restore` restores it). That is what lets it
//! run the frozen-window hooks and take the broker cut while the container
//! is frozen (CRIU's `post-dump`), quiesce the tap just before the freeze
//! (`pre-dump`), and run pre-dump rounds first for pre-copy.

use std::path::Path;
use std::time::Instant;

use criu_bridge::config::CriuConfig;
use criu_bridge::container::{
    Cgroups, ConfigFile, ContainerDump, DumpKnobs, Freeze, LockMethod, NetworkLock, RuncContainer,
};
use criu_bridge::rpc::{CriuClient, CriuFailure, Notify};
use criu_bridge::stats::read_dump_stats;
use criu_bridge::strategy::PreCopyLimits;

use super::plan::Method;
use super::tap::TapAtCheckpoint;
use super::{DumpJob, Dumped};
use crate::broker::CutHook;
use crate::config::FROZEN_HOOK_ANNOTATION;
use crate::criu_conf;
use crate::error::{Error, Result};
use crate::frozen_window::{CommandHook, FrozenContext, FrozenRecord, FrozenWindowSet};
use crate::inflight::Dump;

/// A direct dump through CRIU's RPC (after pre-copy rounds for
/// [`Method::PreCopy`]), on a blocking thread.
pub(super) async fn dump(job: &DumpJob<'_>, broker: Option<&TapAtCheckpoint>) -> Result<Dumped> {
    let DumpJob {
        target,
        image_path,
        work_path,
        opts,
        plan,
    } = *job;
    let id = target.id.clone();
    let rc = RuncContainer::load(&target.runc_root, &id)
        .map_err(|e| Error::internal(format!("read runc's state of container {id}"), e))?;
    if let Some(conf) = &target.criu_conf {
        // Nothing in the file may override the request's options.
        criu_conf::write(conf, &CriuConfig::new())?;
    }
    let mut knobs = DumpKnobs {
        leave_running: !opts.exit,
        work_dir: Some(work_path.to_path_buf()),
        network_lock: plan.lock,
        lock_when_tcp: plan.lock_when_tcp,
        cgroups: plan.cgroups,
        freeze: Freeze::Cgroup,
        external_netns: true,
        empty_netns: true,
        tcp_established: opts.open_tcp,
        tcp_close: false,
        ext_unix_sk: opts.external_unix_sockets,
        shell_job: opts.terminal,
        file_locks: opts.file_locks,
        log_level: target.config.criu.log_level,
        config_file: ConfigFile::LikeRunc,
    };
    let mut hooks = FrozenWindowSet::default();
    if let Some(cmd) = &target.overrides.frozen_hook {
        let h = CommandHook::new(cmd, target.config.hook_timeout()).map_err(|e| {
            Error::InvalidArgument(format!("annotation {FROZEN_HOOK_ANNOTATION}: {e}"))
        })?;
        hooks.push(Box::new(h));
    }
    // With a tap: the app's broker connection (to the tap, in-container
    // loopback) is not dumped in repair mode but restored closed, so its
    // client reconnects; nothing then needs the network lock.
    let (cut_slot, quiescer) = match broker {
        Some(b) => {
            knobs.tcp_close = true;
            knobs.network_lock = NetworkLock::Always(LockMethod::Skip);
            // Leave-running: held deliveries may flow as soon as the cut
            // is taken (the app's socket queues are not dumped with
            // tcp-close); the app finds them when it thaws. Not when the
            // container asks the tap to hold them.
            let (hook, slot) =
                CutHook::new(b.tap.clone(), b.quiesced, b.bound, !opts.exit && !b.hold);
            hooks.push(Box::new(hook.clone()));
            (Some(slot), Some(hook))
        }
        None => (None, None),
    };
    let guard = Dump::begin(&id, rc.freezer_cgroup().map(Path::to_path_buf));
    let client = {
        let g = guard.clone();
        CriuClient::new(&plan.criu)
            .with_helper_dir(plan.helper_dir.clone())
            .on_spawn(move |pid| g.set_criu_pid(pid))
    };
    let images = image_path.to_path_buf();
    let work = work_path.to_path_buf();
    let method = plan.method;
    let cgroups_mode = match plan.cgroups {
        Cgroups::Ignore => "ignore",
        Cgroups::Soft => "soft",
    };
    let g = guard.clone();
    let span = tracing::info_span!("criu-dump", id = %id);
    let joined = tokio::task::spawn_blocking(move || {
        let _e = span.enter();
        let rounds = match method {
            Method::PreCopy(limits) => Some(
                pre_copy(&rc, &client, &images, &knobs, &limits)
                    .map_err(|e| Box::new((e, None)))?,
            ),
            _ => None,
        };
        let mut frozen: Option<FrozenRecord> = None;
        let ctx_base = FrozenContext {
            container_id: rc.id().to_string(),
            init_pid: rc.init_pid(),
            image_path: images.clone(),
            criu_pid: 0,
        };
        let mut notify = |n: Notify<'_>| -> std::result::Result<(), String> {
            if n.script == "pre-dump" {
                // Still running: criu-bridge freezes it when this returns.
                if let Some(q) = &quiescer {
                    q.quiesce(&ctx_base.container_id);
                }
                return Ok(());
            }
            if n.script != "post-dump" {
                return Ok(());
            }
            let ctx = FrozenContext {
                criu_pid: n.criu_pid,
                ..ctx_base.clone()
            };
            let rec = hooks.run(&ctx);
            tracing::info!(
                hook_ms = rec.hook_duration_ms,
                hooks = hooks.len(),
                ok = rec.ok,
                "frozen window"
            );
            let res = match &rec.error {
                None => Ok(()),
                Some(e) => Err(format!("frozen-window hook failed: {e}")),
            };
            frozen = Some(rec);
            res
        };
        let t0 = Instant::now();
        let result = match &rounds {
            Some(r) => {
                let mut k = knobs.clone();
                k.work_dir = Some(work.clone());
                final_dump_with_parent(&rc, &client, &images, &k, r.last_dir(), &mut notify)
            }
            None => rc.dump(&client, &images, &knobs, Some(&mut notify)),
        };
        tracing::debug!(
            elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "criu dump returned"
        );
        result
            .map(|d| (d, frozen.clone(), rounds))
            .map_err(|e| Box::new((e, frozen)))
    })
    .await
    .map_err(|e| Error::internal("the dump thread failed", e))?;
    let aborted = g.aborted();
    drop(guard);
    match joined {
        Ok((d, frozen, rounds)) => {
            if let Some(e) = &d.stats_error {
                tracing::warn!(id = %id, "no CRIU dump statistics: {e}");
            }
            Ok(Dumped {
                stats: d.stats,
                network_lock: d.network_lock.as_str().to_string(),
                frozen,
                criu_events: serde_json::to_value(&d.outcome.events).ok(),
                cgroups_mode: Some(cgroups_mode.to_string()),
                rounds: rounds.map(|r| r.to_json()),
                cut: cut_slot.and_then(|s| match s.lock() {
                    Ok(mut g) => g.take(),
                    Err(p) => p.into_inner().take(),
                }),
            })
        }
        Err(boxed) => {
            let (e, frozen) = *boxed;
            let mut msg = match (&aborted, e.criu_failure()) {
                (Some(why), _) => format!("checkpoint aborted: {why}; CRIU was killed: {e}"),
                (None, Some(CriuFailure::HookFailed)) => {
                    let hook_err = frozen
                        .as_ref()
                        .and_then(|f| f.error.clone())
                        .unwrap_or_default();
                    format!("frozen-window hook failed: {hook_err}; the dump was aborted: {e}")
                }
                _ => e.to_string(),
            };
            if let Some(f) = frozen.filter(|f| f.ok) {
                msg.push_str(&format!(
                    " (the frozen-window hook had run: {:.1} ms)",
                    f.hook_duration_ms
                ));
            }
            Err(Error::Internal(msg))
        }
    }
}

/// The pre-dump rounds of a pre-copy checkpoint.
struct Rounds {
    dirs: Vec<String>,
    pages: Vec<u64>,
    decisions: Vec<String>,
    elapsed_ms: f64,
}

impl Rounds {
    fn last_dir(&self) -> &str {
        self.dirs.last().map(String::as_str).unwrap_or("")
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rounds": self.dirs.len(),
            "pages_written": self.pages,
            "decisions": self.decisions,
            "elapsed_ms": self.elapsed_ms,
        })
    }
}

/// Pre-dump rounds into `<images>/../<name>.pre-N` until the policy says
/// stop. Runs only where the kernel tracks dirty memory.
fn pre_copy(
    rc: &RuncContainer,
    client: &CriuClient,
    images: &Path,
    knobs: &DumpKnobs,
    limits: &PreCopyLimits,
) -> std::result::Result<Rounds, criu_bridge::Error> {
    let t0 = Instant::now();
    let base = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".into());
    let parent_dir = images.parent().unwrap_or(Path::new("/"));
    let mut r = Rounds {
        dirs: Vec::new(),
        pages: Vec::new(),
        decisions: Vec::new(),
        elapsed_ms: 0.0,
    };
    loop {
        let decision = limits.next_round(&r.pages, t0.elapsed());
        r.decisions.push(decision.reason().to_string());
        if decision.is_final() {
            break;
        }
        let name = format!("{base}.pre-{}", r.dirs.len() + 1);
        let dir = parent_dir.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| criu_bridge::Error::Criu {
            action: "pre-dump".into(),
            failure: CriuFailure::Spawn,
            detail: format!("create {}: {e}", dir.display()),
        })?;
        let (mut job, _, _) = rc.dump_job(&dir, knobs)?;
        job.work_dir = None;
        if let Some(prev) = r.dirs.last() {
            job.opts.parent_img = Some(format!("../{prev}"));
        }
        client.pre_dump(&job, None)?;
        let pages = read_dump_stats(&dir).map(|s| s.pages_written).unwrap_or(0);
        r.pages.push(pages);
        r.dirs.push(name);
    }
    r.elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(r)
}

/// The final dump of a pre-copy checkpoint: only what changed since the
/// last round (`parent_img`).
fn final_dump_with_parent(
    rc: &RuncContainer,
    client: &CriuClient,
    images: &Path,
    knobs: &DumpKnobs,
    parent: &str,
    notify: &mut criu_bridge::rpc::NotifyFn<'_>,
) -> std::result::Result<ContainerDump, criu_bridge::Error> {
    let (mut job, lock, external_netns) = rc.dump_job(images, knobs)?;
    if !parent.is_empty() {
        job.opts.parent_img = Some(format!("../{parent}"));
        job.opts.track_mem = Some(true);
    }
    let outcome = client.dump(&job, Some(notify))?;
    Ok(ContainerDump::finish(
        outcome,
        images,
        knobs,
        lock,
        external_netns,
        0.0,
    ))
}
