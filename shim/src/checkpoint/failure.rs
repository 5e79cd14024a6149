//! What a failed dump leaves behind: CRIU's dump.log where a user looks
//! (beside the images and in the bundle), the container as it was (thawed
//! if the dump left it frozen, still paused if it was paused, its network
//! unlocked), and no images: what the failed dump wrote is removed, so
//! nothing takes it for a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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

/// After a failed dump: removes CRIU's network lock from the container's
/// network namespace. A CRIU killed between its `network-lock` and
/// `post-dump` notifications (or timed out there) leaves it, and the
/// container runs on with no network at all, loopback included. No other
/// CRIU dumps this container meanwhile: the checkpoint holds its lock.
/// Returns a note for the error message.
pub(super) async fn release_network_lock(target: &Target) -> String {
    let pid = target.init_pid as u32;
    let released = tokio::task::spawn_blocking(move || {
        // In the host's namespace CRIU takes no namespace lock, and rules
        // there are not the container's to remove.
        if !criu_bridge::netlock::has_own_netns(pid)? {
            return Ok(Vec::new());
        }
        criu_bridge::netlock::release(pid)
    })
    .await;
    match released {
        Ok(Ok(removed)) if removed.is_empty() => String::new(),
        Ok(Ok(removed)) => {
            tracing::warn!(id = %target.id, ?removed, "the failed dump left CRIU's network lock: removed");
            format!(
                "; CRIU's network lock was left in the container's network namespace and has been removed ({})",
                removed.join(", ")
            )
        }
        Ok(Err(e)) => {
            format!("; CRIU's network lock may be left in the container's network namespace: {e}")
        }
        Err(e) => {
            format!("; CRIU's network lock may be left in the container's network namespace: {e}")
        }
    }
}

/// The files of an image directory before a dump, and when each was last
/// written: what the dump writes is told apart from what was there.
pub(super) struct Before(HashMap<std::ffi::OsString, Option<SystemTime>>);

impl Before {
    pub(super) fn take(images: &Path) -> Before {
        let files = std::fs::read_dir(images)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let mtime = e.metadata().and_then(|m| m.modified()).ok();
                        (e.file_name(), mtime)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Before(files)
    }
}

/// After a failed dump: removes the files it wrote into the image
/// directory (new or rewritten since `before`), but the kept log. A dump
/// killed at `post-dump` has written every image, `inventory.img`
/// included: left there, `ms2m inspect`, `ms2m restore` and `runc
/// restore` would take it for a checkpoint, one whose broker cut and
/// manifest never came. Returns a note for the error message.
pub(super) fn discard_images(images: &Path, before: &Before, keep: Option<&Path>) -> String {
    let Ok(dir) = std::fs::read_dir(images) else {
        return String::new();
    };
    let mut failed = Vec::new();
    let mut removed = 0usize;
    for e in dir.flatten() {
        let path = e.path();
        if Some(path.as_path()) == keep || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let mtime = e.metadata().and_then(|m| m.modified()).ok();
        if before
            .0
            .get(&e.file_name())
            .is_some_and(|was| *was == mtime)
        {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(err) => failed.push(format!("{}: {err}", path.display())),
        }
    }
    match (removed, failed.is_empty()) {
        (0, true) => String::new(),
        (n, true) => format!("; the {n} files the failed dump wrote were removed (no checkpoint)"),
        (_, false) => format!(
            "; could not remove what the failed dump wrote, it is no checkpoint: {}",
            failed.join(", ")
        ),
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

    #[test]
    fn only_what_the_dump_wrote_is_discarded() {
        let dir = std::env::temp_dir().join(format!("ms2m-shim-discard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "the user's").unwrap();
        std::fs::write(dir.join("inventory.img"), "old").unwrap();
        let before = Before::take(&dir);
        // The dump rewrites one file (a later mtime) and adds others.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("inventory.img"))
            .unwrap();
        f.set_modified(later).unwrap();
        for n in ["pages-1.img", "dump.log"] {
            std::fs::write(dir.join(n), "new").unwrap();
        }
        let note = discard_images(&dir, &before, Some(&dir.join("dump.log")));
        assert!(note.contains("2 files"), "{note}");
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["dump.log", "notes.txt"]);
        assert_eq!(discard_images(&dir, &Before::take(&dir), None), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
