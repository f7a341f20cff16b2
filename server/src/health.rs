//! The gRPC health service (`grpc.health.v1.Health`) as its specification
//! has it: tonic-health's statuses, except that `Watch` on a service the
//! server does not know sends SERVICE_UNKNOWN and keeps the stream open
//! (tonic-health ends it with NOT_FOUND). niix registers every service it
//! reports on at start, so an unknown one stays unknown until shutdown.

use std::pin::Pin;

use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The health service; `stop` ends open `Watch` streams at shutdown.
#[derive(Debug)]
pub struct NiixHealth {
    statuses: HealthService,
    stop: watch::Receiver<bool>,
}

impl NiixHealth {
    /// Serves the statuses `reporter` sets.
    pub fn new(reporter: HealthReporter, stop: watch::Receiver<bool>) -> Self {
        NiixHealth { statuses: HealthService::from_health_reporter(reporter), stop }
    }
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for NiixHealth {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.statuses.check(request).await
    }

    type WatchStream = Statuses;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Statuses>, Status> {
        match self.statuses.watch(request).await {
            Ok(known) => Ok(Response::new(Box::pin(known.into_inner()))),
            Err(e) if e.code() == tonic::Code::NotFound => {
                let unknown = HealthCheckResponse { status: ServingStatus::ServiceUnknown as i32 };
                let mut stop = self.stop.clone();
                let until_stop = stream::once(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .filter_map(|()| async { None });
                Ok(Response::new(Box::pin(stream::once(async move { Ok(unknown) }).chain(until_stop))))
            }
            Err(e) => Err(e),
        }
    }
}
