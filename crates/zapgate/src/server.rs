//! The HTTP server under the router: accepts connections within a cap, gives each its
//! header-read deadline, and tells the router who is calling (the peer's address).
//!
//! What a crowd of connections may take is bounded, so it can never take the open files
//! kept for WhatsApp's sockets:
//! - at most `max_connections` at once. At the cap, a new connection takes the place of
//!   one that has no request in flight (an idle keep-alive, or a client still sending its
//!   headers): the oldest such of the address holding the most connections, so one
//!   address flooding the gateway makes room from its own. When every one is busy, the
//!   new connection gets a 503 and is closed;
//! - a request's headers must arrive within `header_timeout` of its first byte (or of the
//!   connect, for the first request), so a client trickling them is closed;
//! - a keep-alive connection may idle `idle_timeout` between requests: longer than
//!   common clients keep idle connections pooled (90 s), so the client is the one that
//!   closes and never sends a request into a connection the gateway is closing. Idle
//!   connections make room for new ones at the cap anyway.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// How the server bounds its connections.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections one address (an IPv6 /64) may hold, busy or not; trusted proxies
    /// are not held to it.
    pub per_address: usize,
    pub trusted_proxies: Vec<crate::config::Network>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Connections being answered 503 at once; more are closed without an answer.
const REFUSING_AT_ONCE: usize = 32;
/// How long a connection told to close may finish the request it is in.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a gateway shutting down waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A live connection, as the cap sees it.
struct Entry {
    address: IpAddr,
    activity: Arc<Activity>,
    /// Cancelled to make room for a newer connection.
    evict: CancellationToken,
}

/// Live connections by arrival, oldest first.
#[derive(Default)]
struct Connections {
    next: u64,
    live: BTreeMap<u64, Entry>,
}

impl Connections {
    /// Admits a connection from `address`: under the caps, or in place of an idle one
    /// (see the module's comment): its own, when the address holds as many as it may.
    /// `None` when there is no room.
    fn admit(
        &mut self,
        limits: &Limits,
        address: IpAddr,
    ) -> Option<(u64, Arc<Activity>, CancellationToken)> {
        let key = address_key(address);
        let own = || {
            self.live
                .iter()
                .filter(|(_, e)| address_key(e.address) == key)
        };
        let proxy = limits.trusted_proxies.iter().any(|n| n.contains(address));
        if !proxy && own().count() >= limits.per_address {
            let idle = own().find(|(_, e)| !e.activity.busy()).map(|(id, _)| *id)?;
            if let Some(entry) = self.live.remove(&idle) {
                entry.evict.cancel();
            }
        } else if self.live.len() >= limits.max_connections {
            let idle = self.idle_to_evict()?;
            if let Some(entry) = self.live.remove(&idle) {
                entry.evict.cancel();
            }
        }
        self.next += 1;
        let entry = Entry {
            address,
            activity: Arc::new(Activity::new()),
            evict: CancellationToken::new(),
        };
        let handles = (self.next, entry.activity.clone(), entry.evict.clone());
        self.live.insert(self.next, entry);
        Some(handles)
    }

    /// The oldest idle connection of the address that holds the most connections
    /// among those with one idle (IPv6 addresses counted by their /64).
    fn idle_to_evict(&self) -> Option<u64> {
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for entry in self.live.values() {
            *held.entry(address_key(entry.address)).or_default() += 1;
        }
        let mut oldest_idle: HashMap<IpAddr, u64> = HashMap::new();
        for (id, entry) in &self.live {
            if !entry.activity.busy() {
                oldest_idle.entry(address_key(entry.address)).or_insert(*id);
            }
        }
        oldest_idle
            .into_iter()
            .max_by_key(|(address, id)| (held[address], std::cmp::Reverse(*id)))
            .map(|(_, id)| id)
    }
}

/// The address a client is counted by: IPv4 addresses one by one, IPv6 ones by their
/// /64, which one host usually holds whole (an IPv4 address written in IPv6 is that
/// IPv4 address).
pub(crate) fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets requests in flight finish
/// (event streams end at shutdown) for a few seconds.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = Arc::new(Mutex::new(Connections::default()));
    // Open connections' files, the cap's hard bound.
    let files = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSING_AT_ONCE));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of files or memory for a moment: wait, do not spin.
                    tracing::warn!(error = %e, "could not accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admitted = connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&limits, peer.ip());
        let Some((id, activity, evict)) = admitted else {
            // Refusals hold a file for a moment too: a few at a time, the rest dropped.
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                tracker.spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        // A connection's file is let go only once its task has dropped it: the one that
        // made room may still be closing.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = files.clone().acquire_owned() => permit.expect("never closed"),
        };
        let connections = connections.clone();
        let (app, limits) = (app.clone(), limits.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            // Made room for another: a moment to finish. The gateway stopping: what
            // the shutdown allows.
            let closing = async move {
                tokio::select! {
                    () = evict.cancelled() => CLOSE_GRACE,
                    () = shutdown.cancelled() => SHUTDOWN_GRACE,
                }
            };
            serve_connection(stream, peer, app, activity, &limits, closing).await;
            connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .live
                .remove(&id);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "HTTP requests still in flight after {} s; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    Ok(())
}

/// Every connection busy: a short 503, and the connection is closed.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str =
        r#"{"error":"The gateway is at its limit of HTTP connections; try again in a moment"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // The request's head is read first (a client that is answered before it has asked
    // takes the answer for garbage), and what else it sends until it closes: closing
    // with its request unread would reset the connection, answer and all. A moment at
    // most.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut chunk).await? {
                0 => break,
                n => head.extend_from_slice(&chunk[..n]),
            }
        }
        stream.write_all(response.as_bytes()).await
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    activity: Arc<Activity>,
    limits: &Limits,
    closing: impl Future<Output = Duration> + Send + 'static,
) {
    let in_flight = activity.clone();
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let in_flight = InFlight::new(in_flight.clone());
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await?;
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let io = Watched {
        stream,
        activity: activity.clone(),
    };
    // No upgrades: a socket taken out of the connection would escape the cap.
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    let mut connection = pin!(connection);
    // The deadlines and the calls to close are watched by a task of their own, so the
    // connection's every wake-up polls one channel and nothing else.
    let (close, mut closed) = tokio::sync::oneshot::channel();
    let watch = AbortOnDrop(tokio::spawn(watch(
        activity.clone(),
        limits.clone(),
        closing,
        close,
    )));
    let grace = tokio::select! {
        biased;
        _ = connection.as_mut() => return,
        grace = &mut closed => grace.unwrap_or(Duration::ZERO),
    };
    drop(watch);
    // Told to close. With nothing in flight, at once: its file is wanted now.
    if grace.is_zero() || !activity.busy() {
        return;
    }
    // A request in flight may finish, within the grace.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, connection).await;
}

/// Says when the connection is to close: at once (zero) when it is overdue with
/// nothing in flight, its headers too slow or its idle too long; with a grace when it
/// is made to close (`closing`). Wakes at the connection's deadline, and at least once
/// per header time, so a request begun meanwhile is held to its header deadline within
/// one more header time, without waking for every request.
async fn watch(
    activity: Arc<Activity>,
    limits: Limits,
    closing: impl Future<Output = Duration>,
    close: tokio::sync::oneshot::Sender<Duration>,
) {
    let mut closing = pin!(closing);
    let sleep = tokio::time::sleep(limits.header_timeout);
    let mut sleep = pin!(sleep);
    loop {
        let now = Instant::now();
        let deadline = activity.deadline(&limits);
        if deadline <= now && !activity.busy() {
            let _ = close.send(Duration::ZERO);
            return;
        }
        let wake = deadline.max(now).min(now + limits.header_timeout);
        sleep.as_mut().reset(wake);
        tokio::select! {
            grace = closing.as_mut() => {
                let _ = close.send(grace);
                return;
            }
            () = sleep.as_mut() => {}
        }
    }
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a connection is doing, as its reads and its requests tell.
struct Activity {
    opened: Instant,
    /// Requests in flight, bodies included (an event stream is in flight while open).
    busy: AtomicUsize,
    /// Milliseconds from `opened` to the first byte of a request not yet dispatched,
    /// plus one; 0 when none has begun.
    request_began: AtomicU64,
    /// Milliseconds from `opened` to when the last request ended; `u64::MAX` before
    /// any request.
    idle_since: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            busy: AtomicUsize::new(0),
            request_began: AtomicU64::new(0),
            idle_since: AtomicU64::new(u64::MAX),
        }
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// When the connection is to be closed if nothing changes: headers begun are due
    /// `header_timeout` after their first byte, the first request that long after the
    /// connect, the next one `idle_timeout` after the last. Busy: checked again later.
    fn deadline(&self, limits: &Limits) -> Instant {
        if self.busy() {
            return Instant::now() + limits.header_timeout;
        }
        match (
            self.idle_since.load(Ordering::Acquire),
            self.request_began.load(Ordering::Acquire),
        ) {
            (u64::MAX, _) => self.opened + limits.header_timeout,
            (_, began) if began > 0 => self.at(began - 1) + limits.header_timeout,
            (idle, _) => self.at(idle) + limits.idle_timeout,
        }
    }

    /// Bytes came in: with no request in flight, a new one has begun.
    fn read(&self) {
        if !self.busy() && self.request_began.load(Ordering::Acquire) == 0 {
            self.request_began
                .store(self.now_ms() + 1, Ordering::Release);
        }
    }
}

/// Counts a request as in flight until its response body is done with.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        activity.request_began.store(0, Ordering::Release);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.now_ms(), Ordering::Release);
        activity.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's socket, telling its [`Activity`] when bytes come in.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A response body that keeps its request counted as in flight while it lives.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn limits(max_connections: usize, per_address: usize) -> Limits {
        Limits {
            max_connections,
            per_address,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            trusted_proxies: Vec::new(),
        }
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let mut connections = Connections::default();
        let (first, first_activity, first_evict) = connections.admit(&limits(2, 2), ip(1)).unwrap();
        let (_, _, second_evict) = connections.admit(&limits(2, 2), ip(1)).unwrap();
        let _busy = InFlight::new(first_activity);
        // The first is busy: the second, idle, goes.
        let (third, _, _) = connections.admit(&limits(2, 2), ip(1)).unwrap();
        assert!(second_evict.is_cancelled() && !first_evict.is_cancelled());
        assert_eq!(
            connections.live.keys().copied().collect::<Vec<_>>(),
            [first, third]
        );
        // Every one busy: no room.
        let _busy = InFlight::new(connections.live[&third].activity.clone());
        assert!(connections.admit(&limits(2, 2), ip(1)).is_none());
        assert_eq!(connections.live.len(), 2);
    }

    #[test]
    fn an_address_holding_its_share_makes_room_from_its_own_or_is_refused() {
        let mut connections = Connections::default();
        let limits = limits(10, 2);
        let (_, first_activity, first_evict) = connections.admit(&limits, ip(1)).unwrap();
        let (_, second_activity, second_evict) = connections.admit(&limits, ip(1)).unwrap();
        let _busy = InFlight::new(first_activity);
        // Its idle one goes, far below the cap.
        let (_, _, third_evict) = connections.admit(&limits, ip(1)).unwrap();
        assert!(second_evict.is_cancelled() && !first_evict.is_cancelled());
        drop(second_activity);
        // Both busy (a slow body, say): refused, while others still get in.
        let third = connections.live.values().last().unwrap().activity.clone();
        let _busy_too = InFlight::new(third);
        assert!(connections.admit(&limits, ip(1)).is_none());
        assert!(!third_evict.is_cancelled());
        assert!(connections.admit(&limits, ip(2)).is_some());
    }

    #[test]
    fn the_address_holding_the_most_connections_makes_room_from_its_own() {
        let mut connections = Connections::default();
        let (_, _, newcomer) = connections.admit(&limits(4, 4), ip(2)).unwrap();
        let flood: Vec<_> = (0..3)
            .map(|_| connections.admit(&limits(4, 4), ip(1)).unwrap())
            .collect();
        // At the cap, the flooding address loses its oldest idle connection, not the
        // older connection of the other address.
        connections.admit(&limits(4, 4), ip(1)).unwrap();
        assert!(flood[0].2.is_cancelled());
        assert!(!newcomer.is_cancelled());
        connections.admit(&limits(4, 4), ip(3)).unwrap();
        assert!(flood[1].2.is_cancelled());
        assert!(!newcomer.is_cancelled());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let same: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let key = address_key;
        assert_eq!(key(one), key(same));
        assert_ne!(key(one), key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
