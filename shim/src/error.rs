//! The shim's error type and its mapping onto ttrpc status codes, which
//! containerd turns back into its own error kinds (not found, failed
//! precondition, ...).

use containerd_shim_protos::ttrpc::{self, Code};

/// A task-service error. The message always says what was being done, to
/// which container or process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The container or process does not exist (or has already finished,
    /// for a kill).
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid in the current state of the process.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The id is already in use.
    #[error("{0}")]
    AlreadyExists(String),
    /// Anything else: a runc or CRIU failure, an I/O error.
    #[error("{0}")]
    Internal(String),
}

/// Result of the shim's own operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An internal error built from a context and a cause.
    pub fn internal(context: impl std::fmt::Display, cause: impl std::fmt::Display) -> Self {
        Error::Internal(format!("{context}: {cause}"))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::Internal(_) => Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_ttrpc_codes() {
        let e: ttrpc::Error = Error::NotFound("container c1 not found".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "container c1 not found");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
