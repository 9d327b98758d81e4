//! Serving HTTP connections (HTTP/1.1 and cleartext HTTP/2) with the two timeouts of
//! `server.http`: a connection must deliver a request head within `headerReadTimeoutSecs`, and
//! one with no request in progress is closed after `idleTimeoutSecs`. A request body must have
//! arrived whole within `bodyReadTimeoutSecs` of its head (see [`Deadline`]).
//!
//! Why not hyper's own `header_read_timeout`: its timer starts whenever the connection waits for
//! a request head, so on HTTP/1 it also ends every idle keep-alive connection after the same
//! time, and it does not cover the first bytes of a connection, which hyper-util reads itself to
//! tell HTTP/1 from HTTP/2. So each connection gets a small watchdog instead, fed by two facts:
//! which requests are in progress (counted from the call of the router until its response body
//! is finished or dropped) and when bytes arrive while none is. A request in progress, however
//! quiet (an SSE stream, a Socket.IO long poll), is never timed out; a WebSocket leaves this
//! module once it is upgraded. HTTP/2 clients talk between requests (SETTINGS, PING), so an
//! HTTP/2 connection is judged by the idle rule only; its keep-alive PINGs find dead peers under
//! long streams.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The two timeouts, from `server.http`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
    pub body_read: Duration,
}

impl Timeouts {
    pub fn from_config(http: &crate::config::HttpTimeouts) -> Self {
        Self {
            header_read: Duration::from_secs(http.header_read_timeout_secs),
            idle: Duration::from_secs(http.idle_timeout_secs),
            body_read: Duration::from_secs(http.body_read_timeout_secs),
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets every open connection finish
/// (each is asked to close once its requests are done) and returns when the last has.
///
/// # Errors
/// None today: accept errors are logged and retried (a full descriptor table clears up).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_per_connection(&e) {
                        // EMFILE and friends: pausing lets descriptors free up instead of
                        // spinning on the same error.
                        tracing::warn!(error = %e, "accept failed; pausing");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop.cancelled() => break,
                        }
                    }
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Streams are many small writes; without TCP_NODELAY each can wait for the client's
        // delayed ACK (about 40 ms) behind the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        connections.spawn(serve_connection(
            tcp,
            peer,
            app.clone(),
            timeouts,
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Accept errors that concern only the connection being accepted.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    )
}

async fn serve_connection(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = Tracked {
        app,
        activity: activity.clone(),
        body_read: timeouts.body_read,
        peer,
    };
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(timeouts.idle)
        .keep_alive_timeout(timeouts.header_read);
    let mut conn = pin!(builder.serve_connection_with_upgrades(io, service));
    let mut stopping = pin!(stop.cancelled());
    // hyper is asked to close the connection once at most, for whichever reason comes first.
    let mut asked_to_close = false;
    // Set once the connection has been asked to close for being idle: it gets as long again as
    // a request head would to do so, then it is dropped.
    let mut closing_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake = match closing_until {
            Some(until) => until,
            None => match activity.check(timeouts, now) {
                Check::WaitUntil(when) => when,
                Check::Expired(Expiry::HeaderRead) => {
                    tracing::debug!("closing a connection that did not send a request in time");
                    return;
                }
                Check::Expired(Expiry::Idle) => {
                    tracing::debug!("closing an idle connection");
                    if !asked_to_close {
                        asked_to_close = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    let until = now + timeouts.header_read;
                    closing_until = Some(until);
                    until
                }
            },
        };
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut stopping, if !asked_to_close => {
                asked_to_close = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(wake) => {
                if closing_until.is_some_and(|until| Instant::now() >= until) {
                    return;
                }
            }
        }
    }
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Bytes of a request came, but not a whole head, within the header-read timeout.
    HeaderRead,
    /// No request in progress for the idle timeout.
    Idle,
}

#[derive(Debug, PartialEq, Eq)]
enum Check {
    Expired(Expiry),
    /// Nothing to do before this instant (the state may change before then; it is checked again).
    WaitUntil(Instant),
}

/// `header_since` when no request head is being awaited with bytes pending.
const NONE: u64 = u64::MAX;
/// The HTTP/2 connection preface, which is how an HTTP/2 connection is recognised.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the watchdog of one connection knows. Times are milliseconds since `opened`.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// When the last request in progress ended (or the connection opened).
    quiet_since: AtomicU64,
    /// When the first byte of a request head arrived while no request was in progress; a new
    /// connection starts in this state, so one that sends nothing is closed just the same.
    header_since: AtomicU64,
    /// Bytes of the connection's start seen so far, up to the length of the HTTP/2 preface.
    sniffed: AtomicUsize,
    http2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            header_since: AtomicU64::new(0),
            sniffed: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.opened).as_millis() as u64
    }

    fn at(&self, millis: u64) -> Instant {
        self.opened + Duration::from_millis(millis)
    }

    /// Notes bytes read from the client: the start of a request head when none is in progress,
    /// and, at the start of the connection, whether it speaks HTTP/2.
    fn read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let seen = self.sniffed.load(Ordering::Relaxed);
        if seen < H2_PREFACE.len() {
            let take = bytes.len().min(H2_PREFACE.len() - seen);
            if bytes[..take] == H2_PREFACE[seen..seen + take] {
                self.sniffed.store(seen + take, Ordering::Relaxed);
                if seen + take == H2_PREFACE.len() {
                    self.http2.store(true, Ordering::Relaxed);
                }
            } else {
                // Not HTTP/2: stop looking.
                self.sniffed.store(usize::MAX, Ordering::Relaxed);
            }
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let now = self.millis(Instant::now());
            let _ =
                self.header_since
                    .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// A request's head has been read and the router called.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.header_since.store(NONE, Ordering::Release);
        InFlight(self.clone())
    }

    fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.millis(Instant::now());
            self.quiet_since.store(now, Ordering::Release);
            self.header_since.store(NONE, Ordering::Release);
        }
    }

    fn check(&self, timeouts: Timeouts, now: Instant) -> Check {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Check::WaitUntil(now + timeouts.header_read.min(timeouts.idle));
        }
        let header_since = self.header_since.load(Ordering::Acquire);
        let (deadline, expiry) = if header_since != NONE && !self.http2.load(Ordering::Relaxed) {
            (
                self.at(header_since) + timeouts.header_read,
                Expiry::HeaderRead,
            )
        } else {
            let quiet_since = self.quiet_since.load(Ordering::Acquire);
            (self.at(quiet_since) + timeouts.idle, Expiry::Idle)
        };
        if now >= deadline {
            Check::Expired(expiry)
        } else {
            Check::WaitUntil(deadline)
        }
    }
}

/// One request in progress; dropping it (its response body finished or abandoned) ends it.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The connection's socket, telling the watchdog when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.activity.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, counting each request as in progress until its response body is done.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
    body_read: Duration,
    /// The TCP peer, given to the router as `ConnectInfo` (a trusted proxy is known by it).
    peer: std::net::SocketAddr,
}

type Responding = Pin<Box<dyn Future<Output = Result<Response<Guarded>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Guarded>;
    type Error = Infallible;
    type Future = Responding;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let deadline = Instant::now() + self.body_read;
        let mut request = request.map(|body| Body::new(Deadline::new(body, deadline)));
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let responding = tower::ServiceExt::oneshot(self.app.clone(), request);
        Box::pin(async move {
            let response = responding.await?;
            Ok(response.map(|body| Guarded {
                body,
                _in_flight: guard,
            }))
        })
    }
}

/// A request body that fails once its deadline has passed before its end. A request in
/// progress is never timed out by the connection's watchdog (it may be a stream), so without
/// this a client could hold a connection and a task forever by sending a body a byte at a time.
/// The handler reading the body gets the error and answers 408.
struct Deadline {
    body: Incoming,
    expires: Pin<Box<tokio::time::Sleep>>,
}

/// What a handler sees when the body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body read timeout")]
pub struct BodyTimedOut;

impl Deadline {
    fn new(body: Incoming, deadline: Instant) -> Self {
        Self {
            body,
            expires: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::Error::new)));
        }
        match self.expires.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that holds its request's [`InFlight`] until it is done or dropped.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        body_read: Duration::from_secs(60),
    };

    fn expired_at(activity: &Activity, after: Duration) -> Option<Expiry> {
        match activity.check(T, activity.opened + after) {
            Check::Expired(expiry) => Some(expiry),
            Check::WaitUntil(_) => None,
        }
    }

    #[test]
    fn a_silent_new_connection_gets_the_header_timeout() {
        let activity = Activity::new();
        assert_eq!(expired_at(&activity, Duration::from_secs(9)), None);
        assert_eq!(
            expired_at(&activity, Duration::from_secs(10)),
            Some(Expiry::HeaderRead)
        );
    }

    #[test]
    fn a_request_in_progress_is_never_timed_out_and_idleness_counts_from_its_end() {
        let activity = Arc::new(Activity::new());
        activity.read(b"GET / HTTP/1.1\r\n\r\n");
        let guard = activity.begin();
        assert_eq!(expired_at(&activity, Duration::from_secs(3600)), None);
        drop(guard);
        let ended = activity.millis(Instant::now());
        let idle_at = Duration::from_millis(ended) + T.idle;
        assert_eq!(
            expired_at(&activity, idle_at - Duration::from_secs(1)),
            None
        );
        assert_eq!(expired_at(&activity, idle_at), Some(Expiry::Idle));
    }

    #[test]
    fn a_half_sent_head_after_a_request_gets_the_header_timeout() {
        let activity = Arc::new(Activity::new());
        drop(activity.begin());
        activity.read(b"GET / HT");
        let since = activity.header_since.load(Ordering::Relaxed);
        assert_ne!(since, NONE);
        let limit = Duration::from_millis(since) + T.header_read;
        assert_eq!(
            expired_at(&activity, limit - Duration::from_millis(1)),
            None
        );
        assert_eq!(expired_at(&activity, limit), Some(Expiry::HeaderRead));
    }

    #[test]
    fn http2_is_recognised_by_its_whole_preface_and_judged_by_idleness() {
        let activity = Activity::new();
        activity.read(&H2_PREFACE[..3]);
        assert!(
            !activity.http2.load(Ordering::Relaxed),
            "PRI alone is not enough"
        );
        activity.read(&H2_PREFACE[3..]);
        activity.read(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert!(activity.http2.load(Ordering::Relaxed));
        assert_eq!(expired_at(&activity, Duration::from_secs(30)), None);
        assert_eq!(
            expired_at(&activity, Duration::from_secs(60)),
            Some(Expiry::Idle)
        );

        let http1 = Activity::new();
        http1.read(b"PRIVATE / HTTP/1.1\r\n");
        assert!(!http1.http2.load(Ordering::Relaxed));
    }
}
