//! A webhook receiver on loopback for the tests: records every request, answers with a
//! status it is told, after a delay it is told.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub event_id: String,
    pub timestamp: String,
    pub signature: Option<String>,
    pub body: Value,
    pub raw: String,
    pub answered: u16,
    pub at: Instant,
    pub at_ms: i64,
}

/// A webhook receiver: records every request, answers with `status` after `delay_ms`.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Received>>>,
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<AtomicU64>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            url: format!("http://{}", listener.local_addr().unwrap()),
            got: Default::default(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::new(AtomicU64::new(0)),
        };
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(take))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.url)
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The requests it answered with a 2xx, for `path`.
    pub fn delivered(&self, path: &str) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(|r| r.path == path && (200..300).contains(&r.answered))
            .collect()
    }

    pub async fn wait_delivered(&self, path: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let done = self.delivered(path);
            if done.len() >= n {
                return done;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {n} delivered; got {:?}",
                done.len(),
                self.got()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn take(
    State(receiver): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    raw: String,
) -> StatusCode {
    let delay = receiver.delay_ms.load(Ordering::SeqCst);
    if delay > 0 && path.starts_with("slow") {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = receiver.status.load(Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    receiver.got.lock().unwrap().push(Received {
        path,
        event_id: header("x-zapgate-event-id").unwrap_or_default(),
        timestamp: header("x-zapgate-timestamp").unwrap_or_default(),
        signature: header("x-zapgate-signature"),
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
        answered: status,
        at: Instant::now(),
        at_ms: super::unix_millis(),
    });
    StatusCode::from_u16(status).unwrap()
}
