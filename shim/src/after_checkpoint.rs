//! What a tapped container's AMQP tap does after a leave-running checkpoint,
//! chosen per container with the annotation `io.ms2m.tap.after-checkpoint`:
//!
//! - `release` (default): deliveries held for the quiesce flow again as soon
//!   as the cut is taken; the container goes on consuming (the checkpoint is
//!   a snapshot, e.g. the kubelet's forensic checkpoint).
//! - `hold`: deliveries stay held after the cut. The container keeps running
//!   (it answers execs and probes, its state is intact) but is handed no
//!   new message, so it processes and publishes nothing past the cut: the
//!   checkpoint can then be restored elsewhere with exact replay, without a
//!   fence. This is how a Kubernetes operator moves a consumer through CRI
//!   (`CheckpointContainer` is always leave-running; docs/kubernetes.md). The
//!   hold ends with the container, or with its next checkpoint.
//!
//! Read from the bundle's `config.json` at checkpoint time, so the shim's
//! configuration code is untouched; a bad value fails the checkpoint before
//! anything is held or frozen.

use std::path::Path;

use crate::error::{Error, Result};

/// The annotation.
pub const AFTER_CHECKPOINT_ANNOTATION: &str = "io.ms2m.tap.after-checkpoint";

/// Whether the tap keeps holding deliveries after a leave-running
/// checkpoint of the container whose bundle is `bundle`.
pub fn hold(bundle: &Path) -> Result<bool> {
    let file = bundle.join("config.json");
    let text =
        std::fs::read(&file).map_err(|e| Error::internal(format!("read {}", file.display()), e))?;
    let spec: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::internal(format!("parse {}", file.display()), e))?;
    parse(
        spec.get("annotations")
            .and_then(|a| a.get(AFTER_CHECKPOINT_ANNOTATION))
            .and_then(|v| v.as_str()),
    )
}

fn parse(value: Option<&str>) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") | Some("release") => Ok(false),
        Some("hold") => Ok(true),
        Some(other) => Err(Error::InvalidArgument(format!(
            "annotation {AFTER_CHECKPOINT_ANNOTATION} is {other:?}: expected \"release\" or \"hold\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert!(!parse(None).unwrap());
        assert!(!parse(Some("release")).unwrap());
        assert!(parse(Some(" hold ")).unwrap());
        let e = parse(Some("keep")).unwrap_err().to_string();
        assert!(
            e.contains(AFTER_CHECKPOINT_ANNOTATION) && e.contains("\"keep\""),
            "{e}"
        );
    }

    #[test]
    fn reads_the_bundle() {
        let dir = std::env::temp_dir().join(format!("ms2m-after-ck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"annotations":{{"{AFTER_CHECKPOINT_ANNOTATION}":"hold"}}}}"#),
        )
        .unwrap();
        assert!(hold(&dir).unwrap());
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert!(!hold(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
