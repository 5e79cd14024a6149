//! How to dump: the strategy (a direct CRIU dump, pre-copy rounds then a
//! direct dump, or `runc checkpoint`), the network lock and the cgroups
//! mode, chosen from the shim configuration, the container's annotations,
//! the request's options and the features detected on this host (see
//! docs/strategies.md).

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim_protos::shim::oci::CheckpointOptions;
use criu_bridge::container::{Cgroups, LockMethod, NetworkLock};
use criu_bridge::features::Features;
use criu_bridge::rpc::NetworkLockMethod;
use criu_bridge::strategy::{
    self, ContainerFacts, Policy, PreCopyLimits, Strategy as BridgeStrategy, StrategyKind,
};

use super::Target;
use crate::config::{CgroupsChoice, LockChoice, StrategyChoice, FROZEN_HOOK_ANNOTATION};
use crate::error::{Error, Result};

/// Strategy name: a direct CRIU dump driven by the shim.
pub const STRATEGY_DIRECT: &str = "direct";
/// Strategy name: pre-copy rounds, then a direct dump.
pub const STRATEGY_PRE_COPY: &str = "pre-copy";
/// Strategy name: `runc checkpoint`.
pub const STRATEGY_RUNC: &str = "runc";

/// How the dump is carried out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Method {
    /// CRIU's RPC, driven by the shim.
    Direct,
    /// Pre-dump rounds, then a direct final dump.
    PreCopy(PreCopyLimits),
    /// `runc checkpoint`.
    Runc,
}

impl Method {
    pub(super) fn name(self) -> &'static str {
        match self {
            Method::Direct => STRATEGY_DIRECT,
            Method::PreCopy(_) => STRATEGY_PRE_COPY,
            Method::Runc => STRATEGY_RUNC,
        }
    }
}

/// The plan for one checkpoint.
pub(super) struct Plan {
    pub(super) method: Method,
    pub(super) reason: String,
    pub(super) features: Arc<Features>,
    /// The lock to use when locking is needed.
    pub(super) lock: NetworkLock,
    pub(super) lock_when_tcp: LockMethod,
    pub(super) cgroups: Cgroups,
    pub(super) criu: PathBuf,
    /// Put first on CRIU's PATH (the fast tmpfs archiver), if installed.
    pub(super) helper_dir: Option<PathBuf>,
}

/// Chooses the strategy for this checkpoint (config, annotation, features).
pub(super) async fn plan(target: &Target, opts: &CheckpointOptions, has_tcp: bool) -> Result<Plan> {
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
