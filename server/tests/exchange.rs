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

/// The packages of a subscription from `cursor` up to and including the one
/// about scan `last`. The feed is in event order, so every event before
/// `last`'s has been decided on: what is not here was not shared.
async fn until(conn: &Authed, cursor: u64, last: &str) -> Vec<ResultPackage> {
    let mut s = ExchangeClient::new(conn.clone()).subscribe(SubscribeRequest { cursor }).await.unwrap().into_inner();
    let mut out = Vec::new();
    loop {
        let p = tokio::time::timeout(Duration::from_secs(60), s.next()).await;
        let p = p.unwrap_or_else(|_| panic!("no package about {last} after {} others", out.len())).unwrap().unwrap();
        let scan = PackageContent::decode(p.content.as_slice()).unwrap().scan_id;
        out.push(p);
        if scan == last {
            return out;
        }
    }
}

/// Scan ids of packages, in order.
fn scans_of(packages: &[ResultPackage]) -> Vec<String> {
    packages.iter().map(|p| PackageContent::decode(p.content.as_slice()).unwrap().scan_id).collect()
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

    // A later entitled scan marks the end of what to look at.
    let marker = push_container(&scanner, "NLRTM", "MM-1", true).await;
    analysed(&officer, &marker).await;
    let got = until(&de, 0, &marker).await;
    assert_eq!(scans_of(&got), [shared.clone(), marker.clone()], "only the NLRTM alarms are shared, each once");
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
    let marked = keys::verify(&got[1], &public).unwrap().sequence;
    assert_eq!(scans_of(&until(&de, content.sequence, &next).await), [marker.clone(), next.clone()]);
    let more = until(&de, marked, &next).await;
    assert_eq!(more.len(), 1);
    let c2 = keys::verify(&more[0], &public).unwrap();
    assert_eq!(c2.scan_id, next);
    assert!(c2.sequence > marked);

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
    assert_eq!(files.len(), 3);
    // The partner's cursor is at the last shared package; pulling again (a
    // restart of the partner's side) saves nothing and leaves it there.
    let cursor = || std::fs::read_to_string(out.join(".cursor")).unwrap().trim().parse::<u64>().unwrap();
    assert_eq!(cursor(), c2.sequence);
    let again = cli(&[
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
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 packages saved"), "{again:?}");
    assert_eq!(cursor(), c2.sequence);
    assert_eq!(
        std::fs::read_dir(&out)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|e| e == "niixpkg"))
            .count(),
        3
    );
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
    let got = until(&de, 0, &id).await;
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

/// What a scanner put in the scan's metadata and in the plane files: every
/// value a full redaction withholds.
const SECRETS: [&str; 8] =
    ["AB-777-Z", "24NL0000000012345", "CSQU3054383", "ScanCorp", "XR-9000", "SN-889911", "seal-broken", "Jansen"];

/// A 256x128 alarm plane in `encoding`, with the secrets in its file's
/// own fields wherever the format has them, as (descriptor, bytes).
fn secret_plane(dir: &std::path::Path, encoding: &str) -> (PlaneDescriptor, Vec<u8>) {
    let (w, h) = (256, 128);
    let pixels = cargo_samples(w, h, Some((100, 40, 40, 30)), false);
    let text = SECRETS.join(" ");
    let path = dir.join(format!("plane-{encoding}"));
    match encoding {
        "raw" => {
            let raw: Vec<u8> = pixels.iter().flat_map(|v| v.to_le_bytes()).collect();
            return (plane(PlaneEncoding::RawU16le, w, h, &raw), raw);
        }
        "png" => {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Sixteen);
            enc.add_text_chunk("Comment".into(), text.clone()).unwrap();
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(&pixels.iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<u8>>()).unwrap();
            wr.finish().unwrap();
            std::fs::write(&path, out).unwrap();
        }
        "tiff" => {
            let mut buf = std::io::Cursor::new(Vec::new());
            let mut enc = tiff::encoder::TiffEncoder::new(&mut buf).unwrap();
            let mut image = enc.new_image::<tiff::encoder::colortype::Gray16>(w, h).unwrap();
            image.encoder().write_tag(tiff::tags::Tag::ImageDescription, text.as_str()).unwrap();
            image.encoder().write_tag(tiff::tags::Tag::Make, "ScanCorp").unwrap();
            image.encoder().write_tag(tiff::tags::Tag::Artist, "Jansen").unwrap();
            image.write_data(&pixels).unwrap();
            std::fs::write(&path, buf.into_inner()).unwrap();
        }
        dicos => {
            let (comments, operator) = (format!("ImageComments={text}"), "OperatorsName=Jansen".to_string());
            let (make, serial) = ("Manufacturer=ScanCorp".to_string(), "DeviceSerialNumber=SN-889911".to_string());
            let mut args = vec![path.to_str().unwrap(), "--width", "256", "--height", "128", "--spacing", "4", "4"];
            args.extend(["--block", "100", "40", "40", "30"]);
            for t in [&comments, &operator, &make, &serial] {
                args.extend(["--tag", t.as_str()]);
            }
            if dicos == "dicos-rle" {
                args.push("--rle");
            }
            run_python("dicos/make_dx.py", &args);
        }
    }
    let d = niix::client::describe_plane(&path, PlaneKind::HighEnergy, &Default::default()).unwrap();
    (d, std::fs::read(&path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_planes_carry_pixels_only_whatever_the_encoding_and_redaction_holds() {
    use niix_proto::v1::scan_ingest_client::ScanIngestClient;
    let dir = tempfile::tempdir().unwrap();
    let all = vec![
        Redact::VehiclePlate,
        Redact::Declarations,
        Redact::OfficerIds,
        Redact::FreeText,
        Redact::ContainerNumbers,
        Redact::Scanner,
    ];
    let agreement = Agreement {
        name: "NL-DE".into(),
        partner: "DE".into(),
        content: Content::FullPlanes,
        redact: all,
        ..Default::default()
    };
    let Nl { server, url, public, scanner, officer, de, .. } = nl(dir.path(), vec![agreement]).await;
    let pixels: Vec<u8> =
        cargo_samples(256, 128, Some((100, 40, 40, 30)), false).iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut ids = Vec::new();
    for encoding in ["raw", "png", "tiff", "dicos", "dicos-rle"] {
        let (d, bytes) = secret_plane(dir.path(), encoding);
        if encoding != "raw" {
            for s in ["ScanCorp", "Jansen"] {
                assert!(contains(&bytes, s), "the {encoding} file as pushed carries {s:?}");
            }
        }
        let mut h = header(&new_id(), d);
        let m = h.metadata.as_mut().unwrap();
        m.site_id = "NLRTM".into();
        m.vehicle_plate = SECRETS[0].into();
        m.declarations = vec![DeclarationReference { kind: 2, value: SECRETS[1].into() }];
        m.container_numbers = vec![SECRETS[2].into()];
        m.scanner = Some(Scanner {
            manufacturer: SECRETS[3].into(),
            model: SECRETS[4].into(),
            serial_number: SECRETS[5].into(),
            ..Default::default()
        });
        m.remarks = SECRETS[6].into();
        let receipt = ScanIngestClient::new(scanner.clone())
            .push_scan(tokio_stream::iter(messages(&h, &[&bytes], 1 << 16)))
            .await
            .unwrap()
            .into_inner();
        analysed(&officer, &receipt.scan_id).await;
        // An officer's verdict with a name and free text, shared with neither.
        FindingsClient::new(officer.clone())
            .adjudicate(AdjudicateRequest {
                scan_id: receipt.scan_id.clone(),
                verdict: 1,
                officer_id: SECRETS[7].into(),
                comment: SECRETS[6].into(),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push((encoding, receipt.scan_id));
    }
    let packages = until(&de, 0, &ids.last().unwrap().1).await;
    assert_eq!(scans_of(&packages), ids.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>());
    for ((encoding, _), package) in ids.iter().zip(&packages) {
        let content = keys::verify(package, &public).unwrap();
        for s in SECRETS {
            assert!(!contains(&package.content, s), "{encoding}: the package carries {s:?}");
        }
        assert!(content.full_planes);
        let req = GetPlaneRequest { package_id: content.package_id.clone(), plane_index: 0, offset: 0 };
        let mut s = ExchangeClient::new(de.clone()).get_plane(req).await.unwrap().into_inner();
        let mut sent = Vec::new();
        while let Some(chunk) = s.next().await {
            sent.extend(chunk.unwrap().data);
        }
        for s in SECRETS {
            assert!(!contains(&sent, s), "{encoding}: the plane sent carries {s:?}");
        }
        let d = &content.planes[0];
        assert_eq!(sha256(&sent), d.sha256, "{encoding}: the package signs what is sent");
        assert_eq!((d.encoding, d.byte_length), (PlaneEncoding::RawU16le as i32, 256 * 128 * 2), "{encoding}");
        assert!(sent == pixels, "{encoding}: the partner gets the scan's pixels");
    }

    // The partner's CLI checks every plane file against the signed digests.
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
    server.shutdown().await.unwrap();
    let saved: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "niixpkg"))
        .collect();
    assert_eq!(saved.len(), ids.len());
    for file in saved {
        let ok = cli(&["verify", file.to_str().unwrap(), "--key", &public]);
        assert!(String::from_utf8_lossy(&ok.stdout).contains("1 plane file(s) match"), "{ok:?}");
        let plane = std::fs::read(niix::cli::partner::plane_path(&file, 0)).unwrap();
        assert!(SECRETS.iter().all(|s| !contains(&plane, s)));
    }
}

/// True when `needle` occurs in `bytes`.
fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The value of an unlabelled counter on the server's `/metrics` page.
async fn counter(server: &niix::server::RunningServer, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(server.metrics_addr.unwrap()).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}"));
    line[name.len() + 1..].trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_is_rendered_once_however_often_and_in_parallel_it_is_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let agreement = Agreement {
        name: "NL-DE".into(),
        partner: "DE".into(),
        content: Content::FindingsPlanes,
        plane_width: 64,
        ..Default::default()
    };
    let Nl { server, scanner, officer, de, .. } = nl(dir.path(), vec![agreement]).await;
    let id = push_container(&scanner, "NLRTM", "AB-1", true).await;
    analysed(&officer, &id).await;
    let first = until(&de, 0, &id).await.remove(0);
    assert_eq!(counter(&server, "niix_package_renders_total").await, 1);
    let package_id = PackageContent::decode(first.content.as_slice()).unwrap().package_id;
    let fetches: Vec<_> = (0..6)
        .map(|_| {
            let mut c = ExchangeClient::new(de.clone());
            let req = GetPackageRequest { package_id: package_id.clone() };
            tokio::spawn(async move { c.get_package(req).await.unwrap().into_inner() })
        })
        .collect();
    for f in fetches {
        assert_eq!(f.await.unwrap(), first, "the same signed package every time");
    }
    assert_eq!(counter(&server, "niix_package_renders_total").await, 1, "seven fetches, one rendering");
    server.shutdown().await.unwrap();
}
