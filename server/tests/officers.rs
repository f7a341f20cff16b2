//! What officers do, against a real server: query with filters and
//! pagination, overlays, adjudication, the live watch, DICOS in and out.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{
    AdjudicateRequest, AlarmDecision, ExportTdrRequest, FindingsEventKind, GetFindingsRequest, GetScanRequest,
    ListScansRequest, PlaneEncoding, PlaneKind, RegionVerdict, RenderOverlayRequest, ReportType, ScanHeader,
    ScanStatus, Verdict, WatchFindingsRequest,
};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Open cargo with an optional dense block, as raw little-endian bytes.
fn cargo_raw(w: u32, h: u32, block: Option<(u32, u32, u32, u32)>) -> Vec<u8> {
    cargo_samples(w, h, block, false).iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

struct Spec {
    site: &'static str,
    lane: &'static str,
    time: i64,
    container: Option<&'static str>,
    mrn: Option<&'static str>,
    alarm: bool,
}

async fn push_spec(ch: &Channel, s: &Spec) -> String {
    let raw = cargo_raw(256, 128, s.alarm.then_some((100, 40, 40, 30)));
    let mut h = header(&new_id(), plane(PlaneEncoding::RawU16le, 256, 128, &raw));
    let m = h.metadata.as_mut().unwrap();
    m.site_id = s.site.into();
    m.lane_id = s.lane.into();
    m.scan_time = Some(ts(s.time));
    m.container_numbers = s.container.map(|c| vec![c.to_string()]).unwrap_or_default();
    m.declarations =
        s.mrn.map(|v| vec![niix_proto::v1::DeclarationReference { kind: 2, value: v.into() }]).unwrap_or_default();
    push_messages(ch, messages(&h, &[&raw], 1 << 16)).await.unwrap().scan_id
}

async fn ids(ch: &Channel, req: ListScansRequest) -> Vec<String> {
    let mut c = FindingsClient::new(ch.clone());
    c.list_scans(req).await.unwrap().into_inner().scans.into_iter().map(|s| s.scan_id).collect()
}

#[tokio::test]
async fn filters_combine_and_pages_have_no_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let specs = [
        Spec { site: "NLRTM", lane: "1", time: 1000, container: Some("CSQU3054383"), mrn: Some("MRN-A"), alarm: true },
        Spec { site: "NLRTM", lane: "2", time: 2000, container: None, mrn: Some("MRN-B"), alarm: false },
        Spec { site: "DEHAM", lane: "1", time: 3000, container: Some("MSKU9070323"), mrn: None, alarm: true },
        Spec { site: "NLRTM", lane: "1", time: 4000, container: Some("MSKU9070323"), mrn: None, alarm: false },
        Spec { site: "DEHAM", lane: "2", time: 5000, container: None, mrn: Some("MRN-A"), alarm: false },
        Spec { site: "NLRTM", lane: "1", time: 6000, container: None, mrn: None, alarm: true },
    ];
    let mut pushed = Vec::new();
    for s in &specs {
        let id = push_spec(&ch, s).await;
        let f = wait_analysed(&ch, &id).await;
        let want = if s.alarm { AlarmDecision::Alarm } else { AlarmDecision::Clear };
        assert_eq!(f.reports[0].decision, want as i32, "{:?}", f.reports[0]);
        pushed.push(id);
    }
    let by_index = |idx: &[usize]| idx.iter().map(|&i| pushed[i].clone()).collect::<Vec<_>>();
    let q = ListScansRequest::default;

    // Newest scan time first.
    assert_eq!(ids(&ch, q()).await, by_index(&[5, 4, 3, 2, 1, 0]));
    assert_eq!(ids(&ch, ListScansRequest { site_id: "NLRTM".into(), ..q() }).await, by_index(&[5, 3, 1, 0]));
    assert_eq!(
        ids(&ch, ListScansRequest { site_id: "NLRTM".into(), lane_id: "1".into(), ..q() }).await,
        by_index(&[5, 3, 0])
    );
    assert_eq!(ids(&ch, ListScansRequest { decision: AlarmDecision::Alarm as i32, ..q() }).await, by_index(&[5, 2, 0]));
    assert_eq!(
        ids(&ch, ListScansRequest { decision: AlarmDecision::Alarm as i32, site_id: "NLRTM".into(), ..q() }).await,
        by_index(&[5, 0])
    );
    assert_eq!(
        ids(&ch, ListScansRequest { scan_time_from: Some(ts(2000)), scan_time_to: Some(ts(5000)), ..q() }).await,
        by_index(&[3, 2, 1])
    );
    assert_eq!(ids(&ch, ListScansRequest { container_number: "MSKU9070323".into(), ..q() }).await, by_index(&[3, 2]));
    assert_eq!(ids(&ch, ListScansRequest { declaration_reference: "MRN-A".into(), ..q() }).await, by_index(&[4, 0]));
    assert_eq!(ids(&ch, ListScansRequest { min_score: Some(0.5), ..q() }).await, by_index(&[5, 2, 0]));
    assert_eq!(
        ids(&ch, ListScansRequest { status: ScanStatus::Analyzed as i32, lane_id: "2".into(), ..q() }).await,
        by_index(&[4, 1])
    );
    let err =
        FindingsClient::new(ch.clone()).list_scans(ListScansRequest { min_score: Some(2.0), ..q() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Pages of 2, with new scans arriving (newer and older) while paging.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut extra = 0;
    loop {
        let page = FindingsClient::new(ch.clone())
            .list_scans(ListScansRequest { page_size: 2, page_token: token.clone(), ..q() })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.scans.iter().map(|s| s.scan_id.clone()));
        if extra < 2 {
            extra += 1;
            let time = if extra == 1 { 9000 } else { 1 };
            push_spec(&ch, &Spec { site: "X", lane: "9", time, container: None, mrn: None, alarm: false }).await;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates: {seen:?}");
    for id in &pushed {
        assert!(seen.contains(id), "no gaps: {id} missing");
    }
    // The older scan pushed mid-way sorts after the cursor, so it is seen; the newer one is not.
    assert_eq!(seen.len(), pushed.len() + 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_overlay_shows_region_boxes_where_the_findings_say() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let (w, h) = (800u32, 400u32);
    let raw = cargo_raw(w, h, Some((500, 150, 60, 50)));
    let mut p = plane(PlaneEncoding::RawU16le, w, h, &raw);
    p.kind = PlaneKind::SingleEnergy as i32;
    let id = push_messages(&ch, messages(&header(&new_id(), p), &[&raw], 1 << 16)).await.unwrap().scan_id;
    let f = wait_analysed(&ch, &id).await;
    let region = f.reports[0].regions[0].clone();
    let mut c = FindingsClient::new(ch.clone());
    let r = c
        .render_overlay(RenderOverlayRequest { scan_id: id.clone(), max_width: 400, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.width, r.height), (400, 200), "half size, aspect kept");
    let decoder = png::Decoder::new(std::io::Cursor::new(r.png));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height, info.color_type), (400, 200, png::ColorType::Rgb));
    let px = |x: u32, y: u32| {
        let i = ((y * info.width + x) * 3) as usize;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    let green = niix::overlay::BOX_COLOUR;
    // The box's left edge, half-way down, in output coordinates.
    let (x0, y_mid) = (region.x / 2, (region.y + region.height / 2) / 2);
    assert_eq!(px(x0, y_mid), green, "left edge of region {region:?}");
    let (x1, y1) = ((region.x + region.width).div_ceil(2) - 1, (region.y + region.height).div_ceil(2) - 1);
    assert_eq!(px(x1, y_mid), green, "right edge");
    assert_eq!(px((x0 + x1) / 2, y1), green, "bottom edge");
    // Far from the box, no green; inside the box, the heat layer tints it red.
    assert_ne!(px(50, 180), green);
    // The demo model flags the block's rim (its centre matches its own surroundings).
    let tinted = (x0 + 2..x1 - 1).flat_map(|x| (region.y / 2 + 2..y1 - 1).map(move |y| (x, y))).any(|(x, y)| {
        let p = px(x, y);
        p[0] > p[2] + 40 && p != green
    });
    assert!(tinted, "the heat layer tints the region");
    // Without heat and boxes it is plain grey.
    let plain = c
        .render_overlay(RenderOverlayRequest {
            scan_id: id.clone(),
            max_width: 400,
            hide_heat: true,
            hide_boxes: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut reader = png::Decoder::new(std::io::Cursor::new(plain.png)).read_info().unwrap();
    let mut grey = vec![0u8; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut grey).unwrap();
    assert!(grey.chunks(3).all(|c| c[0] == c[1] && c[1] == c[2]));
    let err =
        c.render_overlay(RenderOverlayRequest { scan_id: id, plane_index: 3, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn adjudication_appends_and_never_alters_the_machine_report() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let id = push_spec(&ch, &Spec { site: "S", lane: "1", time: 5, container: None, mrn: None, alarm: true }).await;
    let machine = wait_analysed(&ch, &id).await.reports[0].clone();
    let mut c = FindingsClient::new(ch.clone());
    let first = c
        .adjudicate(AdjudicateRequest {
            scan_id: id.clone(),
            verdict: Verdict::Inconclusive as i32,
            regions: vec![],
            comment: "send to physical inspection".into(),
            officer_id: "NL-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.r#type, ReportType::Operator as i32);
    let second = c
        .adjudicate(AdjudicateRequest {
            scan_id: id.clone(),
            verdict: Verdict::Confirmed as i32,
            regions: vec![RegionVerdict { region_id: 1, verdict: Verdict::Confirmed as i32, comment: "weapon".into() }],
            comment: "found at inspection".into(),
            officer_id: "NL-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.decision, AlarmDecision::Alarm as i32);
    assert_eq!(second.regions[0].verdict, Verdict::Confirmed as i32);

    let detail = c.get_scan(GetScanRequest { scan_id: id.clone() }).await.unwrap().into_inner();
    let reports = detail.findings.unwrap().reports;
    assert_eq!(reports.len(), 3, "history is kept");
    assert_eq!(reports[0].encode_to_vec(), machine.encode_to_vec(), "the machine report is byte-identical");
    assert_eq!((reports[1].operator_id.as_str(), reports[2].operator_id.as_str()), ("NL-1", "NL-2"));
    assert_eq!(detail.scan.unwrap().decision, AlarmDecision::Alarm as i32, "the scan keeps the machine decision");

    for (bad, code) in [
        (
            AdjudicateRequest { scan_id: id.clone(), verdict: 0, officer_id: "x".into(), ..Default::default() },
            tonic::Code::InvalidArgument,
        ),
        (
            AdjudicateRequest {
                scan_id: id.clone(),
                verdict: 1,
                officer_id: "x".into(),
                regions: vec![RegionVerdict { region_id: 77, verdict: 1, comment: String::new() }],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            AdjudicateRequest { scan_id: new_id(), verdict: 1, officer_id: "x".into(), ..Default::default() },
            tonic::Code::NotFound,
        ),
    ] {
        assert_eq!(c.adjudicate(bad).await.unwrap_err().code(), code);
    }
    let f = c.get_findings(GetFindingsRequest { scan_id: id }).await.unwrap().into_inner();
    assert_eq!(f.reports.len(), 3, "refused verdicts store nothing");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_watcher_that_reconnects_gets_every_event_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let spec = |t| Spec { site: "S", lane: "1", time: t, container: None, mrn: None, alarm: false };

    let mut c = FindingsClient::new(ch.clone());
    let mut stream = c.watch_findings(WatchFindingsRequest::default()).await.unwrap().into_inner();
    let a = push_spec(&ch, &spec(1)).await;
    let b = push_spec(&ch, &spec(2)).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
        got.push(e);
    }
    drop(stream); // the officer's laptop goes to sleep

    let c2 = push_spec(&ch, &spec(3)).await;
    wait_analysed(&ch, &c2).await;
    c.adjudicate(AdjudicateRequest { scan_id: a.clone(), verdict: 2, officer_id: "o".into(), ..Default::default() })
        .await
        .unwrap();

    let cursor = got.last().unwrap().cursor;
    let mut stream =
        c.watch_findings(WatchFindingsRequest { cursor, ..Default::default() }).await.unwrap().into_inner();
    while got.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
        got.push(e);
    }
    // Nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_millis(300), stream.next()).await.is_err());
    let cursors: Vec<u64> = got.iter().map(|e| e.cursor).collect();
    assert_eq!(cursors, vec![1, 2, 3, 4], "in order, none missed, none repeated");
    let scans: Vec<&str> = got.iter().map(|e| e.scan_id.as_str()).collect();
    assert_eq!(scans, vec![a.as_str(), b.as_str(), c2.as_str(), a.as_str()]);
    assert_eq!(got[3].kind, FindingsEventKind::Adjudicated as i32);
    assert_eq!(got[0].kind, FindingsEventKind::Analyzed as i32);

    // live_only starts after the newest event.
    let mut live =
        c.watch_findings(WatchFindingsRequest { live_only: true, ..Default::default() }).await.unwrap().into_inner();
    assert!(tokio::time::timeout(Duration::from_millis(300), live.next()).await.is_err());
    let d = push_spec(&ch, &spec(4)).await;
    let e = tokio::time::timeout(Duration::from_secs(10), live.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((e.cursor, e.scan_id), (5, d));
    server.shutdown().await.unwrap();
}

// Multi-threaded: the test blocks on the niix CLI while the in-process server serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicos_dx_in_and_tdr_out_agree_with_pydicom() {
    let dir = tempfile::tempdir().unwrap();
    // The low-energy-only DX below is stored with a warning, not refused:
    // the demo model reads no scan without a high-energy (or single) plane.
    let mut config = config(&dir.path().join("data"), Default::default());
    config.analysis.refuse_unreadable = false;
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;
    let dx = dir.path().join("scan.dcs");
    let uid = "1.2.826.0.1.3680043.8.498.12345";
    run_python(
        "dicos/make_dx.py",
        &[
            dx.to_str().unwrap(),
            "--width",
            "400",
            "--height",
            "300",
            "--block",
            "200",
            "100",
            "48",
            "40",
            "--rle",
            "--uid",
            uid,
        ],
    );
    let url = format!("http://{}", server.addr);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_niix"))
        .args(["push", dx.to_str().unwrap(), "--server", &url, "--site", "NLRTM", "--wait", "--json"])
        .env("NIIX_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = r["scan_id"].as_str().unwrap().to_string();
    assert_eq!(r["planes"][0]["sha256"], sha256(&std::fs::read(&dx).unwrap()));
    assert_eq!(r["findings"]["decision"], "alarm", "{r}");

    // The plane kind, size and spacing came from the DX object.
    let mut c = FindingsClient::new(ch.clone());
    let scan = c.get_scan(GetScanRequest { scan_id: id.clone() }).await.unwrap().into_inner().scan.unwrap();
    let d = scan.planes[0].descriptor.clone().unwrap();
    assert_eq!(
        (d.kind, d.width, d.height, d.encoding),
        (PlaneKind::HighEnergy as i32, 400, 300, PlaneEncoding::Dicos as i32)
    );
    assert_eq!((d.pixel_spacing_x_mm, d.pixel_spacing_y_mm), (4.0, 5.0));

    // Uncompressed DX (explicit VR little endian) goes in too, as a low-energy plane.
    let plain = dir.path().join("plain.dcs");
    run_python(
        "dicos/make_dx.py",
        &[plain.to_str().unwrap(), "--width", "64", "--height", "48", "--kind", "LOW ENERGY"],
    );
    let low = niix::client::describe_plane(&plain, PlaneKind::HighEnergy, &Default::default()).unwrap();
    assert_eq!((low.kind, low.encoding), (PlaneKind::LowEnergy as i32, PlaneEncoding::Dicos as i32));
    let bytes = std::fs::read(&plain).unwrap();
    let receipt = push_messages(&ch, messages(&header(&new_id(), low), &[&bytes], 1 << 16)).await.unwrap();
    assert_eq!(receipt.planes[0].sha256, sha256(&bytes));

    // A DX whose declared size lies is refused.
    let mut h = ScanHeader { scan_id: new_id(), ..header("x", d.clone()) };
    h.planes[0].width = 401;
    h.planes[0].sha256.clear();
    let bytes = std::fs::read(&dx).unwrap();
    let err = push_messages(&ch, messages(&h, &[&bytes], 1 << 16)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());

    // The TDR, read by pydicom.
    c.adjudicate(AdjudicateRequest {
        scan_id: id.clone(),
        verdict: 1,
        officer_id: "NL-7".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let findings = c.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.unwrap().into_inner();
    let machine = &findings.reports[0];
    for (kind, want_type) in [(ReportType::Machine, "MACHINE"), (ReportType::Operator, "OPERATOR")] {
        let tdr =
            c.export_tdr(ExportTdrRequest { scan_id: id.clone(), report: kind as i32 }).await.unwrap().into_inner();
        let path = dir.path().join(format!("{want_type}.dcs"));
        std::fs::write(&path, &tdr.dicos).unwrap();
        let read: serde_json::Value =
            serde_json::from_str(&run_python("dicos/read_tdr.py", &[path.to_str().unwrap()])).unwrap();
        assert_eq!(read["sop_class_uid"], "1.2.840.10008.5.1.4.1.1.501.3");
        assert_eq!(read["media_sop_class_uid"], "1.2.840.10008.5.1.4.1.1.501.3");
        assert_eq!(read["sop_instance_uid"], tdr.sop_instance_uid.as_str());
        assert_eq!(read["tdr_type"], want_type);
        assert_eq!(read["alarm_decision"], "ALARM");
        assert_eq!(read["abort_flag"], "SUCCESS");
        assert_eq!(read["ooi_type"], "CARGO");
        assert_eq!(read["total_objects"], machine.regions.len());
        assert!(read["alarm_decision_time"].as_str().unwrap().starts_with("20"));
        let ptos = read["ptos"].as_array().unwrap();
        assert_eq!(ptos.len(), machine.regions.len());
        let (p, g) = (&ptos[0], &machine.regions[0]);
        assert_eq!(p["id"], g.id);
        assert_eq!(p["category"], "ANOMALY");
        assert_eq!(p["base"], serde_json::json!([g.x as f64, g.y as f64, 0.0]));
        assert_eq!(p["extents"], serde_json::json!([g.width as f64, g.height as f64, 0.0]));
        assert_eq!(p["referenced_sop_instance_uid"], uid, "PTOs reference the source DX image");
        if kind == ReportType::Machine {
            let algo = read["algorithm"].as_array().unwrap();
            assert_eq!(algo[1], "1");
            let digest = algo[2].as_str().unwrap().strip_prefix("sha256=").unwrap();
            assert!(machine.algorithm.as_ref().unwrap().sha256.starts_with(digest) && digest.len() == 56);
            assert!((p["probability"].as_f64().unwrap() - f64::from(g.assessment_probability)).abs() < 1e-6);
        } else {
            assert_eq!(read["operators"], serde_json::json!(["NL-7"]));
        }
    }
    server.shutdown().await.unwrap();
}
