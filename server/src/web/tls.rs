//! TLS for the officer console, with the certificate and key of `[tls]`
//! (the gRPC port's). Handshakes run in their own tasks, each bounded by
//! the connection's handshake timeout, so a slow client does not hold up
//! the others' accepts.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;
use crate::conn::{Guarded, GuardedListener};

/// Handshakes finished but not yet taken by the server.
const READY: usize = 64;

/// The console's TLS settings from the `[tls]` PEM files (HTTP/1.1, no
/// client certificates: officers sign in with tokens).
pub fn acceptor(tls: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate chain {}", tls.cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("reading the key {}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the [tls] certificate and key for the officer console")?;
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
