//! The one place where niix errors become gRPC statuses and HTTP statuses.
//!
//! Every service returns [`Error`]; its [`From`] impl for [`tonic::Status`]
//! picks the gRPC code, [`Error::http_status`] the officer console's HTTP
//! status, so the mapping is reviewed and tested here only.

use crate::store::StoreError;

/// An error a niix service reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or violates the protocol.
    #[error("{0}")]
    InvalidArgument(String),
    /// Bytes were lost or corrupted in transit (truncated stream, digest mismatch).
    #[error("{0}")]
    DataLoss(String),
    /// A configured limit was exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The scan id is taken by a scan with different content.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request conflicts with the state on the server.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent operation on the same object is in progress.
    #[error("{0}")]
    Aborted(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not prove who they are (no, unknown or expired credentials).
    #[error("{0}")]
    Unauthenticated(String),
    /// The server is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The client went silent for longer than the server waits.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The storage layer failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// A bug or a panic inside the server.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::DataLoss(_) => tonic::Code::DataLoss,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Error::Store(StoreError::Tampered(_)) => tonic::Code::DataLoss,
            Error::Store(_) | Error::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl Error {
    /// The HTTP status this error maps to (the officer console).
    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as H;
        match self.code() {
            tonic::Code::InvalidArgument => H::BAD_REQUEST,
            tonic::Code::Unauthenticated => H::UNAUTHORIZED,
            tonic::Code::PermissionDenied => H::FORBIDDEN,
            tonic::Code::NotFound => H::NOT_FOUND,
            tonic::Code::AlreadyExists | tonic::Code::Aborted => H::CONFLICT,
            tonic::Code::FailedPrecondition => H::PRECONDITION_FAILED,
            tonic::Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable => H::SERVICE_UNAVAILABLE,
            tonic::Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
            _ => H::INTERNAL_SERVER_ERROR,
        }
    }

    /// What a client stream that broke means: a message that did not parse
    /// is the sender's fault (INVALID_ARGUMENT, see `niix_proto::codec`), so
    /// is a message over the transport's size limit (RESOURCE_EXHAUSTED);
    /// anything else lost bytes in transit (DATA_LOSS, `what: cause`).
    pub fn broken_stream(status: tonic::Status, what: &str) -> Error {
        match status.code() {
            tonic::Code::InvalidArgument => Error::InvalidArgument(status.message().to_string()),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Error::ResourceExhausted(format!(
                "{what}: {}; no message may exceed 4 MiB: a PlaneChunk carries at most {} data bytes \
                 (niix push sends 1 MiB)",
                status.message(),
                niix_proto::MAX_CHUNK_DATA
            )),
            _ => Error::DataLoss(format!("{what}: {}", status.message())),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        if matches!(e, Error::Store(StoreError::Tampered(_))) {
            tracing::error!(error = %e, "refusing to send stored data that was altered");
        } else if matches!(e, Error::Store(_) | Error::Internal(_)) {
            tracing::error!(error = %e, "request failed inside the server");
        }
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Runs blocking work (file or database I/O, hashing, decoding) on the
/// blocking pool; a panic there becomes INTERNAL instead of a crash.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// Shorthand for service results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_variant() {
        let s: tonic::Status = Error::DataLoss("plane 0 truncated".into()).into();
        assert_eq!(s.code(), tonic::Code::DataLoss);
        assert_eq!(s.message(), "plane 0 truncated");
        let s: tonic::Status = Error::Store(StoreError::Corrupt("x".into())).into();
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(s.message().starts_with("storage failure"));
        let s: tonic::Status = Error::Store(StoreError::Tampered("plane 0 of scan x".into())).into();
        assert_eq!(s.code(), tonic::Code::DataLoss);
        assert!(s.message().contains("altered"), "{}", s.message());
    }

    #[test]
    fn http_statuses_follow_the_code() {
        use http::StatusCode as H;
        assert_eq!(Error::Unauthenticated("x".into()).http_status(), H::UNAUTHORIZED);
        assert_eq!(Error::PermissionDenied("x".into()).http_status(), H::FORBIDDEN);
        assert_eq!(Error::NotFound("x".into()).http_status(), H::NOT_FOUND);
        assert_eq!(Error::InvalidArgument("x".into()).http_status(), H::BAD_REQUEST);
        assert_eq!(Error::Store(StoreError::Tampered("x".into())).http_status(), H::INTERNAL_SERVER_ERROR);
    }
}
