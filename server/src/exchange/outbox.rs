//! Push federation, sending side: one outbox per agreement with a `[push]`
//! target.
//!
//! The outbox is the event log read from the partner's persisted cursor (the
//! last event whose package the partner acknowledged). Each entitled package
//! is delivered with `Exchange.Receive`, and the cursor moves on only after
//! the partner's receipt, so a partner that is down, or a restart on either
//! side, loses nothing. A package delivered again after a crash between the
//! receipt and the cursor update is recognised by its id on the other side.
//! Failures are retried with exponential backoff (1 s doubling to 60 s).

use std::time::Duration;

use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::receive_request::Part;
use niix_proto::v1::{PackageContent, ReceiveRequest, ResultPackage};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{Agreement, ExchangeService, MAX_MESSAGE_BYTES, PushTarget, stream_plane};
use crate::audit::Caller;
use crate::client::{Authed, ClientTls, authed, connect_tls};
use crate::error::blocking;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a caught-up outbox looks again even without a new event.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// Starts one outbox task per agreement that pushes.
pub fn start(svc: &ExchangeService, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    svc.config()
        .agreements
        .iter()
        .filter(|a| a.push.is_some())
        .map(|a| tokio::spawn(run(svc.clone(), a.clone(), stop.clone())))
        .collect()
}

/// The wait before attempt `attempts + 1`.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(MAX_BACKOFF)
}

async fn run(svc: ExchangeService, agreement: Agreement, mut stop: watch::Receiver<bool>) {
    let mut signal = svc.events.subscribe();
    let mut client = None;
    let partner = agreement.partner.clone();
    tracing::info!(partner, agreement = agreement.name, "outbox started");
    loop {
        if *stop.borrow() {
            return;
        }
        let wait = match push_pending(&svc, &agreement, &mut client).await {
            Ok(true) => IDLE_RECHECK,
            Ok(false) => Duration::ZERO,
            Err(e) => {
                client = None;
                let error = format!("{e:#}");
                let (m, p, err) = (svc.meta.clone(), partner.clone(), error.clone());
                let attempts = blocking(move || Ok(m.outbox_failed(&p, &err)?)).await.unwrap_or(1);
                let wait = backoff(attempts);
                tracing::warn!(partner, attempts, retry_in = ?wait, error, "pushing packages failed");
                svc.gate.metrics().outbox_failures.inc();
                // Only time (or shutdown) ends a backoff.
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = signal.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Delivers the next batch; true when the outbox is empty.
async fn push_pending(
    svc: &ExchangeService,
    agreement: &Agreement,
    client: &mut Option<ExchangeClient<Authed>>,
) -> anyhow::Result<bool> {
    let (m, p) = (svc.meta.clone(), agreement.partner.clone());
    let state = blocking(move || Ok(m.outbox(&p)?)).await?;
    let (packages, more) = svc.next_packages(agreement, state.delivered).await?;
    for (seq, package) in packages {
        if let Some(package) = package {
            if client.is_none() {
                *client = Some(connect(agreement.push.as_ref().expect("only pushing agreements run")).await?);
            }
            deliver(svc, client.as_mut().expect("connected above"), package).await?;
        }
        let (m, p) = (svc.meta.clone(), agreement.partner.clone());
        blocking(move || Ok(m.outbox_delivered(&p, seq)?)).await?;
    }
    Ok(!more)
}

async fn connect(target: &PushTarget) -> anyhow::Result<ExchangeClient<Authed>> {
    let tls =
        (target.ca.is_some() || target.cert.is_some() || target.endpoint.starts_with("https:")).then(|| ClientTls {
            ca: target.ca.clone(),
            cert: target.cert.clone(),
            key: target.key.clone(),
            domain: target.domain.clone(),
        });
    let token = match &target.token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading push token {}: {e}", p.display()))?)
        }
        None => None,
    };
    let channel = connect_tls(&target.endpoint, tls.as_ref()).await?;
    Ok(ExchangeClient::new(authed(channel, token.as_deref())?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Sends one package (and its planes' bytes, for full planes) and audits the outcome.
async fn deliver(
    svc: &ExchangeService,
    client: &mut ExchangeClient<Authed>,
    package: ResultPackage,
) -> anyhow::Result<()> {
    let content = PackageContent::decode(package.content.as_slice())?;
    // The planes the package signs (pixel-only copies), never the pushed files.
    let planes = match content.full_planes {
        true => content.planes.clone(),
        false => Vec::new(),
    };
    let (tx, rx) = mpsc::channel(4);
    let blobs = svc.blobs.clone();
    let sender = tokio::spawn(async move {
        if tx.send(ReceiveRequest { part: Some(Part::Package(package)) }).await.is_err() {
            return Ok(());
        }
        for (i, plane) in planes.iter().enumerate() {
            let (b, sha) = (blobs.clone(), plane.sha256.clone());
            let reader = blocking(move || Ok(b.open(&sha)?)).await?;
            let mut chunks = stream_plane(reader, i as u32, 0);
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                if tx.send(ReceiveRequest { part: Some(Part::Chunk(chunk)) }).await.is_err() {
                    return Ok(());
                }
            }
        }
        anyhow::Ok(())
    });
    let reply = client.receive(ReceiverStream::new(rx)).await;
    let local = sender.await.map_err(|e| anyhow::anyhow!("plane sender failed: {e}"))?;
    let system = Caller { identity: "niix".into(), role: "system".into() };
    let outcome = match &reply {
        Ok(_) => "OK".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    // A delivery that cannot be audited is not recorded as delivered: it is retried.
    svc.gate
        .audit(&system, "Push", &format!("{} to {}", content.package_id, content.recipient), &outcome)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    local?;
    let receipt =
        reply.map_err(|s| anyhow::anyhow!("{} refused package {}: {s}", content.recipient, content.package_id))?;
    svc.gate.metrics().packages_pushed.inc();
    tracing::debug!(package = content.package_id, duplicate = receipt.get_ref().duplicate, "package delivered");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
