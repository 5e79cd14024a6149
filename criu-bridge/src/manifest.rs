//! The ms2m checkpoint manifest: a JSON file beside CRIU's images that says
//! what was checkpointed, how, and what it cost.
//!
//! The manifest is versioned. Readers accept any version up to
//! [`MANIFEST_VERSION`] and keep sections they do not know
//! ([`Manifest::extensions`]), so later releases can add sections (the broker
//! cut, for one) without breaking older readers of the fields they share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::stats::{DumpStats, RestoreStats};
use crate::Error;

/// File name of the manifest inside a checkpoint's image directory.
pub const MANIFEST_FILE: &str = "ms2m-manifest.json";

/// File name of the publish fence beside the manifest: what the source of
/// a leave-running checkpoint published after the cut, written by `ms2m
/// fence` (the shim's answer to a [`FENCE_REQUEST_TYPE_URL`] update) and
/// read at restore (docs/broker.md, "The fence").
pub const FENCE_FILE: &str = "ms2m-fence.json";

/// `type_url` of the task `Update` resources that ask ms2m's shim for a
/// fence instead of a resource update; the value is a JSON
/// [`FenceRequest`].
pub const FENCE_REQUEST_TYPE_URL: &str = "ms2m.io/fence.v1";

/// The body of a fence request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    /// The checkpoint directory (its manifest holds the cut the fence
    /// closes); the fence is written there as [`FENCE_FILE`].
    pub image_path: String,
}
/// `type_url` of the task `Update` resources that drive the source side of
/// a live migration (`ms2m migrate`) in ms2m's shim; the value is a JSON
/// [`MigrateRequest`].
pub const MIGRATE_REQUEST_TYPE_URL: &str = "ms2m.io/migrate.v1";

/// The body of a migrate request, one per step of the source's part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MigrateRequest {
    /// Before the checkpoint: refuse at once what cannot be migrated live
    /// (no tap, a no-ack classic consumer), so the source is not frozen for
    /// nothing, and arm the classic-queue mirror for the coming cut.
    Check {
        /// The migration.
        migration_id: String,
    },
    /// Become the source of a migration from the leave-running checkpoint
    /// in `image_path`: announce the tap's progress into the migration's
    /// broker room.
    Start {
        /// The migration (names the broker room).
        migration_id: String,
        /// The checkpoint the target restores (its cut is where the source
        /// counts publishes from).
        image_path: String,
    },
    /// Fence the source (hold, wait at most `timeout_ms` for acks, count
    /// publishes) and send the fence into the room. Deliveries stay held.
    Cutover {
        /// The migration.
        migration_id: String,
        /// Quiesce bound, ms.
        timeout_ms: u64,
    },
    /// Abandon the migration: the source goes on (a fence's hold is
    /// released).
    Abort {
        /// The migration.
        migration_id: String,
        /// Why, for the logs and the room.
        reason: String,
    },
}

/// The `schema` every manifest carries.
pub const MANIFEST_SCHEMA: &str = "ms2m.checkpoint";
/// The manifest version this build writes, and the newest it reads.
pub const MANIFEST_VERSION: u32 = 1;

/// Everything ms2m records about one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_SCHEMA`].
    pub schema: String,
    /// Format version, see [`MANIFEST_VERSION`].
    pub version: u32,
    /// The checkpointed container.
    pub container_id: String,
    /// containerd namespace of the container, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// When the checkpoint was taken, RFC 3339, UTC.
    pub created_at: String,
    /// The same instant, milliseconds since the Unix epoch.
    pub created_at_unix_ms: u64,
    /// Which software took the checkpoint.
    pub runtime: RuntimeInfo,
    /// The dump options used.
    pub options: DumpOptions,
    /// How the checkpoint was taken, and why that way.
    pub strategy: Strategy,
    /// CRIU's own statistics for the dump, when it wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<DumpStats>,
    /// Wall times the shim measured.
    #[serde(default)]
    pub timings: Timings,
    /// Sections this version does not interpret, kept as they are.
    #[serde(flatten)]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

/// The software that took a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// The shim binary, e.g. `containerd-shim-ms2m-v1`.
    pub shim: String,
    /// Its version.
    pub shim_version: String,
    /// The OCI runtime binary that drove CRIU, e.g. `runc`.
    pub oci_runtime: String,
    /// Its version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_runtime_version: Option<String>,
    /// CRIU's version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_version: Option<String>,
}

/// The options a checkpoint was dumped with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DumpOptions {
    /// The container was stopped by the dump (otherwise it kept running).
    pub exit: bool,
    /// Established TCP connections were dumped (CRIU `--tcp-established`).
    #[serde(default)]
    pub tcp_established: bool,
    /// TCP connections are restored closed (CRIU `tcp-close`).
    #[serde(default)]
    pub tcp_close: bool,
    /// External Unix sockets were allowed (`--ext-unix-sk`).
    #[serde(default)]
    pub external_unix_sockets: bool,
    /// Dumped as a shell job (terminal attached).
    #[serde(default)]
    pub shell_job: bool,
    /// File locks were dumped.
    #[serde(default)]
    pub file_locks: bool,
    /// CRIU's network lock method: `iptables`, `nftables` or `skip`.
    #[serde(default)]
    pub network_lock: String,
    /// Where the images were written.
    pub image_path: String,
    /// CRIU's work directory (logs, statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_path: Option<String>,
    /// A parent (pre-dump) image directory, for incremental dumps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_path: Option<String>,
    /// runc's `--manage-cgroups-mode`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups_mode: Option<String>,
    /// Namespaces dumped empty (`--empty-ns`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub empty_namespaces: Vec<String>,
}

/// How a checkpoint was taken and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// A short name, e.g. `runc-criu-dump`.
    pub name: String,
    /// Why this strategy and these options were chosen, for a human.
    pub reason: String,
}

/// Wall-clock times measured by the shim, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From the checkpoint request to the manifest being written.
    pub total_ms: f64,
    /// The dump itself (the OCI runtime's checkpoint command).
    pub dump_ms: f64,
}

impl Manifest {
    /// A manifest for `container_id`, stamped now, with empty sections.
    pub fn new(container_id: &str) -> Manifest {
        let now = SystemTime::now();
        let unix_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Manifest {
            schema: MANIFEST_SCHEMA.to_string(),
            version: MANIFEST_VERSION,
            container_id: container_id.to_string(),
            namespace: None,
            created_at: humantime::format_rfc3339_millis(now).to_string(),
            created_at_unix_ms: unix_ms,
            runtime: RuntimeInfo::default(),
            options: DumpOptions::default(),
            strategy: Strategy::default(),
            stats: None,
            timings: Timings::default(),
            extensions: BTreeMap::new(),
        }
    }

    /// Path of the manifest inside the image directory `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Writes the manifest into the image directory `dir`, atomically (a
    /// reader sees the old file or the whole new one). Returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, Error> {
        let path = Self::path_in(dir);
        let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::malformed(&path, format!("cannot encode manifest: {e}")))?;
        std::fs::write(&tmp, json).map_err(|e| Error::io("write checkpoint manifest", &tmp, e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io("write checkpoint manifest", &path, e))?;
        Ok(path)
    }

    /// Reads and validates the manifest in the image directory `dir` (or the
    /// manifest file itself).
    pub fn read(dir: &Path) -> Result<Manifest, Error> {
        let path = if dir.is_dir() {
            Self::path_in(dir)
        } else {
            dir.to_path_buf()
        };
        let data =
            std::fs::read(&path).map_err(|e| Error::io("read checkpoint manifest", &path, e))?;
        Self::from_slice(&data).map_err(|reason| Error::malformed(&path, reason))
    }

    /// Parses and validates a manifest from JSON bytes.
    pub fn from_slice(data: &[u8]) -> Result<Manifest, String> {
        // Look at schema and version first, so a newer manifest gets a clear
        // message rather than a complaint about a missing field.
        let head: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| format!("not valid JSON: {e}"))?;
        let schema = head.get("schema").and_then(|s| s.as_str());
        if schema != Some(MANIFEST_SCHEMA) {
            return Err(format!(
                "not an ms2m checkpoint manifest (schema {schema:?}, expected {MANIFEST_SCHEMA:?})"
            ));
        }
        let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version == 0 || version > u64::from(MANIFEST_VERSION) {
            return Err(format!(
                "manifest version {version} is not supported (this ms2m reads versions 1 to {MANIFEST_VERSION})"
            ));
        }
        serde_json::from_value(head).map_err(|e| format!("invalid manifest: {e}"))
    }
}

/// CRIU's restore statistics in a form ready to log or print.
pub fn describe_restore(stats: &RestoreStats) -> String {
    format!(
        "restore {:.1} ms (forking {:.1} ms), {} pages restored",
        stats.restore_time_us as f64 / 1000.0,
        stats.forking_time_us as f64 / 1000.0,
        stats.pages_restored
    )
}

/// CRIU's dump statistics in a form ready to log or print.
pub fn describe_dump(stats: &DumpStats) -> String {
    format!(
        "frozen {:.1} ms (freezing {:.1} ms, memdump {:.1} ms, memwrite {:.1} ms), {} pages written",
        stats.frozen_time_us as f64 / 1000.0,
        stats.freezing_time_us as f64 / 1000.0,
        stats.memdump_time_us as f64 / 1000.0,
        stats.memwrite_time_us as f64 / 1000.0,
        stats.pages_written
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("criu-bridge-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trip_keeps_unknown_sections() {
        let dir = tmpdir("manifest-rt");
        let mut m = Manifest::new("c1");
        m.options.image_path = dir.display().to_string();
        m.stats = Some(DumpStats {
            frozen_time_us: 12_000,
            ..Default::default()
        });
        m.extensions
            .insert("broker".into(), serde_json::json!({"queues": []}));
        m.write(&dir).unwrap();
        let back = Manifest::read(&dir).unwrap();
        assert_eq!(back, m);
        assert!(back.extensions.contains_key("broker"));
        assert!(m.created_at.ends_with('Z'));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_other_schemas_and_newer_versions() {
        let err = Manifest::from_slice(br#"{"schema":"x","version":1}"#).unwrap_err();
        assert!(err.contains("not an ms2m checkpoint manifest"), "{err}");
        let err =
            Manifest::from_slice(br#"{"schema":"ms2m.checkpoint","version":99}"#).unwrap_err();
        assert!(err.contains("version 99 is not supported"), "{err}");
        let err = Manifest::from_slice(b"{not json").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = Manifest::from_slice(br#"{"schema":"ms2m.checkpoint","version":1}"#).unwrap_err();
        assert!(err.contains("container_id"), "{err}");
    }

    #[test]
    fn describes_stats() {
        let s = DumpStats {
            frozen_time_us: 15_500,
            pages_written: 10,
            ..Default::default()
        };
        assert!(describe_dump(&s).starts_with("frozen 15.5 ms"));
    }
}
