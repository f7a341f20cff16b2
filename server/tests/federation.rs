//! Push federation between two administrations' niix instances: NL pushes
//! the packages its agreement entitles DE to, over mutual TLS; DE verifies
//! them against NL's configured key and stores them as foreign scans. DE
//! crashing mid-stream loses nothing and receives nothing twice; foreign
//! scans are not passed on; forged, misaddressed and corrupted deliveries
//! are refused and leave nothing behind.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use niix::auth::{Role, token_hash};
use niix::client::{Authed, ClientTls, authed, connect_tls};
use niix::config::Limits;
use niix::exchange::receive::foreign_scan_id;
use niix::exchange::{Agreement, Content, ExchangeConfig, Issuer, PushTarget, Redact, keys};
use niix::store::MetadataStore;
use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::receive_request::Part;
use niix_proto::v1::*;
use prost::Message;

/// Waits until the scan is analysed on its own server and says whether it alarmed.
async fn alarmed(conn: &Authed, id: &str) -> bool {
    let mut c = FindingsClient::new(conn.clone());
    for _ in 0..600 {
        let s = c.get_scan(GetScanRequest { scan_id: id.into() }).await.unwrap().into_inner().scan.unwrap();
        if s.status == ScanStatus::Analyzed as i32 {
            return s.decision == AlarmDecision::Alarm as i32;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} not analysed");
}

async fn foreign_scans(officer: &Authed) -> Vec<Scan> {
    let req = ListScansRequest { page_size: 1000, ..Default::default() };
    FindingsClient::new(officer.clone()).list_scans(req).await.unwrap().into_inner().scans
}

/// Polls until `officer` sees `n` scans (or the time is up) and returns them.
async fn wait_for_scans(officer: &impl AsyncFn() -> Option<Authed>, n: usize) -> Vec<Scan> {
    let mut last = Vec::new();
    for _ in 0..600 {
        if let Some(c) = officer().await {
            last = foreign_scans(&c).await;
            if last.len() >= n {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("expected {n} scans, have {}", last.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nl_pushes_alarms_to_de_over_mutual_tls_and_a_de_crash_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki { dir: tmp.path().to_path_buf() };
    let (nl_ca, nl_issuer) = ca("NL customs CA");
    let (de_ca, de_issuer) = ca("DE customs CA");
    let (de_server, de_server_key) = leaf("localhost", &de_issuer);
    let (nl_client, nl_client_key) = leaf("NL", &nl_issuer);
    let (nl_key_file, nl_public) = keys::init(&tmp.path().join("nl-keys")).unwrap();

    // DE: TLS with client certificates from NL's CA; NL's certificate is the
    // partner NL; NL's packages verify with NL's public key.
    let de_port = free_port();
    let de_data = tmp.path().join("de-data");
    let de_config = pki.write(
        "de.toml",
        &format!(
            "[analysis]\nenabled = false\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             [[auth.tokens]]\nidentity = \"de-officer\"\nrole = \"officer\"\nsha256 = \"{}\"\n\
             [[auth.certificates]]\nidentity = \"NL\"\nrole = \"partner\"\nsha256 = \"{}\"\n\
             [exchange]\nadministration = \"DE\"\n\
             [[exchange.issuers]]\nadministration = \"NL\"\npublic_key = \"{nl_public}\"\n",
            pki.write("de-server.pem", &de_server.pem()),
            pki.write("de-server.key", &de_server_key.serialize_pem()),
            pki.write("nl-ca.pem", &nl_ca.pem()),
            token_hash("t-de-officer"),
            sha256(nl_client.der()),
        ),
    );
    let de_args: Vec<std::ffi::OsString> =
        vec!["--config".into(), de_config.into(), "--data".into(), de_data.clone().into()];
    let de_ca_pem = pki.write("de-ca.pem", &de_ca.pem());
    let de_url = format!("https://127.0.0.1:{de_port}");
    let de_tls = ClientTls { ca: Some(de_ca_pem.clone()), domain: Some("localhost".into()), ..Default::default() };
    let de_officer = async || {
        let ch = connect_tls(&de_url, Some(&de_tls)).await.ok()?;
        Some(authed(ch, Some("t-de-officer")).unwrap())
    };
    let de = Server::spawn_args(de_port, &de_args).await;

    // NL: shares ALARM findings of NLRTM with DE, plate redacted,
    // downsampled planes included, pushed with NL's client certificate.
    let mut nl_config = config(&tmp.path().join("nl-data"), Limits::default());
    nl_config.auth = tokens(&[("scanner", Role::Scanner, "t-scan"), ("officer", Role::Officer, "t-officer")]);
    nl_config.exchange = ExchangeConfig {
        administration: "NL".into(),
        signing_key: Some(nl_key_file),
        agreements: vec![Agreement {
            name: "NL-DE-2026-01".into(),
            partner: "DE".into(),
            sites: vec!["NLRTM".into()],
            decisions: vec!["alarm".into()],
            content: Content::FindingsPlanes,
            plane_width: 64,
            redact: vec![Redact::VehiclePlate],
            push: Some(PushTarget {
                endpoint: de_url.clone(),
                ca: Some(de_ca_pem.clone()),
                cert: Some(pki.write("nl-client.pem", &nl_client.pem())),
                key: Some(pki.write("nl-client.key", &nl_client_key.serialize_pem())),
                domain: Some("localhost".into()),
                token_file: None,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let nl = niix::server::start(nl_config).await.unwrap();
    let nl_ch = niix::client::connect(&format!("http://{}", nl.addr)).await.unwrap();
    let (scanner, nl_officer) =
        (authed(nl_ch.clone(), Some("t-scan")).unwrap(), authed(nl_ch, Some("t-officer")).unwrap());

    // First wave: three entitled alarms among scans DE must not get.
    let mut entitled = BTreeSet::new();
    let mut wave = Vec::new();
    for (site, alarm) in [("NLRTM", true), ("NLRTM", false), ("NLRTM", true), ("DEHAM", true), ("NLRTM", true)] {
        wave.push((push_container(&scanner, site, "AB-123-C", alarm).await, site));
    }
    for (id, site) in &wave {
        if alarmed(&nl_officer, id).await && *site == "NLRTM" {
            entitled.insert(id.clone());
        }
    }
    assert_eq!(entitled.len(), 3, "the demo model alarms on the dense block only");

    // DE crashes as soon as the first package is in.
    wait_for_scans(&de_officer, 1).await;
    de.kill9();

    // Second wave while DE is down.
    for alarm in [true, false, true] {
        let id = push_container(&scanner, "NLRTM", "ZZ-999-Z", alarm).await;
        if alarmed(&nl_officer, &id).await {
            entitled.insert(id);
        }
    }
    assert_eq!(entitled.len(), 5);

    // DE comes back on the same port; NL's outbox catches up.
    let de = Server::spawn_args(de_port, &de_args).await;
    wait_for_scans(&de_officer, entitled.len()).await;
    // NL's outbox has decided on every event NL has: nothing more will come.
    let nl_db = niix::store::SqliteMetadata::open(&tmp.path().join("nl-data/niix.db")).unwrap();
    let last = nl_db.last_event().unwrap();
    for _ in 0..600 {
        if nl_db.outbox("DE").unwrap().delivered == last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(nl_db.outbox("DE").unwrap().delivered, last, "NL's cursor reached its last event");
    let officer = de_officer().await.unwrap();
    let scans_after = foreign_scans(&officer).await;
    let got: BTreeSet<String> = scans_after.iter().map(|s| s.scan_id.clone()).collect();
    let expected: BTreeSet<String> = entitled.iter().map(|id| foreign_scan_id("NL", id)).collect();
    assert_eq!(got, expected, "exactly the entitled scans arrive, under NL's namespace, nothing else");
    for s in &scans_after {
        assert_eq!(s.origin, "NL");
        let meta = s.metadata.clone().unwrap();
        assert_eq!(meta.vehicle_plate, "", "the plate never leaves NL");
        assert_eq!(meta.site_id, "NLRTM");
        assert_eq!(s.decision, AlarmDecision::Alarm as i32);
        assert_eq!(s.planes.len(), 1);
        assert_eq!(s.planes[0].downsampled, 4, "256 px wide shared at most 64 px wide");
        let f = FindingsClient::new(officer.clone())
            .get_findings(GetFindingsRequest { scan_id: s.scan_id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(f.reports.len(), 1, "each package stored once");
    }
    // DE's officers see the downsampled plane with NL's regions drawn on it.
    let overlay = FindingsClient::new(officer.clone())
        .render_overlay(RenderOverlayRequest { scan_id: scans_after[0].scan_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((overlay.width, overlay.height), (64, 32));
    drop(de);
    nl.shutdown().await.unwrap();

    // Every stored package verifies with NL's key; the audit logs show both sides.
    let db = niix::store::SqliteMetadata::open(&de_data.join("niix.db")).unwrap();
    let blobs = niix::store::FsBlobs::open(&de_data).unwrap();
    let mut packages = 0;
    for id in &entitled {
        for p in db.received_packages(&foreign_scan_id("NL", id)).unwrap() {
            let bytes = std::fs::read(blobs.blob_path(&p.package_sha256)).unwrap();
            let content = keys::verify(&ResultPackage::decode(bytes.as_slice()).unwrap(), &nl_public).unwrap();
            assert_eq!((content.scan_id.as_str(), content.recipient.as_str()), (id.as_str(), "DE"));
            packages += 1;
        }
    }
    assert_eq!(packages, entitled.len(), "each entitled package stored exactly once, after two DE starts");
    let log = db.audit_tail(10_000).unwrap();
    assert!(log.iter().any(|r| r.entry.identity == "NL" && r.entry.action == "Receive" && r.entry.outcome == "OK"));
    let nl_log = nl_db.audit_tail(10_000).unwrap();
    let pushed = nl_log.iter().filter(|r| r.entry.action == "Push" && r.entry.outcome == "OK").count();
    assert!(pushed >= entitled.len(), "every delivery is audited");
    assert!(nl_db.outbox("DE").unwrap().delivered > 0);
}

/// A second in-process pair: full planes pushed with a token, refusals of
/// bad deliveries, and foreign scans not re-shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_checks_every_delivery_and_foreign_scans_stay_put() {
    let tmp = tempfile::tempdir().unwrap();
    let (nl_key_file, nl_public) = keys::init(&tmp.path().join("nl-keys")).unwrap();
    let (de_key_file, _) = keys::init(&tmp.path().join("de-keys")).unwrap();
    let (rogue_key_file, _) = keys::init(&tmp.path().join("rogue-keys")).unwrap();

    // DE accepts NL's packages; shares with FR, but not foreign scans.
    let mut de_config = config(&tmp.path().join("de"), Limits::default());
    de_config.analysis.enabled = false;
    de_config.auth = tokens(&[
        ("NL", Role::Partner, "t-nl"),
        ("BE", Role::Partner, "t-be"),
        ("FR", Role::Partner, "t-fr"),
        ("de-officer", Role::Officer, "t-off"),
        ("de-scanner", Role::Scanner, "t-de-scan"),
    ]);
    de_config.exchange = ExchangeConfig {
        administration: "DE".into(),
        signing_key: Some(de_key_file),
        agreements: vec![Agreement {
            name: "DE-FR".into(),
            partner: "FR".into(),
            operator_reports: true,
            ..Default::default()
        }],
        issuers: vec![
            Issuer { administration: "NL".into(), public_key: nl_public.clone() },
            Issuer { administration: "BE".into(), public_key: nl_public.clone() },
        ],
        ..Default::default()
    };
    let de = niix::server::start(de_config).await.unwrap();
    let de_url = format!("http://{}", de.addr);
    let de_ch = niix::client::connect(&de_url).await.unwrap();
    let as_de = |tok: &str| authed(de_ch.clone(), Some(tok)).unwrap();

    // NL pushes full planes of everything to DE with a token.
    let token_file = tmp.path().join("nl-at-de.token");
    std::fs::write(&token_file, "t-nl\n").unwrap();
    let mut nl_config = config(&tmp.path().join("nl"), Limits::default());
    nl_config.exchange = ExchangeConfig {
        administration: "NL".into(),
        signing_key: Some(nl_key_file.clone()),
        agreements: vec![Agreement {
            name: "NL-DE-full".into(),
            partner: "DE".into(),
            content: Content::FullPlanes,
            push: Some(PushTarget {
                endpoint: de_url.clone(),
                ca: None,
                cert: None,
                key: None,
                domain: None,
                token_file: Some(token_file),
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let nl = niix::server::start(nl_config).await.unwrap();
    let nl_conn = authed(niix::client::connect(&format!("http://{}", nl.addr)).await.unwrap(), None).unwrap();
    let id = push_container(&nl_conn, "NLRTM", "AB-1", true).await;
    alarmed(&nl_conn, &id).await;
    let officer = as_de("t-off");
    let scans = wait_for_scans(&async || Some(officer.clone()), 1).await;
    let nl_scan = FindingsClient::new(nl_conn.clone())
        .get_scan(GetScanRequest { scan_id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .scan
        .unwrap();
    assert_eq!(scans[0].scan_id, foreign_scan_id("NL", &id));
    assert_eq!(scans[0].origin, "NL");
    assert_eq!(scans[0].planes.len(), 1);
    assert_eq!(scans[0].planes[0].sha256, nl_scan.planes[0].sha256, "full planes arrive byte for byte");
    assert_eq!(scans[0].planes[0].downsampled, 1);
    let overlay = FindingsClient::new(officer.clone())
        .render_overlay(RenderOverlayRequest { scan_id: scans[0].scan_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overlay.width, 256);
    // A TIFF plane goes out as its pixels only, and DE checks them as ingest would.
    let tif = write_tiff(&tmp.path().join("nl.tif"), 256, 128, 9);
    let tiff_header = header(&new_id(), plane(PlaneEncoding::Tiff, 256, 128, &tif));
    let tiff_id = scan_ingest_client::ScanIngestClient::new(nl_conn.clone())
        .push_scan(tokio_stream::iter(messages(&tiff_header, &[&tif], 1 << 16)))
        .await
        .unwrap()
        .into_inner()
        .scan_id;
    alarmed(&nl_conn, &tiff_id).await;
    let scans = wait_for_scans(&async || Some(officer.clone()), 2).await;
    let shared = scans.iter().find(|s| s.scan_id == foreign_scan_id("NL", &tiff_id)).unwrap();
    let pixels: Vec<u8> = samples(256, 128, 9).iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(shared.planes[0].descriptor.as_ref().unwrap().encoding, PlaneEncoding::RawU16le as i32);
    assert_eq!(shared.planes[0].sha256, sha256(&pixels), "DE holds the TIFF's pixels, not the file");
    nl.shutdown().await.unwrap();

    // FR's feed from DE skips NL's scan: the first package FR gets is about
    // a scan of DE's own that an officer adjudicated after NL's arrived.
    let own = push_container(&as_de("t-de-scan"), "DEHAM", "D-1", true).await;
    FindingsClient::new(officer.clone())
        .adjudicate(AdjudicateRequest {
            scan_id: own.clone(),
            verdict: 1,
            officer_id: "DE-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut fr = ExchangeClient::new(as_de("t-fr"));
    let mut feed = fr.subscribe(SubscribeRequest { cursor: 0 }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), tokio_stream::StreamExt::next(&mut feed)).await;
    let first = PackageContent::decode(first.unwrap().unwrap().unwrap().content.as_slice()).unwrap();
    assert_eq!(first.scan_id, own, "a foreign scan is not re-shared");

    // Hand-made deliveries, each refused with its reason, nothing stored.
    let nl_key = keys::load(&nl_key_file).unwrap();
    let plane_bytes = raw_bytes(16, 8, 3);
    let descriptor =
        PlaneDescriptor { sha256: sha256(&plane_bytes), ..plane(PlaneEncoding::RawU16le, 16, 8, &plane_bytes) };
    let content = |recipient: &str, seq: u64| PackageContent {
        package_id: niix::exchange::package_id("NL", recipient, seq),
        issuer: "NL".into(),
        recipient: recipient.into(),
        sequence: seq,
        scan_id: new_id(),
        metadata: Some(ScanMetadata { site_id: "NLRTM".into(), ..Default::default() }),
        planes: vec![descriptor.clone()],
        reports: vec![ThreatReport { r#type: ReportType::Machine as i32, ..Default::default() }],
        ..Default::default()
    };
    let deliver = |tok: &'static str, parts: Vec<ReceiveRequest>| {
        let mut c = ExchangeClient::new(as_de(tok));
        async move { c.receive(tokio_stream::iter(parts)).await.map(|r| r.into_inner()) }
    };
    let pkg = |p: ResultPackage| ReceiveRequest { part: Some(Part::Package(p)) };

    let good = content("DE", 1000);
    let ok = deliver("t-nl", vec![pkg(keys::sign(&nl_key, &good))]).await.unwrap();
    assert!(!ok.duplicate);
    let again = deliver("t-nl", vec![pkg(keys::sign(&nl_key, &good))]).await.unwrap();
    assert!(again.duplicate, "idempotent on package id");
    // Without planes or an overlay there is nothing to draw; a shared overlay is shown as signed.
    let overlay = |scan_id: String| {
        let mut c = FindingsClient::new(officer.clone());
        async move { c.render_overlay(RenderOverlayRequest { scan_id, ..Default::default() }).await }
    };
    let err = overlay(foreign_scan_id("NL", &good.scan_id)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 3, 2);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header().unwrap().write_image_data(&[200; 18]).unwrap();
    }
    let with_overlay = PackageContent { overlay_png: png.clone(), ..content("DE", 1007) };
    deliver("t-nl", vec![pkg(keys::sign(&nl_key, &with_overlay))]).await.unwrap();
    let shown = overlay(foreign_scan_id("NL", &with_overlay.scan_id)).await.unwrap().into_inner();
    assert_eq!((shown.png, shown.width, shown.height), (png, 3, 2));

    let mut tampered = keys::sign(&nl_key, &content("DE", 1001));
    let last = tampered.content.len() - 1;
    tampered.content[last] ^= 1;
    let cases: Vec<(&'static str, Vec<ReceiveRequest>, tonic::Code, &str)> = vec![
        ("t-nl", vec![pkg(tampered)], tonic::Code::DataLoss, "altered or forged"),
        (
            "t-nl",
            vec![pkg(keys::sign(&keys::load(&rogue_key_file).unwrap(), &content("DE", 1002)))],
            tonic::Code::PermissionDenied,
            "signed by key",
        ),
        (
            "t-be",
            vec![pkg(keys::sign(&nl_key, &content("DE", 1003)))],
            tonic::Code::PermissionDenied,
            "may not deliver packages issued by NL",
        ),
        ("t-nl", vec![pkg(keys::sign(&nl_key, &content("FR", 1004)))], tonic::Code::FailedPrecondition, "addressed to"),
        (
            "t-fr",
            vec![pkg(keys::sign(
                &keys::load(&tmp.path().join("de-keys").join(keys::PRIVATE_KEY_FILE)).unwrap(),
                &PackageContent { issuer: "FR".into(), ..content("DE", 1005) },
            ))],
            tonic::Code::PermissionDenied,
            "FR is not an issuer",
        ),
        (
            "t-be",
            vec![pkg(keys::sign(
                &keys::load(&tmp.path().join("de-keys").join(keys::PRIVATE_KEY_FILE)).unwrap(),
                &PackageContent { issuer: "FR".into(), ..content("DE", 1008) },
            ))],
            tonic::Code::PermissionDenied,
            "not accepted here",
        ),
        ("t-nl", vec![], tonic::Code::InvalidArgument, "first message must be the package"),
    ];
    for (tok, parts, code, text) in cases {
        let err = deliver(tok, parts).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(text), "{:?} lacks {text:?}", err.message());
    }
    // Full planes whose bytes do not match the signed digest.
    let bytes = plane_bytes.clone();
    let mut full = content("DE", 1006);
    full.full_planes = true;
    let mut wrong = bytes.clone();
    wrong[0] ^= 1;
    let chunk =
        ReceiveRequest { part: Some(Part::Chunk(PlaneChunk { plane_index: 0, offset: 0, data: wrong.into() })) };
    let err = deliver("t-nl", vec![pkg(keys::sign(&nl_key, &full)), chunk]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{}", err.message());
    let truncated = ReceiveRequest {
        part: Some(Part::Chunk(PlaneChunk { plane_index: 0, offset: 0, data: bytes[..100].to_vec().into() })),
    };
    let err = deliver("t-nl", vec![pkg(keys::sign(&nl_key, &full)), truncated]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{}", err.message());
    // Only the two good packages and NL's two pushed scans are stored.
    assert_eq!(foreign_scans(&officer).await.iter().filter(|s| !s.origin.is_empty()).count(), 4);
    de.shutdown().await.unwrap();
}

/// DE accepting NL's and BE's packages (each with its own key), with a
/// partner XX that is not an issuer and an officer.
struct De {
    server: niix::server::RunningServer,
    channel: tonic::transport::Channel,
    nl_key: ed25519_dalek::SigningKey,
    be_key: ed25519_dalek::SigningKey,
}

async fn de_accepting_nl_and_be(dir: &std::path::Path) -> De {
    let (nl_file, nl_public) = keys::init(&dir.join("nl-keys")).unwrap();
    let (be_file, be_public) = keys::init(&dir.join("be-keys")).unwrap();
    let mut config = config(&dir.join("de"), Limits::default());
    config.analysis.enabled = false;
    config.auth = tokens(&[
        ("NL", Role::Partner, "t-nl"),
        ("BE", Role::Partner, "t-be"),
        ("XX", Role::Partner, "t-xx"),
        ("de-officer", Role::Officer, "t-off"),
    ]);
    config.exchange = ExchangeConfig {
        administration: "DE".into(),
        issuers: vec![
            Issuer { administration: "NL".into(), public_key: nl_public },
            Issuer { administration: "BE".into(), public_key: be_public },
        ],
        ..Default::default()
    };
    let server = niix::server::start(config).await.unwrap();
    let channel = niix::client::connect(&format!("http://{}", server.addr)).await.unwrap();
    De { server, channel, nl_key: keys::load(&nl_file).unwrap(), be_key: keys::load(&be_file).unwrap() }
}

/// Starts a raw `Exchange.Receive` call as `token` whose body is a gRPC
/// message prefix declaring `declared` bytes followed by `sent` bytes of it,
/// and then nothing (the body stays open). Returns the gRPC status the
/// server answers with, and the body's sender (dropping it ends the body).
async fn half_sent_receive(
    channel: &tonic::transport::Channel,
    token: &str,
    declared: u32,
    sent: usize,
) -> (Option<String>, String, tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>) {
    use tower::Service;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let request = http::Request::builder()
        .method("POST")
        .uri("/niix.v1.Exchange/Receive")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::new(body))
        .unwrap();
    let feeder = tx.clone();
    tokio::spawn(async move {
        let mut prefix = vec![0u8];
        prefix.extend(declared.to_be_bytes());
        if feeder.send(Ok(prefix.into())).await.is_err() {
            return;
        }
        for _ in 0..sent / (1 << 20) {
            if feeder.send(Ok(vec![7u8; 1 << 20].into())).await.is_err() {
                return;
            }
        }
    });
    let mut svc = channel.clone();
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), svc.call(request))
        .await
        .expect("the server answers while the message is still incomplete")
        .unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    (header("grpc-status"), header("grpc-message").unwrap_or_default(), tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_refuses_non_issuers_and_oversized_messages_before_reading_them_and_bounds_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let de = de_accepting_nl_and_be(tmp.path()).await;
    // XX is a partner but no issuer: sixteen halves of 64 MiB messages at
    // once, as in the attack, are each refused while their bodies are open.
    let attack: Vec<_> = (0..16)
        .map(|_| {
            let ch = de.channel.clone();
            tokio::spawn(async move { half_sent_receive(&ch, "t-xx", 64 << 20, 32 << 20).await })
        })
        .collect();
    let mut open = Vec::new();
    for a in attack {
        let (status, message, body) = a.await.unwrap();
        assert_eq!(status.as_deref(), Some("7"), "PERMISSION_DENIED: {message}");
        assert!(
            message.contains("XX%20is%20not%20an%20issuer") || message.contains("XX is not an issuer"),
            "{message}"
        );
        open.push(body);
    }
    // An issuer declaring a message over max_receive_message_bytes is refused
    // from the length prefix.
    let (status, message, _open2) = half_sent_receive(&de.channel, "t-nl", 64 << 20, 4 << 20).await;
    assert_eq!(status.as_deref(), Some("8"), "RESOURCE_EXHAUSTED: {message}");
    // Two deliveries of NL may be open at once; a third is refused.
    let hold = |token: &'static str| {
        let ch = de.channel.clone();
        tokio::spawn(async move { half_sent_receive(&ch, token, 1 << 20, 0).await })
    };
    let pending = [hold("t-nl"), hold("t-nl"), hold("t-be")];
    // Each holds its slot until its body ends; let the server take them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // (On a slow machine the two may not hold their slots yet: a third that
    // is not answered at once is dropped and sent again.)
    let mut attempts = 0;
    let (status, message, _third) = loop {
        let third = half_sent_receive(&de.channel, "t-nl", 1 << 20, 0);
        match tokio::time::timeout(Duration::from_secs(3), third).await {
            Ok(answer) => break answer,
            Err(_) => attempts += 1,
        }
        assert!(attempts < 10, "a third delivery of NL was never refused");
    };
    assert_eq!(status.as_deref(), Some("8"), "RESOURCE_EXHAUSTED: {message}");
    assert!(message.contains("deliveries%20in%20progress") || message.contains("deliveries in progress"), "{message}");
    // None of the open ones was answered, BE's included: its slots are its own.
    assert!(pending.iter().all(|t| !t.is_finished()));
    // Nothing of it was stored.
    let officer = authed(de.channel.clone(), Some("t-off")).unwrap();
    assert!(foreign_scans(&officer).await.is_empty());
    pending.iter().for_each(|t| t.abort());
    drop(open);
    de.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_headers_meet_the_ingest_rules_and_issuers_cannot_write_each_others_scans() {
    let tmp = tempfile::tempdir().unwrap();
    let de = de_accepting_nl_and_be(tmp.path()).await;
    let bytes = raw_bytes(16, 8, 3);
    let good_plane = PlaneDescriptor { sha256: sha256(&bytes), ..plane(PlaneEncoding::RawU16le, 16, 8, &bytes) };
    let scan_id = new_id();
    let content = |issuer: &str, seq: u64| PackageContent {
        package_id: niix::exchange::package_id(issuer, "DE", seq),
        issuer: issuer.into(),
        recipient: "DE".into(),
        sequence: seq,
        scan_id: scan_id.clone(),
        metadata: Some(ScanMetadata { site_id: format!("{issuer}SITE"), ..Default::default() }),
        planes: vec![good_plane.clone()],
        reports: vec![ThreatReport {
            r#type: ReportType::Machine as i32,
            comment: issuer.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let deliver = |token: &str, package: ResultPackage| {
        let mut c = ExchangeClient::new(authed(de.channel.clone(), Some(token)).unwrap());
        async move {
            let parts = vec![ReceiveRequest { part: Some(Part::Package(package)) }];
            c.receive(tokio_stream::iter(parts)).await.map(|r| r.into_inner())
        }
    };
    let officer = authed(de.channel.clone(), Some("t-off")).unwrap();

    // Descriptors a scanner could not push are refused from an issuer too.
    let wide = PlaneDescriptor { kind: 0, encoding: 0, width: 300_000, ..good_plane.clone() };
    let huge_png = PlaneDescriptor {
        encoding: PlaneEncoding::Png as i32,
        width: 65536,
        height: 65536,
        byte_length: 555_000,
        ..good_plane.clone()
    };
    let tiny_png = {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 4, 4);
        enc.set_depth(png::BitDepth::Sixteen);
        enc.write_header().unwrap().write_image_data(&[0; 32]).unwrap();
        out
    };
    let cases: Vec<(PackageContent, tonic::Code, &str)> = vec![
        (
            PackageContent { planes: vec![wide.clone(); 100], ..content("NL", 1) },
            tonic::Code::ResourceExhausted,
            "100 planes",
        ),
        (PackageContent { planes: vec![wide], ..content("NL", 2) }, tonic::Code::InvalidArgument, "kind is not set"),
        (
            PackageContent {
                planes: vec![huge_png.clone()],
                plane_images: vec![PlaneImage { plane_index: 0, factor: 2, width: 4, height: 4, png: tiny_png }],
                ..content("NL", 3)
            },
            tonic::Code::ResourceExhausted,
            "exceeds the server's limit",
        ),
        (
            PackageContent { planes: vec![huge_png], full_planes: true, ..content("NL", 4) },
            tonic::Code::ResourceExhausted,
            "exceeds the server's limit",
        ),
        (PackageContent { metadata: None, ..content("NL", 5) }, tonic::Code::InvalidArgument, "no metadata"),
    ];
    for (c, code, text) in cases {
        let err = deliver("t-nl", keys::sign(&de.nl_key, &c)).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(text), "{:?} lacks {text:?}", err.message());
    }
    assert!(foreign_scans(&officer).await.is_empty(), "a refused package leaves nothing");

    // NL claims BE scanned it: the scan is NL's, under NL's namespace.
    let forged = PackageContent { origin: "BE".into(), ..content("NL", 10) };
    let receipt = deliver("t-nl", keys::sign(&de.nl_key, &forged)).await.unwrap();
    assert_eq!(receipt.scan_id, foreign_scan_id("NL", &scan_id));
    // BE's genuine package about the same scan id is a scan of its own.
    let genuine = deliver("t-be", keys::sign(&de.be_key, &content("BE", 10))).await.unwrap();
    assert_eq!(genuine.scan_id, foreign_scan_id("BE", &scan_id));
    assert_ne!(genuine.scan_id, receipt.scan_id);
    let scans = foreign_scans(&officer).await;
    let origins: BTreeSet<(String, String)> = scans.iter().map(|s| (s.scan_id.clone(), s.origin.clone())).collect();
    let expected: BTreeSet<(String, String)> =
        [(receipt.scan_id.clone(), "NL".to_string()), (genuine.scan_id.clone(), "BE".to_string())].into();
    assert_eq!(origins, expected);
    for (id, issuer) in expected {
        let f = FindingsClient::new(officer.clone())
            .get_findings(GetFindingsRequest { scan_id: id })
            .await
            .unwrap()
            .into_inner();
        let comments: Vec<&str> = f.reports.iter().map(|r| r.comment.as_str()).collect();
        assert_eq!(comments, [issuer.as_str()], "each issuer's report stays on its own scan");
    }
    de.server.shutdown().await.unwrap();
}
