//! The `Findings` service: what officers query. For now it lists and returns
//! stored scans; analysis results join them when inference lands.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use niix_proto::v1::findings_server::Findings;
use niix_proto::v1::{
    GetFindingsRequest, GetScanRequest, ListScansRequest, ListScansResponse, Plane, Scan, ScanFindings, ScanStatus,
};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, blocking, reply};
use crate::header::canonical_scan_id;
use crate::metrics::Metrics;
use crate::store::{MetadataStore, ScanQuery, ScanRecord};

/// Default and largest page of `ListScans`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page of `ListScans`.
pub const MAX_PAGE: usize = 1000;

/// `niix.v1.Findings` over a metadata store.
#[derive(Clone)]
pub struct FindingsService {
    meta: Arc<dyn MetadataStore>,
    metrics: Metrics,
}

/// Converts a time to a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.clamp(0, 999_999_999) as u32)
}

/// The wire form of a stored scan.
pub fn scan_message(r: &ScanRecord) -> Scan {
    Scan {
        scan_id: r.scan_id.clone(),
        metadata: r.header.metadata.clone(),
        planes: r
            .header
            .planes
            .iter()
            .zip(&r.planes)
            .enumerate()
            .map(|(i, (d, p))| Plane {
                index: i as u32,
                descriptor: Some(d.clone()),
                sha256: p.sha256.clone(),
                byte_length: p.byte_length,
            })
            .collect(),
        status: r.status as i32,
        received_at: Some(timestamp(r.received_at)),
    }
}

/// Page tokens are "<received_at micros>.<scan id>" of the last scan returned.
fn encode_token(r: &ScanRecord) -> String {
    let us = r.received_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
    format!("{us}.{}", r.scan_id)
}

fn decode_token(token: &str) -> Result<(SystemTime, String)> {
    let bad = || Error::InvalidArgument(format!("page_token {token:?} is not one this server issued"));
    let (us, id) = token.split_once('.').ok_or_else(bad)?;
    let us: u64 = us.parse().map_err(|_| bad())?;
    Ok((UNIX_EPOCH + Duration::from_micros(us), id.to_string()))
}

impl FindingsService {
    /// Creates the service.
    pub fn new(meta: Arc<dyn MetadataStore>, metrics: Metrics) -> Self {
        FindingsService { meta, metrics }
    }

    /// Lists scans (used by the gRPC method).
    pub async fn list(&self, req: ListScansRequest) -> Result<ListScansResponse> {
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let status = match ScanStatus::try_from(req.status) {
            Ok(ScanStatus::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => return Err(Error::InvalidArgument(format!("unknown scan status value {}", req.status))),
        };
        let query = ScanQuery {
            limit: limit + 1,
            before: if req.page_token.is_empty() { None } else { Some(decode_token(&req.page_token)?) },
            site_id: (!req.site_id.is_empty()).then_some(req.site_id),
            status,
            received_after: req.received_after.as_ref().map(system_time),
        };
        let meta = self.meta.clone();
        let mut rows = blocking(move || Ok(meta.list_scans(&query)?)).await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_token(last),
            _ => String::new(),
        };
        Ok(ListScansResponse { scans: rows.iter().map(scan_message).collect(), next_page_token })
    }

    /// A scan's status and reports (used by the gRPC method).
    pub async fn findings(&self, scan_id: &str) -> Result<ScanFindings> {
        let id = canonical_scan_id(scan_id)?;
        let meta = self.meta.clone();
        let lookup = id.clone();
        let found = blocking(move || {
            let Some(scan) = meta.get_scan(&lookup)? else { return Ok(None) };
            Ok(Some((scan.status, meta.reports(&lookup)?)))
        })
        .await?;
        match found {
            Some((status, reports)) => Ok(ScanFindings { scan_id: id, status: status as i32, reports }),
            None => Err(Error::NotFound(format!("no scan {id} is stored"))),
        }
    }

    /// Returns one scan (used by the gRPC method).
    pub async fn get(&self, scan_id: &str) -> Result<Scan> {
        let id = canonical_scan_id(scan_id)?;
        let meta = self.meta.clone();
        let lookup = id.clone();
        match blocking(move || Ok(meta.get_scan(&lookup)?)).await? {
            Some(r) => Ok(scan_message(&r)),
            None => Err(Error::NotFound(format!("no scan {id} is stored"))),
        }
    }
}

#[tonic::async_trait]
impl Findings for FindingsService {
    async fn list_scans(
        &self,
        request: Request<ListScansRequest>,
    ) -> std::result::Result<Response<ListScansResponse>, Status> {
        let result = self.list(request.into_inner()).await;
        reply(&self.metrics, "ListScans", result)
    }

    async fn get_scan(&self, request: Request<GetScanRequest>) -> std::result::Result<Response<Scan>, Status> {
        let result = self.get(&request.into_inner().scan_id).await;
        reply(&self.metrics, "GetScan", result)
    }

    async fn get_findings(
        &self,
        request: Request<GetFindingsRequest>,
    ) -> std::result::Result<Response<ScanFindings>, Status> {
        let result = self.findings(&request.into_inner().scan_id).await;
        reply(&self.metrics, "GetFindings", result)
    }
}
