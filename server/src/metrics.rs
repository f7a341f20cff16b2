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

/// The gRPC services the server answers, with their methods: the closed
/// set of `rpc` label values (anything else is counted as `unknown`).
pub const SERVICES: &[(&str, &[&str])] = &[
    ("niix.v1.ScanIngest", &["PushScan", "GetUploadStatus", "AbortUpload"]),
    (
        "niix.v1.Findings",
        &["ListScans", "GetScan", "GetFindings", "RenderOverlay", "Adjudicate", "WatchFindings", "ExportTdr"],
    ),
    ("niix.v1.Exchange", &["Subscribe", "GetPackage", "GetPlane", "Receive"]),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    ("grpc.reflection.v1.ServerReflection", &["ServerReflectionInfo"]),
    ("grpc.reflection.v1alpha.ServerReflection", &["ServerReflectionInfo"]),
    (
        "inference.GRPCInferenceService",
        &[
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
            "RepositoryIndex",
        ],
    ),
];

/// The `rpc` label of a method name: the name itself when the server has
/// such a method, else `unknown`.
pub fn rpc_label(name: &str) -> &'static str {
    SERVICES.iter().flat_map(|(_, methods)| methods.iter()).find(|m| **m == name).copied().unwrap_or("unknown")
}

/// The method name of a request path `/<service>/<method>`, if the server
/// has that method.
pub fn known_rpc(path: &str) -> Option<&'static str> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let (_, methods) = SERVICES.iter().find(|(s, _)| *s == service)?;
    methods.iter().find(|m| **m == method).copied()
}

/// Label of a failed request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// RPC name from [`SERVICES`], e.g. "PushScan", or "unknown".
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
    /// Requests for a path the server has no method for (refused UNIMPLEMENTED).
    pub unknown_rpcs: Counter,
    /// Connections closed because the peer sent nothing for too long.
    pub connections_timed_out: Counter,
    /// New connections refused at `limits.max_connections` (every open one talking).
    pub connections_refused: Counter,
    /// Silent connections closed to make room for a new one at `limits.max_connections`.
    pub connections_evicted: Counter,
    /// Image content rendered for packages (downsampled planes, overlays,
    /// pixel-only planes); a package served from the cache adds nothing.
    pub package_renders: Counter,
    /// Audit records that could not be written (each refused its request).
    pub audit_failed: Counter,
    /// Audit group commits (one transaction and fsync each, for every
    /// record queued meanwhile); records per commit = records / commits.
    pub audit_group_commits: Counter,
    /// Stored bytes or rows that no longer match their recorded digest
    /// (each refused with DATA_LOSS instead of being sent).
    pub integrity_failures: Counter,
    /// Bytes of decoded pyramid levels the officer console keeps in memory.
    pub console_decoded_bytes: Gauge,
    /// Planes the console decoded into its pyramid table.
    pub console_decoded_planes: Counter,
    /// Planes evicted from that table to stay within `[web] decoded_cache_mib`.
    pub console_decoded_evictions: Counter,
}

/// Holds one unit of a gauge (e.g. one open push stream) and gives it back
/// when dropped: on success, on error, and when the request's future is
/// dropped because the client cancelled or its deadline passed.
#[must_use = "the gauge goes back down as soon as the guard is dropped"]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Increments `gauge` until the guard is dropped.
    pub fn hold(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
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
        let unknown_rpcs = Counter::default();
        let connections_timed_out = Counter::default();
        registry.register(
            "unknown_rpc_requests",
            "Requests for a path the server has no method for",
            unknown_rpcs.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections closed because the peer sent nothing within the handshake or idle timeout",
            connections_timed_out.clone(),
        );
        let connections_refused = Counter::default();
        let connections_evicted = Counter::default();
        registry.register(
            "connections_refused",
            "New connections refused at limits.max_connections because every open connection was talking",
            connections_refused.clone(),
        );
        registry.register(
            "connections_evicted",
            "Silent connections closed to make room for a new one at limits.max_connections",
            connections_evicted.clone(),
        );
        let package_renders = Counter::default();
        registry.register("package_renders", "Image content rendered for packages", package_renders.clone());
        let audit_failed = Counter::default();
        let integrity_failures = Counter::default();
        registry.register("audit_write_failures", "Audit records that could not be written", audit_failed.clone());
        let audit_group_commits = Counter::default();
        registry.register(
            "audit_group_commits",
            "Audit group commits (one fsync each, for all records queued meanwhile)",
            audit_group_commits.clone(),
        );
        registry.register(
            "integrity_failures",
            "Stored planes or reports that no longer match their recorded digest",
            integrity_failures.clone(),
        );
        let console_decoded_bytes = Gauge::default();
        let console_decoded_planes = Counter::default();
        let console_decoded_evictions = Counter::default();
        registry.register(
            "console_decoded_bytes",
            "Bytes of decoded pyramid levels the officer console keeps for the scans being viewed",
            console_decoded_bytes.clone(),
        );
        registry.register(
            "console_decoded_planes",
            "Planes the officer console decoded into its pyramid table",
            console_decoded_planes.clone(),
        );
        registry.register(
            "console_decoded_evictions",
            "Planes evicted from the console's pyramid table to stay within its budget",
            console_decoded_evictions.clone(),
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
            unknown_rpcs,
            connections_timed_out,
            connections_refused,
            connections_evicted,
            package_renders,
            audit_failed,
            audit_group_commits,
            integrity_failures,
            console_decoded_bytes,
            console_decoded_planes,
            console_decoded_evictions,
        }
    }

    /// Counts a failed request; `rpc` outside [`SERVICES`] counts as `unknown`.
    pub fn error(&self, rpc: &str, code: tonic::Code) {
        self.errors.get_or_create(&ErrorLabels { rpc: rpc_label(rpc).into(), code: format!("{code:?}") }).inc();
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
    fn a_gauge_guard_gives_its_unit_back_on_drop() {
        let m = Metrics::new();
        let a = GaugeGuard::hold(&m.uploads_active);
        let b = GaugeGuard::hold(&m.uploads_active);
        assert_eq!(m.uploads_active.get(), 2);
        drop(a);
        assert_eq!(m.uploads_active.get(), 1);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _b = b;
            panic!("a handler that panics");
        }));
        assert!(unwound.is_err());
        assert_eq!(m.uploads_active.get(), 0);
    }

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

    #[test]
    fn rpc_labels_come_from_the_closed_set() {
        let m = Metrics::new();
        let before = m.encode().len();
        m.error("inj\"}{", tonic::Code::Unauthenticated);
        m.error(&"x".repeat(12_000), tonic::Code::Unauthenticated);
        let text = m.encode();
        assert!(text.contains("niix_request_errors_total{rpc=\"unknown\",code=\"Unauthenticated\"} 2"), "{text}");
        // The page grows by the `unknown` series (a 12 KB label would add 12 KB).
        assert!(!text.contains("inj") && text.len() < before + 256, "{} -> {}\n{text}", before, text.len());
        assert_eq!(known_rpc("/niix.v1.Findings/Adjudicate"), Some("Adjudicate"));
        assert_eq!(known_rpc("/grpc.health.v1.Health/Check"), Some("Check"));
        for bad in ["/x/inj\"}{", "/niix.v1.Findings/Nope", "/niix.v1.Findings", "niix.v1.Findings/GetScan", ""] {
            assert_eq!(known_rpc(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_closed_set_lists_every_method_of_the_niix_services() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(niix_proto::v1::FILE_DESCRIPTOR_SET).unwrap();
        let mut described = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for m in &service.method {
                    described.push(format!("/{name}/{}", m.name()));
                }
            }
        }
        assert!(described.len() >= 14, "{described:?}");
        for path in &described {
            assert!(known_rpc(path).is_some(), "{path} is missing from SERVICES");
        }
        let niix: usize = SERVICES.iter().filter(|(s, _)| s.starts_with("niix.")).map(|(_, m)| m.len()).sum();
        assert_eq!(niix, described.len(), "SERVICES lists a method the protocol does not have");
    }
}
