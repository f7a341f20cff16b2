//! Partner exchange: agreements decide what is shared, redaction happens
//! before signing, packages verify offline, and the feed resumes from a
//! cursor with nothing missed or repeated.

mod common;

use std::time::Duration;

use common::*;
use niix::auth::Role;
use niix::client::{Authed, authed};
use niix::config::Limits;
use niix::exchange::{Agreement, Content, ExchangeConfig, Redact, keys};
use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::*;
use prost::Message;
use tokio_stream::StreamExt;

async fn analysed(conn: &Authed, id: &str) {
    let mut c = FindingsClient::new(conn.clone());
    for _ in 0..300 {
        let f = c.get_findings(GetFindingsRequest { scan_id: id.into() }).await.unwrap().into_inner();
        if f.status == ScanStatus::Analyzed as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} not analysed");
}

/// Runs the `niix` binary.
fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_niix")).args(args).env("NIIX_LOG", "warn").output().unwrap()
}

/// Packages from a subscription until it is quiet for a while.
async fn drain(conn: &Authed, cursor: u64) -> Vec<ResultPackage> {
    let mut s = ExchangeClient::new(conn.clone()).subscribe(SubscribeRequest { cursor }).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(700), s.next()).await {
        out.push(p.unwrap());
    }
    out
}

/// NL's server, signing with a fresh key, sharing under `agreements`, with
/// its four callers connected.
struct Nl {
    server: niix::server::RunningServer,
    url: String,
    /// NL's public key.
    public: String,
    scanner: Authed,
    officer: Authed,
    de: Authed,
    fr: Authed,
}

async fn nl(dir: &std::path::Path, agreements: Vec<Agreement>) -> Nl {
    let (key_file, public) = keys::init(&dir.join("keys")).unwrap();
    let mut config = config(&dir.join("data"), Limits::default());
    config.auth = tokens(&[
        ("scanner", Role::Scanner, "t-scan"),
        ("officer", Role::Officer, "t-officer"),
        ("DE", Role::Partner, "t-de"),
        ("FR", Role::Partner, "t-fr"),
    ]);
    config.exchange =
        ExchangeConfig { administration: "NL".into(), signing_key: Some(key_file), agreements, ..Default::default() };
    let server = niix::server::start(config).await.unwrap();
    let url = format!("http://{}", server.addr);
    let ch = niix::client::connect(&url).await.unwrap();
    let conn = |token| authed(ch.clone(), Some(token)).unwrap();
    Nl { scanner: conn("t-scan"), officer: conn("t-officer"), de: conn("t-de"), fr: conn("t-fr"), server, url, public }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_receives_exactly_its_redacted_signed_packages() {
    let dir = tempfile::tempdir().unwrap();
    let Nl { server, url, public, scanner, officer, de, fr } = nl(
        dir.path(),
        vec![Agreement {
            name: "NL-DE-2026-01".into(),
            partner: "DE".into(),
            sites: vec!["NLRTM".into()],
            conveyances: vec![],
            decisions: vec!["alarm".into()],
            content: Content::Findings,
            redact: vec![Redact::VehiclePlate],
            operator_reports: false,
            ..Default::default()
        }],
    )
    .await;

    let shared = push_container(&scanner, "NLRTM", "AB-123-C", true).await;
    let clear = push_container(&scanner, "NLRTM", "AB-124-C", false).await;
    let elsewhere = push_container(&scanner, "DEHAM", "AB-125-C", true).await;
    for id in [&shared, &clear, &elsewhere] {
        analysed(&officer, id).await;
    }
    // An officer's verdict is not shared under this agreement.
    FindingsClient::new(officer.clone())
        .adjudicate(AdjudicateRequest {
            scan_id: shared.clone(),
            verdict: 1,
            officer_id: "NL-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let got = drain(&de, 0).await;
    assert_eq!(got.len(), 1, "only the NLRTM alarm is shared");
    let content = keys::verify(&got[0], &public).unwrap();
    assert_eq!((content.issuer.as_str(), content.recipient.as_str()), ("NL", "DE"));
    assert_eq!(content.scan_id, shared);
    assert_eq!(content.agreement, "NL-DE-2026-01");
    let meta = content.metadata.clone().unwrap();
    assert_eq!(meta.vehicle_plate, "", "the plate is redacted before signing");
    assert_eq!(meta.container_numbers, vec!["CSQU3054383".to_string()], "other fields stay");
    assert_eq!(content.reports.len(), 1);
    assert_eq!(content.reports[0].r#type, ReportType::Machine as i32);
    assert_eq!(content.reports[0].decision, AlarmDecision::Alarm as i32);

    // Resume from the cursor: nothing repeated, the next entitled package arrives.
    let next = push_container(&scanner, "NLRTM", "ZZ-9", true).await;
    analysed(&officer, &next).await;
    let more = drain(&de, content.sequence).await;
    assert_eq!(more.len(), 1);
    let c2 = keys::verify(&more[0], &public).unwrap();
    assert_eq!(c2.scan_id, next);
    assert!(c2.sequence > content.sequence);

    // GetPackage returns the same signed bytes.
    let again = ExchangeClient::new(de.clone())
        .get_package(GetPackageRequest { package_id: content.package_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, got[0]);

    // A partner without an agreement, and other roles, get nothing.
    let err = ExchangeClient::new(fr).subscribe(SubscribeRequest { cursor: 0 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = ExchangeClient::new(officer).subscribe(SubscribeRequest { cursor: 0 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // The partner's CLI saves and verifies; verify works offline and catches tampering.
    let out = dir.path().join("inbox");
    let pulled = cli(&[
        "partner",
        "pull",
        "--server",
        &url,
        "--token",
        "t-de",
        "--out",
        out.to_str().unwrap(),
        "--key",
        &public,
    ]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "niixpkg"))
        .collect();
    assert_eq!(files.len(), 2);
    server.shutdown().await.unwrap();

    let ok = cli(&["verify", files[0].to_str().unwrap(), "--key", &public]);
    assert!(ok.status.success() && String::from_utf8_lossy(&ok.stdout).starts_with("valid"));
    let mut pkg = ResultPackage::decode(std::fs::read(&files[0]).unwrap().as_slice()).unwrap();
    let mut c = PackageContent::decode(pkg.content.as_slice()).unwrap();
    c.metadata.as_mut().unwrap().vehicle_plate = "AB-123-C".into();
    pkg.content = c.encode_to_vec();
    let forged = dir.path().join("forged.niixpkg");
    std::fs::write(&forged, pkg.encode_to_vec()).unwrap();
    let bad = cli(&["verify", forged.to_str().unwrap(), "--key", &public]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("altered or forged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_planes_are_pulled_in_chunks_and_checked_against_the_signed_digest() {
    let dir = tempfile::tempdir().unwrap();
    let Nl { server, url, public, scanner, officer, de, fr } = nl(
        dir.path(),
        vec![
            Agreement {
                name: "NL-DE".into(),
                partner: "DE".into(),
                content: Content::FullPlanes,
                ..Default::default()
            },
            Agreement { name: "NL-FR".into(), partner: "FR".into(), ..Default::default() },
        ],
    )
    .await;
    let id = push_container(&scanner, "NLRTM", "AB-1", true).await;
    analysed(&officer, &id).await;
    let got = drain(&de, 0).await;
    assert_eq!(got.len(), 1);
    let content = keys::verify(&got[0], &public).unwrap();
    assert!(content.full_planes);
    let digest = content.planes[0].sha256.clone();

    // GetPlane streams the stored bytes, and resumes from an offset.
    let fetch = |offset: u64| {
        let mut c = ExchangeClient::new(de.clone());
        let req = GetPlaneRequest { package_id: content.package_id.clone(), plane_index: 0, offset };
        async move {
            let mut s = c.get_plane(req).await.unwrap().into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = s.next().await {
                bytes.extend(chunk.unwrap().data);
            }
            bytes
        }
    };
    let whole = fetch(0).await;
    assert_eq!(sha256(&whole), digest);
    assert_eq!(fetch(1000).await, whole[1000..]);
    // Another partner's agreement does not share planes.
    let err = ExchangeClient::new(fr)
        .get_plane(GetPlaneRequest { package_id: content.package_id.clone(), plane_index: 0, offset: 0 })
        .await
        .unwrap_err();
    assert!(matches!(err.code(), tonic::Code::PermissionDenied | tonic::Code::NotFound), "{err:?}");

    // The partner's CLI saves the plane beside the package; verify checks both.
    let out = dir.path().join("inbox");
    let pulled = cli(&[
        "partner",
        "pull",
        "--server",
        &url,
        "--token",
        "t-de",
        "--out",
        out.to_str().unwrap(),
        "--key",
        &public,
    ]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let pkg_file = std::path::PathBuf::from(String::from_utf8_lossy(&pulled.stdout).trim());
    let plane_file = niix::cli::partner::plane_path(&pkg_file, 0);
    assert_eq!(std::fs::read(&plane_file).unwrap(), whole);
    server.shutdown().await.unwrap();
    let ok = cli(&["verify", pkg_file.to_str().unwrap(), "--key", &public]);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("1 plane file(s) match"), "{ok:?}");
    let mut bad = whole.clone();
    bad[7] ^= 0x40;
    std::fs::write(&plane_file, bad).unwrap();
    let tampered = cli(&["verify", pkg_file.to_str().unwrap(), "--key", &public]);
    assert!(!tampered.status.success());
    assert!(String::from_utf8_lossy(&tampered.stderr).contains("is not the signed"));
}
