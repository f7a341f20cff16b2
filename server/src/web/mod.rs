//! The officer console: a browser workstation served by `niix serve` on its
//! own HTTP listener (`[web] listen`, `--web-listen`, default
//! `127.0.0.1:8080`).
//!
//! It is an edge like the gRPC services: every request goes through the
//! same [`FindingsService`](crate::findings::FindingsService) (reads,
//! adjudication, TDR export), the same [`Authenticator`](crate::auth::Authenticator)
//! (who may sign in) and the same audit [`Gate`](crate::audit::Gate) (every
//! action recorded under the signed-in identity). The browser talks JSON
//! over HTTP (see docs/protocol.md, "Officer console"); the page itself is
//! embedded in the binary ([`assets`]), so the console works offline.
//!
//! - [`session`]: sign-in sessions (cookie + CSRF token).
//! - [`state`]: what every handler shares, and how errors are answered.
//! - [`api`]: the JSON endpoints.
//! - [`tiles`]: the tile pyramid of the viewer.
//! - [`pyramid`]: the decoded levels of the planes being viewed.

pub mod api;
pub mod assets;
pub mod pyramid;
pub mod session;
pub mod state;
pub mod tiles;
pub mod tls;

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::conn::{GuardedListener, Timeouts};
pub use state::{ApiError, ClientCertificate, Web};

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
    let app = api::router(web).into_make_service_with_connect_info::<ClientCertificate>();
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
