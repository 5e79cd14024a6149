//! The source container's cgroups, recorded at checkpoint and stood in for
//! at restore when they are gone.
//!
//! With the shim's default `cgroups = "ignore"` CRIU records each task's
//! cgroup paths (the source container's, e.g. `/k8s.io/<source id>`) and
//! puts the restored tasks back there before runc's are used;
//! `restore::adopt_cgroups` then moves them into the cgroups runc made for
//! the new container. `runc restore` maps the v1 controllers for CRIU, but
//! not the unified (v2) hierarchy of a hybrid host, so a restore under a new
//! container id after the source is gone (a CRI restore: Kubernetes creates
//! a new container from the checkpoint archive) failed with "cg: Can't move
//! into unified//k8s.io/<source id>/cgroup.procs". The checkpoint records
//! the source's cgroup directories in the manifest (`source_cgroups`); the
//! restore creates the missing ones as empty stand-ins for the moment CRIU
//! needs them and removes them once the tasks are adopted.

use std::path::{Path, PathBuf};

use criu_bridge::manifest::Manifest;

/// The manifest section.
pub const MANIFEST_KEY: &str = "source_cgroups";

/// The container's cgroup directories (controller → host path) from runc's
/// state, for the manifest; `None` when runc's state cannot be read.
pub fn record(runc_root: &Path, id: &str) -> Option<serde_json::Value> {
    let state = runc_root.join(id).join("state.json");
    let rc = criu_bridge::container::RuncContainer::from_state_file(&state)
        .map_err(|e| tracing::warn!(id, "source cgroups not recorded: {e}"))
        .ok()?;
    let paths: serde_json::Map<String, serde_json::Value> = rc
        .cgroup_paths()
        .map(|(c, p)| (c.to_string(), p.display().to_string().into()))
        .collect();
    Some(serde_json::json!({ "paths": paths }))
}

/// Empty cgroups created for a restore; removed (deepest first) on drop.
#[derive(Default)]
pub struct StandIns {
    created: Vec<PathBuf>,
}

/// Creates the recorded source cgroups that do not exist (only below
/// `/sys/fs/cgroup/`), except the restored container's own (same
/// `linux.cgroupsPath` in its bundle): runc makes those.
pub fn stand_in(manifest: Option<&Manifest>, id: &str, bundle: &Path) -> StandIns {
    let mut s = StandIns::default();
    let Some(paths) = manifest
        .and_then(|m| m.extensions.get(MANIFEST_KEY))
        .and_then(|v| v.get("paths"))
        .and_then(|v| v.as_object())
    else {
        return s;
    };
    let own = own_cgroups_path(bundle);
    for p in paths.values().filter_map(|v| v.as_str()).map(Path::new) {
        if !is_cgroup_dir(p) || p.exists() || own.as_deref().is_some_and(|o| is_own(p, o)) {
            continue;
        }
        // Parents first, remembering each one made here.
        let mut missing: Vec<&Path> = p.ancestors().take_while(|a| !a.exists()).collect();
        missing.reverse();
        for dir in missing {
            match std::fs::create_dir(dir) {
                Ok(()) => {
                    s.created.push(dir.to_path_buf());
                    inherit_cpuset(dir);
                }
                Err(e) => {
                    tracing::warn!(id, dir = %dir.display(), "cannot stand in for the source's cgroup: {e}");
                    break;
                }
            }
        }
    }
    if !s.created.is_empty() {
        tracing::info!(
            id,
            n = s.created.len(),
            "restore: the source's cgroups stood in for"
        );
    }
    s
}

/// The container's `linux.cgroupsPath` (cgroupfs form, `/a/b`).
fn own_cgroups_path(bundle: &Path) -> Option<String> {
    let text = std::fs::read(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let p = spec.pointer("/linux/cgroupsPath")?.as_str()?.trim();
    (p.starts_with('/') && p.len() > 1).then(|| p.to_string())
}

/// Whether the host cgroup directory `p` is the one for `cgroups_path`
/// (in any hierarchy: `/sys/fs/cgroup/<hierarchy>/<cgroups_path>`).
fn is_own(p: &Path, cgroups_path: &str) -> bool {
    p.to_str().is_some_and(|s| {
        s.trim_end_matches('/')
            .ends_with(cgroups_path.trim_end_matches('/'))
    })
}

/// A new v1 cpuset cgroup has no CPUs nor memory nodes, and no task can
/// join it ("No space left on device"): give it its parent's.
fn inherit_cpuset(dir: &Path) {
    let Some(parent) = dir.parent() else { return };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
            let _ = std::fs::write(dir.join(f), v.trim());
        }
    }
}

fn is_cgroup_dir(p: &Path) -> bool {
    p.is_absolute()
        && p.starts_with("/sys/fs/cgroup/")
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

impl Drop for StandIns {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!(dir = %dir.display(), "cannot remove a stand-in cgroup: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroup_paths() {
        assert!(is_cgroup_dir(Path::new(
            "/sys/fs/cgroup/unified/k8s.io/abc"
        )));
        assert!(!is_cgroup_dir(Path::new("/sys/fs/cgroup/../../etc")));
        assert!(!is_cgroup_dir(Path::new("/tmp/x")));
        assert!(!is_cgroup_dir(Path::new("sys/fs/cgroup/x")));
    }

    #[test]
    fn nothing_without_a_record() {
        let b = Path::new("/nonexistent");
        assert!(stand_in(None, "c", b).created.is_empty());
        let m = Manifest::new("c");
        assert!(stand_in(Some(&m), "c", b).created.is_empty());
    }

    #[test]
    fn own_paths_are_runcs() {
        assert!(is_own(
            Path::new("/sys/fs/cgroup/unified/k8s.io/abc"),
            "/k8s.io/abc"
        ));
        assert!(!is_own(
            Path::new("/sys/fs/cgroup/unified/k8s.io/abd"),
            "/k8s.io/abc"
        ));
    }
}
