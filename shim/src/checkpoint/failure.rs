//! What a failed dump leaves behind: CRIU's dump.log where a user looks
//! (beside the images and in the bundle), and the container as it was
//! (thawed if the dump left it frozen, still paused if it was paused).

use std::path::{Path, PathBuf};

use super::Target;

/// Copies CRIU's dump.log from the work directory into the image directory
/// and the bundle (as criu-dump.log). Returns where it can be read.
pub(super) fn keep_dump_log(work: &Path, images: &Path, bundle: &Path) -> Option<PathBuf> {
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
pub(super) async fn ensure_running(target: &Target) -> String {
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
