//! The tonic face of [`Ingest`].

use std::sync::Arc;

use niix_proto::v1::scan_ingest_server::ScanIngest;
use niix_proto::v1::{
    AbortUploadRequest, AbortUploadResponse, GetUploadStatusRequest, PushScanRequest, ScanReceipt, UploadStatus,
};
use tonic::{Request, Response, Status, Streaming};

use super::Ingest;
use crate::error::reply;

/// `niix.v1.ScanIngest` backed by an [`Ingest`] engine.
#[derive(Clone)]
pub struct IngestService {
    ingest: Arc<Ingest>,
}

impl IngestService {
    /// Wraps an engine.
    pub fn new(ingest: Arc<Ingest>) -> Self {
        IngestService { ingest }
    }
}

#[tonic::async_trait]
impl ScanIngest for IngestService {
    async fn push_scan(&self, request: Request<Streaming<PushScanRequest>>) -> Result<Response<ScanReceipt>, Status> {
        let result = self.ingest.push(request.into_inner()).await;
        reply(&self.ingest.metrics, "PushScan", result)
    }

    async fn get_upload_status(
        &self,
        request: Request<GetUploadStatusRequest>,
    ) -> Result<Response<UploadStatus>, Status> {
        let result = self.ingest.upload_status(&request.into_inner().scan_id).await;
        reply(&self.ingest.metrics, "GetUploadStatus", result)
    }

    async fn abort_upload(
        &self,
        request: Request<AbortUploadRequest>,
    ) -> Result<Response<AbortUploadResponse>, Status> {
        let result = self.ingest.abort_upload(&request.into_inner().scan_id).await;
        reply(&self.ingest.metrics, "AbortUpload", result.map(|aborted| AbortUploadResponse { aborted }))
    }
}
