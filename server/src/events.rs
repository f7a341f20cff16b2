//! The event feed's plumbing shared by the services that stream it: the
//! signal that wakes watchers when an event is stored, the wait of a
//! caught-up stream, and the wire form of a time. Findings (officers'
//! `WatchFindings`), the exchange (partners' `Subscribe`) and the analysis
//! (which stores events) meet here instead of importing each other.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tonic::Status;

/// Tells watchers the newest event's sequence number.
pub type EventSignal = Arc<watch::Sender<u64>>;

/// How long a caught-up stream waits before looking at the event log again
/// even without a signal.
const EVENT_POLL: Duration = Duration::from_secs(5);

/// Waits, for a caught-up stream, until a new event is signalled. Returns
/// false when the stream must end: its client went away, or the server is
/// shutting down (the client is told to resume from its cursor).
pub async fn wait_for_events<T>(
    signal: &mut watch::Receiver<u64>,
    tx: &mpsc::Sender<std::result::Result<T, Status>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = signal.changed() => true,
        _ = tx.closed() => false,
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            let _ = tx.send(Err(Status::unavailable("the server is shutting down; resume from your cursor"))).await;
            false
        }
        _ = tokio::time::sleep(EVENT_POLL) => true,
    }
}

/// Converts a time to a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}
