//! The console's JSON endpoints (the contract is in docs/protocol.md,
//! "Officer console"). Reads need the session cookie; requests that change
//! state (POST) also the session's CSRF token header. Each answers errors
//! as `{"error": message}` with the status of [`Error::http_status`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use niix_proto::v1::{
    AdjudicateRequest, AlarmDecision, ExportTdrRequest, FindingsEvent, FindingsEventKind, ListScansRequest, PlaneKind,
    Region, RegionVerdict, RenderOverlayRequest, ReportType, Scan, ScanStatus, ThreatReport, Verdict,
    WatchFindingsRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::pyramid::Levels;
use super::session::{COOKIE, Session};
use super::tiles::{self, TileSpec};
use super::{ApiError, ClientCertificate, Web, assets};
use crate::audit::Caller;
use crate::auth::Role;
use crate::error::{Error, blocking};
use crate::findings::latest;
use crate::scope::SiteScope;

type ApiResult<T = Response> = Result<T, ApiError>;

/// The console's routes.
pub fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(|| async { page("text/html; charset=utf-8", assets::INDEX_HTML) }))
        .route("/app.js", get(|| async { page("text/javascript; charset=utf-8", assets::APP_JS) }))
        .route("/app.css", get(|| async { page("text/css; charset=utf-8", assets::APP_CSS) }))
        .route("/api/login", post(login))
        .route("/api/certificate", get(certificate))
        .route("/api/logout", post(logout))
        .route("/api/session", get(current))
        .route("/api/scans", get(list))
        .route("/api/events", get(events))
        .route("/api/scans/{id}", get(detail))
        .route("/api/scans/{id}/adjudicate", post(adjudicate))
        .route("/api/scans/{id}/tdr", get(tdr))
        .route("/api/scans/{id}/heatmap.png", get(heatmap))
        .route("/api/scans/{id}/overlay.png", get(overlay))
        .route("/api/scans/{id}/tiles/{plane}/{level}/{x}/{tile}", get(tile))
        .fallback(|| async { ApiError(Error::NotFound("the console has no such page or endpoint".into())) })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(web)
}

fn page(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Same-origin only: no inline script, no framing, no content sniffing.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::InvalidArgument(format!("the request body is not the JSON expected: {e}")))
}

/// `{"token": ...}`, or `{"certificate": true}` to sign in with the
/// connection's client certificate (mutual TLS).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    #[serde(default)]
    token: String,
    #[serde(default)]
    certificate: bool,
}

fn session_json(web: &Web, s: &Session, ttl_secs: u64) -> Value {
    json!({
        "identity": s.caller.identity,
        "role": s.caller.role,
        "csrf": s.csrf,
        "expires_in_seconds": ttl_secs,
        "can_adjudicate": can_adjudicate(web, &s.caller),
    })
}

/// Only officers adjudicate (as over gRPC); on a server without
/// authentication the local user does too, as over gRPC. Decided by the
/// server's authentication, never by an identity's name.
fn can_adjudicate(web: &Web, c: &Caller) -> bool {
    c.role == Role::Officer.name() || !web.auth.enabled()
}

/// POST /api/login `{"token": ...}` or `{"certificate": true}`: checks the
/// token, or the client certificate the connection presented, like a gRPC
/// call to the Findings service (officer or admin), starts a session, sets
/// its cookie. The body must be JSON (`content-type: application/json`),
/// which a cross-site form cannot send: a browser that holds a certificate
/// is not signed in by another site's page.
async fn login(
    State(web): State<Web>,
    ConnectInfo(presented): ConnectInfo<ClientCertificate>,
    request_headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let json = request_headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
    if !json {
        return Err(Error::InvalidArgument("sign in with a JSON body (content-type: application/json)".into()).into());
    }
    let req: LoginRequest = parse_json(&body)?;
    let mut headers = HeaderMap::new();
    let checked = match (req.certificate, presented.0.as_deref()) {
        (true, Some(fingerprint)) => web.auth.check("/niix.v1.Findings/ListScans", &headers, Some(fingerprint)),
        (true, None) => {
            let e = Error::Unauthenticated(
                "this connection presented no client certificate: the console asks for one only over TLS with \
                 [tls] client_ca configured, and the browser must have the certificate installed; or sign in with \
                 your token"
                    .into(),
            );
            let who = Caller { identity: "unauthenticated".into(), role: "none".into() };
            return Err(web.audited::<()>(&who, "ConsoleLogin", "certificate", Err(e)).await.unwrap_err());
        }
        (false, _) => match HeaderValue::from_str(&format!("Bearer {}", req.token.trim())) {
            Ok(v) => {
                headers.insert(header::AUTHORIZATION, v);
                web.auth.check("/niix.v1.Findings/ListScans", &headers, None)
            }
            Err(_) => Err((None, tonic::Status::unauthenticated("bad token"))),
        },
    };
    let method = if req.certificate { "certificate" } else { "" };
    let (caller, scope) = match checked {
        Ok(Some(c)) => {
            let scope = web.auth.scope(&c.identity);
            (c, scope)
        }
        // No authentication configured: one workstation on loopback, whose
        // user has the token `niix serve` printed.
        Ok(None) => {
            let printed = web.workstation_token().unwrap_or_default().as_bytes();
            if req.certificate || printed.is_empty() || !super::state::same(req.token.trim().as_bytes(), printed) {
                let e = Error::Unauthenticated(
                    "this server has no tokens configured: sign in with the token `niix serve` printed beside the \
                     console's address when it started (`make run` shows it)"
                        .into(),
                );
                let who = Caller { identity: "unauthenticated".into(), role: "none".into() };
                return Err(web.audited::<()>(&who, "ConsoleLogin", method, Err(e)).await.unwrap_err());
            }
            (Caller { identity: "local@console".into(), role: Role::Admin.name().into() }, SiteScope::all())
        }
        Err((caller, status)) => {
            let who = caller.clone().unwrap_or(Caller { identity: "unauthenticated".into(), role: "none".into() });
            let e = match (status.code(), caller) {
                (tonic::Code::PermissionDenied, Some(c)) => Error::PermissionDenied(format!(
                    "{} (role {}) may not sign in to the officer console: it is for officers and admins; partner \
                     administrations and scanners use the gRPC API",
                    c.identity, c.role
                )),
                _ if req.certificate => Error::Unauthenticated(
                    "this client certificate is not known to the server ([[auth.certificates]]): ask the \
                     administrator to register its fingerprint, or sign in with your token"
                        .into(),
                ),
                _ => Error::Unauthenticated(
                    "this token is not known to the server: check it, or ask the administrator for an officer token"
                        .into(),
                ),
            };
            return Err(web.audited::<()>(&who, "ConsoleLogin", method, Err(e)).await.unwrap_err());
        }
    };
    let created = web.sessions.create(caller.clone(), scope);
    let (id, session) = web.audited(&caller, "ConsoleLogin", method, created).await?;
    let ttl = web.sessions.ttl().as_secs();
    let secure = if web.secure_cookie { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={ttl}{secure}");
    let mut r = json_response(StatusCode::OK, session_json(&web, &session, ttl));
    r.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).map_err(|e| Error::Internal(e.to_string()))?);
    Ok(r)
}

/// GET /api/certificate: whether this connection presented a client
/// certificate (the sign-in page then offers to sign in with it).
async fn certificate(ConnectInfo(presented): ConnectInfo<ClientCertificate>) -> Response {
    json_response(StatusCode::OK, json!({ "presented": presented.0.is_some() }))
}

/// POST /api/logout: ends the session and clears its cookie.
async fn logout(State(web): State<Web>, headers: HeaderMap) -> ApiResult {
    let (id, session) = web.session_for_change(&headers)?;
    web.sessions.remove(&id);
    web.audited(&session.caller, "ConsoleLogout", "", Ok(())).await?;
    let mut r = json_response(StatusCode::OK, json!({ "signed_out": true }));
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    r.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).map_err(|e| Error::Internal(e.to_string()))?);
    Ok(r)
}

/// GET /api/session: who is signed in (and the CSRF token, for a reloaded page).
async fn current(State(web): State<Web>, headers: HeaderMap) -> ApiResult {
    let (_, session) = web.session(&headers)?;
    let left = session.expires.saturating_duration_since(std::time::Instant::now()).as_secs();
    Ok(json_response(StatusCode::OK, session_json(&web, &session, left)))
}

/// Percent-decoded `key=value` pairs of a query string.
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn enum_value<F: Fn(&str) -> Option<i32>>(what: &str, prefix: &str, value: &str, parse: F) -> Result<i32, Error> {
    parse(&format!("{prefix}{}", value.to_ascii_uppercase()))
        .ok_or_else(|| Error::InvalidArgument(format!("unknown {what} {value:?}")))
}

fn timestamp_arg(what: &str, v: &str) -> Result<prost_types::Timestamp, Error> {
    let t = humantime::parse_rfc3339_weak(v)
        .map_err(|e| Error::InvalidArgument(format!("{what} {v:?} is not a time like 2026-12-07T10:00:00Z: {e}")))?;
    Ok(crate::events::timestamp(t))
}

/// The `verdict` filter: `none` (not adjudicated) or a verdict. It is not a
/// ListScans filter: it thins each page, so a page may hold fewer scans
/// (or none) and still have a `next_page_token`.
fn verdict_filter(q: Option<&str>) -> Result<Option<i32>, Error> {
    match query_pairs(q).into_iter().find(|(k, v)| k == "verdict" && !v.is_empty()) {
        None => Ok(None),
        Some((_, v)) if v == "none" => Ok(Some(0)),
        Some((_, v)) => verdict_arg(&v).map(Some),
    }
}

/// The ListScans request of the console's query string.
fn list_request(q: Option<&str>) -> Result<ListScansRequest, Error> {
    let mut r = ListScansRequest { page_size: 50, ..Default::default() };
    for (k, v) in query_pairs(q) {
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "site" => r.site_id = v,
            "status" => {
                r.status = enum_value("status", "SCAN_STATUS_", &v, |n| ScanStatus::from_str_name(n).map(|s| s as i32))?
            }
            "decision" => {
                r.decision = enum_value("decision", "ALARM_DECISION_", &v, |n| {
                    AlarmDecision::from_str_name(n).map(|s| s as i32)
                })?
            }
            "container" => r.container_number = v,
            "declaration" => r.declaration_reference = v,
            "from" => r.scan_time_from = Some(timestamp_arg("from", &v)?),
            "to" => r.scan_time_to = Some(timestamp_arg("to", &v)?),
            "page_token" => r.page_token = v,
            "plate" => r.vehicle_plate = v,
            "verdict" => {} // applied to each page by `list`
            "page_size" => {
                r.page_size =
                    v.parse().map_err(|_| Error::InvalidArgument(format!("page_size {v:?} is not a number")))?
            }
            other => return Err(Error::InvalidArgument(format!("unknown filter {other:?}"))),
        }
    }
    Ok(r)
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

fn seconds(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(t.seconds))
}

fn scan_json(s: &Scan, verdict: Option<i32>) -> Value {
    let m = s.metadata.clone().unwrap_or_default();
    json!({
        "scan_id": s.scan_id,
        "status": short(ScanStatus::try_from(s.status).unwrap_or_default().as_str_name(), "SCAN_STATUS_"),
        "decision": (s.decision != 0)
            .then(|| short(AlarmDecision::try_from(s.decision).unwrap_or_default().as_str_name(), "ALARM_DECISION_")),
        "score": s.score,
        "site_id": m.site_id,
        "lane_id": m.lane_id,
        "scan_time": seconds(&m.scan_time),
        "received_at": seconds(&s.received_at),
        "container_numbers": m.container_numbers,
        "vehicle_plate": m.vehicle_plate,
        "declarations": m.declarations.iter().map(|d| d.value.clone()).collect::<Vec<_>>(),
        "origin": s.origin,
        "verdict": verdict.map(verdict_name),
    })
}

fn verdict_name(v: i32) -> String {
    short(Verdict::try_from(v).unwrap_or_default().as_str_name(), "VERDICT_")
}

fn region_json(r: &Region) -> Value {
    json!({
        "id": r.id, "x": r.x, "y": r.y, "width": r.width, "height": r.height,
        "width_mm": r.width_mm, "height_mm": r.height_mm,
        "max_score": r.max_score, "mean_score": r.mean_score,
        "category": r.threat_category,
        "verdict": (r.verdict != 0).then(|| verdict_name(r.verdict)),
        "comment": r.comment,
    })
}

fn report_json(r: &ThreatReport) -> Value {
    json!({
        "type": short(ReportType::try_from(r.r#type).unwrap_or_default().as_str_name(), "REPORT_TYPE_"),
        "decision": short(AlarmDecision::try_from(r.decision).unwrap_or_default().as_str_name(), "ALARM_DECISION_"),
        "decision_time": seconds(&r.decision_time),
        "score": r.score,
        "aborted": r.aborted,
        "abort_reason": r.abort_reason,
        "plane_index": r.plane_index,
        "algorithm": r.algorithm.as_ref().map(|a| format!("{} {}", a.name, a.version)),
        "operator_id": r.operator_id,
        "operator_name": r.operator_name,
        "verdict": (r.verdict != 0).then(|| verdict_name(r.verdict)),
        "comment": r.comment,
        "regions": r.regions.iter().map(region_json).collect::<Vec<_>>(),
        "heatmap_stride": (!r.anomaly_map_sha256.is_empty()).then_some(r.anomaly_map_stride),
    })
}

fn operator_verdict(reports: &[ThreatReport]) -> Option<i32> {
    latest(reports, ReportType::Operator).map(|(_, r)| r.verdict)
}

/// GET /api/scans?filters: a page of scans, newest first, with verdicts.
async fn list(State(web): State<Web>, headers: HeaderMap, RawQuery(q): RawQuery) -> ApiResult {
    let (_, s) = web.session(&headers)?;
    let result = async {
        let req = list_request(q.as_deref())?;
        let wanted = verdict_filter(q.as_deref())?;
        let page = web.findings.list(req, &s.scope).await?;
        let mut scans = Vec::with_capacity(page.scans.len());
        for scan in &page.scans {
            let reports = web.findings.findings(&scan.scan_id, &s.scope).await.map(|f| f.reports).unwrap_or_default();
            let verdict = operator_verdict(&reports);
            if wanted.is_none_or(|w| w == verdict.unwrap_or(0)) {
                scans.push(scan_json(scan, verdict));
            }
        }
        Ok(json!({ "scans": scans, "next_page_token": page.next_page_token }))
    }
    .await;
    let object = q.unwrap_or_default();
    let body = web.audited(&s.caller, "ListScans", &object, result).await?;
    Ok(json_response(StatusCode::OK, body))
}

/// GET /api/scans/{id}: a scan with its planes (and pyramid levels) and
/// its newest machine and operator reports.
async fn detail(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let (_, s) = web.session(&headers)?;
    // Loaded (and checked against its seals) once, for the answer and for
    // decoding its planes ahead.
    let mut opened = None;
    let result = async {
        let (record, reports) = web.findings.scan_record(&id, &s.scope).await?;
        let scan = crate::findings::scan_message(&record);
        let planes: Vec<Value> = scan
            .planes
            .iter()
            .map(|p| {
                let desc = p.descriptor.clone().unwrap_or_default();
                let f = p.downsampled.max(1);
                let (w, h) = (desc.width.div_ceil(f), desc.height.div_ceil(f));
                json!({
                    "index": p.index,
                    "kind": short(PlaneKind::try_from(desc.kind).unwrap_or_default().as_str_name(), "PLANE_KIND_"),
                    "width": w, "height": h, "downsampled": f,
                    "pixel_spacing_mm": [desc.pixel_spacing_x_mm * f64::from(f), desc.pixel_spacing_y_mm * f64::from(f)],
                    "levels": tiles::top_level(w, h) + 1,
                })
            })
            .collect();
        let shared = web.findings.shared(&record).await?;
        opened = Some(record);
        let kinds: Vec<i32> = scan.planes.iter().filter_map(|p| p.descriptor.as_ref().map(|d| d.kind)).collect();
        let dual = kinds.contains(&(PlaneKind::HighEnergy as i32)) && kinds.contains(&(PlaneKind::LowEnergy as i32));
        let m = scan.metadata.clone().unwrap_or_default();
        let material_calibration = dual.then(|| calibration(&web, &m).name.clone());
        Ok(json!({
            "scan": scan_json(&scan, operator_verdict(&reports)),
            "remarks": m.remarks,
            "scanner": m.scanner.map(|sc| format!("{} {} {}", sc.manufacturer, sc.model, sc.serial_number).trim().to_string()),
            "planes": planes,
            "dual_energy": dual,
            "material_calibration": material_calibration,
            "tile_size": tiles::TILE,
            "machine": latest(&reports, ReportType::Machine).map(|(_, r)| report_json(r)),
            "operator": latest(&reports, ReportType::Operator).map(|(_, r)| report_json(r)),
            "partner": shared.map(|p| partner_json(&scan, &p)),
        }))
    }
    .await;
    let body = web.audited(&s.caller, "GetScan", &id, result).await?;
    if let Some(record) = opened {
        decode_ahead(&web, record);
    }
    Ok(json_response(StatusCode::OK, body))
}

/// How a partner shared a foreign scan, for the viewer's banner: what
/// image it holds as signed (`full_planes`, `downsampled` n x n, the
/// partner's `overlay`, or `none`: findings only).
fn partner_json(scan: &Scan, p: &crate::findings::Shared) -> Value {
    let held = scan.planes.iter().map(|p| p.downsampled.max(1)).max();
    let image = match (held, p.overlay) {
        (Some(1), _) => "full_planes",
        (Some(_), _) => "downsampled",
        (None, true) => "overlay",
        (None, false) if p.full_planes => "full_planes_pending",
        (None, false) => "none",
    };
    json!({
        "origin": scan.origin,
        "first_origin": (!p.first_origin.is_empty()).then_some(&p.first_origin),
        "agreement": p.agreement,
        "package_id": p.package_id,
        "issued_at": seconds(&p.issued_at),
        "image": image,
        "downsampled": held.filter(|f| *f > 1),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionVerdictJson {
    id: u32,
    verdict: String,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjudicateJson {
    verdict: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    regions: Vec<RegionVerdictJson>,
}

fn verdict_arg(v: &str) -> Result<i32, Error> {
    enum_value("verdict", "VERDICT_", v, |n| Verdict::from_str_name(n).map(|x| x as i32))
}

/// POST /api/scans/{id}/adjudicate `{"verdict", "comment", "regions": [{"id", "verdict", "comment"}]}`:
/// stores the OPERATOR report under the signed-in officer, through the
/// same adjudication as gRPC.
async fn adjudicate(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let (_, s) = web.session_for_change(&headers)?;
    let result = async {
        if !can_adjudicate(&web, &s.caller) {
            return Err(Error::PermissionDenied(format!(
                "{} (role {}) may not adjudicate; it needs the role officer",
                s.caller.identity, s.caller.role
            )));
        }
        let j: AdjudicateJson = parse_json(&body)?;
        let regions = j
            .regions
            .iter()
            .map(|r| {
                Ok(RegionVerdict { region_id: r.id, verdict: verdict_arg(&r.verdict)?, comment: r.comment.clone() })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let local = s.caller.identity.starts_with("local@");
        let req = AdjudicateRequest {
            scan_id: id.clone(),
            verdict: verdict_arg(&j.verdict)?,
            regions,
            comment: j.comment,
            // Without authentication the name is the officer of record; with
            // it, the identity the session signed in as is.
            officer_id: if local { s.caller.identity.clone() } else { String::new() },
        };
        let officer = (!local).then_some(s.caller.identity.as_str());
        let report = web.findings.adjudicate(req, officer, &s.scope).await?;
        Ok(report_json(&report))
    }
    .await;
    let body = web.audited(&s.caller, "Adjudicate", &id, result).await?;
    Ok(json_response(StatusCode::OK, body))
}

/// GET /api/scans/{id}/tdr?report=machine|operator: the DICOS TDR file.
async fn tdr(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let (_, s) = web.session(&headers)?;
    let result = async {
        let mut report = ReportType::Machine;
        for (k, v) in query_pairs(q.as_deref()) {
            match (k.as_str(), v.as_str()) {
                ("report", "machine") => report = ReportType::Machine,
                ("report", "operator") => report = ReportType::Operator,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {k}={v}; use report=machine or report=operator"
                    )));
                }
            }
        }
        let r =
            web.findings.export_tdr(ExportTdrRequest { scan_id: id.clone(), report: report as i32 }, &s.scope).await?;
        Ok((r.dicos, short(report.as_str_name(), "REPORT_TYPE_")))
    }
    .await;
    let (dicos, kind) = web.audited(&s.caller, "ExportTdr", &id, result).await?;
    let name = format!(
        "attachment; filename=\"{}-{kind}-tdr.dcm\"",
        id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
    );
    Ok(([(header::CONTENT_TYPE, "application/dicom".to_string()), (header::CONTENT_DISPOSITION, name)], dicos)
        .into_response())
}

fn event_json(e: &FindingsEvent) -> Value {
    json!({
        "cursor": e.cursor,
        "kind": short(FindingsEventKind::try_from(e.kind).unwrap_or_default().as_str_name(), "FINDINGS_EVENT_KIND_"),
        "scan_id": e.scan_id,
        "site_id": e.site_id,
        "status": short(ScanStatus::try_from(e.status).unwrap_or_default().as_str_name(), "SCAN_STATUS_"),
    })
}

/// GET /api/events: server-sent events of new findings (the WatchFindings
/// stream from now on), one `data:` JSON line per event.
async fn events(State(web): State<Web>, headers: HeaderMap) -> ApiResult {
    let (_, s) = web.session(&headers)?;
    let watched = web.findings.watch(WatchFindingsRequest { live_only: true, ..Default::default() }, &s.scope).await;
    let stream = web.audited(&s.caller, "WatchFindings", "console", watched).await?;
    let sse =
        stream.map_while(|e| e.ok()).map(|e| Ok::<_, Infallible>(Event::default().data(event_json(&e).to_string())));
    Ok(Sse::new(sse).keep_alive(KeepAlive::default()).into_response())
}

/// GET /api/scans/{id}/heatmap.png: the machine report's anomaly map as a
/// heat layer (transparent where nothing was found, yellow to red with the
/// score), one pixel per `heatmap_stride` plane pixels; opacity is the
/// viewer's.
async fn heatmap(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let (_, s) = web.session(&headers)?;
    let map = web.findings.anomaly_map(&id, &s.scope).await?;
    let Some((map, _)) = map else {
        return Err(Error::NotFound(format!("scan {id} has no anomaly map on this server")).into());
    };
    let png = blocking(move || tiles::heat_png(&map)).await?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], png).into_response())
}

/// GET /api/scans/{id}/overlay.png: the scan's overlay as RenderOverlay
/// draws it; for a foreign scan held without planes, the overlay its
/// partner signed (agreement content `findings_overlay`).
async fn overlay(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let (_, s) = web.session(&headers)?;
    let r = web.findings.overlay(RenderOverlayRequest { scan_id: id.clone(), ..Default::default() }, &s.scope).await;
    let r = web.audited(&s.caller, "RenderOverlay", &id, r).await?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], r.png).into_response())
}

/// Display parameters of a tile request.
fn tile_spec(plane: usize, level: u32, x: u32, tile: &str, q: Option<&str>) -> Result<TileSpec, Error> {
    let y = tile
        .strip_suffix(".png")
        .and_then(|y| y.parse().ok())
        .ok_or_else(|| Error::NotFound(format!("tile {tile:?}: tiles are named <y>.png")))?;
    let mut spec =
        TileSpec { plane, level, x, y, window: None, gamma: 1.0, invert: false, material: false, edge: false };
    let (mut wl, mut wh) = (None, None);
    let bad = |k: &str, v: &str| Error::InvalidArgument(format!("tile parameter {k}={v:?} is not valid"));
    for (k, v) in query_pairs(q) {
        match k.as_str() {
            "wl" => wl = Some(v.parse::<u16>().map_err(|_| bad(&k, &v))?),
            "wh" => wh = Some(v.parse::<u16>().map_err(|_| bad(&k, &v))?),
            "gamma" => {
                spec.gamma = v.parse::<f32>().ok().filter(|g| (0.1..=10.0).contains(g)).ok_or_else(|| bad(&k, &v))?
            }
            "invert" => spec.invert = v == "1" || v == "true",
            "material" => spec.material = v == "1" || v == "true",
            "edge" => spec.edge = v == "1" || v == "true",
            _ => return Err(Error::InvalidArgument(format!("unknown tile parameter {k:?}"))),
        }
    }
    spec.window = match (wl, wh) {
        (Some(l), Some(h)) if h > l => Some((l, h)),
        (None, None) => None,
        _ => return Err(Error::InvalidArgument("window: give both wl and wh, with wh above wl".into())),
    };
    Ok(spec)
}

/// GET /api/scans/{id}/tiles/{plane}/{level}/{x}/{y}.png: one tile of the
/// pyramid (see [`tiles`]). Opening the scan (GET /api/scans/{id}) is the
/// audited view; tiles are not audited one by one.
async fn tile(
    State(web): State<Web>,
    headers: HeaderMap,
    Path((id, plane, level, x, tile)): Path<(String, usize, u32, u32, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let started = Instant::now();
    let (_, s) = web.session(&headers)?;
    let spec = tile_spec(plane, level, x, &tile, q.as_deref())?;
    // Scope first: a cached tile is only for those who may see the scan.
    let (record, _) = web.findings.scan_record(&id, &s.scope).await?;
    let mut timing = Timing::default();
    timing.lap("scope", started);
    let png = match web.tiles.get(&record.scan_id, &spec) {
        Some(png) => png,
        None => {
            let (origin, shape) = block(&record, &spec)?;
            let drawn = drawn_planes(&record, &spec)?;
            let record = Arc::new(record);
            let at = Instant::now();
            let kept = kept_levels(&web, &record, drawn, spec.level).await?;
            timing.lap("decoded", at);
            match kept {
                // The level is held decoded: this tile alone, from memory.
                Some(kept) => {
                    let at = Instant::now();
                    let _permit =
                        web.renders.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
                    timing.lap("wait", at);
                    let (w, spec, at) = (web.clone(), spec.clone(), Instant::now());
                    let (png, cpu) = blocking(move || {
                        let cpu = thread_cpu();
                        Ok((render_kept(&w, &record, &spec, &kept)?, thread_cpu().saturating_sub(cpu)))
                    })
                    .await?;
                    timing.lap("render", at);
                    timing.0.push(format!("cpu;dur={:.2}", cpu.as_secs_f64() * 1000.0));
                    png
                }
                // One render per block: requests for its other tiles wait,
                // then find theirs in the cache.
                None => {
                    let key = format!("{}/{:?}", record.scan_id, TileSpec { x: origin.0, y: origin.1, ..spec.clone() });
                    let flight = web.tiles.flight(&key);
                    let rendered = async {
                        let _turn = flight.lock.lock().await;
                        if let Some(png) = web.tiles.get(&record.scan_id, &spec) {
                            return Ok(png);
                        }
                        let _permit =
                            web.renders.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
                        let w = web.clone();
                        let spec = spec.clone();
                        blocking(move || render_block(&w, &record, &spec, drawn, origin, shape)).await
                    }
                    .await;
                    drop(flight);
                    rendered?
                }
            }
        }
    };
    timing.lap("total", started);
    let mut r =
        ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], png.as_ref().clone())
            .into_response();
    if let Ok(v) = HeaderValue::from_str(&timing.0.join(", ")) {
        r.headers_mut().insert("server-timing", v);
    }
    Ok(r)
}

/// CPU time the calling thread has used (the render's own cost, whatever
/// else the machine runs).
fn thread_cpu() -> std::time::Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    match rc {
        0 => std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32),
        _ => std::time::Duration::ZERO,
    }
}

/// A tile's `Server-Timing` header (seen in the browser's developer tools
/// and by `make console-bench`): milliseconds spent checking the scope,
/// getting the decoded levels, waiting for a render turn, rendering (and
/// the render's CPU time), and in all.
#[derive(Default)]
struct Timing(Vec<String>);

impl Timing {
    fn lap(&mut self, name: &str, since: Instant) {
        self.0.push(format!("{name};dur={:.1}", since.elapsed().as_secs_f64() * 1000.0));
    }
}

/// The block of tiles rendered with the tile of `spec` ([`tiles::block_of`]).
fn block(record: &crate::store::ScanRecord, spec: &TileSpec) -> Result<(tiles::Cell, tiles::Cell), Error> {
    let (w, h) = plane_size(record, spec.plane)?;
    let top = tiles::top_level(w, h);
    if spec.level > top {
        return Err(Error::InvalidArgument(format!(
            "level {} does not exist; this plane has levels 0..={top}",
            spec.level
        )));
    }
    let span = u64::from(tiles::TILE) << spec.level;
    if u64::from(spec.x) * span >= u64::from(w) || u64::from(spec.y) * span >= u64::from(h) {
        return Err(Error::NotFound(format!(
            "tile {},{} of level {} lies outside the {w}x{h} plane",
            spec.x, spec.y, spec.level
        )));
    }
    Ok(tiles::block_of(w, h, spec.level, spec.x, spec.y))
}

/// The size of plane `index` as this server holds it (a partner's
/// downsampled share is smaller than scanned).
fn plane_size(record: &crate::store::ScanRecord, index: usize) -> Result<(u32, u32), Error> {
    let d = record.header.planes.get(index).ok_or_else(|| {
        Error::NotFound(format!("plane {index} does not exist; the scan has {}", record.header.planes.len()))
    })?;
    let f = record.planes.get(index).map_or(1, |p| p.downsampled.max(1));
    Ok((d.width.div_ceil(f), d.height.div_ceil(f)))
}

/// The planes a tile is drawn from: the plane asked for twice, or for
/// material colouring the scan's high- and low-energy planes. Refused for a
/// foreign scan held without planes, and for colouring a scan that is not
/// dual-energy.
fn drawn_planes(record: &crate::store::ScanRecord, spec: &TileSpec) -> Result<(usize, usize), Error> {
    if !record.origin.is_empty() && record.planes.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "scan {} came from {} without its planes (the sharing agreement does not include image content)",
            record.scan_id, record.origin
        )));
    }
    match spec.material {
        true => tiles::dual_energy(record).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "scan {} has no high- and low-energy planes: material colouring needs a dual-energy scan",
                record.scan_id
            ))
        }),
        false => Ok((spec.plane, spec.plane)),
    }
}

/// The material calibration for a scan: by its scanner and source energies.
fn calibration<'a>(web: &'a Web, m: &niix_proto::v1::ScanMetadata) -> &'a tiles::Calibration {
    let scanner = m.scanner.clone().unwrap_or_default();
    let source = m.source.unwrap_or_default();
    web.materials.for_scan(&scanner.manufacturer, &scanner.model, source.peak_kv, source.low_kv)
}

/// The decoded levels of the planes a tile is drawn from, when `level` is
/// one the console keeps ([`super::pyramid`]); decoded now (once, however
/// many requests wait for it) when not held.
async fn kept_levels(
    web: &Web,
    record: &Arc<crate::store::ScanRecord>,
    (first, second): (usize, usize),
    level: u32,
) -> Result<Option<(Arc<Levels>, Arc<Levels>)>, Error> {
    let Some(high) = decoded(web, record, first, level).await? else { return Ok(None) };
    if second == first {
        return Ok(Some((high.clone(), high)));
    }
    Ok(decoded(web, record, second, level).await?.map(|low| (high, low)))
}

/// Plane `index`'s decoded levels if `level` is among those kept.
async fn decoded(
    web: &Web,
    record: &Arc<crate::store::ScanRecord>,
    index: usize,
    level: u32,
) -> Result<Option<Arc<Levels>>, Error> {
    let (w, h) = plane_size(record, index)?;
    let Some(first) = web.pyramids.first_kept(w, h).filter(|&f| f <= level) else { return Ok(None) };
    let key = format!("{}/{index}", record.scan_id);
    if let Some(levels) = web.pyramids.get(&key) {
        return Ok(Some(levels));
    }
    let flight = web.tiles.flight(&format!("decoded {key}"));
    let decoded = async {
        let _turn = flight.lock.lock().await;
        if let Some(levels) = web.pyramids.get(&key) {
            return Ok(levels);
        }
        let _permit = web.renders.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        let (w, record) = (web.clone(), record.clone());
        let levels = blocking(move || Levels::decode(&mut w.findings.open_plane(&record, index)?, first)).await?;
        let levels = Arc::new(levels);
        web.pyramids.put(&key, levels.clone());
        Ok::<_, Error>(levels)
    }
    .await;
    drop(flight);
    decoded.map(Some)
}

/// Decodes the kept levels of every plane of a scan just opened, in the
/// background, so that its first tiles and a switch to material colouring
/// (which reads the low-energy plane too) find them decoded.
fn decode_ahead(web: &Web, record: crate::store::ScanRecord) {
    if record.planes.is_empty() {
        return;
    }
    let web = web.clone();
    tokio::spawn(async move {
        let record = Arc::new(record);
        for index in 0..record.planes.len() {
            if let Err(e) = decoded(&web, &record, index, u32::MAX).await {
                tracing::debug!(scan = %record.scan_id, plane = index, error = %e, "decoding ahead failed");
            }
        }
    });
}

/// The automatic window of a plane (its 0.5th to 99.5th percentile, on the
/// top level), remembered per plane; `kept` when its levels are held.
fn auto_window(
    web: &Web,
    record: &crate::store::ScanRecord,
    plane: usize,
    kept: Option<&Levels>,
) -> Result<(u16, u16), Error> {
    if let Some(w) = web.tiles.window(&record.scan_id, plane) {
        return Ok(w);
    }
    let w = match kept {
        Some(levels) => crate::overlay::auto_window(levels.top()),
        None => {
            let (w, h) = plane_size(record, plane)?;
            let mut input = web.findings.open_plane(record, plane)?;
            crate::overlay::auto_window(&tiles::tile_samples(&mut input, tiles::top_level(w, h), 0, 0)?)
        }
    };
    web.tiles.put_window(&record.scan_id, plane, w);
    Ok(w)
}

/// Renders (and caches) the tile of `spec` from the held levels (blocking).
fn render_kept(
    web: &Web,
    record: &crate::store::ScanRecord,
    spec: &TileSpec,
    (high, low): &(Arc<Levels>, Arc<Levels>),
) -> Result<Arc<Vec<u8>>, Error> {
    let outside = || Error::NotFound(format!("tile {},{} lies outside the plane", spec.x, spec.y));
    let highs = vec![((0, 0), high.tile(spec.level, spec.x, spec.y).ok_or_else(outside)?)];
    let lows = match spec.material {
        true => Some(vec![((0, 0), low.tile(spec.level, spec.x, spec.y).ok_or_else(outside)?)]),
        false => None,
    };
    let shown = shown(web, record, spec, drawn_planes(record, spec)?, Some((high, low)))?;
    draw(web, record, spec, (spec.x, spec.y), highs, lows, shown)
}

/// Renders (and caches) the tiles of the block at `origin` of `shape`
/// tiles, reading the stored planes, and returns the one of `spec`
/// (blocking).
fn render_block(
    web: &Web,
    record: &crate::store::ScanRecord,
    spec: &TileSpec,
    (first, second): (usize, usize),
    origin: (u32, u32),
    shape: (u32, u32),
) -> Result<Arc<Vec<u8>>, Error> {
    let shown = shown(web, record, spec, (first, second), None)?;
    // The block of tiles around the one asked for, in one pass.
    let band = |plane: usize| -> Result<Vec<(tiles::Cell, ndarray::Array2<u16>)>, Error> {
        let mut input = web.findings.open_plane(record, plane)?;
        Ok(tiles::split_block(&tiles::block_samples(&mut input, spec.level, origin, shape)?))
    };
    let (highs, lows) = match spec.material {
        true => (band(first)?, Some(band(second)?)),
        false => (band(spec.plane)?, None),
    };
    draw(web, record, spec, origin, highs, lows, shown)
}

/// How a tile is shown: the window (the one asked for, or the drawn plane's
/// automatic one) and, for material colouring, the air levels of the high-
/// and low-energy planes (the tops of their automatic windows).
struct Shown {
    window: (u16, u16),
    air: (u16, u16),
}

/// The [`Shown`] of a tile of `spec`.
fn shown(
    web: &Web,
    record: &crate::store::ScanRecord,
    spec: &TileSpec,
    (first, second): (usize, usize),
    kept: Option<(&Levels, &Levels)>,
) -> Result<Shown, Error> {
    let auto = |plane, levels| auto_window(web, record, plane, levels);
    let window = match spec.window {
        Some(w) => w,
        None => auto(first, kept.map(|k| k.0))?,
    };
    let air = match spec.material {
        true => (auto(first, kept.map(|k| k.0))?.1, auto(second, kept.map(|k| k.1))?.1),
        false => (0, 0),
    };
    Ok(Shown { window, air })
}

/// Draws tiles (at their cells from `origin`) as `spec` asks, with the
/// window and air levels of [`shown`], caches each, and returns the one of
/// `spec`.
fn draw(
    web: &Web,
    record: &crate::store::ScanRecord,
    spec: &TileSpec,
    origin: (u32, u32),
    highs: Vec<(tiles::Cell, ndarray::Array2<u16>)>,
    lows: Option<Vec<(tiles::Cell, ndarray::Array2<u16>)>>,
    Shown { window, air }: Shown,
) -> Result<Arc<Vec<u8>>, Error> {
    let metadata = record.header.metadata.clone().unwrap_or_default();
    let colouring = tiles::Colouring { calibration: calibration(web, &metadata), air };
    let mut wanted = None;
    for (i, ((dx, dy), high)) in highs.iter().enumerate() {
        let sharp;
        let shade = match spec.edge {
            true => {
                sharp = tiles::enhance_edges(high);
                &sharp
            }
            false => high,
        };
        let png = match &lows {
            Some(lows) => {
                let low = lows.get(i).map(|(_, l)| l).filter(|l| l.dim() == high.dim()).ok_or_else(|| {
                    Error::FailedPrecondition("the high- and low-energy planes differ in size".into())
                })?;
                // Classes from the planes as measured; edges only sharpen the shading.
                tiles::material_png(high, low, shade, colouring, window, spec.gamma, spec.invert)?
            }
            None => tiles::grey_png(shade, window, spec.gamma, spec.invert)?,
        };
        let png = Arc::new(png);
        let at = TileSpec { x: origin.0 + dx, y: origin.1 + dy, ..spec.clone() };
        web.tiles.put(&record.scan_id, &at, png.clone());
        if (at.x, at.y) == (spec.x, spec.y) {
            wanted = Some(png);
        }
    }
    wanted.ok_or_else(|| Error::NotFound(format!("tile {},{} lies outside the plane", spec.x, spec.y)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_map_to_list_filters() {
        let r = list_request(Some("site=NL%20RTM&status=analyzed&decision=alarm&page_size=10&container=")).unwrap();
        assert_eq!(r.site_id, "NL RTM");
        assert_eq!(r.status, ScanStatus::Analyzed as i32);
        assert_eq!(r.decision, AlarmDecision::Alarm as i32);
        assert_eq!(r.page_size, 10);
        assert!(list_request(Some("status=bogus")).unwrap_err().to_string().contains("unknown status"));
        assert!(list_request(Some("colour=red")).is_err());
        assert_eq!(verdict_filter(Some("verdict=none")).unwrap(), Some(0));
        assert_eq!(verdict_filter(Some("verdict=confirmed")).unwrap(), Some(Verdict::Confirmed as i32));
        assert_eq!(verdict_filter(Some("site=x")).unwrap(), None);
        assert!(verdict_filter(Some("verdict=maybe")).is_err());
        assert_eq!(list_request(Some("plate=ab-123%20c")).unwrap().vehicle_plate, "ab-123 c");
        let t = tile_spec(0, 1, 2, "3.png", Some("wl=100&wh=2000&gamma=0.5&invert=1&material=1")).unwrap();
        assert_eq!((t.y, t.window, t.gamma, t.invert, t.material), (3, Some((100, 2000)), 0.5, true, true));
        assert!(tile_spec(0, 0, 0, "x.png", None).is_err());
        assert!(tile_spec(0, 0, 0, "1.png", Some("wl=5")).is_err());
    }
}
