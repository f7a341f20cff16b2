//! Prometheus metrics, served as text on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a received scan.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceivedLabels {
    /// "true" when the push repeated a stored scan.
    pub duplicate: String,
}

/// Label of a failed request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// RPC name, e.g. "PushScan".
    pub rpc: String,
    /// gRPC status code name, e.g. "InvalidArgument".
    pub code: String,
}

/// Label of a finished analysis.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnalysisLabels {
    /// "analyzed" or "failed".
    pub outcome: String,
}

/// The server's metrics, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Scans whose push completed, by duplicate or not.
    pub scans_received: Family<ReceivedLabels, Counter>,
    /// Plane bytes received (including resumed and duplicate pushes).
    pub bytes_received: Counter,
    /// Failed requests by RPC and status code.
    pub errors: Family<ErrorLabels, Counter>,
    /// Duration of successful pushes.
    pub upload_seconds: Histogram,
    /// Push streams open right now.
    pub uploads_active: Gauge,
    /// Finished analyses by outcome.
    pub analyses: Family<AnalysisLabels, Counter>,
    /// Duration of analyses.
    pub analysis_seconds: Histogram,
    /// Scans waiting for analysis.
    pub analysis_queue_depth: Gauge,
    /// Packages pushed to partners and acknowledged.
    pub packages_pushed: Counter,
    /// Failed push attempts to partners (each is retried).
    pub outbox_failures: Counter,
    /// Audit records that could not be written (each refused its request).
    pub audit_failed: Counter,
    /// Stored bytes or rows that no longer match their recorded digest
    /// (each refused with DATA_LOSS instead of being sent).
    pub integrity_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("niix");
        let scans_received = Family::<ReceivedLabels, Counter>::default();
        let bytes_received = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let upload_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let uploads_active = Gauge::default();
        for duplicate in ["false", "true"] {
            // Present from the start, so dashboards see 0 rather than nothing.
            let _ = scans_received.get_or_create(&ReceivedLabels { duplicate: duplicate.into() });
        }
        registry.register("scans_received", "Scans whose push completed", scans_received.clone());
        registry.register("ingest_bytes", "Plane bytes received", bytes_received.clone());
        registry.register("request_errors", "Failed requests by RPC and gRPC status code", errors.clone());
        registry.register("upload_duration_seconds", "Duration of successful pushes", upload_seconds.clone());
        registry.register("uploads_active", "Push streams open now", uploads_active.clone());
        let analyses = Family::<AnalysisLabels, Counter>::default();
        for outcome in ["analyzed", "failed"] {
            let _ = analyses.get_or_create(&AnalysisLabels { outcome: outcome.into() });
        }
        let analysis_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        let analysis_queue_depth = Gauge::default();
        registry.register("analyses", "Finished analyses by outcome", analyses.clone());
        registry.register("analysis_duration_seconds", "Duration of analyses", analysis_seconds.clone());
        registry.register("analysis_queue_depth", "Scans waiting for analysis", analysis_queue_depth.clone());
        let packages_pushed = Counter::default();
        let outbox_failures = Counter::default();
        registry.register("packages_pushed", "Packages pushed to partners and acknowledged", packages_pushed.clone());
        registry.register("outbox_failures", "Failed push attempts to partners", outbox_failures.clone());
        let audit_failed = Counter::default();
        let integrity_failures = Counter::default();
        registry.register("audit_write_failures", "Audit records that could not be written", audit_failed.clone());
        registry.register(
            "integrity_failures",
            "Stored planes or reports that no longer match their recorded digest",
            integrity_failures.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            scans_received,
            bytes_received,
            errors,
            upload_seconds,
            uploads_active,
            analyses,
            analysis_seconds,
            analysis_queue_depth,
            packages_pushed,
            outbox_failures,
            audit_failed,
            integrity_failures,
        }
    }

    /// Counts a failed request.
    pub fn error(&self, rpc: &str, code: tonic::Code) {
        self.errors.get_or_create(&ErrorLabels { rpc: rpc.into(), code: format!("{code:?}") }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.error("PushScan", tonic::Code::DataLoss);
        m.bytes_received.inc_by(42);
        let text = m.encode();
        for needle in [
            "niix_scans_received_total{duplicate=\"false\"} 0",
            "niix_ingest_bytes_total 42",
            "niix_request_errors_total{rpc=\"PushScan\",code=\"DataLoss\"} 1",
            "niix_upload_duration_seconds_bucket",
            "niix_uploads_active",
            "niix_analyses_total{outcome=\"failed\"} 0",
            "niix_analysis_duration_seconds_bucket",
            "niix_analysis_queue_depth 0",
            "niix_audit_write_failures_total 0",
            "niix_integrity_failures_total 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
