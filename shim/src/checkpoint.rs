//! The checkpoint path: decode containerd's checkpoint options, choose the
//! CRIU configuration, run `runc checkpoint`, and write the ms2m manifest
//! (options, strategy, CRIU's dump statistics, timings) beside the images.
//!
//! A failed checkpoint leaves the container as it was: CRIU thaws it on
//! failure, and the shim checks and resumes it if it is still frozen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::CheckpointOptions;
use criu_bridge::config::{netns_has_tcp, CriuConfig, NetworkLock as ConfLock};
use criu_bridge::container::{
    Cgroups, ConfigFile, ContainerDump, DumpKnobs, Freeze, LockMethod, NetworkLock, RuncContainer,
};
use criu_bridge::features::Features;
use criu_bridge::manifest::{describe_dump, Manifest};
use criu_bridge::rpc::{CriuClient, CriuFailure, NetworkLockMethod, Notify};
use criu_bridge::stats::{read_dump_stats, DumpStats};
use criu_bridge::strategy::{
    self, ContainerFacts, Policy, PreCopyLimits, Strategy as BridgeStrategy, StrategyKind,
};
use tokio::sync::OnceCell;

use crate::config::{
    CgroupsChoice, LockChoice, Overrides, ShimConfig, StrategyChoice, FROZEN_HOOK_ANNOTATION,
};
use crate::container::type_name;
use crate::criu_conf;
use crate::error::{Error, Result};
use crate::frozen_window::{CommandHook, FrozenContext, FrozenRecord, FrozenWindowSet};
use crate::inflight::Dump;
use crate::runc::{CheckpointArgs, Runc};

/// The type of containerd's checkpoint options for runc runtimes.
const CHECKPOINT_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";

/// Strategy name: a direct CRIU dump driven by the shim.
pub const STRATEGY_DIRECT: &str = "direct";
/// Strategy name: pre-copy rounds, then a direct dump.
pub const STRATEGY_PRE_COPY: &str = "pre-copy";
/// Strategy name: `runc checkpoint`.
pub const STRATEGY_RUNC: &str = "runc";

/// Decodes the request's checkpoint options (none: defaults).
pub fn parse_options(any: Option<&Any>) -> Result<CheckpointOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
        return Ok(CheckpointOptions::default());
    };
    if type_name(&any.type_url) != CHECKPOINT_OPTIONS_TYPE {
        return Err(Error::InvalidArgument(format!(
            "checkpoint options of type {:?} are not supported (expected {CHECKPOINT_OPTIONS_TYPE})",
            any.type_url
        )));
    }
    CheckpointOptions::parse_from_bytes(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("decode {CHECKPOINT_OPTIONS_TYPE}: {e}")))
}

/// The network lock to ask CRIU for, and why. `None` keeps CRIU's default.
pub fn plan_network_lock(has_tcp: &std::io::Result<bool>) -> (Option<ConfLock>, String) {
    match has_tcp {
        Ok(false) => (
            Some(ConfLock::Skip),
            "no TCP socket in the container's network namespace: nothing to lock, \
             network lock skipped"
                .to_string(),
        ),
        Ok(true) => (
            None,
            "TCP sockets in the container's network namespace: CRIU's default network lock"
                .to_string(),
        ),
        Err(e) => (
            None,
            format!("network namespace not inspectable ({e}): CRIU's default network lock"),
        ),
    }
}

/// The container being checkpointed, as the checkpoint needs it.
pub struct Target {
    /// Container id.
    pub id: String,
    /// containerd namespace.
    pub namespace: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// runc for the container.
    pub runc: Runc,
    /// runc's state directory (`--root`).
    pub runc_root: PathBuf,
    /// Host pid of the init process.
    pub init_pid: i32,
    /// The container was paused before the checkpoint (it stays paused).
    pub was_paused: bool,
    /// The CRIU configuration file the shim owns, if any.
    pub criu_conf: Option<PathBuf>,
    /// The shim configuration of the container.
    pub config: Arc<ShimConfig>,
    /// The container's ms2m annotations.
    pub overrides: Overrides,
    /// The container's AMQP tap and its configuration, if it has one.
    pub tap: Option<(ms2m_tap::Tap, ms2m_tap::TapConfig)>,
    /// The fence `ms2m fence` wrote for the container's previous
    /// checkpoint: this checkpoint releases the tap's hold, so the source
    /// publishes past what it counted, and it is removed.
    pub void_fence: Option<PathBuf>,
}

/// How the dump is carried out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    /// CRIU's RPC, driven by the shim.
    Direct,
    /// Pre-dump rounds, then a direct final dump.
    PreCopy(PreCopyLimits),
    /// `runc checkpoint`.
    Runc,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Direct => STRATEGY_DIRECT,
            Method::PreCopy(_) => STRATEGY_PRE_COPY,
            Method::Runc => STRATEGY_RUNC,
        }
    }
}

/// The plan for one checkpoint.
struct Plan {
    method: Method,
    reason: String,
    features: Arc<Features>,
    /// The lock to use when locking is needed.
    lock: NetworkLock,
    lock_when_tcp: LockMethod,
    cgroups: Cgroups,
    criu: PathBuf,
    /// Put first on CRIU's PATH (the fast tmpfs archiver), if installed.
    helper_dir: Option<PathBuf>,
}

fn lock_method(m: NetworkLockMethod) -> LockMethod {
    match m {
        NetworkLockMethod::Iptables => LockMethod::Iptables,
        NetworkLockMethod::Nftables => LockMethod::Nftables,
        NetworkLockMethod::Skip => LockMethod::Skip,
    }
}

/// Resident memory of `pid`, bytes (0 when unknown).
fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// A short summary of the features, for the manifest.
fn features_summary(f: &Features) -> serde_json::Value {
    serde_json::json!({
        "criu_version": f.criu_version,
        "dirty_tracking": f.dirty_tracking(),
        "soft_dirty": f.soft_dirty.detail,
        "lazy_pages": f.lazy_pages(),
        "userfaultfd": f.userfaultfd.detail,
        "pagemap_scan": f.pagemap_scan.available,
        "network_locks": {
            "iptables": f.network_locks.iptables,
            "nftables": f.network_locks.nftables,
        },
        "criu_kdat_cache": f.criu_kdat_cache.detail,
        "detected_at_unix_ms": f.detected_at_unix_ms,
    })
}

/// Chooses the strategy for this checkpoint (config, annotation, features).
async fn plan(target: &Target, opts: &CheckpointOptions, has_tcp: bool) -> Result<Plan> {
    let id = &target.id;
    let (choice, source) = target.overrides.strategy(&target.config)?;
    let hook = target.overrides.frozen_hook.is_some();
    if choice == StrategyChoice::Runc && hook {
        return Err(Error::InvalidArgument(format!(
            "checkpoint of container {id}: the frozen-window hook ({FROZEN_HOOK_ANNOTATION}) \
             needs the direct strategy, but the {source} forces runc"
        )));
    }
    let criu = target.config.criu_binary();
    let features = {
        let criu = criu.clone();
        tokio::task::spawn_blocking(move || Features::cached(&criu))
            .await
            .map_err(|e| Error::internal("detect checkpoint features", e))?
    };
    let facts = ContainerFacts {
        rss_bytes: rss_bytes(target.init_pid),
        has_tcp: has_tcp || opts.open_tcp,
        exit: opts.exit,
        forced: match choice {
            StrategyChoice::Auto => None,
            StrategyChoice::Direct | StrategyChoice::Runc => Some(StrategyKind::Dump),
            StrategyChoice::PreCopy => Some(StrategyKind::PreCopy),
        },
    };
    let policy = Policy {
        lazy_min_rss_bytes: target.config.restore.lazy_min_rss_mib * 1024 * 1024,
        ..Policy::default()
    };
    let decision = strategy::choose(&features, &facts, &policy);
    let method = match (choice, &decision.strategy) {
        (StrategyChoice::Runc, _) => Method::Runc,
        (_, BridgeStrategy::PreCopy(limits)) => Method::PreCopy(*limits),
        _ => Method::Direct,
    };
    let mut reason = format!(
        "{} (strategy {} from the {source}): {}",
        method.name(),
        choice.as_str(),
        decision.reason
    );
    if decision.strategy == BridgeStrategy::LazyRestore {
        reason.push_str("; the dump is plain, the restore is lazy");
    }
    let helper_dir = match method {
        Method::Runc => None,
        _ => target.config.criu_helper_dir(),
    };
    if let Some(d) = &helper_dir {
        reason.push_str(&format!(
            "; tmpfs contents archived by the tar in {}",
            d.display()
        ));
    }
    let lock_when_tcp = features
        .best_network_lock()
        .map(lock_method)
        .unwrap_or(LockMethod::Iptables);
    let lock = match target.config.checkpoint.network_lock {
        LockChoice::Auto => NetworkLock::Auto,
        LockChoice::Iptables => NetworkLock::Always(LockMethod::Iptables),
        LockChoice::Nftables => NetworkLock::Always(LockMethod::Nftables),
        LockChoice::Skip => NetworkLock::Always(LockMethod::Skip),
    };
    if lock != NetworkLock::Auto {
        reason.push_str(&format!(
            "; network lock {:?} set by the shim configuration",
            target.config.checkpoint.network_lock
        ));
    }
    let cgroups = match opts.cgroups_mode.as_str() {
        "" => match target.config.checkpoint.cgroups {
            CgroupsChoice::Ignore => Cgroups::Ignore,
            CgroupsChoice::Soft => Cgroups::Soft,
        },
        "ignore" => Cgroups::Ignore,
        "soft" => Cgroups::Soft,
        other if method == Method::Runc => {
            tracing::debug!(id = %id, "cgroups mode {other} passed to runc");
            Cgroups::Soft
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "checkpoint of container {id}: cgroups mode {other:?} is not supported by the \
                 {} strategy (soft or ignore)",
                method.name()
            )))
        }
    };
    Ok(Plan {
        method,
        reason,
        features,
        lock,
        lock_when_tcp,
        cgroups,
        criu,
        helper_dir,
    })
}

/// What a dump produced, whatever the method.
struct Dumped {
    stats: Option<DumpStats>,
    network_lock: String,
    frozen: Option<FrozenRecord>,
    criu_events: Option<serde_json::Value>,
    cgroups_mode: Option<String>,
    rounds: Option<serde_json::Value>,
    /// The broker cut captured in the frozen window.
    cut: Option<crate::broker::Captured>,
}

/// Checkpoints `target` into `image_path` and returns the manifest written
/// there.
pub async fn checkpoint(
    target: &Target,
    image_path: &Path,
    opts: &CheckpointOptions,
) -> Result<Manifest> {
    let started = Instant::now();
    let id = &target.id;
    let what = format!("checkpoint of container {id} into {}", image_path.display());
    if image_path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint of container {id}: no image path given"
        )));
    }
    // Fences that no longer hold: the one the container's previous
    // checkpoint was fenced with (any checkpoint attempt may release the
    // tap's hold), and one an earlier checkpoint left in this directory
    // (it belongs to that one's cut, not to this one).
    let fences = target
        .void_fence
        .iter()
        .cloned()
        .chain([image_path.join(criu_bridge::manifest::FENCE_FILE)]);
    for f in fences {
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
    let has_tcp = netns_has_tcp(target.init_pid as u32);
    let mut plan = plan(target, opts, *has_tcp.as_ref().unwrap_or(&true)).await?;
    if target.tap.is_some() {
        plan.reason.push_str(
            "; AMQP tap: quiesce at CRIU's pre-dump, cut in the frozen window, TCP restored \
             closed (tcp-close), so no network lock after all",
        );
    }
    tracing::info!(
        id = %id,
        strategy = plan.method.name(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "checkpoint planned: {}",
        plan.reason
    );
    std::fs::create_dir_all(image_path)
        .map_err(|e| Error::internal(format!("{what} failed: cannot create image directory"), e))?;
    let (work_path, temp_work) = if opts.work_path.is_empty() {
        (target.bundle.join("criu-work"), true)
    } else {
        (PathBuf::from(&opts.work_path), false)
    };
    if temp_work {
        let _ = std::fs::remove_dir_all(&work_path);
    }
    std::fs::create_dir_all(&work_path).map_err(|e| {
        Error::internal(
            format!(
                "{what} failed: cannot create work directory {}",
                work_path.display()
            ),
            e,
        )
    })?;

    // A leave-running checkpoint of a tap whose container asks for it
    // keeps deliveries held after the cut (crate::after_checkpoint).
    let hold = target.tap.is_some()
        && !opts.exit
        && crate::after_checkpoint::hold(&target.bundle)
            .map_err(|e| Error::InvalidArgument(format!("checkpoint of container {id}: {e}")))?;
    // The tap: quiesced at CRIU's pre-dump notification (holding new
    // deliveries, waiting for the app to ack what it has), cut in the
    // frozen window.
    let broker = match &target.tap {
        None => None,
        Some((tap, tc)) => {
            if plan.method == Method::Runc {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint of container {id}: its AMQP tap ({}) needs the direct strategy \
                     (the broker cut is captured in CRIU's frozen window), but runc was forced",
                    crate::config::TAP_UPSTREAM_ANNOTATION
                )));
            }
            if target.criu_conf.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "checkpoint of container {id}: its AMQP tap needs CRIU's tcp-close on \
                     restore, which the shim passes through its own CRIU configuration file, \
                     but the container names its own ({})",
                    criu_bridge::config::CRIU_CONFIG_ANNOTATION
                )));
            }
            let reachable =
                crate::broker::probe_upstream(tc, std::time::Duration::from_millis(500)).await;
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
            Some((tap.clone(), quiesced, tc.quiesce_timeout, reachable))
        }
    };

    let dump_started = Instant::now();
    let dumped = match plan.method {
        Method::Runc => dump_runc(target, image_path, &work_path, opts, &plan, &has_tcp).await,
        Method::Direct | Method::PreCopy(_) => {
            let b = broker
                .as_ref()
                .map(|(t, q, bound, _)| (t.clone(), *q, *bound));
            dump_direct(target, image_path, &work_path, opts, &plan, b, !hold).await
        }
    };
    let dump_ms = dump_started.elapsed().as_secs_f64() * 1000.0;

    // Holding never outlives the checkpoint.
    if let Some((tap, _, _, _)) = &broker {
        let t0 = Instant::now();
        let after = if dumped.is_ok() && opts.exit {
            tap.close_for_exit().await;
            "closed for exit"
        } else if dumped.is_ok() && hold {
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

    let dumped = match dumped {
        Ok(d) => d,
        Err(e) => {
            let log = keep_dump_log(&work_path, image_path, &target.bundle);
            let state = ensure_running(target).await;
            return Err(Error::Internal(format!(
                "{what} failed: {e}{}{state}",
                log.map(|l| format!("; CRIU log: {}", l.display()))
                    .unwrap_or_default()
            )));
        }
    };

    let mut m = Manifest::new(id);
    m.namespace = Some(target.namespace.clone());
    m.runtime.shim = crate::SHIM_BINARY.to_string();
    m.runtime.shim_version = env!("CARGO_PKG_VERSION").to_string();
    m.runtime.oci_runtime = "runc".to_string();
    m.runtime.oci_runtime_version = runc_version(&target.runc).await;
    m.runtime.criu_version = plan.features.criu_version.clone().or_else(|| {
        criu_bridge::criu::criu_version(&plan.criu.to_string_lossy())
            .map_err(|e| tracing::warn!("CRIU version unknown: {e}"))
            .ok()
    });
    m.options.exit = opts.exit;
    m.options.tcp_established = opts.open_tcp;
    m.options.tcp_close = broker.is_some();
    m.options.external_unix_sockets = opts.external_unix_sockets;
    m.options.shell_job = opts.terminal;
    m.options.file_locks = opts.file_locks;
    m.options.network_lock = dumped.network_lock;
    m.options.image_path = image_path.display().to_string();
    m.options.work_path = (!temp_work).then(|| work_path.display().to_string());
    m.options.cgroups_mode = dumped.cgroups_mode;
    m.options.empty_namespaces = if plan.method == Method::Runc {
        opts.empty_namespaces.clone()
    } else {
        vec!["network".to_string()]
    };
    m.strategy.name = plan.method.name().to_string();
    m.strategy.reason = plan.reason.clone();
    m.stats = dumped.stats;
    m.timings.dump_ms = dump_ms;
    let ext = &mut m.extensions;
    ext.insert("features".into(), features_summary(&plan.features));
    if let Some(f) = &dumped.frozen {
        ext.insert(
            "frozen_window".into(),
            serde_json::to_value(f).map_err(|e| Error::internal("encode frozen_window", e))?,
        );
    }
    if let Some(ev) = dumped.criu_events {
        ext.insert("criu_notifications".into(), ev);
    }
    if let Some(r) = dumped.rounds {
        ext.insert("pre_copy_rounds".into(), r);
    }
    if let Some((_, _, _, reachable)) = &broker {
        let cut = dumped.cut.as_ref().ok_or_else(|| {
            Error::Internal(format!(
                "{what}: the dump succeeded but the frozen-window hook captured no broker cut"
            ))
        })?;
        let after = if opts.exit {
            "closed-for-exit"
        } else if hold {
            "held"
        } else {
            "released"
        };
        ext.insert(
            crate::broker::MANIFEST_KEY.into(),
            crate::broker::section(cut, *reachable, after)?,
        );
    }
    if let Some(c) = crate::source_cgroups::record(&target.runc_root, id) {
        ext.insert(crate::source_cgroups::MANIFEST_KEY.into(), c);
    }
    m.timings.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    m.write(image_path)
        .map_err(|e| Error::internal(format!("{what}: images written, but the manifest not"), e))?;
    if temp_work {
        let _ = std::fs::remove_dir_all(&work_path);
    }
    if let Some(s) = &m.stats {
        tracing::info!(id = %id, strategy = %m.strategy.name, "CRIU dump: {}", describe_dump(s));
    }
    Ok(m)
}

/// `runc checkpoint` with the shim's CRIU configuration.
async fn dump_runc(
    target: &Target,
    image_path: &Path,
    work_path: &Path,
    opts: &CheckpointOptions,
    plan: &Plan,
    has_tcp: &std::io::Result<bool>,
) -> Result<Dumped> {
    let (auto_lock, _) = plan_network_lock(has_tcp);
    let lock = match plan.lock {
        NetworkLock::Auto => auto_lock,
        NetworkLock::Always(LockMethod::Iptables) => Some(ConfLock::Iptables),
        NetworkLock::Always(LockMethod::Nftables) => Some(ConfLock::Nftables),
        NetworkLock::Always(LockMethod::Skip) => Some(ConfLock::Skip),
    };
    let network_lock = match &target.criu_conf {
        Some(conf) => {
            let mut config = CriuConfig::new();
            if let Some(l) = lock {
                config = config.network_lock(l);
            }
            criu_conf::write(conf, &config)?;
            lock.map(|l| l.to_string())
                .unwrap_or_else(|| ConfLock::Iptables.to_string())
        }
        None => "configured".to_string(),
    };
    let args = CheckpointArgs {
        image_path: image_path.to_path_buf(),
        work_path: work_path.to_path_buf(),
        parent_path: None,
        leave_running: !opts.exit,
        tcp_established: opts.open_tcp,
        external_unix_sockets: opts.external_unix_sockets,
        shell_job: opts.terminal,
        file_locks: opts.file_locks,
        empty_namespaces: opts.empty_namespaces.clone(),
        cgroups_mode: Some(opts.cgroups_mode.clone()).filter(|m| !m.is_empty()),
    };
    if let Err(e) = target.runc.checkpoint(&target.id, &args).await {
        let criu_errors = std::fs::read_to_string(work_path.join("dump.log"))
            .map(|log| criu_errors(&log))
            .unwrap_or_default();
        return Err(if criu_errors.is_empty() {
            e
        } else {
            Error::Internal(format!("{e}; CRIU: {criu_errors}"))
        });
    }
    let stats = match read_dump_stats(work_path) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(id = %target.id, "no CRIU dump statistics: {e}");
            None
        }
    };
    Ok(Dumped {
        stats,
        network_lock,
        frozen: None,
        criu_events: None,
        cgroups_mode: args.cgroups_mode,
        rounds: None,
        cut: None,
    })
}

/// A direct dump through CRIU's RPC (after pre-copy rounds for
/// [`Method::PreCopy`]), on a blocking thread.
async fn dump_direct(
    target: &Target,
    image_path: &Path,
    work_path: &Path,
    opts: &CheckpointOptions,
    plan: &Plan,
    broker: Option<(ms2m_tap::Tap, Option<ms2m_tap::Quiesce>, Duration)>,
    // Leave-running: release held deliveries once the cut is taken (not
    // when the container asks the tap to hold them).
    release_after_cut: bool,
) -> Result<Dumped> {
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
        Some((tap, quiesced, bound)) => {
            knobs.tcp_close = true;
            knobs.network_lock = NetworkLock::Always(LockMethod::Skip);
            // Leave-running: held deliveries may flow as soon as the cut
            // is taken (the app's socket queues are not dumped with
            // tcp-close); the app finds them when it thaws.
            let (hook, slot) =
                crate::broker::CutHook::new(tap, quiesced, bound, !opts.exit && release_after_cut);
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

/// The quiesce of a paused container: resumed with deliveries held, paused
/// again once settled or at `bound`; on failure the tap is released.
async fn quiesce_paused(
    target: &Target,
    tap: &ms2m_tap::Tap,
    bound: std::time::Duration,
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

/// The last error lines of a CRIU log, joined (at most three).
pub fn criu_errors(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .map(str::trim)
        .collect();
    errors[errors.len().saturating_sub(3)..].join(" | ")
}

/// runc's version, asked once per shim process.
pub(crate) async fn runc_version(runc: &Runc) -> Option<String> {
    static VERSION: OnceCell<Option<String>> = OnceCell::const_new();
    VERSION
        .get_or_init(|| async {
            runc.version()
                .await
                .map_err(|e| tracing::warn!("runc version unknown: {e}"))
                .ok()
        })
        .await
        .clone()
}

/// Copies CRIU's dump.log from the work directory into the image directory
/// and the bundle (as criu-dump.log). Returns where it can be read.
fn keep_dump_log(work: &Path, images: &Path, bundle: &Path) -> Option<PathBuf> {
    let log = work.join("dump.log");
    if !log.exists() {
        return None;
    }
    let mut kept = None;
    let in_bundle = bundle.join("criu-dump.log");
    if std::fs::copy(&log, &in_bundle).is_ok() {
        kept = Some(in_bundle);
    }
    if work != images {
        let in_images = images.join("dump.log");
        if std::fs::copy(&log, &in_images).is_ok() {
            kept = Some(in_images);
        }
    } else {
        kept = Some(log);
    }
    kept
}

/// After a failed dump: makes sure the container is not left frozen.
/// Returns a note for the error message when something was done or is wrong.
async fn ensure_running(target: &Target) -> String {
    match target.runc.status(&target.id).await {
        Ok(s) if s == "paused" && !target.was_paused => {
            match target.runc.resume(&target.id).await {
                Ok(()) => {
                    tracing::warn!(id = %target.id, "container was left frozen by the failed checkpoint: resumed");
                    "; the container was left frozen and has been resumed".to_string()
                }
                Err(e) => format!("; the container is left frozen and resuming it failed: {e}"),
            }
        }
        Ok(s) if s == "running" || s == "paused" => String::new(),
        Ok(s) => format!("; the container is now {s}"),
        Err(e) => format!("; container state unknown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_checkpoint_options() {
        let opts = CheckpointOptions {
            exit: true,
            open_tcp: true,
            image_path: "/dev/shm/x".into(),
            work_path: "/dev/shm/w".into(),
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert_eq!(parse_options(Some(&any)).unwrap(), opts);
        assert_eq!(parse_options(None).unwrap(), CheckpointOptions::default());
    }

    #[test]
    fn rejects_foreign_options() {
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        };
        assert!(matches!(
            parse_options(Some(&any)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn network_lock_only_when_tcp() {
        assert_eq!(plan_network_lock(&Ok(false)).0, Some(ConfLock::Skip));
        assert_eq!(plan_network_lock(&Ok(true)).0, None);
        assert_eq!(
            plan_network_lock(&Err(std::io::Error::other("gone"))).0,
            None
        );
    }

    #[test]
    fn picks_criu_errors() {
        let log = "(00.1) info\n(00.2) Error (criu/image.c:1): can't write: No space left\n\
                   (00.3) Error (criu/cr-dump.c:2): Dumping failed\n(00.4) Unfreezing tasks\n";
        assert_eq!(
            criu_errors(log),
            "(00.2) Error (criu/image.c:1): can't write: No space left | \
             (00.3) Error (criu/cr-dump.c:2): Dumping failed"
        );
        assert_eq!(criu_errors("all fine\n"), "");
    }

    #[test]
    fn dump_log_is_kept() {
        let base = std::env::temp_dir().join(format!("ms2m-shim-test-{}", std::process::id()));
        let (work, images, bundle) = (base.join("w"), base.join("i"), base.join("b"));
        for d in [&work, &images, &bundle] {
            std::fs::create_dir_all(d).unwrap();
        }
        assert_eq!(keep_dump_log(&work, &images, &bundle), None);
        std::fs::write(work.join("dump.log"), "Error (criu/cr-dump.c)").unwrap();
        assert_eq!(
            keep_dump_log(&work, &images, &bundle),
            Some(images.join("dump.log"))
        );
        assert!(bundle.join("criu-dump.log").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
