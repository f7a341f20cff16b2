//! The one place where niix errors become gRPC statuses and HTTP statuses.
//!
//! Every service returns [`Error`]; its [`From`] impl for [`tonic::Status`]
//! picks the code and attaches the `google.rpc` rich error details clients
//! act on without parsing text (see docs/protocol.md, "Error details"):
//! `BadRequest` on INVALID_ARGUMENT, `ResourceInfo` on NOT_FOUND,
//! `RetryInfo` on UNAVAILABLE and on a RESOURCE_EXHAUSTED that passes. The
//! mapping is reviewed and tested here only. [`Error::http_status`] picks the
//! officer console's HTTP status.

use std::time::Duration;

use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

/// How long a client waits before retrying a request refused because the
/// server was busy or shutting down (`google.rpc.RetryInfo`).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// An error a niix service reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or violates the protocol.
    #[error("{0}")]
    InvalidArgument(String),
    /// One field of the request is invalid: INVALID_ARGUMENT whose
    /// `BadRequest` detail names the field.
    #[error("{message}")]
    InvalidField {
        /// The field's path in the request, e.g. `header.scan_id`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Bytes were lost or corrupted in transit (truncated stream, digest mismatch).
    #[error("{0}")]
    DataLoss(String),
    /// A configured limit was exceeded: the same request fails again.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server is busy (all upload slots taken): the same request may
    /// succeed after [`RETRY_AFTER`].
    #[error("{0}")]
    Busy(String),
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
    /// A named object does not exist: NOT_FOUND whose `ResourceInfo` detail
    /// names it.
    #[error("{message}")]
    Missing {
        /// The kind of object, e.g. `scan`, `model`.
        resource_type: &'static str,
        /// Its name or id.
        name: String,
        /// What the caller can do.
        message: String,
    },
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
            Error::InvalidArgument(_) | Error::InvalidField { .. } => tonic::Code::InvalidArgument,
            Error::DataLoss(_) => tonic::Code::DataLoss,
            Error::ResourceExhausted(_) | Error::Busy(_) => tonic::Code::ResourceExhausted,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::NotFound(_) | Error::Missing { .. } => tonic::Code::NotFound,
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
        let details = match &e {
            // The field is empty when the request as a whole is wrong.
            Error::InvalidArgument(m) => ErrorDetails::with_bad_request_violation("", m.as_str()),
            Error::InvalidField { field, message } => {
                ErrorDetails::with_bad_request_violation(field.as_str(), message.as_str())
            }
            Error::NotFound(m) => ErrorDetails::with_resource_info("", "", "", m.as_str()),
            Error::Missing { resource_type, name, message } => {
                ErrorDetails::with_resource_info(*resource_type, name.as_str(), "", message.as_str())
            }
            Error::Busy(_) | Error::Unavailable(_) => ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            _ => return tonic::Status::new(e.code(), e.to_string()),
        };
        tonic::Status::with_error_details(e.code(), e.to_string(), details)
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
    fn statuses_carry_the_details_a_client_acts_on() {
        let s: tonic::Status =
            Error::InvalidField { field: "header.scan_id".into(), message: "not a UUID".into() }.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let v = s.get_error_details().bad_request().unwrap().field_violations[0].clone();
        assert_eq!((v.field.as_str(), v.description.as_str()), ("header.scan_id", "not a UUID"));

        let s: tonic::Status =
            Error::Missing { resource_type: "scan", name: "0f8e".into(), message: "no scan 0f8e".into() }.into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        let r = s.get_error_details().resource_info().cloned().unwrap();
        assert_eq!((r.resource_type.as_str(), r.resource_name.as_str()), ("scan", "0f8e"));

        for e in [Error::Busy("all slots taken".into()), Error::Unavailable("shutting down".into())] {
            let s: tonic::Status = e.into();
            assert_eq!(s.get_error_details().retry_info().unwrap().retry_delay, Some(RETRY_AFTER));
        }
        // A limit that the same request exceeds again promises no retry.
        let s: tonic::Status = Error::ResourceExhausted("plane too large".into()).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.get_error_details().retry_info().is_none());
        assert!(s.details().is_empty());
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
