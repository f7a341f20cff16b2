//! Mutual TLS: a partner authenticates with its client certificate, a
//! scanner with a token over TLS; unknown or missing certificates get in
//! nowhere. Certificates are made in the test with rcgen.

mod common;

use std::time::Duration;

use common::*;
use niix::auth::{AuthConfig, CertificateConfig, Role, TokenConfig, token_hash};
use niix::client::{ClientTls, authed, connect_tls};
use niix::config::{Limits, TlsConfig};
use niix::exchange::{Agreement, Content, ExchangeConfig, keys};
use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::*;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_authenticate_with_their_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki { dir: tmp.path().to_path_buf() };
    let (ca_cert, ca_issuer) = ca("NL customs CA");
    let (server_cert, server_key) = leaf("localhost", &ca_issuer);
    let (de_cert, de_key) = leaf("DE", &ca_issuer);
    let (_, rogue_issuer) = ca("someone else");
    let (rogue_cert, rogue_key) = leaf("DE", &rogue_issuer);
    let ca_pem = pki.write("ca.pem", &ca_cert.pem());
    let de_files = (pki.write("de.pem", &de_cert.pem()), pki.write("de.key", &de_key.serialize_pem()));
    let rogue_files = (pki.write("rogue.pem", &rogue_cert.pem()), pki.write("rogue.key", &rogue_key.serialize_pem()));

    let (key_file, public) = keys::init(&tmp.path().join("keys")).unwrap();
    let mut config = config(&tmp.path().join("data"), Limits::default());
    config.tls = Some(TlsConfig {
        cert: pki.write("server.pem", &server_cert.pem()),
        key: pki.write("server.key", &server_key.serialize_pem()),
        client_ca: Some(ca_pem.clone()),
    });
    config.auth = AuthConfig {
        tokens: vec![TokenConfig {
            identity: "scanner".into(),
            role: Role::Scanner,
            sha256: token_hash("t-scan"),
            sites: vec![],
        }],
        certificates: vec![CertificateConfig {
            identity: "DE".into(),
            role: Role::Partner,
            sha256: sha256(de_cert.der()),
            sites: vec![],
        }],
    };
    config.exchange = ExchangeConfig {
        administration: "NL".into(),
        signing_key: Some(key_file),
        agreements: vec![Agreement {
            name: "NL-DE".into(),
            partner: "DE".into(),
            sites: vec![],
            conveyances: vec![],
            decisions: vec![],
            content: Content::Findings,
            redact: vec![],
            operator_reports: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let server = niix::server::start(config).await.unwrap();
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let tls = |cert: Option<&(std::path::PathBuf, std::path::PathBuf)>| ClientTls {
        ca: Some(ca_pem.clone()),
        cert: cert.map(|c| c.0.clone()),
        key: cert.map(|c| c.1.clone()),
        domain: Some("localhost".into()),
    };

    // A scanner: TLS without a client certificate, token.
    let scanner = authed(connect_tls(&url, Some(&tls(None))).await.unwrap(), Some("t-scan")).unwrap();
    let raw = raw_bytes(32, 16, 1);
    let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    let receipt = ScanIngestClient::new(scanner)
        .push_scan(tokio_stream::iter(messages(&h, &[&raw], 256)))
        .await
        .unwrap()
        .into_inner();

    // DE with its certificate receives the package, signed.
    let de = authed(connect_tls(&url, Some(&tls(Some(&de_files)))).await.unwrap(), None).unwrap();
    let mut feed = ExchangeClient::new(de).subscribe(SubscribeRequest { cursor: 0 }).await.unwrap().into_inner();
    let pkg = tokio::time::timeout(Duration::from_secs(20), feed.next()).await.unwrap().unwrap().unwrap();
    let content = keys::verify(&pkg, &public).unwrap();
    assert_eq!((content.recipient.as_str(), content.scan_id.as_str()), ("DE", receipt.scan_id.as_str()));

    // Without a certificate: unauthenticated. With a certificate from another CA: refused.
    let anonymous = authed(connect_tls(&url, Some(&tls(None))).await.unwrap(), None).unwrap();
    let err = ExchangeClient::new(anonymous).subscribe(SubscribeRequest { cursor: 0 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let rogue = match connect_tls(&url, Some(&tls(Some(&rogue_files)))).await {
        Err(_) => None, // the handshake failed: fine
        Ok(ch) => Some(ExchangeClient::new(ch).subscribe(SubscribeRequest { cursor: 0 }).await),
    };
    if let Some(result) = rogue {
        assert!(result.is_err(), "a certificate from another CA must not get a feed");
    }
    // Plain text is refused by a TLS server.
    let plain = format!("http://127.0.0.1:{}", server.addr.port());
    if let Ok(ch) = niix::client::connect(&plain).await {
        assert!(ExchangeClient::new(ch).subscribe(SubscribeRequest { cursor: 0 }).await.is_err());
    }
    server.shutdown().await.unwrap();
}
