//! The CRIU configuration file runc hands to CRIU.
//!
//! runc reads the path of a CRIU configuration file from the OCI annotation
//! `org.criu.config` (when the container is created; it is kept in runc's
//! state) and passes it to CRIU on checkpoint and restore. At create, when
//! the spec has no such annotation, the shim adds one pointing to
//! `<bundle>/ms2m-criu.conf`, a file it then owns and rewrites before each
//! checkpoint and restore. A user's own annotation is left alone.

use std::path::{Path, PathBuf};

use criu_bridge::config::{CriuConfig, CRIU_CONFIG_ANNOTATION};

use crate::error::{Error, Result};

/// The shim's CRIU configuration file, in the bundle.
pub const CONF_FILE: &str = "ms2m-criu.conf";

/// Makes sure `<bundle>/config.json` names a CRIU configuration file.
/// Returns the path of the file when the shim owns it (it added the
/// annotation), `None` when the spec already named one.
pub fn ensure_annotation(bundle: &Path) -> Result<Option<PathBuf>> {
    let config = bundle.join("config.json");
    let text = std::fs::read(&config)
        .map_err(|e| Error::internal(format!("read {}", config.display()), e))?;
    let ours = bundle.join(CONF_FILE);
    let Some(new_text) = add_annotation(&text, &ours)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", config.display())))?
    else {
        return Ok(None);
    };
    let tmp = bundle.join("config.json.ms2m-tmp");
    std::fs::write(&tmp, new_text)
        .and_then(|()| std::fs::rename(&tmp, &config))
        .map_err(|e| Error::internal(format!("write {}", config.display()), e))?;
    write(&ours, &CriuConfig::new())?;
    Ok(Some(ours))
}

/// Writes the configuration file.
pub fn write(path: &Path, config: &CriuConfig) -> Result<()> {
    config
        .write(path)
        .map_err(|e| Error::internal("write the CRIU configuration", e))
}

/// The spec with the annotation added, or `None` when it already has one.
/// Edits the JSON tree so fields the shim does not know survive.
fn add_annotation(spec: &[u8], path: &Path) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(spec).map_err(|e| format!("not a valid OCI spec: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "not a JSON object".to_string())?;
    let ann = obj
        .entry("annotations")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if ann.is_null() {
        *ann = serde_json::Value::Object(Default::default());
    }
    let ann = ann
        .as_object_mut()
        .ok_or_else(|| "annotations is not an object".to_string())?;
    if ann.contains_key(CRIU_CONFIG_ANNOTATION) {
        return Ok(None);
    }
    ann.insert(
        CRIU_CONFIG_ANNOTATION.to_string(),
        serde_json::Value::String(path.display().to_string()),
    );
    serde_json::to_vec(&v)
        .map(Some)
        .map_err(|e| format!("serialize: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_annotation_keeping_other_fields() {
        let spec = br#"{"ociVersion":"1.0.2","process":{"args":["sh"]},"x-unknown":1}"#;
        let out = add_annotation(spec, Path::new("/b/ms2m-criu.conf"))
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["annotations"]["org.criu.config"], "/b/ms2m-criu.conf");
        assert_eq!(v["x-unknown"], 1);
        assert_eq!(v["process"]["args"][0], "sh");
    }

    #[test]
    fn keeps_user_annotation() {
        let spec = br#"{"annotations":{"org.criu.config":"/etc/criu/mine.conf"}}"#;
        assert!(add_annotation(spec, Path::new("/b/x")).unwrap().is_none());
        let null_ann = br#"{"annotations":null}"#;
        assert!(add_annotation(null_ann, Path::new("/b/x"))
            .unwrap()
            .is_some());
    }

    #[test]
    fn rejects_garbage() {
        assert!(add_annotation(b"[1,2]", Path::new("/b/x")).is_err());
        assert!(add_annotation(b"{", Path::new("/b/x")).is_err());
    }
}
