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
                sites: vec![],
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

/// A server with analysis off and these bearer tokens.
async fn server_with(
    dir: &std::path::Path,
    auth: AuthConfig,
) -> (niix::server::RunningServer, tonic::transport::Channel) {
    let mut config = config(dir, Limits::default());
    config.analysis.enabled = false;
    config.auth = auth;
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;
    (server, ch)
}

fn authed_as(ch: &tonic::transport::Channel, token: &str) -> niix::client::Authed {
    niix::client::authed(ch.clone(), Some(token)).unwrap()
}

#[tokio::test]
async fn the_officer_of_record_is_the_authenticated_identity() {
    let dir = tempfile::tempdir().unwrap();
    let auth = tokens(&[("scanner-1", Role::Scanner, "tok-s"), ("officer-a", Role::Officer, "tok-a")]);
    let (server, ch) = server_with(dir.path(), auth).await;
    let id = push_container(&authed_as(&ch, "tok-s"), "NLRTM-01", "XX-1", false).await;
    let mut officer = FindingsClient::new(authed_as(&ch, "tok-a"));
    let report = officer
        .adjudicate(AdjudicateRequest {
            scan_id: id.clone(),
            verdict: Verdict::Dismissed as i32,
            officer_id: "officer-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.operator_id.as_str(), report.operator_name.as_str()), ("officer-a", "officer-b"));
    server.shutdown().await.unwrap();

    // As stored: read back after a restart.
    let (server, ch) = server_with(
        dir.path(),
        tokens(&[("scanner-1", Role::Scanner, "tok-s"), ("officer-a", Role::Officer, "tok-a")]),
    )
    .await;
    let detail = FindingsClient::new(authed_as(&ch, "tok-a"))
        .get_scan(GetScanRequest { scan_id: id })
        .await
        .unwrap()
        .into_inner();
    let stored = detail.findings.unwrap().reports;
    let op: Vec<_> = stored.iter().filter(|r| r.r#type == ReportType::Operator as i32).collect();
    assert_eq!(op.len(), 1);
    assert_eq!((op[0].operator_id.as_str(), op[0].operator_name.as_str()), ("officer-a", "officer-b"));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn site_scopes_bound_what_scanners_push_and_officers_see() {
    let dir = tempfile::tempdir().unwrap();
    let mut auth = tokens(&[
        ("scanner-nl", Role::Scanner, "tok-snl"),
        ("scanner-any", Role::Scanner, "tok-sany"),
        ("officer-nl", Role::Officer, "tok-onl"),
        ("officer-any", Role::Officer, "tok-oany"),
    ]);
    auth.tokens[0].sites = vec!["NLRTM".into()];
    auth.tokens[2].sites = vec!["NLRTM".into()];
    let (server, ch) = server_with(dir.path(), auth).await;

    // A scanner pushes for its sites only.
    let nl = push_container(&authed_as(&ch, "tok-snl"), "NLRTM-01", "NL-1", false).await;
    let raw = raw_bytes(32, 16, 3);
    let mut h = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    h.metadata.as_mut().unwrap().site_id = "BEANR-01".into();
    let e = ScanIngestClient::new(authed_as(&ch, "tok-snl"))
        .push_scan(tokio_stream::iter(messages(&h, &[&raw], 256)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(
        e.message().contains("scanner-nl may push scans of the sites [\"NLRTM\"] only")
            && e.message().contains("site BEANR-01"),
        "{}",
        e.message()
    );
    let status = ScanIngestClient::new(authed_as(&ch, "tok-sany"))
        .get_upload_status(GetUploadStatusRequest { scan_id: h.scan_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, upload_status::State::Unknown as i32, "nothing of the refused push is kept");
    let be = push_container(&authed_as(&ch, "tok-sany"), "BEANR-01", "BE-1", false).await;

    // To the scoped scanner, BE's scan and unfinished upload are unknown and
    // cannot be aborted.
    let mut snl = ScanIngestClient::new(authed_as(&ch, "tok-snl"));
    let mut sany = ScanIngestClient::new(authed_as(&ch, "tok-sany"));
    let status = |id: &str| GetUploadStatusRequest { scan_id: id.into() };
    let state = snl.get_upload_status(status(&be)).await.unwrap().into_inner().state;
    assert_eq!(state, upload_status::State::Unknown as i32);
    let state = sany.get_upload_status(status(&be)).await.unwrap().into_inner().state;
    assert_eq!(state, upload_status::State::Complete as i32);
    let half = sany.push_scan(tokio_stream::iter(messages(&h, &[&raw[..512]], 256))).await.unwrap_err();
    assert_eq!(half.code(), Code::DataLoss, "{}", half.message());
    let aborted = snl.abort_upload(AbortUploadRequest { scan_id: h.scan_id.clone() }).await.unwrap().into_inner();
    assert!(!aborted.aborted);
    let state = snl.get_upload_status(status(&h.scan_id)).await.unwrap().into_inner().state;
    assert_eq!(state, upload_status::State::Unknown as i32);
    let held = sany.get_upload_status(status(&h.scan_id)).await.unwrap().into_inner();
    assert_eq!((held.state, held.planes[0].received_bytes), (upload_status::State::InProgress as i32, 512));
    assert!(sany.abort_upload(AbortUploadRequest { scan_id: h.scan_id.clone() }).await.unwrap().into_inner().aborted);

    // The unscoped officer sees both and adjudicates the Belgian scan first.
    let mut any = FindingsClient::new(authed_as(&ch, "tok-oany"));
    let all = any.list_scans(ListScansRequest::default()).await.unwrap().into_inner().scans;
    assert_eq!(all.len(), 2);
    let verdict = |id: &str| AdjudicateRequest { scan_id: id.into(), verdict: 2, ..Default::default() };
    any.adjudicate(verdict(&be)).await.unwrap();

    // The scoped officer: the listing leaves BE out, BE reads as not found.
    let mut o = FindingsClient::new(authed_as(&ch, "tok-onl"));
    let listed = o.list_scans(ListScansRequest::default()).await.unwrap().into_inner().scans;
    assert_eq!(listed.iter().map(|s| s.scan_id.as_str()).collect::<Vec<_>>(), [nl.as_str()]);
    let e = o.list_scans(ListScansRequest { site_id: "BEANR-01".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("site_id BEANR-01 is not among them"), "{}", e.message());
    let missing = new_id();
    for id in [&be, &missing] {
        let get = o.get_scan(GetScanRequest { scan_id: id.clone() }).await.unwrap_err();
        assert_eq!(get.code(), Code::NotFound);
        assert_eq!(get.message(), format!("no scan {id} is stored"), "out of scope reads like missing");
        let f = o.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.unwrap_err();
        assert_eq!(f.code(), Code::NotFound);
        let r = o.render_overlay(RenderOverlayRequest { scan_id: id.clone(), ..Default::default() }).await;
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
        let t = o.export_tdr(ExportTdrRequest { scan_id: id.clone(), report: 0 }).await.unwrap_err();
        assert_eq!(t.code(), Code::NotFound);
        assert_eq!(o.adjudicate(verdict(id)).await.unwrap_err().code(), Code::NotFound);
    }
    o.get_scan(GetScanRequest { scan_id: nl.clone() }).await.unwrap();
    o.adjudicate(verdict(&nl)).await.unwrap();

    // Watching from the first event: BE's adjudication (the earlier event) is
    // left out, NL's is the first the scoped officer gets.
    let mut watch = o.watch_findings(WatchFindingsRequest::default()).await.unwrap().into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message()).await.unwrap().unwrap();
    let first = first.unwrap();
    assert_eq!((first.scan_id.as_str(), first.site_id.as_str()), (nl.as_str(), "NLRTM-01"));
    assert!(first.cursor > 1, "an earlier event (BE's) was skipped");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn configurations_that_expose_the_server_do_not_start() {
    let dir = tempfile::tempdir().unwrap();
    // One identity, two roles.
    let mut c = config(dir.path(), Limits::default());
    c.auth = tokens(&[("ops", Role::Scanner, "a"), ("ops", Role::Admin, "b")]);
    let e = format!("{:#}", niix::server::start(c).await.err().unwrap());
    assert!(e.contains("[[auth.tokens]] entry 1 says scanner and [[auth.tokens]] entry 2 says admin"), "{e}");
    // Bearer tokens on a non-loopback address without TLS.
    let mut c = config(dir.path(), Limits::default());
    c.listen = "0.0.0.0:0".parse().unwrap();
    c.auth = tokens(&[("s", Role::Scanner, "a")]);
    let e = format!("{:#}", niix::server::start(c).await.err().unwrap());
    assert!(e.contains("without TLS") && e.contains("--insecure"), "{e}");
    // /metrics on a non-loopback address.
    let mut c = config(dir.path(), Limits::default());
    c.metrics_listen = Some("0.0.0.0:0".parse().unwrap());
    let e = format!("{:#}", niix::server::start(c).await.err().unwrap());
    assert!(e.contains("/metrics on 0.0.0.0:0") && e.contains("no authentication"), "{e}");
}
