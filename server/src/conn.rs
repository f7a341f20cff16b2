//! Accepted TCP connections that must keep talking.
//!
//! Every connection of the gRPC and the metrics listener is wrapped in a
//! [`Guarded`] stream: it is closed when the peer sends no byte within the
//! handshake timeout of being accepted (a silent TCP connection, or a TLS or
//! HTTP/2 handshake that never finishes), or sends nothing for the idle
//! timeout afterwards. Live gRPC clients answer the server's HTTP/2
//! keepalive pings, which are bytes too, so only dead or silent peers are
//! cut. This bounds the file handles a peer can hold without speaking.
//!
//! A burst of connections faster than the handshake timeout is bounded by a
//! [`ConnectionCap`] shared by both listeners: past its maximum, a new
//! connection makes room by closing the oldest connection that never sent a
//! byte (a live client sends its first byte as soon as it is connected),
//! else the one silent longest if silent for at least
//! [`EVICT_AFTER_SILENCE`]; when every open connection is talking, the new
//! one is refused. So a flood of silent sockets cannot starve the health
//! check or a scanner, and the server's handles stay bounded.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// How long a peer may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to the first byte received.
    pub handshake: Duration,
    /// Between bytes received afterwards.
    pub idle: Duration,
}

/// A connection that has sent something, and did so this recently, is never
/// closed to make room for a new one.
pub const EVICT_AFTER_SILENCE: Duration = Duration::from_secs(1);

/// The connections open over the listeners that share it: at most `max`
/// (briefly up to twice that while closed connections wind down).
#[derive(Clone)]
pub struct ConnectionCap {
    shared: Arc<CapShared>,
}

struct CapShared {
    max: usize,
    epoch: Instant,
    open: Mutex<Open>,
    refused: Counter,
    evicted: Counter,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    slots: HashMap<u64, Arc<SlotState>>,
}

/// What the cap knows of one open connection.
struct SlotState {
    /// Milliseconds after the cap's epoch when it was accepted.
    accepted_ms: u64,
    /// Milliseconds after the cap's epoch when a byte last arrived; 0 for never.
    last_read_ms: AtomicU64,
    evicted: AtomicBool,
    /// The task reading the connection, woken when it is evicted.
    waker: Mutex<Option<Waker>>,
}

impl SlotState {
    fn spoke(&self) -> bool {
        self.last_read_ms.load(Ordering::Relaxed) != 0
    }

    /// When it was last heard from (its accept, if it never spoke).
    fn heard_ms(&self) -> u64 {
        match self.last_read_ms.load(Ordering::Relaxed) {
            0 => self.accepted_ms,
            at => at,
        }
    }
}

/// One admitted connection's place under a [`ConnectionCap`]; freed on drop.
pub struct Slot {
    id: u64,
    state: Arc<SlotState>,
    cap: Arc<CapShared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConnectionCap {
    /// At most `max` connections; `refused` and `evicted` count the new
    /// connections turned away and the old ones closed to make room.
    pub fn new(max: usize, refused: Counter, evicted: Counter) -> Self {
        let shared = CapShared { max: max.max(1), epoch: Instant::now(), open: Mutex::default(), refused, evicted };
        ConnectionCap { shared: Arc::new(shared) }
    }

    /// A place for a connection just accepted, or `None` when it must be
    /// closed at once (every open connection is talking).
    pub fn admit(&self) -> Option<Slot> {
        let shared = &self.shared;
        let now = shared.now_ms();
        let mut open = lock(&shared.open);
        if open.slots.len() >= shared.max {
            // Connections already evicted but not yet closed still hold their
            // handle: past twice the maximum, refuse rather than evict more.
            let live = open.slots.values().filter(|s| !s.evicted.load(Ordering::Relaxed));
            let victim = live.min_by_key(|s| (s.spoke(), s.heard_ms()));
            let quiet_ms = EVICT_AFTER_SILENCE.as_millis() as u64;
            match victim {
                Some(v)
                    if open.slots.len() < 2 * shared.max
                        && (!v.spoke() || now.saturating_sub(v.heard_ms()) >= quiet_ms) =>
                {
                    v.evicted.store(true, Ordering::Relaxed);
                    if let Some(w) = lock(&v.waker).take() {
                        w.wake();
                    }
                    shared.evicted.inc();
                }
                _ => {
                    shared.refused.inc();
                    return None;
                }
            }
        }
        open.next_id += 1;
        let id = open.next_id;
        let state = Arc::new(SlotState {
            accepted_ms: now,
            last_read_ms: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        open.slots.insert(id, state.clone());
        Some(Slot { id, state, cap: shared.clone() })
    }

    /// Connections open (including evicted ones not yet closed).
    pub fn open(&self) -> usize {
        lock(&self.shared.open).slots.len()
    }
}

impl CapShared {
    /// Milliseconds since the epoch, never 0 (0 means "never" in a slot).
    fn now_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }
}

impl Slot {
    fn heard(&self) {
        self.state.last_read_ms.store(self.cap.now_ms(), Ordering::Relaxed);
    }

    /// Ready with the error to return once the cap closed this connection;
    /// otherwise remembers the task to wake when it does.
    fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.state.evicted.load(Ordering::Relaxed) {
            let mut waker = lock(&self.state.waker);
            match waker.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
            drop(waker);
            if !self.state.evicted.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed to make room for a new connection: the server is at limits.max_connections",
        ))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.cap.open).slots.remove(&self.id);
    }
}

/// A TCP stream closed (reads fail with `TimedOut`) once its peer has been
/// silent for longer than its [`Timeouts`] allow, or (with a [`Slot`]) when
/// its [`ConnectionCap`] needs the room.
pub struct Guarded {
    inner: TcpStream,
    timeouts: Timeouts,
    /// When the next check is due; on firing, the real due time is worked
    /// out from `last_read`, so a busy stream does not reset a timer per read.
    timer: Pin<Box<Sleep>>,
    /// When a byte last arrived; `None` until the first.
    last_read: Option<Instant>,
    accepted: Instant,
    timed_out: Counter,
    slot: Option<Slot>,
}

impl Guarded {
    /// Wraps a freshly accepted stream; `timed_out` counts the closures.
    pub fn new(inner: TcpStream, timeouts: Timeouts, timed_out: Counter) -> Self {
        let accepted = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(accepted + timeouts.handshake));
        Guarded { inner, timeouts, timer, last_read: None, accepted, timed_out, slot: None }
    }

    /// The same, holding `slot` of a [`ConnectionCap`] while it is open.
    pub fn with_slot(mut self, slot: Slot) -> Self {
        self.slot = Some(slot);
        self
    }

    fn due(&self) -> Instant {
        match self.last_read {
            None => self.accepted + self.timeouts.handshake,
            Some(at) => at + self.timeouts.idle,
        }
    }

    /// Ready with the error to return once the peer has been silent too long.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let due = self.due();
            if due <= Instant::now() {
                self.timed_out.inc();
                let what = if self.last_read.is_none() { "handshake" } else { "idle" };
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer sent nothing within the {what} timeout"),
                ));
            }
            self.timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(slot) = &this.slot
            && let Poll::Ready(e) = slot.poll_evicted(cx)
        {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = Some(Instant::now());
                    if let Some(slot) = &this.slot {
                        slot.heard();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_silence(cx).map(Err),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A listener whose connections are [`Guarded`] and held under a
/// [`ConnectionCap`], for the metrics endpoint.
pub struct GuardedListener {
    inner: TcpListener,
    timeouts: Timeouts,
    timed_out: Counter,
    cap: ConnectionCap,
}

impl GuardedListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, timeouts: Timeouts, timed_out: Counter, cap: ConnectionCap) -> Self {
        GuardedListener { inner, timeouts, timed_out, cap }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
            // A refused connection is dropped (closed) at once.
            if let Some(slot) = self.cap.admit() {
                return (Guarded::new(stream, self.timeouts, self.timed_out.clone()).with_slot(slot), peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(timeouts: Timeouts) -> (Guarded, TcpStream, Counter) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let counter = Counter::default();
        (Guarded::new(server, timeouts, counter.clone()), client, counter)
    }

    #[tokio::test]
    async fn a_silent_peer_is_cut_after_the_handshake_timeout() {
        let t = Timeouts { handshake: Duration::from_millis(150), idle: Duration::from_secs(30) };
        let (mut server, _client, counter) = pair(t).await;
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("handshake"), "{e}");
        assert_eq!(counter.get(), 1);
    }

    #[tokio::test]
    async fn a_talking_peer_stays_and_is_cut_once_idle() {
        let t = Timeouts { handshake: Duration::from_millis(200), idle: Duration::from_millis(300) };
        let (mut server, mut client, counter) = pair(t).await;
        let mut buf = [0u8; 8];
        // Bytes every 100 ms keep it open well past both timeouts.
        for _ in 0..8 {
            client.write_all(b"x").await.unwrap();
            assert_eq!(server.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = server.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("idle"), "{e}");
        assert_eq!(counter.get(), 1);
    }

    #[tokio::test]
    async fn the_cap_closes_connections_that_never_spoke_first_and_refuses_when_all_talk() {
        let (refused, evicted) = (Counter::default(), Counter::default());
        let cap = ConnectionCap::new(2, refused.clone(), evicted.clone());
        let (a, b) = (cap.admit().unwrap(), cap.admit().unwrap());
        a.heard();
        b.heard();
        // Both talked just now: a third is refused.
        assert!(cap.admit().is_none());
        assert_eq!((refused.get(), evicted.get()), (1, 0));
        tokio::time::sleep(EVICT_AFTER_SILENCE + Duration::from_millis(100)).await;
        a.heard();
        // b has been silent for longer than a: it makes room.
        let c = cap.admit().unwrap();
        assert!(b.state.evicted.load(Ordering::Relaxed) && !a.state.evicted.load(Ordering::Relaxed));
        // c never spoke: however new, it goes before a, which talks.
        let d = cap.admit().unwrap();
        assert!(c.state.evicted.load(Ordering::Relaxed) && !a.state.evicted.load(Ordering::Relaxed));
        assert_eq!(evicted.get(), 2);
        // Evicted connections hold their handle until closed: at twice the
        // cap, new ones are refused instead.
        assert_eq!(cap.open(), 4);
        assert!(cap.admit().is_none());
        assert_eq!(refused.get(), 2);
        drop((b, c));
        assert_eq!(cap.open(), 2);
        drop((a, d));
        assert_eq!(cap.open(), 0);
    }
}
