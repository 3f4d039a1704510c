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
//! - a request's headers must arrive within `header_timeout`, counted from the connect or
//!   from the previous response, so it is also how long a keep-alive connection may idle.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// How the server bounds its connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Connections being answered 503 at once; more are closed without an answer.
const REFUSING_AT_ONCE: usize = 8;
/// How long a connection told to close may finish the request it is in.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a gateway shutting down waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A live connection, as the cap sees it.
struct Entry {
    address: IpAddr,
    /// Requests in flight, bodies included (an event stream is in flight while open).
    busy: Arc<AtomicUsize>,
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
    /// Admits a connection from `address`: under the cap, or in place of an idle one
    /// (see the module's comment). `None` when every connection is busy.
    fn admit(
        &mut self,
        max: usize,
        address: IpAddr,
    ) -> Option<(u64, Arc<AtomicUsize>, CancellationToken)> {
        if self.live.len() >= max {
            let idle = self.idle_to_evict()?;
            if let Some(entry) = self.live.remove(&idle) {
                entry.evict.cancel();
            }
        }
        self.next += 1;
        let entry = Entry {
            address,
            busy: Arc::new(AtomicUsize::new(0)),
            evict: CancellationToken::new(),
        };
        let handles = (self.next, entry.busy.clone(), entry.evict.clone());
        self.live.insert(self.next, entry);
        Some(handles)
    }

    /// The oldest idle connection of the address that holds the most connections
    /// among those with one idle.
    fn idle_to_evict(&self) -> Option<u64> {
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for entry in self.live.values() {
            *held.entry(entry.address).or_default() += 1;
        }
        let mut oldest_idle: HashMap<IpAddr, u64> = HashMap::new();
        for (id, entry) in &self.live {
            if entry.busy.load(Ordering::Acquire) == 0 {
                oldest_idle.entry(entry.address).or_insert(*id);
            }
        }
        oldest_idle
            .into_iter()
            .max_by_key(|(address, id)| (held[address], std::cmp::Reverse(*id)))
            .map(|(_, id)| id)
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
            .admit(limits.max_connections, peer.ip());
        let Some((id, busy, evict)) = admitted else {
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
        let app = app.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let closing = async {
                tokio::select! {
                    () = evict.cancelled() => {}
                    () = shutdown.cancelled() => {}
                }
            };
            serve_connection(stream, peer, app, busy, limits, closing).await;
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
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    busy: Arc<AtomicUsize>,
    limits: Limits,
    closing: impl Future<Output = ()>,
) {
    let in_flight = busy.clone();
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let in_flight = InFlight::new(busy.clone());
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
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut connection = pin!(connection);
    let mut closing = pin!(closing);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = closing.as_mut() => {}
    }
    // Told to close. With nothing in flight, at once: its file is wanted now.
    if in_flight.load(Ordering::Acquire) == 0 {
        return;
    }
    // A request in flight may finish, briefly.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// Counts a request as in flight until its response body is done with.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(busy: Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::AcqRel);
        Self(busy)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let mut connections = Connections::default();
        let (first, first_busy, first_evict) = connections.admit(2, ip(1)).unwrap();
        let (_, _, second_evict) = connections.admit(2, ip(1)).unwrap();
        first_busy.fetch_add(1, Ordering::AcqRel);
        // The first is busy: the second, idle, goes.
        let (third, _, _) = connections.admit(2, ip(1)).unwrap();
        assert!(second_evict.is_cancelled() && !first_evict.is_cancelled());
        assert_eq!(
            connections.live.keys().copied().collect::<Vec<_>>(),
            [first, third]
        );
        // Every one busy: no room.
        connections.live[&third].busy.fetch_add(1, Ordering::AcqRel);
        assert!(connections.admit(2, ip(1)).is_none());
        assert_eq!(connections.live.len(), 2);
    }

    #[test]
    fn the_address_holding_the_most_connections_makes_room_from_its_own() {
        let mut connections = Connections::default();
        let (_, _, newcomer) = connections.admit(4, ip(2)).unwrap();
        let flood: Vec<_> = (0..3)
            .map(|_| connections.admit(4, ip(1)).unwrap())
            .collect();
        // At the cap, the flooding address loses its oldest idle connection, not the
        // older connection of the other address.
        connections.admit(4, ip(1)).unwrap();
        assert!(flood[0].2.is_cancelled());
        assert!(!newcomer.is_cancelled());
        connections.admit(4, ip(3)).unwrap();
        assert!(flood[1].2.is_cancelled());
        assert!(!newcomer.is_cancelled());
    }
}
