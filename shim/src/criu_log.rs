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

#[cfg(test)]
mod tests {
    use super::*;

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
