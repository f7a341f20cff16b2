//! The officer console: a browser workstation served by `niix serve` on its
//! own HTTP listener (`[web] listen`, `--web-listen`, default
//! `127.0.0.1:8080`).
//!
//! It is an edge like the gRPC services: every request goes through the
//! same [`FindingsService`] (reads, adjudication, TDR export), the same
//! [`Authenticator`] (who may sign in) and the same audit [`Gate`] (every
//! action recorded under the signed-in identity). The browser talks JSON
//! over HTTP (see docs/protocol.md, "Officer console"); the page itself is
//! embedded in the binary ([`assets`]), so the console works offline.
//!
//! - [`session`]: sign-in sessions (cookie + CSRF token).
//! - [`api`]: the JSON endpoints.
//! - [`tiles`]: the tile pyramid of the viewer.

pub mod api;
pub mod assets;
pub mod session;
pub mod tiles;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::audit::{Caller, Gate};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::conn::{GuardedListener, Timeouts};
use crate::error::Error;
use crate::findings::FindingsService;
use session::{COOKIE, CSRF_HEADER, Session, Sessions};
use tiles::TileCache;

/// Tiles rendered at once (each uses a core while it decodes).
const RENDERS_AT_ONCE: usize = 2;

/// Refuses console addresses that would expose it, by the gRPC port's
/// rules: off loopback it needs authentication (tokens) and TLS (`[tls]`,
/// which the console then serves too), else tokens and session cookies
/// would cross the network in clear text; `insecure` accepts either on a
/// network the operator trusts.
pub fn check_listen_policy(config: &Config) -> anyhow::Result<()> {
    let Some(at) = config.web.listen else { return Ok(()) };
    if at.ip().is_loopback() || config.insecure {
        return Ok(());
    }
    if !config.auth.enabled() {
        anyhow::bail!(
            "refusing to serve the officer console on {at} without authentication: configure [[auth.tokens]] \
             (see docs/operations.md), bind it to 127.0.0.1 (--web-listen 127.0.0.1:8080), or pass --insecure \
             (insecure = true) on a network you trust"
        );
    }
    if config.tls.is_none() {
        anyhow::bail!(
            "refusing to serve the officer console on {at} without TLS: tokens and session cookies would cross the \
             network in clear text; configure [tls] (the console then serves HTTPS), bind it to 127.0.0.1, or pass \
             --insecure (insecure = true) on a network you trust"
        );
    }
    Ok(())
}

/// What every console handler shares.
#[derive(Clone)]
pub struct Web {
    findings: FindingsService,
    auth: Arc<Authenticator>,
    gate: Gate,
    sessions: Arc<Sessions>,
    tiles: Arc<TileCache>,
    renders: Arc<Semaphore>,
    secure_cookie: bool,
}

impl Web {
    /// The console over these services. `secure_cookie` marks the session
    /// cookie `Secure` (set it when the browser reaches the console over TLS).
    pub fn new(
        findings: FindingsService,
        auth: Arc<Authenticator>,
        gate: Gate,
        config: &crate::config::WebConfig,
        secure_cookie: bool,
    ) -> Self {
        Web {
            findings,
            auth,
            gate,
            sessions: Arc::new(Sessions::new(config.session_ttl)),
            tiles: Arc::new(TileCache::default()),
            renders: Arc::new(Semaphore::new(RENDERS_AT_ONCE)),
            secure_cookie,
        }
    }

    /// The signed-in session of a request (its cookie), or UNAUTHENTICATED.
    fn session(&self, headers: &HeaderMap) -> Result<(String, Session), ApiError> {
        let id = cookie(headers, COOKIE).ok_or_else(|| {
            Error::Unauthenticated("you are not signed in to the console: sign in with your token".into())
        })?;
        let session = self.sessions.get(&id)?;
        Ok((id, session))
    }

    /// Like [`Self::session`], for a request that changes state: it must
    /// also carry the session's CSRF token in [`CSRF_HEADER`].
    fn session_for_change(&self, headers: &HeaderMap) -> Result<(String, Session), ApiError> {
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
    async fn audited<T>(
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
fn same(a: &[u8], b: &[u8]) -> bool {
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

/// What guards the console's connections, shared with the gRPC port:
/// handshake and idle timeouts, their counter, and the connection cap.
pub struct Guards {
    /// Handshake and idle timeouts.
    pub timeouts: Timeouts,
    /// Counts connections closed by the timeouts.
    pub timed_out: prometheus_client::metrics::counter::Counter,
    /// The cap on open connections, over every listener.
    pub cap: crate::conn::ConnectionCap,
}

/// Binds the console and serves it (over TLS with `tls`) in the background
/// until `stop`.
pub async fn serve(
    at: SocketAddr,
    web: Web,
    tls: Option<tokio_rustls::TlsAcceptor>,
    guards: Guards,
    mut stop: watch::Receiver<bool>,
    background: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let app = api::router(web);
    let listener = TcpListener::bind(at).await.with_context(|| format!("binding the officer console address {at}"))?;
    let bound = listener.local_addr()?;
    let listener = GuardedListener::new(listener, guards.timeouts, guards.timed_out, guards.cap);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    background.push(match tls {
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor)?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
                    tracing::warn!(error = %e, "officer console stopped");
                }
            })
        }
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
                tracing::warn!(error = %e, "officer console stopped");
            }
        }),
    });
    Ok(bound)
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

    #[test]
    fn the_console_stays_on_loopback_unless_insecure() {
        let open = Config {
            web: crate::config::WebConfig { listen: Some("0.0.0.0:8080".parse().unwrap()), ..Default::default() },
            ..Config::default()
        };
        let e = check_listen_policy(&open).unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:8080") && e.contains("without authentication"), "{e}");
        assert!(check_listen_policy(&Config { insecure: true, ..open.clone() }).is_ok());
        let auth = crate::auth::AuthConfig {
            tokens: vec![crate::auth::TokenConfig {
                identity: "o".into(),
                role: crate::auth::Role::Officer,
                sha256: "ab".repeat(32),
                sites: vec![],
            }],
            ..Default::default()
        };
        let tokens = Config { auth, ..open };
        let e = check_listen_policy(&tokens).unwrap_err().to_string();
        assert!(e.contains("without TLS") && e.contains("[tls]"), "{e}");
        let tls = crate::config::TlsConfig { cert: "c".into(), key: "k".into(), client_ca: None };
        assert!(check_listen_policy(&Config { tls: Some(tls), ..tokens }).is_ok());
        assert!(check_listen_policy(&Config::default()).is_ok());
    }
}
