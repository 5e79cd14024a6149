//! The ms2m manifest of a checkpoint (`ms2m-manifest.json`, written beside
//! CRIU's images so it travels with them): what was dumped and how (the
//! request's options, the strategy and why, CRIU's statistics), by which
//! shim, runc and CRIU, the frozen-window records and the broker cut. A
//! restore reads it back ([`crate::restore`]).

use std::path::Path;

use containerd_shim_protos::shim::oci::CheckpointOptions;
use criu_bridge::features::Features;
use criu_bridge::manifest::Manifest;

use super::plan::{Method, Plan};
use super::tap::TapAtCheckpoint;
use super::{describe, Dumped, Target, WorkDir};
use crate::broker;
use crate::error::{Error, Result};
use crate::runc::runc_version;

/// The manifest of a successful dump of `target` into `image_path` (its
/// timings are the caller's to fill in).
pub(super) async fn build(
    target: &Target,
    image_path: &Path,
    opts: &CheckpointOptions,
    plan: &Plan,
    dumped: Dumped,
    broker: Option<&TapAtCheckpoint>,
    work: &WorkDir,
) -> Result<Manifest> {
    let id = &target.id;
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
    m.options.work_path = (!work.temporary).then(|| work.path.display().to_string());
    m.options.cgroups_mode = dumped.cgroups_mode;
    m.options.empty_namespaces = if plan.method == Method::Runc {
        opts.empty_namespaces.clone()
    } else {
        vec!["network".to_string()]
    };
    m.strategy.name = plan.method.name().to_string();
    m.strategy.reason = plan.reason.clone();
    m.stats = dumped.stats;
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
    if let Some(b) = broker {
        let cut = dumped.cut.as_ref().ok_or_else(|| {
            Error::Internal(format!(
                "{}: the dump succeeded but the frozen-window hook captured no broker cut",
                describe(id, image_path)
            ))
        })?;
        let after = if opts.exit {
            "closed-for-exit"
        } else if b.hold {
            "held"
        } else {
            "released"
        };
        ext.insert(
            broker::MANIFEST_KEY.into(),
            broker::section(cut, b.upstream_reachable, after)?,
        );
    }
    if let Some(src) = &target.config.source {
        ext.insert(
            crate::config::MANIFEST_CONFIG_KEY.into(),
            serde_json::json!({ "path": src }),
        );
    }
    if let Some(c) = crate::source_cgroups::record(&target.runc_root, id) {
        ext.insert(crate::source_cgroups::MANIFEST_KEY.into(), c);
    }
    Ok(m)
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
