//! The tonic face of [`Ingest`].

use std::sync::Arc;

use niix_proto::v1::scan_ingest_server::ScanIngest;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{
    AbortUploadRequest, AbortUploadResponse, GetUploadStatusRequest, PushScanRequest, ScanReceipt, UploadStatus,
};
use tonic::{Request, Response, Status, Streaming};

use super::{Ingest, Uploader};
use crate::audit::{Caller, Gate};
use crate::scope::SiteScope;

/// `niix.v1.ScanIngest` backed by an [`Ingest`] engine.
#[derive(Clone)]
pub struct IngestService {
    ingest: Arc<Ingest>,
    gate: Gate,
}

impl IngestService {
    /// Wraps an engine; every outcome passes through `gate`.
    pub fn new(ingest: Arc<Ingest>, gate: Gate) -> Self {
        IngestService { ingest, gate }
    }

    /// True when a site-scoped caller asks about a scan or upload of a site
    /// outside its scope: to it, such an id is unknown.
    async fn hidden(&self, scope: &SiteScope, scan_id: &str) -> crate::error::Result<bool> {
        if scope.sites().is_none() {
            return Ok(false);
        }
        Ok(self.ingest.site_of(scan_id).await?.is_some_and(|site| !scope.allows(&site)))
    }
}

#[tonic::async_trait]
impl ScanIngest for IngestService {
    async fn push_scan(&self, request: Request<Streaming<PushScanRequest>>) -> Result<Response<ScanReceipt>, Status> {
        let caller = Caller::of(&request);
        let uploader = Uploader { identity: caller.identity.clone(), scope: SiteScope::of(&request) };
        let result = self.ingest.push(&uploader, request.into_inner()).await;
        let object = result.as_ref().map(|r| r.scan_id.clone()).unwrap_or_default();
        self.gate.reply(&caller, "PushScan", &object, result).await
    }

    async fn get_upload_status(
        &self,
        request: Request<GetUploadStatusRequest>,
    ) -> Result<Response<UploadStatus>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let id = request.into_inner().scan_id;
        let result = match self.hidden(&scope, &id).await {
            Ok(true) => Ok(UploadStatus { scan_id: id.clone(), state: State::Unknown as i32, ..Default::default() }),
            Ok(false) => self.ingest.upload_status(&id).await,
            Err(e) => Err(e),
        };
        self.gate.reply(&caller, "GetUploadStatus", &id, result).await
    }

    async fn abort_upload(
        &self,
        request: Request<AbortUploadRequest>,
    ) -> Result<Response<AbortUploadResponse>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let id = request.into_inner().scan_id;
        let result = match self.hidden(&scope, &id).await {
            Ok(true) => Ok(false),
            Ok(false) => self.ingest.abort_upload(&id).await,
            Err(e) => Err(e),
        };
        self.gate.reply(&caller, "AbortUpload", &id, result.map(|aborted| AbortUploadResponse { aborted })).await
    }
}
