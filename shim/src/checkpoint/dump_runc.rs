//! The runc strategy: `runc checkpoint`, with the network lock passed
//! through the shim's CRIU configuration file (runc has no flag for it).
//! No frozen-window hooks and no broker cut: runc runs CRIU itself.

use criu_bridge::config::{CriuConfig, NetworkLock as ConfLock};
use criu_bridge::container::{LockMethod, NetworkLock};
use criu_bridge::stats::read_dump_stats;

use super::{DumpJob, Dumped};
use crate::criu_conf;
use crate::criu_log::criu_errors;
use crate::error::{Error, Result};
use crate::runc::CheckpointArgs;

/// `runc checkpoint` with the shim's CRIU configuration.
pub(super) async fn dump(job: &DumpJob<'_>, has_tcp: &std::io::Result<bool>) -> Result<Dumped> {
    let DumpJob {
        target,
        image_path,
        work_path,
        opts,
        plan,
    } = *job;
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
    let runc = target.runc.with_criu(&plan.criu);
    if let Err(e) = runc.checkpoint(&target.id, &args).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_lock_only_when_tcp() {
        assert_eq!(plan_network_lock(&Ok(false)).0, Some(ConfLock::Skip));
        assert_eq!(plan_network_lock(&Ok(true)).0, None);
        assert_eq!(
            plan_network_lock(&Err(std::io::Error::other("gone"))).0,
            None
        );
    }
}
