//! CRIU's logs as the shim quotes them: a failed checkpoint's or restore's
//! error carries CRIU's own last error lines, so the caller sees why
//! without opening the log. Shared by [`crate::checkpoint`] and
//! [`crate::restore`], which otherwise know nothing of each other.

/// The last error lines of a CRIU log, joined (at most three).
pub fn criu_errors(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .map(str::trim)
        .collect();
    errors[errors.len().saturating_sub(3)..].join(" | ")
}

/// The notification stage CRIU reached last ("pre-resume"), from a log at
/// level 4 (runc's), which records each one ("Running pre-resume
/// scripts"): where a CRIU that died without an error line was.
pub fn last_stage(log: &str) -> Option<&str> {
    log.lines().rev().find_map(|l| {
        let (_, rest) = l.split_once("Running ")?;
        rest.trim().strip_suffix(" scripts")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_stage() {
        let log = "(00.1) Running pre-restore scripts\n(00.2) Running pre-resume scripts\n\
                   (00.3) Error (criu/util.c:1): rlimit\n";
        assert_eq!(last_stage(log), Some("pre-resume"));
        assert_eq!(last_stage("nothing\n"), None);
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
}
