//! Who may call what. Callers authenticate with bearer tokens (stored in the
//! configuration only as SHA-256 hashes); every RPC is checked in one place,
//! [`AuthLayer`], against the role table [`allowed_roles`].
//!
//! With no tokens configured, the server only listens on loopback (unless
//! `--insecure`), and everyone on that workstation is the local admin.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{Caller, Gate};

/// What a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A scanner pushing scans.
    Scanner,
    /// An image analyst.
    Officer,
    /// A partner administration's data-sharing client.
    Partner,
    /// An administrator.
    Admin,
}

impl Role {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Scanner => "scanner",
            Role::Officer => "officer",
            Role::Partner => "partner",
            Role::Admin => "admin",
        }
    }
}

/// One accepted token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who presents it, e.g. `scanner-nlrtm-03` or `officer-4711`.
    pub identity: String,
    /// In which role.
    pub role: Role,
    /// Lowercase hex SHA-256 of the token (`niix token new` prints it).
    pub sha256: String,
}

/// One accepted client certificate (mutual TLS).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Who presents it, e.g. the partner administration `DE`.
    pub identity: String,
    /// In which role.
    pub role: Role,
    /// Lowercase hex SHA-256 of the certificate (DER), its fingerprint.
    pub sha256: String,
}

/// The `[auth]` section of the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// Accepted client certificates, by fingerprint (needs `[tls] client_ca`).
    pub certificates: Vec<CertificateConfig>,
}

impl AuthConfig {
    /// True when callers must authenticate.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || !self.certificates.is_empty()
    }
}

/// Roles allowed to call an RPC path; `None` for public services (health,
/// reflection).
pub fn allowed_roles(path: &str) -> Option<&'static [Role]> {
    if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        return None;
    }
    if path.starts_with("/niix.v1.ScanIngest/") {
        return Some(&[Role::Scanner, Role::Admin]);
    }
    if path == "/niix.v1.Findings/Adjudicate" {
        return Some(&[Role::Officer]);
    }
    if path.starts_with("/niix.v1.Findings/") {
        return Some(&[Role::Officer, Role::Admin]);
    }
    if path.starts_with("/niix.v1.Exchange/") {
        return Some(&[Role::Partner]);
    }
    Some(&[Role::Admin])
}

/// The lowercase hex SHA-256 of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Checks credentials against the configuration.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_hash: HashMap<String, Caller>,
    by_certificate: HashMap<String, Caller>,
    roles: HashMap<String, Role>,
}

impl Authenticator {
    /// Builds the checker; refuses malformed or duplicate token hashes.
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut a = Authenticator::default();
        for t in &config.tokens {
            anyhow::ensure!(
                crate::header::is_sha256_hex(&t.sha256),
                "auth token of {:?}: sha256 must be 64 lowercase hex digits (`niix token new` prints it)",
                t.identity
            );
            let caller = Caller { identity: t.identity.clone(), role: t.role.name().into() };
            anyhow::ensure!(
                a.by_hash.insert(t.sha256.clone(), caller).is_none(),
                "auth token listed twice ({:?})",
                t.identity
            );
            a.roles.insert(t.identity.clone(), t.role);
        }
        for c in &config.certificates {
            anyhow::ensure!(
                crate::header::is_sha256_hex(&c.sha256),
                "auth certificate of {:?}: sha256 must be the certificate's 64 lowercase hex digit fingerprint",
                c.identity
            );
            let caller = Caller { identity: c.identity.clone(), role: c.role.name().into() };
            anyhow::ensure!(a.by_certificate.insert(c.sha256.clone(), caller).is_none(), "certificate listed twice");
            if let Some(r) = a.roles.insert(c.identity.clone(), c.role) {
                anyhow::ensure!(r == c.role, "identity {:?} has two roles", c.identity);
            }
        }
        Ok(a)
    }

    /// True when callers must authenticate.
    pub fn enabled(&self) -> bool {
        !self.by_hash.is_empty() || !self.by_certificate.is_empty()
    }

    /// The caller of `path` with these headers and (under mutual TLS) this
    /// client certificate fingerprint, or the refusal.
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        certificate: Option<&str>,
    ) -> Result<Option<Caller>, (Option<Caller>, tonic::Status)> {
        let Some(allowed) = allowed_roles(path) else { return Ok(None) };
        if !self.enabled() {
            return Ok(None);
        }
        if let Some(caller) = certificate.and_then(|f| self.by_certificate.get(f)) {
            return self.admit(caller, allowed, path);
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return Err((
                None,
                tonic::Status::unauthenticated(
                    "this server requires authentication: a client certificate it knows, or `authorization: Bearer <token>` \
                     (niix --token or NIIX_TOKEN)",
                ),
            ));
        };
        let Some(caller) = self.by_hash.get(&token_hash(token)) else {
            return Err((None, tonic::Status::unauthenticated("the bearer token is not known to this server")));
        };
        self.admit(caller, allowed, path)
    }

    fn admit(
        &self,
        caller: &Caller,
        allowed: &[Role],
        path: &str,
    ) -> Result<Option<Caller>, (Option<Caller>, tonic::Status)> {
        let role = self.roles[&caller.identity];
        if !allowed.contains(&role) {
            let names: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
            return Err((
                Some(caller.clone()),
                tonic::Status::permission_denied(format!(
                    "{} (role {}) may not call {path}; it needs the role {}",
                    caller.identity,
                    role.name(),
                    names.join(" or ")
                )),
            ));
        }
        Ok(Some(caller.clone()))
    }
}

/// A tower layer that authenticates every request before it reaches a
/// service, puts the [`Caller`] into the request's extensions, and answers
/// (and audits) refusals itself.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    gate: Gate,
}

impl AuthLayer {
    /// Creates the layer.
    pub fn new(auth: Arc<Authenticator>, gate: Gate) -> Self {
        AuthLayer { auth, gate }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, auth: self.auth.clone(), gate: self.gate.clone() }
    }
}

/// The service [`AuthLayer`] wraps around each gRPC service.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    gate: Gate,
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let certificate = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|certs| certs.first().map(|c| hex::encode(Sha256::digest(c.as_ref()))));
        match self.auth.check(&path, req.headers(), certificate.as_deref()) {
            Ok(caller) => {
                if let Some(c) = caller {
                    req.extensions_mut().insert(c);
                }
                // The service that was made ready is the one to call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err((caller, status)) => {
                let gate = self.gate.clone();
                Box::pin(async move {
                    let who = caller.unwrap_or(Caller { identity: "unauthenticated".into(), role: "none".into() });
                    let action = path.rsplit('/').next().unwrap_or(&path).to_string();
                    // The refusal stands whether or not its record could be written.
                    let _ = gate.audit(&who, &action, "", &format!("{:?}", status.code())).await;
                    gate.metrics().error(&action, status.code());
                    Ok(status.into_http())
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            tokens: vec![
                TokenConfig { identity: "scanner-1".into(), role: Role::Scanner, sha256: token_hash("s3cret-scanner") },
                TokenConfig { identity: "officer-1".into(), role: Role::Officer, sha256: token_hash("s3cret-officer") },
            ],
            certificates: vec![CertificateConfig {
                identity: "DE".into(),
                role: Role::Partner,
                sha256: "ab".repeat(32),
            }],
        })
        .unwrap()
    }

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        h
    }

    #[test]
    fn roles_gate_each_service() {
        let a = auth();
        let push = "/niix.v1.ScanIngest/PushScan";
        let list = "/niix.v1.Findings/ListScans";
        assert_eq!(a.check(push, &headers(Some("s3cret-scanner")), None).unwrap().unwrap().identity, "scanner-1");
        assert_eq!(a.check(list, &headers(Some("s3cret-officer")), None).unwrap().unwrap().role, "officer");
        let (_, s) = a.check(list, &headers(Some("s3cret-scanner")), None).unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains("scanner-1 (role scanner)"), "{}", s.message());
        assert_eq!(a.check(push, &headers(None), None).unwrap_err().1.code(), tonic::Code::Unauthenticated);
        assert_eq!(a.check(push, &headers(Some("guess")), None).unwrap_err().1.code(), tonic::Code::Unauthenticated);
        assert_eq!(a.check("/grpc.health.v1.Health/Check", &headers(None), None).unwrap(), None);
        let de = "ab".repeat(32);
        let sub = "/niix.v1.Exchange/Subscribe";
        assert_eq!(a.check(sub, &headers(None), Some(&de)).unwrap().unwrap().identity, "DE");
        assert_eq!(a.check(push, &headers(None), Some(&de)).unwrap_err().1.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            a.check(sub, &headers(None), Some(&"cd".repeat(32))).unwrap_err().1.code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn without_tokens_everyone_is_local() {
        let a = Authenticator::new(&AuthConfig::default()).unwrap();
        assert!(!a.enabled());
        assert_eq!(a.check("/niix.v1.ScanIngest/PushScan", &headers(None), None).unwrap(), None);
    }

    #[test]
    fn malformed_hashes_are_refused() {
        let bad = AuthConfig {
            tokens: vec![TokenConfig { identity: "x".into(), role: Role::Admin, sha256: "abc".into() }],
            ..Default::default()
        };
        assert!(Authenticator::new(&bad).unwrap_err().to_string().contains("64 lowercase hex"));
    }
}
