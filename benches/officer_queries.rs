//! What officers feel: latency (p50/p99) and requests per second of
//! `ListScans`, `GetScan` and `GetFindings` with 10,000 stored scans and 50
//! concurrent clients (every one an audited read, durable before it is
//! answered), and the time to render an overlay of a 2048x6144 scan. Prints
//! `name: value` lines. Run with `make bench`.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use niix::config::Config;
use niix::store::{MetadataStore, PlaneDigest, ScanRecord, SqliteMetadata};
use niix_benches::percentile;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{
    AlarmDecision, GetFindingsRequest, GetScanRequest, ListScansRequest, PlaneDescriptor, ScanHeader, ScanMetadata,
    ScanStatus, ThreatReport,
};

const SCANS: usize = 10_000;
const CLIENTS: usize = 50;
const REQUESTS_PER_CLIENT: usize = 40;
const SITES: [&str; 5] = ["NLRTM", "DEHAM", "BEANR", "FRLEH", "ESVLC"];

fn fill(dir: &std::path::Path) {
    let db = SqliteMetadata::open(&dir.join("niix.db")).expect("database");
    let start = Instant::now();
    for i in 0..SCANS {
        let id = scan_id(i);
        let header = ScanHeader {
            scan_id: id.clone(),
            metadata: Some(ScanMetadata {
                site_id: SITES[i % SITES.len()].into(),
                lane_id: (i % 4).to_string(),
                scan_time: Some(prost_types::Timestamp { seconds: 1_700_000_000 + i as i64 * 60, nanos: 0 }),
                container_numbers: vec!["CSQU3054383".into()],
                ..Default::default()
            }),
            planes: vec![PlaneDescriptor { width: 2048, height: 6144, ..Default::default() }],
        };
        let record = ScanRecord {
            scan_id: id.clone(),
            header,
            planes: vec![PlaneDigest::full(format!("{i:064x}"), 25_000_000)],
            header_sha256: format!("{i:064}"),
            status: ScanStatus::Queued,
            received_at: SystemTime::now(),
            decision: 0,
            score: None,
            origin: String::new(),
        };
        db.commit_scan(&record).expect("commit");
        let decision = if i % 10 == 0 { AlarmDecision::Alarm } else { AlarmDecision::Clear };
        let report = ThreatReport {
            r#type: 1,
            decision: decision as i32,
            score: (i % 100) as f32 / 100.0,
            ..Default::default()
        };
        db.add_report(&id, &report, Some(ScanStatus::Analyzed)).expect("report");
    }
    eprintln!("stored {SCANS} scans with reports in {:.1} s", start.elapsed().as_secs_f64());
}

/// The officer RPCs measured, each in its own phase.
#[derive(Clone, Copy)]
enum Rpc {
    ListScans,
    GetScan,
    GetFindings,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::ListScans => "list_scans",
            Rpc::GetScan => "get_scan",
            Rpc::GetFindings => "get_findings",
        }
    }

    /// Request `r` of client `c`: a mix of what an analysis centre asks.
    async fn call(self, client: &mut FindingsClient<tonic::transport::Channel>, c: usize, r: usize) {
        // Scans are spread over the whole store, so reads do not hit one cached page.
        let scan_id = scan_id((c * 7919 + r * 104_729) % SCANS);
        match self {
            Rpc::ListScans => {
                // A site's latest, its alarms, high scores, a container, and a
                // page deep in the listing (asked for as a scan time bound).
                let mut req = ListScansRequest { page_size: 50, ..Default::default() };
                match (c + r) % 5 {
                    0 => req.site_id = SITES[r % SITES.len()].into(),
                    1 => req.decision = AlarmDecision::Alarm as i32,
                    2 => req.min_score = Some(0.9),
                    3 => req.container_number = "CSQU3054383".into(),
                    _ => req.scan_time_to = Some(prost_types::Timestamp { seconds: 1_700_000_000 + 300_000, nanos: 0 }),
                }
                assert!(!client.list_scans(req).await.expect("ListScans").into_inner().scans.is_empty());
            }
            Rpc::GetScan => {
                let scan = client.get_scan(GetScanRequest { scan_id }).await.expect("GetScan").into_inner();
                assert!(scan.scan.is_some());
            }
            Rpc::GetFindings => {
                let f = client.get_findings(GetFindingsRequest { scan_id }).await.expect("GetFindings").into_inner();
                assert!(!f.reports.is_empty());
            }
        }
    }
}

fn scan_id(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// `CLIENTS` clients each sending `REQUESTS_PER_CLIENT` requests of `rpc`
/// back to back; prints p50, p99 and requests per second.
async fn measure(url: &str, rpc: Rpc) {
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(CLIENTS * REQUESTS_PER_CLIENT)));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(FindingsClient::new(niix::client::connect(url).await.expect("connect")));
    }
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for (c, mut client) in clients.into_iter().enumerate() {
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..REQUESTS_PER_CLIENT {
                let t = Instant::now();
                rpc.call(&mut client, c, r).await;
                let elapsed = t.elapsed();
                latencies.lock().unwrap().push(elapsed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let wall = wall.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let name = rpc.name();
    println!("{name}_requests: {}", l.len());
    println!("{name}_p50_ms: {:.2}", percentile(&l, 0.50));
    println!("{name}_p99_ms: {:.2}", percentile(&l, 0.99));
    println!("{name}_per_s: {:.0}", l.len() as f64 / wall.as_secs_f64());
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    fill(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            web: niix::config::WebConfig { listen: None, ..Default::default() },
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.analysis.enabled = false;
        let server = niix::server::start(config).await.expect("server");
        let url = format!("http://{}", server.addr);
        println!("officer_clients: {CLIENTS}");
        println!("officer_stored_scans: {SCANS}");
        for rpc in [Rpc::ListScans, Rpc::GetScan, Rpc::GetFindings] {
            measure(&url, rpc).await;
        }
        server.shutdown().await.expect("shutdown");
    });

    // Overlay of a full-size plane, with a map and a few regions.
    let (w, h) = niix_benches::SCAN;
    let px = niix_benches::cargo_plane(w, h, false);
    let plane = ndarray::Array2::from_shape_vec((h as usize, w as usize), px).expect("plane");
    let map = ndarray::Array2::from_shape_fn((h as usize, w as usize), |(y, x)| ((x / 300 + y / 500) % 7 * 36) as u8);
    let regions: Vec<niix_proto::v1::Region> = (0..5)
        .map(|i| niix_proto::v1::Region {
            id: i + 1,
            x: 100 + i * 300,
            y: 200 + i * 1000,
            width: 120,
            height: 90,
            max_score: 0.8,
            ..Default::default()
        })
        .collect();
    let options = niix::overlay::OverlayOptions { max_width: 1600, window: None, heat: true, boxes: true };
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let o = niix::overlay::render(&plane, Some((&map, 1)), &regions, &options).expect("render");
        times.push(t.elapsed());
        assert!(o.png.len() > 1000);
    }
    times.sort();
    println!("overlay_2048x6144_to_1600_ms: {:.1}", times[times.len() / 2].as_secs_f64() * 1000.0);
    let _ = UNIX_EPOCH;
}
