//! Accepted TCP connections that must keep talking.
//!
//! Every connection of the gRPC and the metrics listener is wrapped in a
//! [`Guarded`] stream: it is closed when the peer sends no byte within the
//! handshake timeout of being accepted (a silent TCP connection, or a TLS or
//! HTTP/2 handshake that never finishes), or sends nothing for the idle
//! timeout afterwards. Live gRPC clients answer the server's HTTP/2
//! keepalive pings, which are bytes too, so only dead or silent peers are
//! cut. This bounds the file handles a peer can hold without speaking.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
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

/// A TCP stream closed (reads fail with `TimedOut`) once its peer has been
/// silent for longer than its [`Timeouts`] allow.
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
}

impl Guarded {
    /// Wraps a freshly accepted stream; `timed_out` counts the closures.
    pub fn new(inner: TcpStream, timeouts: Timeouts, timed_out: Counter) -> Self {
        let accepted = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(accepted + timeouts.handshake));
        Guarded { inner, timeouts, timer, last_read: None, accepted, timed_out }
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
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = Some(Instant::now());
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

/// A listener whose connections are [`Guarded`], for the metrics endpoint.
pub struct GuardedListener {
    inner: TcpListener,
    timeouts: Timeouts,
    timed_out: Counter,
}

impl GuardedListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, timeouts: Timeouts, timed_out: Counter) -> Self {
        GuardedListener { inner, timeouts, timed_out }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
        (Guarded::new(stream, self.timeouts, self.timed_out.clone()), peer)
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
}
