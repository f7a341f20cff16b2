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

/// Pushes a small scan for `site` over `conn`.
async fn push_for(conn: &niix::client::Authed, site: &str) -> Result<ScanReceipt, tonic::Status> {
    let raw = raw_bytes(32, 16, 2);
    let mut h = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    h.metadata.as_mut().unwrap().site_id = site.into();
    ScanIngestClient::new(conn.clone())
        .push_scan(tokio_stream::iter(messages(&h, &[&raw], 256)))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_scopes_on_client_certificates_bound_what_scanners_push_and_officers_see() {
    use niix_proto::v1::findings_client::FindingsClient;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki { dir: tmp.path().to_path_buf() };
    let (ca_cert, ca_issuer) = ca("NL customs CA");
    let (server_cert, server_key) = leaf("localhost", &ca_issuer);
    let (scanner_cert, scanner_key) = leaf("scanner-nlrtm", &ca_issuer);
    let (officer_cert, officer_key) = leaf("officer-deham", &ca_issuer);
    let ca_pem = pki.write("ca.pem", &ca_cert.pem());
    let scanner_files = (pki.write("s.pem", &scanner_cert.pem()), pki.write("s.key", &scanner_key.serialize_pem()));
    let officer_files = (pki.write("o.pem", &officer_cert.pem()), pki.write("o.key", &officer_key.serialize_pem()));

    let mut config = config(&tmp.path().join("data"), Limits::default());
    config.analysis.enabled = false;
    config.tls = Some(TlsConfig {
        cert: pki.write("server.pem", &server_cert.pem()),
        key: pki.write("server.key", &server_key.serialize_pem()),
        client_ca: Some(ca_pem.clone()),
    });
    let cert = |identity: &str, role, der: &[u8], site: &str| CertificateConfig {
        identity: identity.into(),
        role,
        sha256: sha256(der),
        sites: vec![site.into()],
    };
    config.auth = AuthConfig {
        // An unscoped scanner token, to store a DEHAM scan the officer may see.
        tokens: vec![TokenConfig {
            identity: "scanner-all".into(),
            role: Role::Scanner,
            sha256: token_hash("t-all"),
            sites: vec![],
        }],
        certificates: vec![
            cert("scanner-nlrtm", Role::Scanner, scanner_cert.der(), "NLRTM"),
            cert("officer-deham", Role::Officer, officer_cert.der(), "DEHAM"),
        ],
    };
    let server = niix::server::start(config).await.unwrap();
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let tls = |files: Option<&(std::path::PathBuf, std::path::PathBuf)>| ClientTls {
        ca: Some(ca_pem.clone()),
        cert: files.map(|c| c.0.clone()),
        key: files.map(|c| c.1.clone()),
        domain: Some("localhost".into()),
    };
    let scanner = authed(connect_tls(&url, Some(&tls(Some(&scanner_files)))).await.unwrap(), None).unwrap();
    let officer = authed(connect_tls(&url, Some(&tls(Some(&officer_files)))).await.unwrap(), None).unwrap();
    let all = authed(connect_tls(&url, Some(&tls(None))).await.unwrap(), Some("t-all")).unwrap();

    // The certificate's scope: NLRTM (and NLRTM-01) pass, DEHAM is refused.
    let nl = push_for(&scanner, "NLRTM-01").await.expect("a covered site is accepted").scan_id;
    let e = push_for(&scanner, "DEHAM").await.expect_err("another site is refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("DEHAM"), "{}", e.message());
    let de = push_for(&all, "DEHAM").await.unwrap().scan_id;

    // The officer's certificate sees DEHAM only; NL's scan answers as unknown.
    let mut f = FindingsClient::new(officer);
    let listed: Vec<String> = f
        .list_scans(ListScansRequest { page_size: 50, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .scans
        .into_iter()
        .map(|s| s.scan_id)
        .collect();
    assert_eq!(listed, vec![de.clone()], "exactly the refused push is missing and NL's scan is left out");
    f.get_scan(GetScanRequest { scan_id: de }).await.expect("its own site's scan");
    let e = f.get_scan(GetScanRequest { scan_id: nl.clone() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    let e = f.list_scans(ListScansRequest { site_id: "NLRTM".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    server.shutdown().await.unwrap();
}
