//! TLS for the officer console, with the certificate and key of `[tls]`
//! (the gRPC port's). Handshakes run in their own tasks, each bounded by
//! the connection's handshake timeout, so a slow client does not hold up
//! the others' accepts.
//!
//! With `[tls] client_ca` the console, like the gRPC port, asks for a
//! client certificate from that CA (optional: officers with tokens still
//! connect) and hands its fingerprint to the handlers as a
//! [`ClientCertificate`]; signing in with it maps it to an identity through
//! `[[auth.certificates]]`, as over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::state::ClientCertificate;
use crate::config::TlsConfig;
use crate::conn::{Guarded, GuardedListener};

/// Handshakes finished but not yet taken by the server.
const READY: usize = 64;

/// The console's TLS settings from the `[tls]` PEM files (HTTP/1.1); with
/// `client_ca`, client certificates from that CA are asked for (and
/// verified) but not required.
pub fn acceptor(tls: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate chain {}", tls.cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("reading the key {}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the client CA {}", ca.display()))?
            {
                roots.add(cert).with_context(|| format!("a certificate of the client CA {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("client certificates of {} for the officer console", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_single_cert(certs, key).context("the [tls] certificate and key for the officer console")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts guarded connections and hands out those whose TLS handshake
/// succeeded.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<Guarded>, SocketAddr)>,
}

impl TlsListener {
    /// Starts accepting on `inner`.
    pub fn new(mut inner: GuardedListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = axum::serve::Listener::local_addr(&inner)?;
        let (tx, ready) = mpsc::channel(READY);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = axum::serve::Listener::accept(&mut inner).await;
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                if tx.is_closed() {
                    return;
                }
                tokio::spawn(async move {
                    // A silent or failing client is dropped; the guard's
                    // handshake timeout bounds how long it can take.
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

/// The SHA-256 fingerprint of a certificate (DER), as `[[auth.certificates]]` lists it.
fn fingerprint(cert: &CertificateDer<'_>) -> String {
    crate::auth::certificate_fingerprint(cert.as_ref())
}

impl Connected<IncomingStream<'_, TlsListener>> for ClientCertificate {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        ClientCertificate(stream.io().get_ref().1.peer_certificates().and_then(|c| c.first()).map(fingerprint))
    }
}

impl Connected<IncomingStream<'_, GuardedListener>> for ClientCertificate {
    fn connect_info(_: IncomingStream<'_, GuardedListener>) -> Self {
        ClientCertificate(None)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Guarded>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended: wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
