//! Who may call what. Callers authenticate with bearer tokens (stored in the
//! configuration only as SHA-256 hashes); every RPC is checked in one place,
//! [`AuthLayer`], against the role table [`allowed_roles`].
//!
//! With no tokens configured, the server only listens on loopback (unless
//! `--insecure`), and everyone on that workstation is the local admin.
//!
//! A request for a path the server has no method for is refused with
//! UNIMPLEMENTED before anything else: it is only counted
//! (`niix_unknown_rpc_requests_total`) and logged at most every
//! [`UNKNOWN_LOG_EVERY`], never audited, so a flood of made-up paths
//! cannot grow the audit log or the metric labels.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{Caller, Gate};
use crate::metrics::known_rpc;
use crate::scope::SiteScope;

/// How often at most a request for an unknown path is logged.
pub const UNKNOWN_LOG_EVERY: Duration = Duration::from_secs(10);

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
    /// Sites a scanner may push for and an officer may see (see
    /// [`crate::scope`]); empty: every site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
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
    /// Sites its holder may act for, as on a token; empty: every site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
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
    if path.starts_with("/inference.GRPCInferenceService/") {
        return Some(&[Role::Officer, Role::Admin]);
    }
    Some(&[Role::Admin])
}

/// The lowercase hex SHA-256 of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What one identity may do: its role and sites, and the configuration
/// entry that first named it (for error messages).
#[derive(Debug)]
struct Grant {
    role: Role,
    sites: Vec<String>,
    scope: SiteScope,
    entry: String,
}

/// Checks credentials against the configuration.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_hash: HashMap<String, Caller>,
    by_certificate: HashMap<String, Caller>,
    grants: HashMap<String, Grant>,
}

impl Authenticator {
    /// Builds the checker; refuses malformed or duplicate token hashes, and
    /// an identity named by two entries with different roles or sites. The
    /// same identity with the same role and sites on several tokens is
    /// allowed: that is how a token is rotated (add the new one, hand it
    /// out, remove the old one).
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut a = Authenticator::default();
        for (i, t) in config.tokens.iter().enumerate() {
            anyhow::ensure!(
                crate::digest::is_sha256_hex(&t.sha256),
                "auth token of {:?}: sha256 must be 64 lowercase hex digits (`niix token new` prints it)",
                t.identity
            );
            let caller = Caller { identity: t.identity.clone(), role: t.role.name().into() };
            anyhow::ensure!(
                a.by_hash.insert(t.sha256.clone(), caller).is_none(),
                "auth token listed twice ({:?})",
                t.identity
            );
            a.grant(&t.identity, t.role, &t.sites, format!("[[auth.tokens]] entry {}", i + 1))?;
        }
        for (i, c) in config.certificates.iter().enumerate() {
            anyhow::ensure!(
                crate::digest::is_sha256_hex(&c.sha256),
                "auth certificate of {:?}: sha256 must be the certificate's 64 lowercase hex digit fingerprint",
                c.identity
            );
            let caller = Caller { identity: c.identity.clone(), role: c.role.name().into() };
            anyhow::ensure!(a.by_certificate.insert(c.sha256.clone(), caller).is_none(), "certificate listed twice");
            a.grant(&c.identity, c.role, &c.sites, format!("[[auth.certificates]] entry {}", i + 1))?;
        }
        Ok(a)
    }

    /// Records what `identity` may do; refuses a second entry that says otherwise.
    fn grant(&mut self, identity: &str, role: Role, sites: &[String], entry: String) -> anyhow::Result<()> {
        anyhow::ensure!(
            sites.iter().all(|s| !s.trim().is_empty() && s.trim() == s),
            "{entry} ({identity:?}): a site in `sites` is blank or has spaces around it"
        );
        let mut sorted = sites.to_vec();
        sorted.sort();
        sorted.dedup();
        if let Some(g) = self.grants.get(identity) {
            anyhow::ensure!(
                g.role == role,
                "identity {identity:?} has two roles: {} says {} and {entry} says {}; one identity has one role \
                 (give the other credential its own identity)",
                g.entry,
                g.role.name(),
                role.name()
            );
            anyhow::ensure!(
                g.sites == sorted,
                "identity {identity:?} has two site scopes: {} says {:?} and {entry} says {:?}; \
                 every credential of one identity must list the same sites",
                g.entry,
                g.sites,
                sorted
            );
            return Ok(());
        }
        let scope = SiteScope::only(&sorted);
        self.grants.insert(identity.to_string(), Grant { role, sites: sorted, scope, entry });
        Ok(())
    }

    /// The sites `identity` may act for (every site when it is not scoped).
    pub fn scope(&self, identity: &str) -> SiteScope {
        self.grants.get(identity).map(|g| g.scope.clone()).unwrap_or_default()
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
        let role = self.grants[&caller.identity].role;
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
        let Some(rpc) = known_rpc(req.uri().path()) else {
            self.gate.metrics().unknown_rpcs.inc();
            log_unknown(req.uri().path());
            let status = tonic::Status::unimplemented(
                "this server has no such method; the methods it serves are in docs/protocol.md",
            );
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let path = req.uri().path().to_string();
        let certificate = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|certs| certs.first().map(|c| certificate_fingerprint(c.as_ref())));
        match self.auth.check(&path, req.headers(), certificate.as_deref()) {
            Ok(caller) => {
                if let Some(c) = caller {
                    req.extensions_mut().insert(self.auth.scope(&c.identity));
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
                    // The refusal stands whether or not its record could be written.
                    let _ = gate.audit(&who, rpc, "", &format!("{:?}", status.code())).await;
                    gate.metrics().error(rpc, status.code());
                    Ok(status.into_http())
                })
            }
        }
    }
}

/// Logs a request for an unknown path, at most once per
/// [`UNKNOWN_LOG_EVERY`] (with how many came since), and never more than
/// the first 64 bytes of the path.
fn log_unknown(path: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    // Seconds since the first refusal (process-wide), shifted by one period
    // so that the very first one, with `LAST` still 0, is logged.
    let now = START.get_or_init(Instant::now).elapsed().as_secs() + UNKNOWN_LOG_EVERY.as_secs();
    let last = LAST.load(Ordering::Relaxed);
    if now < last + UNKNOWN_LOG_EVERY.as_secs()
        || LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
    {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut end = path.len().min(64);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let since = SUPPRESSED.swap(0, Ordering::Relaxed);
    tracing::warn!(path = %path[..end].escape_debug(), path_bytes = path.len(), not_logged_since = since,
        "refused a request for a path the server has no method for");
}

/// The SHA-256 fingerprint of a certificate (DER), as `[[auth.certificates]]`
/// lists it: the gRPC port and the console compute it here alike.
pub fn certificate_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            tokens: vec![
                token("scanner-1", Role::Scanner, "s3cret-scanner"),
                token("officer-1", Role::Officer, "s3cret-officer"),
            ],
            certificates: vec![CertificateConfig {
                identity: "DE".into(),
                role: Role::Partner,
                sha256: "ab".repeat(32),
                sites: vec![],
            }],
        })
        .unwrap()
    }

    fn token(identity: &str, role: Role, secret: &str) -> TokenConfig {
        TokenConfig { identity: identity.into(), role, sha256: token_hash(secret), sites: vec![] }
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
    fn officers_and_admins_run_the_open_inference_protocol() {
        let a = auth();
        let infer = "/inference.GRPCInferenceService/ModelInfer";
        assert_eq!(a.check(infer, &headers(Some("s3cret-officer")), None).unwrap().unwrap().role, "officer");
        assert_eq!(
            a.check(infer, &headers(Some("s3cret-scanner")), None).unwrap_err().1.code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(a.check(infer, &headers(None), None).unwrap_err().1.code(), tonic::Code::Unauthenticated);
        let alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        assert_eq!(a.check(alpha, &headers(None), None).unwrap(), None, "reflection is public in both versions");
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
            tokens: vec![TokenConfig { identity: "x".into(), role: Role::Admin, sha256: "abc".into(), sites: vec![] }],
            ..Default::default()
        };
        assert!(Authenticator::new(&bad).unwrap_err().to_string().contains("64 lowercase hex"));
    }

    #[test]
    fn one_identity_with_two_roles_is_refused_naming_both_entries() {
        let two = AuthConfig {
            tokens: vec![
                token("ops", Role::Scanner, "a"),
                token("x", Role::Officer, "b"),
                token("ops", Role::Admin, "c"),
            ],
            ..Default::default()
        };
        let e = Authenticator::new(&two).unwrap_err().to_string();
        assert!(
            e.contains("\"ops\" has two roles")
                && e.contains("[[auth.tokens]] entry 1 says scanner")
                && e.contains("[[auth.tokens]] entry 3 says admin"),
            "{e}"
        );
        let cert = AuthConfig {
            tokens: vec![token("DE", Role::Admin, "a")],
            certificates: vec![CertificateConfig {
                identity: "DE".into(),
                role: Role::Partner,
                sha256: "ab".repeat(32),
                sites: vec![],
            }],
        };
        let e = Authenticator::new(&cert).unwrap_err().to_string();
        assert!(e.contains("[[auth.tokens]] entry 1 says admin and [[auth.certificates]] entry 1 says partner"), "{e}");
        let mut scoped = token("ops", Role::Scanner, "c");
        scoped.sites = vec!["NLRTM".into()];
        let sites = AuthConfig { tokens: vec![token("ops", Role::Scanner, "a"), scoped], ..Default::default() };
        let e = Authenticator::new(&sites).unwrap_err().to_string();
        assert!(e.contains("two site scopes") && e.contains("entry 2 says [\"NLRTM\"]"), "{e}");
    }

    #[test]
    fn sites_on_a_token_or_certificate_scope_its_identity() {
        let mut t = token("scanner-nl", Role::Scanner, "s");
        t.sites = vec!["NLRTM".into()];
        let a = Authenticator::new(&AuthConfig {
            tokens: vec![t, token("officer-any", Role::Officer, "o")],
            certificates: vec![CertificateConfig {
                identity: "BE-officer".into(),
                role: Role::Officer,
                sha256: "ab".repeat(32),
                sites: vec!["BEANR".into()],
            }],
        })
        .unwrap();
        assert_eq!(a.scope("scanner-nl").sites(), Some(&["NLRTM".to_string()][..]));
        assert!(a.scope("BE-officer").allows("BEANR-02") && !a.scope("BE-officer").allows("NLRTM-01"));
        assert_eq!(a.scope("officer-any"), SiteScope::all());
        let mut blank = token("x", Role::Scanner, "x");
        blank.sites = vec![" NLRTM".into()];
        let e = Authenticator::new(&AuthConfig { tokens: vec![blank], ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("blank or has spaces"), "{e}");
    }

    #[test]
    fn one_identity_on_two_tokens_with_one_role_is_a_rotation() {
        let rotation = AuthConfig {
            tokens: vec![token("ops", Role::Scanner, "old"), token("ops", Role::Scanner, "new")],
            ..Default::default()
        };
        let a = Authenticator::new(&rotation).unwrap();
        let push = "/niix.v1.ScanIngest/PushScan";
        for t in ["old", "new"] {
            let c = a.check(push, &headers(Some(t)), None).unwrap().unwrap();
            assert_eq!((c.identity.as_str(), c.role.as_str()), ("ops", "scanner"));
        }
    }
}
