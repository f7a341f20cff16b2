//! The officer console's HTTP API through the real server: sign-in cookie
//! and who may sign in, CSRF refusal, expired sessions, live events, tiles
//! rendered from the stored planes, and adjudication stored under the
//! signed-in identity (checked through gRPC and the audit log).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use niix::auth::Role;
use niix::config::{Limits, WebConfig};
use niix::store::MetadataStore;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{GetFindingsRequest, ReportType, ScanStatus, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 answer.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one request on a fresh connection (`Connection: close`).
async fn http(at: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect(at).await.unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Answer { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}

/// Signs in with `token`; returns the answer.
async fn login(at: SocketAddr, token: &str) -> Answer {
    http(at, "POST", "/api/login", &[("content-type", "application/json")], &format!("{{\"token\":\"{token}\"}}")).await
}

/// The `Cookie:` header value and the CSRF token of a successful sign-in.
fn session_of(a: &Answer) -> (String, String) {
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let set = a.header("set-cookie").expect("a session cookie");
    let cookie = set.split(';').next().unwrap().to_string();
    (cookie, a.json()["csrf"].as_str().unwrap().to_string())
}

const TOKENS: [(&str, Role, &str); 4] = [
    ("officer-1", Role::Officer, "tok-officer"),
    ("DE", Role::Partner, "tok-partner"),
    ("scanner-1", Role::Scanner, "tok-scanner"),
    ("admin-1", Role::Admin, "tok-admin"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_officer_signs_in_sees_a_scan_live_views_tiles_and_adjudicates_under_their_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.auth = tokens(&TOKENS);
    // An officer of another site: the scan stays invisible to them.
    let mut scoped = tokens(&[("officer-be", Role::Officer, "tok-officer-be")]).tokens.remove(0);
    scoped.sites = vec!["BEANR".into()];
    config.auth.tokens.push(scoped);
    let server = niix::server::start(config).await.unwrap();
    let web = server.web_addr.expect("the console listens");

    // The page is embedded and locked to its own origin.
    let page = http(web, "GET", "/", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("officer console"));
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'self'"));

    // Partners and scanners cannot open the console; unknown tokens neither.
    for token in ["tok-partner", "tok-scanner"] {
        let a = login(web, token).await;
        assert_eq!(a.status, 403, "{token}");
        assert!(a.json()["error"].as_str().unwrap().contains("may not sign in to the officer console"));
        assert!(a.header("set-cookie").is_none());
    }
    assert_eq!(login(web, "guess").await.status, 401);
    assert_eq!(http(web, "GET", "/api/scans", &[], "").await.status, 401);

    // The officer's cookie: HttpOnly, SameSite=Strict, with an expiry.
    let a = login(web, "tok-officer").await;
    let set = a.header("set-cookie").unwrap().to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Max-Age="), "{set}");
    assert!(!set.contains("Secure"), "plain HTTP on loopback: {set}");
    assert_eq!(a.json()["identity"], "officer-1");
    let (cookie, csrf) = session_of(&a);
    let me = [("cookie", cookie.as_str())];

    // Live events: the SSE stream announces the analysed scan.
    let mut sse = TcpStream::connect(web).await.unwrap();
    sse.write_all(format!("GET /api/events HTTP/1.1\r\nHost: {web}\r\nCookie: {cookie}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let scanner = niix::client::authed(channel(&server).await, Some("tok-scanner")).unwrap();
    let id = push_container(&scanner, "NLRTM-01", "AB-123-C", true).await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&seen).contains(&id) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, sse.read(&mut buf)).await.expect("an event in time").unwrap();
        assert!(n > 0, "the event stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("text/event-stream") && text.contains("\"kind\":\"analyzed\""), "{text}");
    drop(sse);

    // The queue shows it, newest first, with the machine decision.
    let q = http(web, "GET", "/api/scans?site=NLRTM-01", &me, "").await;
    assert_eq!(q.status, 200);
    let scans = q.json()["scans"].as_array().unwrap().clone();
    assert_eq!(scans[0]["scan_id"], id.as_str());
    assert_eq!(scans[0]["decision"], "alarm");
    assert_eq!(scans[0]["vehicle_plate"], "AB-123-C");
    assert!(scans[0]["verdict"].is_null());
    assert_eq!(http(web, "GET", "/api/scans?status=bogus", &me, "").await.status, 400);

    let d = http(web, "GET", &format!("/api/scans/{id}"), &me, "").await;
    assert_eq!(d.status, 200);
    let d = d.json();
    assert_eq!(d["planes"][0]["width"], 256);
    assert_eq!(d["planes"][0]["levels"], 1);
    assert!(d["partner"].is_null(), "an own scan: {d}");
    let regions = d["machine"]["regions"].as_array().unwrap().clone();
    assert!(!regions.is_empty(), "{d}");

    // Tiles come from the stored plane: a 256x128 plane is one tile at level 0.
    let tile = http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/0/0.png?wl=0&wh=40000"), &me, "").await;
    assert_eq!(tile.status, 200);
    assert_eq!(tile.header("content-type"), Some("image/png"));
    let info = png::Decoder::new(std::io::Cursor::new(&tile.body)).read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (256, 128));
    let dark_block = {
        let mut reader = info;
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        // The dense block at (100..140, 40..70) is dark, its surroundings bright.
        (buf[50 * 256 + 110], buf[10 * 256 + 10])
    };
    assert!(dark_block.0 < 40 && dark_block.1 > 150, "{dark_block:?}");
    assert_eq!(http(web, "GET", &format!("/api/scans/{id}/tiles/0/1/0/0.png"), &me, "").await.status, 400);
    assert_eq!(http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/1/0.png"), &me, "").await.status, 404);
    assert_eq!(http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/0/0.png"), &[], "").await.status, 401);
    let mono = http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/0/0.png?material=1"), &me, "").await;
    assert_eq!(mono.status, 412, "a single-energy scan has no material colouring");

    // The heat layer is the analysed plane's anomaly map, stride pixels per value.
    let stride = d["machine"]["heatmap_stride"].as_u64().expect("a stored anomaly map");
    let heat = http(web, "GET", &format!("/api/scans/{id}/heatmap.png"), &me, "").await;
    assert_eq!(heat.status, 200);
    let info = png::Decoder::new(std::io::Cursor::new(&heat.body)).read_info().unwrap();
    assert_eq!(info.info().color_type, png::ColorType::Rgba);
    assert_eq!(u64::from(info.info().width), 256u64.div_ceil(stride));

    // A site-scoped officer of another site sees neither the scan nor its tiles.
    let (be_cookie, _) = session_of(&login(web, "tok-officer-be").await);
    let be = [("cookie", be_cookie.as_str())];
    assert_eq!(http(web, "GET", &format!("/api/scans/{id}"), &be, "").await.status, 404);
    assert_eq!(
        http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/0/0.png?wl=0&wh=40000"), &be, "").await.status,
        404
    );
    assert_eq!(http(web, "GET", &format!("/api/scans/{id}/heatmap.png"), &be, "").await.status, 404);
    assert!(http(web, "GET", "/api/scans", &be, "").await.json()["scans"].as_array().unwrap().is_empty());

    // Adjudication without the CSRF header is refused and stores nothing.
    let region = regions[0]["id"].as_u64().unwrap();
    let body = format!(
        "{{\"verdict\":\"confirmed\",\"comment\":\"dense block\",\"regions\":[{{\"id\":{region},\"verdict\":\"confirmed\"}}]}}"
    );
    let path = format!("/api/scans/{id}/adjudicate");
    let json = ("content-type", "application/json");
    let forged = http(web, "POST", &path, &[me[0], json], &body).await;
    assert_eq!(forged.status, 403);
    assert!(forged.json()["error"].as_str().unwrap().contains("x-niix-csrf"));
    let officer = niix::client::authed(channel(&server).await, Some("tok-officer")).unwrap();
    let mut findings = FindingsClient::new(officer);
    let f = findings.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(f.status, ScanStatus::Analyzed as i32);
    assert!(f.reports.iter().all(|r| r.r#type != ReportType::Operator as i32));

    let done = http(web, "POST", &path, &[me[0], json, ("x-niix-csrf", &csrf)], &body).await;
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    let f = findings.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.unwrap().into_inner();
    let op = f.reports.iter().rev().find(|r| r.r#type == ReportType::Operator as i32).expect("an operator report");
    assert_eq!(op.operator_id, "officer-1");
    assert_eq!(op.verdict, Verdict::Confirmed as i32);
    assert_eq!(op.comment, "dense block");
    let rv: Vec<(u32, i32)> = op.regions.iter().filter(|r| r.verdict != 0).map(|r| (r.id, r.verdict)).collect();
    assert_eq!(rv, vec![(region as u32, Verdict::Confirmed as i32)]);
    let q = http(web, "GET", "/api/scans?site=NLRTM-01", &me, "").await.json();
    assert_eq!(q["scans"][0]["verdict"], "confirmed");
    let open = http(web, "GET", "/api/scans?verdict=none", &me, "").await.json();
    assert!(open["scans"].as_array().unwrap().is_empty(), "{open}");
    let confirmed = http(web, "GET", "/api/scans?verdict=confirmed", &me, "").await.json();
    assert_eq!(confirmed["scans"][0]["scan_id"], id.as_str());

    // The TDR of the operator report downloads.
    let tdr = http(web, "GET", &format!("/api/scans/{id}/tdr?report=operator"), &me, "").await;
    assert_eq!(tdr.status, 200);
    assert_eq!(&tdr.body[128..132], b"DICM");

    // An admin may sign in and read, but adjudicates no more than over gRPC.
    let (admin_cookie, admin_csrf) = session_of(&login(web, "tok-admin").await);
    let a = http(web, "POST", &path, &[("cookie", &admin_cookie), json, ("x-niix-csrf", &admin_csrf)], &body).await;
    assert_eq!(a.status, 403);

    // Signing out ends the session.
    let out = http(web, "POST", "/api/logout", &[me[0], ("x-niix-csrf", &csrf)], "").await;
    assert_eq!(out.status, 200);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(http(web, "GET", "/api/scans", &me, "").await.status, 401);
    server.shutdown().await.unwrap();

    // Every console action is in the audit log under who did it.
    let meta = niix::store::SqliteMetadata::open(&dir.path().join("niix.db")).unwrap();
    let log: Vec<(String, String, String)> = meta
        .audit_records(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|r| (r.entry.identity, r.entry.action, r.entry.outcome))
        .collect();
    let has = |who: &str, action: &str, outcome: &str| {
        log.iter().any(|(w, a, o)| (w.as_str(), a.as_str(), o.as_str()) == (who, action, outcome))
    };
    assert!(has("DE", "ConsoleLogin", "PermissionDenied"), "{log:?}");
    assert!(has("unauthenticated", "ConsoleLogin", "Unauthenticated"), "{log:?}");
    assert!(has("officer-1", "ConsoleLogin", "OK"));
    assert!(has("officer-1", "Adjudicate", "OK"));
    assert!(has("admin-1", "Adjudicate", "PermissionDenied"));
    assert!(has("officer-1", "ConsoleLogout", "OK"));
}

#[tokio::test]
async fn an_expired_session_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.auth = tokens(&TOKENS);
    config.analysis.enabled = false;
    config.web = WebConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        session_ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let server = niix::server::start(config).await.unwrap();
    let web = server.web_addr.unwrap();
    let (cookie, _) = session_of(&login(web, "tok-officer").await);
    assert_eq!(http(web, "GET", "/api/scans", &[("cookie", &cookie)], "").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let a = http(web, "GET", "/api/scans", &[("cookie", &cookie)], "").await;
    assert_eq!(a.status, 401);
    assert!(a.json()["error"].as_str().unwrap().contains("expired"));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_tls_the_console_serves_https_and_its_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki { dir: dir.path().to_path_buf() };
    let (ca_cert, ca_issuer) = ca("NL customs CA");
    let (server_cert, server_key) = leaf("localhost", &ca_issuer);
    let mut config = config(&dir.path().join("data"), Limits::default());
    config.auth = tokens(&TOKENS);
    config.analysis.enabled = false;
    config.tls = Some(niix::config::TlsConfig {
        cert: pki.write("server.pem", &server_cert.pem()),
        key: pki.write("server.key", &server_key.serialize_pem()),
        client_ca: None,
    });
    let server = niix::server::start(config).await.unwrap();
    let web = server.web_addr.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let client =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = TcpStream::connect(web).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("a TLS handshake with the [tls] certificate");
    let body = "{\"token\":\"tok-officer\"}";
    let req = format!(
        "POST /api/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await; // the server may close without close_notify
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let cookie = text.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );

    // Plain HTTP on the TLS port gets no console.
    let mut plain = TcpStream::connect(web).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut raw)).await;
    assert!(!String::from_utf8_lossy(&raw).contains("officer console"));
    server.shutdown().await.unwrap();
}

/// One HTTP/1.1 exchange over TLS with `client` (trusting the test CA,
/// with or without a client certificate); returns the raw answer.
async fn https(client: &rustls::ClientConfig, at: SocketAddr, request: &str) -> String {
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client.clone()));
    let tcp = TcpStream::connect(at).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("a TLS handshake");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await; // the server may close without close_notify
    String::from_utf8_lossy(&raw).into_owned()
}

fn post_login(body: &str) -> String {
    format!(
        "POST /api/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_officer_signs_in_with_a_client_certificate_and_a_partner_certificate_cannot() {
    use niix::auth::CertificateConfig;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki { dir: dir.path().to_path_buf() };
    let (ca_cert, ca_issuer) = ca("NL customs CA");
    let (server_cert, server_key) = leaf("localhost", &ca_issuer);
    let (officer_cert, officer_key) = leaf("officer-cert", &ca_issuer);
    let (partner_cert, partner_key) = leaf("DE", &ca_issuer);
    let (stranger_cert, stranger_key) = leaf("stranger", &ca_issuer);
    let mut config = config(&dir.path().join("data"), Limits::default());
    config.auth = tokens(&TOKENS[..1]);
    let cert = |identity: &str, role, der: &[u8]| CertificateConfig {
        identity: identity.into(),
        role,
        sha256: sha256(der),
        sites: vec![],
    };
    config.auth.certificates = vec![
        cert("officer-cert", Role::Officer, officer_cert.der()),
        cert("DE-cert", Role::Partner, partner_cert.der()),
    ];
    config.analysis.enabled = false;
    config.tls = Some(niix::config::TlsConfig {
        cert: pki.write("server.pem", &server_cert.pem()),
        key: pki.write("server.key", &server_key.serialize_pem()),
        client_ca: Some(pki.write("ca.pem", &ca_cert.pem())),
    });
    let server = niix::server::start(config).await.unwrap();
    let web = server.web_addr.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let builder = || {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
    };
    let with = |cert: &rcgen::Certificate, key: &rcgen::KeyPair| {
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        builder().with_client_auth_cert(vec![cert.der().clone()], key).unwrap()
    };
    let (officer, partner, stranger) =
        (with(&officer_cert, &officer_key), with(&partner_cert, &partner_key), with(&stranger_cert, &stranger_key));
    let anonymous = builder().with_no_client_auth();
    let status = |raw: &str| raw.split(' ').nth(1).unwrap_or_default().parse::<u16>().unwrap_or_default();
    let certificate = "{\"certificate\":true}";

    // The page learns that the browser presented a certificate.
    let probe = "GET /api/certificate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    assert!(https(&officer, web, probe).await.contains("\"presented\":true"));
    assert!(https(&anonymous, web, probe).await.contains("\"presented\":false"));

    // The officer's certificate signs in without a token, as its identity.
    let a = https(&officer, web, &post_login(certificate)).await;
    assert_eq!(status(&a), 200, "{a}");
    assert!(a.contains("\"identity\":\"officer-cert\"") && a.contains("\"role\":\"officer\""), "{a}");
    let set = a.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap();
    assert!(set.contains("; Secure") && set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split_once(':').unwrap().1.split(';').next().unwrap().trim().to_string();
    // The session then works like a token's (the cookie is what counts).
    let list = format!("GET /api/scans HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nCookie: {cookie}\r\n\r\n");
    assert_eq!(status(&https(&anonymous, web, &list).await), 200);

    // A partner's certificate, one the server does not know, and none at all cannot.
    let p = https(&partner, web, &post_login(certificate)).await;
    assert_eq!(status(&p), 403, "{p}");
    assert!(p.contains("DE-cert (role partner) may not sign in to the officer console"), "{p}");
    assert!(!p.to_ascii_lowercase().contains("set-cookie"), "{p}");
    let s = https(&stranger, web, &post_login(certificate)).await;
    assert_eq!(status(&s), 401, "{s}");
    assert!(s.contains("client certificate is not known"), "{s}");
    let n = https(&anonymous, web, &post_login(certificate)).await;
    assert_eq!(status(&n), 401, "{n}");
    assert!(n.contains("presented no client certificate"), "{n}");
    // A certificate is no token: with the certificate flag off, the token decides.
    assert_eq!(status(&https(&officer, web, &post_login("{\"token\":\"guess\"}")).await), 401);
    // The token still signs in over the same TLS port, without a certificate.
    assert_eq!(status(&https(&anonymous, web, &post_login("{\"token\":\"tok-officer\"}")).await), 200);
    // A sign-in that is not JSON (what a cross-site form sends) is refused.
    let form = "POST /api/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                Content-Type: text/plain\r\nContent-Length: 19\r\n\r\n{\"certificate\":true}";
    assert_eq!(status(&https(&officer, web, form).await), 400);
    server.shutdown().await.unwrap();

    let meta = niix::store::SqliteMetadata::open(&dir.path().join("data").join("niix.db")).unwrap();
    let log: Vec<(String, String, String, String)> = meta
        .audit_records(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.action == "ConsoleLogin")
        .map(|r| (r.entry.identity, r.entry.object, r.entry.outcome, r.entry.role))
        .collect();
    let has = |who: &str, object: &str, outcome: &str| {
        log.iter().any(|(w, o, out, _)| (w.as_str(), o.as_str(), out.as_str()) == (who, object, outcome))
    };
    assert!(has("officer-cert", "certificate", "OK"), "{log:?}");
    assert!(has("DE-cert", "certificate", "PermissionDenied"), "{log:?}");
    assert!(has("unauthenticated", "certificate", "Unauthenticated"), "{log:?}");
    assert!(has("officer-1", "", "OK"), "{log:?}");
}

/// The material class a tile pixel was drawn in: black heavy, (near) grey
/// air, else the strongest of orange (red), green and blue.
fn drawn_class(rgb: [u8; 3]) -> niix::web::tiles::Material {
    use niix::web::tiles::Material;
    let (max, min) = (*rgb.iter().max().unwrap(), *rgb.iter().min().unwrap());
    if max < 8 {
        Material::Heavy
    } else if u16::from(min) * 10 > u16::from(max) * 9 {
        Material::Air
    } else if rgb[0] == max {
        Material::Organic
    } else if rgb[1] == max {
        Material::Mixed
    } else {
        Material::Inorganic
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn material_colouring_tells_organic_metal_and_heavy_regions_of_a_synthetic_scan_apart() {
    use niix::web::tiles::{HEAVY_ATTENUATION, Material, TILE};
    use niix_proto::v1::scan_ingest_client::ScanIngestClient;
    use niix_proto::v1::{PlaneEncoding, PlaneKind};
    use niix_synth::physics::{self, HIGH, LOW};
    use niix_synth::rng::Rng;
    use niix_synth::scene::{self, AnomalyKind, CargoKind, Conveyance};
    use std::collections::HashMap;

    // A container of cartons at niix synth's 6/4 MV scanner (the trailer
    // family's scene and physics), with two steel blocks and organic bricks
    // hidden in it. Seed 12 makes one block 7 cm of steel and the other
    // 25 cm, more than the beam gets through; the scene's areal densities are
    // the ground truth of what each pixel's ray crossed.
    let (len, hgt) = (3072usize, 1024usize);
    let kinds = [AnomalyKind::MetalBlock, AnomalyKind::MetalBlock, AnomalyKind::OrganicBricks];
    let s = scene::build(&mut Rng::new(12, 0), len, hgt, Conveyance::Container, &kinds, CargoKind::Cartons);
    let mut noise = Rng::new(12, 1);
    let gain: Vec<f64> = (0..hgt).map(|_| 1.0 + 0.004 * noise.normal()).collect();
    let layers = [s.layers.steel.as_slice(), s.layers.organic.as_slice(), s.layers.mineral.as_slice()];
    let bytes = |v: Vec<u16>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let high = bytes(physics::expose(HIGH, layers, len, &gain, &mut noise));
    let low = bytes(physics::expose(LOW, layers, len, &gain, &mut noise));

    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.auth = tokens(&TOKENS);
    config.analysis.enabled = false;
    let server = niix::server::start(config).await.unwrap();
    let web = server.web_addr.unwrap();
    let scanner = niix::client::authed(channel(&server).await, Some("tok-scanner")).unwrap();
    let plane_of = |kind: PlaneKind, raw: &[u8]| {
        let mut p = plane(PlaneEncoding::RawU16le, len as u32, hgt as u32, raw);
        p.kind = kind as i32;
        (p.pixel_spacing_x_mm, p.pixel_spacing_y_mm) = (s.layers.mm, s.layers.mm);
        p
    };
    let mut h = header(&new_id(), plane_of(PlaneKind::HighEnergy, &high));
    h.planes.push(plane_of(PlaneKind::LowEnergy, &low));
    let id = ScanIngestClient::new(scanner)
        .push_scan(tokio_stream::iter(messages(&h, &[&high, &low], 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .scan_id;
    let (cookie, _) = session_of(&login(web, "tok-officer").await);
    let me = [("cookie", cookie.as_str())];

    // The boxes' insides (the colours average over 5 pixels), and the
    // full-resolution tiles over them in material colours, fetched as the
    // viewer does.
    let inside = |r: &scene::Rect| {
        ((r.x0.ceil() as usize + 3, r.x1.floor() as usize - 3), (r.y0.ceil() as usize + 3, r.y1.floor() as usize - 3))
    };
    let t = TILE as usize;
    let mut tiles: HashMap<(usize, usize), (usize, Vec<u8>)> = HashMap::new();
    for (r, _) in &s.truth {
        let ((x0, x1), (y0, y1)) = inside(r);
        for ty in y0 / t..=(y1 - 1) / t {
            for tx in x0 / t..=(x1 - 1) / t {
                if tiles.contains_key(&(tx, ty)) {
                    continue;
                }
                let a = http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/{tx}/{ty}.png?material=1"), &me, "").await;
                assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
                let mut reader = png::Decoder::new(std::io::Cursor::new(a.body)).read_info().unwrap();
                assert_eq!(reader.info().color_type, png::ColorType::Rgb);
                let width = reader.info().width as usize;
                let mut buf = vec![0; reader.output_buffer_size().unwrap()];
                reader.next_frame(&mut buf).unwrap();
                tiles.insert((tx, ty), (width, buf));
            }
        }
    }
    let drawn = |x: usize, y: usize| -> Material {
        let (width, buf) = &tiles[&(x / t, y / t)];
        let i = ((y % t) * width + x % t) * 3;
        drawn_class([buf[i], buf[i + 1], buf[i + 2]])
    };

    // What each pixel's ray crossed decides the class it must be drawn in:
    // beyond the beam's reach heavy; nearly all steel inorganic; nearly all
    // organic matter organic. Mixed rays are left out.
    let expected = |i: usize| {
        let (st, or, mi) = (f64::from(layers[0][i]), f64::from(layers[1][i]), f64::from(layers[2][i]));
        let p = -physics::transmission(HIGH, st, or, mi).ln() as f32;
        let total = st + or + mi;
        if p > HEAVY_ATTENUATION + 0.5 {
            Some(Material::Heavy)
        } else if p < HEAVY_ATTENUATION - 0.5 && st > 0.85 * total {
            Some(Material::Inorganic)
        } else if p > 0.3 && p < HEAVY_ATTENUATION - 0.5 && or > 0.85 * total {
            Some(Material::Organic)
        } else {
            None
        }
    };
    let mut seen: Vec<(AnomalyKind, Material, usize, usize)> = Vec::new();
    for (r, kind) in &s.truth {
        let ((x0, x1), (y0, y1)) = inside(r);
        let mut by_class: HashMap<Material, (usize, usize)> = HashMap::new();
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * len + x;
                let Some(want) = expected(i) else { continue };
                let e = by_class.entry(want).or_default();
                e.0 += 1;
                e.1 += usize::from(drawn(x, y) == want);
            }
        }
        let (&class, &(judged, right)) = by_class.iter().max_by_key(|(_, (n, _))| *n).expect("pixels to judge");
        seen.push((*kind, class, judged, right));
    }
    for (kind, class, judged, right) in &seen {
        assert!(*judged >= 400, "{kind:?}: only {judged} pixels of one material: {seen:?}");
        assert!(*right * 100 >= *judged * 95, "{kind:?} ({class:?}): {right} of {judged} pixels right: {seen:?}");
    }
    let classes: Vec<(AnomalyKind, Material)> = seen.iter().map(|(k, c, _, _)| (*k, *c)).collect();
    assert!(classes.contains(&(AnomalyKind::OrganicBricks, Material::Organic)), "{classes:?}");
    assert!(classes.contains(&(AnomalyKind::MetalBlock, Material::Inorganic)), "{classes:?}");
    assert!(classes.contains(&(AnomalyKind::MetalBlock, Material::Heavy)), "{classes:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scanner_is_coloured_with_its_own_material_calibration() {
    use niix::material::{Calibration, Ratio};
    use niix_proto::v1::scan_ingest_client::ScanIngestClient;
    use niix_proto::v1::{PlaneEncoding, PlaneKind, Scanner, SourceEnergy};
    // An X-ray tube scanner, where the attenuation ratio rises with the
    // atomic number (the built-in 6/4 MV calibration has it fall).
    let tube = Calibration {
        name: "HX-160 160/80 kV".into(),
        manufacturer: "Hexray".into(),
        model: "HX-160".into(),
        peak_kv: 0.0,
        low_kv: 0.0,
        air_below: 0.05,
        heavy_above: 6.0,
        organic: Ratio(1.35, 0.0),
        mixed: Ratio(1.9, 0.0),
        inorganic: Ratio(3.0, -0.05),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.auth = tokens(&TOKENS);
    config.analysis.enabled = false;
    config.web.materials = vec![tube.clone()];
    let server = niix::server::start(config.clone()).await.unwrap();
    let web = server.web_addr.unwrap();
    let scanner = niix::client::authed(channel(&server).await, Some("tok-scanner")).unwrap();

    // The same pixels from two scanners: air around a block whose rays have
    // p_high = 1 and p_low = 2.9 (R = 2.9).
    let n = 64usize;
    let air = 60000.0f64;
    let counts = |p: f64| -> Vec<u8> {
        (0..n * n)
            .flat_map(|i| {
                let (x, y) = (i % n, i / n);
                let inside = (16..48).contains(&x) && (16..48).contains(&y);
                ((if inside { air * (-p).exp() } else { air }) as u16).to_le_bytes()
            })
            .collect()
    };
    let (high, low) = (counts(1.0), counts(2.9));
    let push = |manufacturer: &str, model: &str| {
        let mut h = header(&new_id(), plane(PlaneEncoding::RawU16le, n as u32, n as u32, &high));
        h.planes[0].kind = PlaneKind::HighEnergy as i32;
        let mut l = plane(PlaneEncoding::RawU16le, n as u32, n as u32, &low);
        l.kind = PlaneKind::LowEnergy as i32;
        h.planes.push(l);
        let m = h.metadata.as_mut().unwrap();
        m.scanner = Some(Scanner { manufacturer: manufacturer.into(), model: model.into(), ..Default::default() });
        m.source = Some(SourceEnergy { peak_kv: 160.0, low_kv: 80.0 });
        let messages = messages(&h, &[&high, &low], 1 << 16);
        let mut client = ScanIngestClient::new(scanner.clone());
        async move { client.push_scan(tokio_stream::iter(messages)).await.unwrap().into_inner().scan_id }
    };
    let hexray = push("HEXRAY", "hx-160").await;
    let other = push("Other", "L-6").await;
    let (cookie, _) = session_of(&login(web, "tok-officer").await);
    let me = [("cookie", cookie.as_str())];
    let centre = |id: String| async move {
        let d = http(web, "GET", &format!("/api/scans/{id}"), &me, "").await.json();
        let a = http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/0/0.png?material=1"), &me, "").await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let mut reader = png::Decoder::new(std::io::Cursor::new(a.body)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        let (corner, middle) = ((2 * n + 2) * 3, (32 * n + 32) * 3);
        let class = |i: usize| drawn_class([buf[i], buf[i + 1], buf[i + 2]]);
        (d["material_calibration"].as_str().unwrap().to_string(), class(corner), class(middle))
    };
    use niix::web::tiles::Material;
    assert_eq!(centre(hexray).await, (tube.name.clone(), Material::Air, Material::Inorganic));
    assert_eq!(
        centre(other).await,
        ("built-in 6/4 MV linac".to_string(), Material::Air, Material::Organic),
        "another scanner keeps the built-in calibration"
    );
    server.shutdown().await.unwrap();

    // A calibration that cannot tell the classes apart stops the server at start.
    config.web.materials = vec![Calibration { mixed: Ratio(1.2, 0.0), ..tube }];
    let e = niix::server::start(config).await.err().expect("refused").to_string();
    assert!(e.contains("HX-160 160/80 kV") && e.contains("strictly between"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_scan_is_marked_with_its_origin_redacted_and_shown_as_signed() {
    use niix::exchange::{Agreement, Content, ExchangeConfig, Issuer, PushTarget, Redact, keys};
    let tmp = tempfile::tempdir().unwrap();
    let (nl_key_file, nl_public) = keys::init(&tmp.path().join("nl-keys")).unwrap();

    // DE receives NL's packages; its officer works in the console.
    let mut de_config = config(&tmp.path().join("de"), Limits::default());
    de_config.analysis.enabled = false;
    de_config.auth = tokens(&[("NL", Role::Partner, "t-nl"), ("de-officer", Role::Officer, "t-off")]);
    de_config.exchange = ExchangeConfig {
        administration: "DE".into(),
        issuers: vec![Issuer { administration: "NL".into(), public_key: nl_public }],
        ..Default::default()
    };
    let de = niix::server::start(de_config).await.unwrap();
    let web = de.web_addr.unwrap();

    // NL shares planes downsampled to 64 pixels wide (4:1), without plates
    // and container numbers, and pushes them to DE.
    let token_file = tmp.path().join("nl-at-de.token");
    std::fs::write(&token_file, "t-nl\n").unwrap();
    let mut nl_config = config(&tmp.path().join("nl"), Limits::default());
    nl_config.web.listen = None;
    nl_config.exchange = ExchangeConfig {
        administration: "NL".into(),
        signing_key: Some(nl_key_file),
        agreements: vec![Agreement {
            name: "NL-DE-2026".into(),
            partner: "DE".into(),
            content: Content::FindingsPlanes,
            plane_width: 64,
            redact: vec![Redact::VehiclePlate, Redact::ContainerNumbers],
            push: Some(PushTarget {
                endpoint: format!("http://{}", de.addr),
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
    let nl_conn =
        niix::client::authed(niix::client::connect(&format!("http://{}", nl.addr)).await.unwrap(), None).unwrap();
    push_container(&nl_conn, "NLRTM-01", "AB-123-C", true).await;

    let (cookie, _) = session_of(&login(web, "t-off").await);
    let me = [("cookie", cookie.as_str())];
    let mut scans = Vec::new();
    for _ in 0..600 {
        scans = http(web, "GET", "/api/scans", &me, "").await.json()["scans"].as_array().unwrap().clone();
        if !scans.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The queue marks it with its origin; the redacted fields are empty.
    let row = scans.first().expect("NL's scan arrives at DE").clone();
    assert_eq!(row["origin"], "NL");
    assert_eq!(row["vehicle_plate"], "");
    assert_eq!(row["container_numbers"], serde_json::json!([]));
    assert_eq!(row["decision"], "alarm", "NL's machine decision, as signed");
    let id = row["scan_id"].as_str().unwrap().to_string();

    // The viewer: how it was shared, and the plane as signed, 4:1.
    let d = http(web, "GET", &format!("/api/scans/{id}"), &me, "").await.json();
    let p = &d["partner"];
    assert_eq!((p["origin"].as_str(), p["agreement"].as_str()), (Some("NL"), Some("NL-DE-2026")), "{d}");
    assert_eq!((p["image"].as_str(), p["downsampled"].as_u64()), (Some("downsampled"), Some(4)), "{d}");
    assert!(p["package_id"].as_str().unwrap().starts_with("NL.DE."), "{d}");
    let plane = &d["planes"][0];
    assert_eq!(
        (plane["width"].as_u64(), plane["height"].as_u64(), plane["downsampled"].as_u64()),
        (Some(64), Some(32), Some(4))
    );
    assert_eq!(plane["pixel_spacing_mm"][0].as_f64(), Some(16.0), "4 mm pixels, 4 to 1");
    assert!(d["scan"]["vehicle_plate"] == "" && d["scan"]["container_numbers"] == serde_json::json!([]), "{d}");
    // Regions stay in the scanned plane's pixels (the viewer divides by 4).
    let region = &d["machine"]["regions"][0];
    assert!(region["x"].as_u64().unwrap() >= 64, "{region}");

    // Tiles come from the downsampled plane: the dense block (100..140,
    // 40..70 as scanned) is dark at (25..35, 10..17).
    let tile = http(web, "GET", &format!("/api/scans/{id}/tiles/0/0/0/0.png?wl=0&wh=40000"), &me, "").await;
    assert_eq!(tile.status, 200, "{}", String::from_utf8_lossy(&tile.body));
    let mut reader = png::Decoder::new(std::io::Cursor::new(tile.body)).read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (64, 32));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    assert!(buf[13 * 64 + 30] < 40 && buf[2 * 64 + 2] > 150, "{} {}", buf[13 * 64 + 30], buf[2 * 64 + 2]);
    nl.shutdown().await.unwrap();
    de.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_configured_tokens_only_the_printed_workstation_token_signs_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.analysis.enabled = false;
    let server = niix::server::start(config).await.unwrap();
    let web = server.web_addr.unwrap();
    let token = server.console_token.clone().expect("a workstation token when no tokens are configured");
    assert_eq!(token.len(), 32);
    let guess = login(web, "anything").await;
    assert_eq!(guess.status, 401);
    assert!(guess.json()["error"].as_str().unwrap().contains("the token `niix serve` printed"));
    let a = login(web, &token).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        (a.json()["identity"].as_str(), a.json()["can_adjudicate"].as_bool()),
        (Some("local@console"), Some(true))
    );
    server.shutdown().await.unwrap();

    // With tokens configured there is no workstation token.
    let mut config = common::config(dir.path(), Limits::default());
    config.auth = tokens(&TOKENS);
    config.analysis.enabled = false;
    let server = niix::server::start(config).await.unwrap();
    assert!(server.console_token.is_none());
    server.shutdown().await.unwrap();
}
