//! The auth matrix: every RPC, called with each role's token and with none,
//! against a server that requires authentication.

mod common;

use common::*;
use niix::auth::{AuthConfig, Role, TokenConfig, token_hash};
use niix::config::Limits;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::*;
use tonic::Code;

const ROLES: [(Role, &str); 4] = [
    (Role::Scanner, "tok-scanner"),
    (Role::Officer, "tok-officer"),
    (Role::Partner, "tok-partner"),
    (Role::Admin, "tok-admin"),
];

const RPCS: [&str; 14] = [
    "PushScan",
    "GetUploadStatus",
    "AbortUpload",
    "ListScans",
    "GetScan",
    "GetFindings",
    "RenderOverlay",
    "Adjudicate",
    "WatchFindings",
    "ExportTdr",
    "Subscribe",
    "GetPackage",
    "GetPlane",
    "Receive",
];

/// Calls one RPC with harmless arguments; returns the status code.
async fn call(rpc: &str, conn: niix::client::Authed) -> Code {
    let id = "0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b".to_string();
    let mut ingest = ScanIngestClient::new(conn.clone());
    let mut findings = FindingsClient::new(conn.clone());
    let mut exchange = niix_proto::v1::exchange_client::ExchangeClient::new(conn);
    let r: Result<(), tonic::Status> = match rpc {
        "PushScan" => ingest.push_scan(tokio_stream::iter(Vec::<PushScanRequest>::new())).await.map(drop),
        "GetUploadStatus" => ingest.get_upload_status(GetUploadStatusRequest { scan_id: id }).await.map(drop),
        "AbortUpload" => ingest.abort_upload(AbortUploadRequest { scan_id: id }).await.map(drop),
        "ListScans" => findings.list_scans(ListScansRequest::default()).await.map(drop),
        "GetScan" => findings.get_scan(GetScanRequest { scan_id: id }).await.map(drop),
        "GetFindings" => findings.get_findings(GetFindingsRequest { scan_id: id }).await.map(drop),
        "RenderOverlay" => {
            findings.render_overlay(RenderOverlayRequest { scan_id: id, ..Default::default() }).await.map(drop)
        }
        "Adjudicate" => findings
            .adjudicate(AdjudicateRequest { scan_id: id, verdict: 1, officer_id: "x".into(), ..Default::default() })
            .await
            .map(drop),
        "WatchFindings" => {
            findings.watch_findings(WatchFindingsRequest { live_only: true, ..Default::default() }).await.map(drop)
        }
        "ExportTdr" => findings.export_tdr(ExportTdrRequest { scan_id: id, report: 0 }).await.map(drop),
        "Subscribe" => exchange.subscribe(SubscribeRequest { cursor: 0 }).await.map(drop),
        "GetPackage" => exchange.get_package(GetPackageRequest { package_id: "NL.DE.1".into() }).await.map(drop),
        "GetPlane" => {
            exchange.get_plane(GetPlaneRequest { package_id: "NL.DE.1".into(), ..Default::default() }).await.map(drop)
        }
        "Receive" => exchange.receive(tokio_stream::iter(Vec::<ReceiveRequest>::new())).await.map(drop),
        other => panic!("no such RPC {other}"),
    };
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn allowed(rpc: &str, role: Role) -> bool {
    match rpc {
        "PushScan" | "GetUploadStatus" | "AbortUpload" => matches!(role, Role::Scanner | Role::Admin),
        "Adjudicate" => role == Role::Officer,
        "Subscribe" | "GetPackage" | "GetPlane" | "Receive" => role == Role::Partner,
        _ => matches!(role, Role::Officer | Role::Admin),
    }
}

#[tokio::test]
async fn every_rpc_checks_the_callers_role() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.auth = AuthConfig {
        tokens: ROLES
            .iter()
            .map(|(role, tok)| TokenConfig {
                identity: format!("{}-1", role.name()),
                role: *role,
                sha256: token_hash(tok),
            })
            .collect(),
        ..Default::default()
    };
    // The partner is an issuer here: its Receive passes the issuer check
    // (which refuses other partners before reading) and fails on the content.
    let (_, public) = niix::exchange::keys::init(&dir.path().join("keys")).unwrap();
    config.exchange = niix::exchange::ExchangeConfig {
        administration: "NL".into(),
        issuers: vec![niix::exchange::Issuer { administration: "partner-1".into(), public_key: public }],
        ..Default::default()
    };
    let server = niix::server::start(config).await.unwrap();
    let url = format!("http://{}", server.addr);
    let ch = niix::client::connect(&url).await.unwrap();

    for rpc in RPCS {
        let code = call(rpc, niix::client::authed(ch.clone(), None).unwrap()).await;
        assert_eq!(code, Code::Unauthenticated, "{rpc} without a token");
        let code = call(rpc, niix::client::authed(ch.clone(), Some("not-a-token")).unwrap()).await;
        assert_eq!(code, Code::Unauthenticated, "{rpc} with an unknown token");
        for (role, tok) in ROLES {
            let code = call(rpc, niix::client::authed(ch.clone(), Some(tok)).unwrap()).await;
            if allowed(rpc, role) {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{rpc} as {} must pass authentication, got {code:?}",
                    role.name()
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{rpc} as {}", role.name());
            }
        }
    }
    // Health stays public.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();

    // The refusals are in the audit log, with the identity when it is known.
    server.shutdown().await.unwrap();
    let db = niix::store::SqliteMetadata::open(&dir.path().join("niix.db")).unwrap();
    let log = niix::store::MetadataStore::audit_tail(&db, 1000).unwrap();
    assert!(log.iter().any(|r| r.entry.identity == "scanner-1"
        && r.entry.action == "ListScans"
        && r.entry.outcome == "PermissionDenied"));
    assert!(log.iter().any(|r| r.entry.identity == "unauthenticated" && r.entry.outcome == "Unauthenticated"));
    assert!(
        log.iter()
            .any(|r| r.entry.identity == "officer-1" && r.entry.action == "GetScan" && r.entry.outcome == "NotFound")
    );
    assert_eq!(niix::audit::verify(&db).unwrap(), Ok(log.len() as u64));
}
