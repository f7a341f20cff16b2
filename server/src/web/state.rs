//! What every console handler shares ([`Web`]: the services, sessions,
//! tile cache), how a request's session is checked, and how an error is
//! answered ([`ApiError`]).

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use tokio::sync::Semaphore;

use super::pyramid::{PyramidMetrics, Pyramids};
use super::session::{COOKIE, CSRF_HEADER, Session, Sessions};
use super::tiles::TileCache;
use crate::audit::{Caller, Gate};
use crate::auth::Authenticator;
use crate::error::Error;
use crate::findings::FindingsService;
use crate::material::Calibrations;

/// Tiles rendered at once (each uses a core while it decodes).
const RENDERS_AT_ONCE: usize = 2;

/// The client certificate a console connection presented under mutual TLS
/// (its SHA-256 fingerprint), or `None`; handlers take it as
/// `ConnectInfo<ClientCertificate>`.
#[derive(Debug, Clone, Default)]
pub struct ClientCertificate(pub Option<String>);

/// What every console handler shares.
#[derive(Clone)]
pub struct Web {
    pub(super) findings: FindingsService,
    pub(super) auth: Arc<Authenticator>,
    pub(super) gate: Gate,
    pub(super) sessions: Arc<Sessions>,
    pub(super) tiles: Arc<TileCache>,
    pub(super) pyramids: Arc<Pyramids>,
    pub(super) materials: Arc<Calibrations>,
    pub(super) renders: Arc<Semaphore>,
    pub(super) secure_cookie: bool,
    /// On a server without authentication: the one token that signs in
    /// (as this workstation), made at start and printed by `niix serve`.
    pub(super) workstation_token: Option<String>,
}

impl Web {
    /// The console over these services. `secure_cookie` marks the session
    /// cookie `Secure` (set it when the browser reaches the console over TLS).
    /// A material calibration that cannot tell the classes apart is refused.
    pub fn new(
        findings: FindingsService,
        auth: Arc<Authenticator>,
        gate: Gate,
        config: &crate::config::WebConfig,
        secure_cookie: bool,
        decoded: PyramidMetrics,
    ) -> Result<Self, Error> {
        let materials = Calibrations::new(&config.materials).map_err(Error::InvalidArgument)?;
        let budget = usize::try_from(config.decoded_cache_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let workstation_token = match auth.enabled() {
            true => None,
            false => Some(super::session::random_id()?[..32].to_string()),
        };
        Ok(Web {
            findings,
            auth,
            gate,
            sessions: Arc::new(Sessions::new(config.session_ttl)),
            tiles: Arc::new(TileCache::default()),
            pyramids: Arc::new(Pyramids::new(budget, decoded)),
            materials: Arc::new(materials),
            renders: Arc::new(Semaphore::new(RENDERS_AT_ONCE)),
            secure_cookie,
            workstation_token,
        })
    }

    /// The token that signs in on a server without authentication (no
    /// `[[auth.tokens]]` or certificates): random, made at start, good until
    /// the server stops. `None` when callers authenticate.
    pub fn workstation_token(&self) -> Option<&str> {
        self.workstation_token.as_deref()
    }

    /// The signed-in session of a request (its cookie), or UNAUTHENTICATED.
    pub(super) fn session(&self, headers: &HeaderMap) -> Result<(String, Session), ApiError> {
        let id = cookie(headers, COOKIE).ok_or_else(|| {
            Error::Unauthenticated("you are not signed in to the console: sign in with your token".into())
        })?;
        let session = self.sessions.get(&id)?;
        Ok((id, session))
    }

    /// Like [`Self::session`], for a request that changes state: it must
    /// also carry the session's CSRF token in [`CSRF_HEADER`].
    pub(super) fn session_for_change(&self, headers: &HeaderMap) -> Result<(String, Session), ApiError> {
        let (id, session) = self.session(headers)?;
        let sent = headers.get(CSRF_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if !same(sent, session.csrf.as_bytes()) {
            return Err(Error::PermissionDenied(format!(
                "this request lacks the console's {CSRF_HEADER} header (cross-site request refused): reload the console"
            ))
            .into());
        }
        Ok((id, session))
    }

    /// Records `action` on `object` by `caller` with the result's outcome;
    /// nothing is answered unaudited.
    pub(super) async fn audited<T>(
        &self,
        caller: &Caller,
        action: &str,
        object: &str,
        result: Result<T, Error>,
    ) -> Result<T, ApiError> {
        let outcome = match &result {
            Ok(_) => "OK".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        self.gate.audit(caller, action, object, &outcome).await?;
        if let Err(e) = &result {
            tracing::warn!(action, identity = %caller.identity, code = ?e.code(), error = %e, "console request refused");
        }
        Ok(result?)
    }
}

/// Compares secrets without stopping at the first difference.
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in a request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A console error: the service's [`Error`], answered with its HTTP status
/// ([`Error::http_status`]) and a JSON body `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self.0, Error::Store(_) | Error::Internal(_)) {
            tracing::error!(error = %self.0, "console request failed inside the server");
        }
        let body = serde_json::json!({ "error": self.0.to_string() }).to_string();
        (self.0.http_status(), [(http::header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name_and_secrets_compared_whole() {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; niix_session=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
