use std::path::PathBuf;

/// Errors of the CRIU bridge. Each says what was being done, to which file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("read CRIU stats", "write manifest", ...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what they must be.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Running a CRIU command failed.
    #[error("{command}: {reason}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Why it failed.
        reason: String,
    },
    /// A CRIU RPC request failed; `failure` says how (CRIU refused, a
    /// callback failed, CRIU died, timed out, ...).
    #[error("{action}: {detail}")]
    Criu {
        /// What was being done ("dump pid 1234", "restore from /dev/shm/x").
        action: String,
        /// How it failed.
        failure: crate::rpc::CriuFailure,
        /// CRIU's error message, exit status, log file.
        detail: String,
    },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Malformed {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
