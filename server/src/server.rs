//! Wires the services into one gRPC server plus a `/metrics` endpoint, and
//! shuts them down gracefully.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use niix_inference::repository::Repository;
use niix_proto::oip::grpc_inference_service_server::GrpcInferenceServiceServer;
use niix_proto::v1::exchange_server::ExchangeServer;
use niix_proto::v1::findings_server::FindingsServer;
use niix_proto::v1::scan_ingest_server::ScanIngestServer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding::Gzip;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tonic_reflection::pb::{v1 as reflection_v1, v1alpha as reflection_v1alpha};

use crate::analysis::Analyzer;
use crate::audit::{Caller, Gate};
use crate::auth::{AuthLayer, Authenticator};
use crate::config::Config;
use crate::conn::{ConnectionCap, Guarded, GuardedListener, Timeouts};
use crate::events::EventSignal;
use crate::exchange::ExchangeService;
use crate::findings::FindingsService;
use crate::health::NiixHealth;
use crate::ingest::{Ingest, IngestService, ReadableCheck};
use crate::metrics::Metrics;
use crate::model_choice::ModelChoice;
use crate::oip::InferenceService;
use crate::reflection::{Reflection, ReflectionV1, ReflectionV1alpha};
use crate::store::{BlobStore, FsBlobs, MetadataStore, SqliteMetadata};

/// HTTP/2 flow-control window per stream, in bytes. Measured on loopback:
/// 16 MiB pushes a plane a third faster than 8 MiB, as the pusher keeps
/// sending while the server's threads wait for a core.
const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 flow-control window per connection, in bytes.
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame the server accepts, in bytes (the protocol's default
/// is 16 KiB). A 1 MiB plane chunk then crosses in four frames instead of 64,
/// read in a few large system calls; much larger frames cost an extra copy
/// when the HTTP/2 read buffer grows to hold them.
const MAX_FRAME: u32 = 256 << 10;

/// How long the gRPC listener waits after a failed accept (e.g. out of file
/// handles) before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// The health-check service name that reports whether scans get analysed:
/// SERVING while the model that analyses scans (the configured one, or any
/// when none is configured) is loaded, NOT_SERVING while scans would only
/// queue (no servable model, or analysis disabled). There is no RPC service
/// of this name; analyses are read through `niix.v1.Findings`.
pub const ANALYSIS_HEALTH: &str = "niix.v1.Analysis";

/// How often unfinished uploads past their TTL are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Refuses a non-loopback listen address unless the operator accepted
/// unauthenticated clients with `insecure`.
pub fn check_bind_policy(addr: SocketAddr, insecure: bool, authenticated: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || insecure || authenticated {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {addr} without authentication: configure [[auth.tokens]] (see docs/operations.md), \
         bind to 127.0.0.1, or pass --insecure (insecure = true) on a network you trust"
    )
}

/// Refuses listen addresses that would expose the server: the gRPC bind as
/// in [`check_bind_policy`]; bearer tokens on a non-loopback address
/// without TLS (they would cross the network in clear text); and a
/// non-loopback `/metrics` address, which has no authentication of its
/// own. `insecure` accepts all three on a network the operator trusts.
pub fn check_listen_policy(config: &Config) -> anyhow::Result<()> {
    check_bind_policy(config.listen, config.insecure, config.auth.enabled())?;
    if !config.listen.ip().is_loopback() && !config.auth.tokens.is_empty() && config.tls.is_none() && !config.insecure {
        anyhow::bail!(
            "refusing bearer tokens on {} without TLS: they would cross the network in clear text; \
             configure [tls] (see docs/operations.md), bind to 127.0.0.1, or pass --insecure (insecure = true) \
             on a network you trust",
            config.listen
        );
    }
    if let Some(at) = config.metrics_listen
        && !at.ip().is_loopback()
        && !config.insecure
    {
        anyhow::bail!(
            "refusing to serve /metrics on {at}: the metrics endpoint has no authentication; bind it to \
             127.0.0.1 (--metrics-listen 127.0.0.1:9464) and let the scraper reach it through a proxy or tunnel, \
             or pass --insecure (insecure = true) on a network you trust"
        );
    }
    crate::web::check_listen_policy(config)
}

/// A server that is accepting requests.
pub struct RunningServer {
    /// The gRPC address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// The `/metrics` address actually bound, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The officer console's address actually bound, if enabled.
    pub web_addr: Option<SocketAddr>,
    /// Without authentication: the token that signs in to the console.
    pub console_token: Option<String>,
    stop: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Opens the embedded store under `data_dir`.
pub fn open_store(data_dir: &Path) -> anyhow::Result<(Arc<dyn MetadataStore>, Arc<dyn BlobStore>)> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let meta = SqliteMetadata::open(&data_dir.join("niix.db"))
        .with_context(|| format!("opening metadata database in {}", data_dir.display()))?;
    let blobs = FsBlobs::open(data_dir).with_context(|| format!("opening blob store in {}", data_dir.display()))?;
    Ok((Arc::new(meta), Arc::new(blobs)))
}

/// Binds and starts every service in the background.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    check_listen_policy(&config)?;
    config.limits.check().context("invalid [limits] configuration")?;
    let authenticator = Arc::new(Authenticator::new(&config.auth).context("invalid [auth] configuration")?);
    let web_auth = authenticator.clone();
    let (meta, blobs) = open_store(&config.data_dir)?;
    check_audit_log(&config, meta.as_ref())?;
    let metrics = Metrics::new();
    let (stop, stop_rx) = watch::channel(false);
    let (abandon, abandon_rx) = watch::channel(false);

    let mut background = Vec::new();
    let last_event = meta.last_event().context("reading the event log")?;
    let events: EventSignal = Arc::new(watch::channel(last_event).0);
    let health = HealthReporter::new();
    let (wake, repo) = match config.analysis.enabled {
        true => {
            let (m, b, x) = (meta.clone(), blobs.clone(), metrics.clone());
            let h = health.clone();
            let (wake, repo) =
                start_analysis(&config, m, b, x, events.clone(), h, stop_rx.clone(), &mut background).await?;
            (Some(wake), Some(repo))
        }
        false => {
            health.set_service_status(ANALYSIS_HEALTH, ServingStatus::NotServing).await;
            (None, None)
        }
    };
    let gate = Gate::new(metrics.clone(), meta.clone());
    let system = Caller { identity: "niix".into(), role: "system".into() };
    // No audit trail, no server: a start that cannot record itself refuses.
    let unaudited = |e: crate::error::Error| {
        anyhow::anyhow!(
            "cannot write the audit log in {}: {e}; niix does not run without an audit trail",
            config.data_dir.display()
        )
    };
    gate.audit(&system, "Start", &config.data_dir.display().to_string(), "OK").await.map_err(unaudited)?;
    // Which configuration (and signing key) the server runs under: a changed
    // file shows as a new digest in the chain.
    let source = match &config.source {
        Some((path, sha256)) => format!("{} sha256={sha256}", path.display()),
        None => "defaults and command-line flags".into(),
    };
    gate.audit(&system, "ReadConfig", &source, "OK").await.map_err(unaudited)?;
    if let Some(key) = &config.exchange.signing_key {
        gate.audit(&system, "ReadSigningKey", &key.display().to_string(), "OK").await.map_err(unaudited)?;
    }
    if let Some(key) = &config.exchange.signing_key {
        let key = crate::exchange::keys::load(key)?;
        background.push(start_checkpoints(key, config.exchange.administration.clone(), &config.data_dir, meta.clone()));
    }
    let exchange = ExchangeService::new(
        meta.clone(),
        blobs.clone(),
        config.exchange.clone(),
        config.limits.clone(),
        gate.clone(),
        events.clone(),
        stop_rx.clone(),
    )?;
    background.extend(crate::exchange::outbox::start(&exchange, stop_rx.clone()));
    let findings = FindingsService::new(meta.clone(), blobs.clone(), gate.clone(), events, stop_rx.clone());
    let web_tls = match (&config.web.listen, &config.tls) {
        (Some(_), Some(tls)) => Some(crate::web::tls::acceptor(tls)?),
        _ => None,
    };
    let decoded = crate::web::pyramid::PyramidMetrics {
        held: metrics.console_decoded_bytes.clone(),
        decodes: metrics.console_decoded_planes.clone(),
        evictions: metrics.console_decoded_evictions.clone(),
    };
    let console =
        crate::web::Web::new(findings.clone(), web_auth, gate.clone(), &config.web, web_tls.is_some(), decoded)?;
    let console_token = config.web.listen.and(console.workstation_token().map(str::to_string));
    let mut ingest = Ingest::new(meta.clone(), blobs, config.limits.clone(), metrics.clone(), abandon_rx, wake)
        .with_min_free_bytes(config.storage.min_free_bytes);
    if let Some(repo) = &repo {
        ingest = ingest.with_readable_check(ReadableCheck {
            choice: ModelChoice::new(repo.clone(), config.analysis.model.clone(), config.analysis.fallback.clone()),
            refuse: config.analysis.refuse_unreadable,
        });
    }
    let ingest = Arc::new(ingest);
    let timeouts = Timeouts { handshake: config.limits.handshake_timeout, idle: config.limits.idle_timeout };
    let cap = ConnectionCap::new(
        config.limits.max_connections,
        metrics.connections_refused.clone(),
        metrics.connections_evicted.clone(),
    );
    let swept = ingest.sweep_staging().await.context("sweeping unfinished uploads")?;
    if swept > 0 {
        tracing::info!(uploads = swept, "removed unfinished uploads past their TTL");
    }
    let sweeper = ingest.clone();
    background.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = sweeper.sweep_staging().await {
                tracing::warn!(error = %e, "sweeping unfinished uploads failed");
            }
        }
    }));

    health.set_serving::<ScanIngestServer<IngestService>>().await;
    health.set_serving::<FindingsServer<FindingsService>>().await;
    health.set_serving::<ExchangeServer<ExchangeService>>().await;
    let health_service = HealthServer::new(NiixHealth::new(health.clone(), stop_rx.clone()));
    let reflection = Arc::new(Reflection::niix().context("indexing the reflection descriptors")?);
    let reflection_v1alpha = reflection_v1alpha::server_reflection_server::ServerReflectionServer::new(
        ReflectionV1alpha(reflection.clone()),
    );
    let reflection_v1 = reflection_v1::server_reflection_server::ServerReflectionServer::new(ReflectionV1(reflection));

    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(server_tls(tls)?).context("configuring TLS")?;
    }
    let router = builder
        .layer(AuthLayer::new(authenticator, gate.clone()))
        // Scans are large uploads: windows well above one 1 MiB chunk keep
        // the stream flowing while the server hashes and writes.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        // Pings find dead peers; answered pings keep live idle clients
        // (watchers) from the idle timeout of `conn`.
        .http2_keepalive_interval(Some(config.limits.keepalive_interval))
        .http2_keepalive_timeout(Some(config.limits.keepalive_timeout))
        // Every service accepts gzip and answers with it when the client
        // accepts it (some stacks compress by default).
        .add_service(health_service.accept_compressed(Gzip).send_compressed(Gzip))
        .add_service(reflection_v1.accept_compressed(Gzip).send_compressed(Gzip))
        .add_service(reflection_v1alpha.accept_compressed(Gzip).send_compressed(Gzip))
        .add_service(
            ScanIngestServer::new(IngestService::new(ingest, gate)).accept_compressed(Gzip).send_compressed(Gzip),
        )
        .add_service(FindingsServer::new(findings).accept_compressed(Gzip).send_compressed(Gzip))
        .add_service(
            GrpcInferenceServiceServer::new(InferenceService::new(
                repo,
                config.analysis.model.clone(),
                config.limits.clone(),
                config.analysis.workers,
            ))
            .max_decoding_message_size(
                crate::oip::MAX_INFER_REQUEST_BYTES
                    .min(usize::try_from(config.limits.max_scan_bytes).unwrap_or(usize::MAX).saturating_add(1 << 20)),
            )
            .accept_compressed(Gzip)
            .send_compressed(Gzip),
        )
        .add_service(
            ExchangeServer::new(exchange)
                .max_decoding_message_size(config.exchange.max_receive_message_bytes)
                .max_encoding_message_size(crate::exchange::MAX_MESSAGE_BYTES)
                .accept_compressed(Gzip)
                .send_compressed(Gzip),
        );
    let mut grpc_stop = stop_rx.clone();
    let timed_out = metrics.connections_timed_out.clone();
    let grpc_cap = cap.clone();
    let incoming = TcpListenerStream::new(listener).then(move |accepted| {
        let timed_out = timed_out.clone();
        let cap = grpc_cap.clone();
        async move {
            if let Err(e) = &accepted {
                // Out of file handles (EMFILE) and the like: tonic skips the
                // error and accepts again at once; pause so that does not spin
                // while the timeouts of `conn` free handles.
                tracing::warn!(error = %e, "accepting a connection failed; pausing {ACCEPT_PAUSE:?}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
            match accepted {
                // Over the cap with every connection talking: closed at once.
                Ok(s) => cap.admit().map(|slot| Ok(Guarded::new(s, timeouts, timed_out).with_slot(slot))),
                Err(e) => Some(Err(e)),
            }
        }
    });
    let incoming = incoming.filter_map(|accepted| accepted);
    let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    }));

    let web_addr = match config.web.listen {
        Some(at) => {
            let timed_out = metrics.connections_timed_out.clone();
            Some(
                crate::web::serve(
                    at,
                    console,
                    web_tls,
                    crate::web::Guards { timeouts, timed_out, cap: cap.clone() },
                    stop_rx.clone(),
                    &mut background,
                )
                .await?,
            )
        }
        None => None,
    };
    let metrics_addr = match config.metrics_listen {
        Some(at) => Some(serve_metrics(at, metrics, timeouts, cap, stop_rx, &mut background).await?),
        None => None,
    };
    tracing::info!(%addr, ?metrics_addr, ?web_addr, data = %config.data_dir.display(), "niix serving");
    Ok(RunningServer {
        addr,
        metrics_addr,
        web_addr,
        console_token,
        stop,
        abandon,
        grpc,
        background,
        grace: config.shutdown_grace,
    })
}

/// The checkpoint the server keeps of its own audit log, under the data
/// directory (operators copy it off the host: see docs/operations.md).
pub const CHECKPOINT_FILE: &str = "audit-checkpoint.json";

/// How often the server signs its audit log's head into [`CHECKPOINT_FILE`].
const CHECKPOINT_EVERY: Duration = Duration::from_secs(300);

/// Refuses to start on an audit log that does not verify, or that no longer
/// holds the head of the server's last checkpoint: a server that went on
/// would add records to a log nobody can trust, and hide when it broke.
fn check_audit_log(config: &Config, meta: &dyn MetadataStore) -> anyhow::Result<()> {
    let data = config.data_dir.display();
    let recover = format!(
        "niix refuses to start on an audit log it cannot trust. Run `niix audit verify --data {data}` to see \
         what is wrong, keep a copy of the data directory as evidence, and restore niix.db from a backup whose \
         log verifies (see \"A broken audit log\" in docs/operations.md)"
    );
    if let Err(b) = crate::audit::verify(meta).context("reading the audit log")? {
        anyhow::bail!("the audit log in {data} is broken: {b}. {recover}");
    }
    let path = config.data_dir.join(CHECKPOINT_FILE);
    if path.exists() {
        let cp = crate::exchange::keys::read_checkpoint(&path)?;
        let pinned = match &config.exchange.signing_key {
            Some(k) => Some(crate::exchange::keys::public_hex(&crate::exchange::keys::load(k)?)),
            None => None,
        };
        crate::exchange::keys::verify_checkpoint(&cp, pinned.as_deref())
            .map_err(|e| anyhow::anyhow!("the audit checkpoint {} does not verify: {e}. {recover}", path.display()))?;
        if let Err(m) = crate::audit::check_checkpoint(meta, &cp).context("reading the audit log")? {
            anyhow::bail!("the audit log in {data} does not match its checkpoint {}: {m}. {recover}", path.display());
        }
    }
    Ok(())
}

/// Signs the audit log's head into [`CHECKPOINT_FILE`] now and every
/// [`CHECKPOINT_EVERY`].
fn start_checkpoints(
    key: ed25519_dalek::SigningKey,
    administration: String,
    data_dir: &Path,
    meta: Arc<dyn MetadataStore>,
) -> JoinHandle<()> {
    let path = data_dir.join(CHECKPOINT_FILE);
    let key = Arc::new(key);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        loop {
            tick.tick().await;
            let (key, admin, path, meta) = (key.clone(), administration.clone(), path.clone(), meta.clone());
            let written = tokio::task::spawn_blocking(move || {
                crate::exchange::keys::write_checkpoint(meta.as_ref(), &key, &admin, &path)
            })
            .await;
            match written {
                Ok(Ok(cp)) => tracing::debug!(seq = cp.seq, "audit checkpoint signed"),
                Ok(Err(e)) => tracing::error!(error = %e, "could not write the audit checkpoint"),
                Err(e) => tracing::error!(error = %e, "the audit checkpoint task failed"),
            }
        }
    })
}

/// The server's TLS settings from PEM files; with a client CA, client
/// certificates are requested and checked (optional, so token callers work).
fn server_tls(tls: &crate::config::TlsConfig) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut t = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        t = t.client_ca_root(Certificate::from_pem(read(ca)?)).client_auth_optional(true);
    }
    Ok(t)
}

/// Whether the model that analyses scans is loaded: the configured one, or
/// any when none is configured.
fn analysis_status(repo: &Repository, model: Option<&str>) -> ServingStatus {
    let servable = match model {
        Some(name) => repo.get(name).is_some(),
        None => !repo.serving().is_empty(),
    };
    if servable { ServingStatus::Serving } else { ServingStatus::NotServing }
}

/// Loads the model repository (failing fast when ONNX Runtime is missing),
/// re-queues interrupted analyses and starts the workers and the reloader;
/// [`ANALYSIS_HEALTH`] follows what the repository serves.
#[allow(clippy::too_many_arguments)]
async fn start_analysis(
    config: &Config,
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    metrics: Metrics,
    events: EventSignal,
    health: HealthReporter,
    stop: watch::Receiver<bool>,
    background: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<(Arc<Notify>, Arc<Repository>)> {
    niix_inference::runtime::environment().map_err(|e| anyhow::anyhow!("{e}"))?;
    let a = &config.analysis;
    let repo = Arc::new(Repository::new(&config.models_dir, a.threads));
    let oip_repo = repo.clone();
    let loader = repo.clone();
    let report = tokio::task::spawn_blocking(move || loader.reload()).await?;
    if repo.serving().is_empty() {
        tracing::warn!(models = %config.models_dir.display(), refused = report.refused.len(),
            "no valid model in the repository: scans will queue until one is added");
    }
    if let Some(name) = &a.model
        && repo.get(name).is_none()
    {
        tracing::warn!(model = %name, "the configured model is not serving: scans will queue until it is");
    }
    health.set_service_status(ANALYSIS_HEALTH, analysis_status(&repo, a.model.as_deref())).await;
    let requeue = meta.clone();
    let requeued = tokio::task::spawn_blocking(move || requeue.requeue_interrupted()).await??;
    if requeued > 0 {
        tracing::info!(scans = requeued, "re-queued analyses interrupted by the last stop");
    }
    let wake = Arc::new(Notify::new());
    let choice = Arc::new(ModelChoice::new(repo.clone(), a.model.clone(), a.fallback.clone()));
    let analyzer = Arc::new(Analyzer::new(meta, blobs, choice, wake.clone(), metrics, events));
    for _ in 0..a.workers.max(1) {
        background.push(tokio::spawn(analyzer.clone().run_worker(stop.clone())));
    }
    let interval = a.reload_interval;
    let poke = wake.clone();
    let model = a.model.clone();
    background.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let r = repo.clone();
            if let Ok(report) = tokio::task::spawn_blocking(move || r.reload()).await
                && !report.loaded.is_empty()
            {
                poke.notify_one();
            }
            health.set_service_status(ANALYSIS_HEALTH, analysis_status(&repo, model.as_deref())).await;
        }
    }));
    Ok((wake, oip_repo))
}

async fn serve_metrics(
    at: SocketAddr,
    metrics: Metrics,
    timeouts: Timeouts,
    cap: ConnectionCap,
    mut stop: watch::Receiver<bool>,
    background: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    use axum::http::header::CONTENT_TYPE;
    let timed_out = metrics.connections_timed_out.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode()) }
        }),
    );
    let listener = TcpListener::bind(at).await.with_context(|| format!("binding metrics address {at}"))?;
    let bound = listener.local_addr()?;
    let listener = GuardedListener::new(listener, timeouts, timed_out, cap);
    background.push(tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(e) = served.await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    }));
    Ok(bound)
}

impl RunningServer {
    /// Stops accepting, lets in-flight uploads finish for the grace period,
    /// then abandons the rest (their bytes stay staged and resumable).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if tokio::time::timeout(self.grace, &mut self.grpc).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight uploads outlived the grace period; abandoning them (resumable)");
            let _ = self.abandon.send(true);
            if tokio::time::timeout(Duration::from_secs(5), &mut self.grpc).await.is_err() {
                self.grpc.abort();
            }
        }
        for task in self.background {
            task.abort();
        }
        tracing::info!("niix stopped");
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_insecure() {
        assert!(check_bind_policy("127.0.0.1:1".parse().unwrap(), false, false).is_ok());
        assert!(check_bind_policy("[::1]:1".parse().unwrap(), false, false).is_ok());
        let e = check_bind_policy("0.0.0.0:1".parse().unwrap(), false, false).unwrap_err().to_string();
        assert!(e.contains("--insecure") && e.contains("auth.tokens"), "{e}");
        assert!(check_bind_policy("0.0.0.0:1".parse().unwrap(), true, false).is_ok());
        assert!(check_bind_policy("0.0.0.0:1".parse().unwrap(), false, true).is_ok());
    }

    #[test]
    fn tokens_off_loopback_need_tls_and_metrics_off_loopback_need_insecure() {
        use crate::auth::{AuthConfig, Role, TokenConfig};
        let tokens = AuthConfig {
            tokens: vec![TokenConfig {
                identity: "s".into(),
                role: Role::Scanner,
                sha256: "ab".repeat(32),
                sites: vec![],
            }],
            ..Default::default()
        };
        let open = Config { listen: "0.0.0.0:1".parse().unwrap(), auth: tokens.clone(), ..Config::default() };
        let e = check_listen_policy(&open).unwrap_err().to_string();
        assert!(e.contains("bearer tokens on 0.0.0.0:1 without TLS") && e.contains("--insecure"), "{e}");
        let tls = crate::config::TlsConfig { cert: "c".into(), key: "k".into(), client_ca: None };
        assert!(check_listen_policy(&Config { tls: Some(tls), ..open.clone() }).is_ok());
        assert!(check_listen_policy(&Config { insecure: true, ..open.clone() }).is_ok());
        let local = Config { auth: tokens, ..Config::default() };
        assert!(check_listen_policy(&local).is_ok());

        let metrics = Config { metrics_listen: Some("0.0.0.0:9464".parse().unwrap()), ..Config::default() };
        let e = check_listen_policy(&metrics).unwrap_err().to_string();
        assert!(e.contains("/metrics on 0.0.0.0:9464") && e.contains("no authentication"), "{e}");
        assert!(check_listen_policy(&Config { insecure: true, ..metrics }).is_ok());
    }
}
