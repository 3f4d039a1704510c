//! wa-sim: a simulated WhatsApp service and phone that speak the real multi-device wire
//! protocol, so an unmodified WhatsApp client links and logs in against it on loopback.
//!
//! - `certs`: the service's static key and its certificate chain
//! - `frame`, `noise`: framing, the Noise XX / IK / XXfallback responder, frame encryption
//! - `conn`: one task per websocket (handshake, registration or login, stanzas)
//! - `iq`: answers to the companion's iqs
//! - `phone`: the simulated phone (QR scan, pairing by code, ADV signatures)
//! - `contact`: contacts, accounts no gateway links, each a Signal peer with a task
//! - `routing`: messages and receipts between devices and contacts, per-device queues
//! - `signal`: in-memory Signal stores for the phone and contacts
//! - `registry`, `sim`: accounts, devices and live connections
//! - `control`: the JSON control API under `/control`; `client`: its HTTP client
//!
//! Start it in-process with [`WaSim::start`], or run the `wa-sim` binary.

mod certs;
mod client;
mod conn;
mod contact;
mod control;
mod devices;
mod frame;
mod iq;
mod noise;
mod phone;
mod prekeys;
mod registry;
mod routing;
mod signal;
mod sim;
mod stanza;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::client::Control;
use crate::sim::{Sim, bump};

/// How the simulated service behaves. The defaults are WhatsApp's.
#[derive(Clone, Debug)]
pub struct Config {
    /// QR refs sent in each `pair-device` (WhatsApp sends 6).
    pub refs_per_pairing: usize,
    /// How long the client shows its first ref, and each next one. These mirror the
    /// client's own timers; the service uses them to know which QR code is current.
    pub first_ref_ttl: Duration,
    pub next_ref_ttl: Duration,
    /// Frames above this size close the connection.
    pub max_frame_bytes: usize,
    /// A client must finish its Noise handshake within this time.
    pub handshake_timeout: Duration,
    /// A connection with no inbound traffic for this long is closed (clients ping
    /// every 15-30 s).
    pub idle_timeout: Duration,
    /// Present a certificate chain that vouches for another server's key, as a server
    /// impersonating WhatsApp would: every client refuses the handshake.
    pub forged_certificate: bool,
    /// The first this-many welcomes the phone sends go out with their first message
    /// garbled in transit (its last ciphertext byte flipped), so the device cannot
    /// decrypt it and must ask again with a retry receipt.
    pub garble_peer_messages: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            refs_per_pairing: 6,
            first_ref_ttl: Duration::from_secs(60),
            next_ref_ttl: Duration::from_secs(20),
            max_frame_bytes: 1 << 20,
            handshake_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(120),
            forged_certificate: false,
            garble_peer_messages: 0,
        }
    }
}

/// A running simulator. Dropping it does not stop it; call [`WaSim::shutdown`].
pub struct WaSim {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl WaSim {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0".parse().expect("valid address"), config).await
    }

    pub async fn bind(addr: SocketAddr, config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, config, shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The WhatsApp websocket URL to give the client.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    /// The base of the control API, e.g. `{control_url}/scan`.
    pub fn control_url(&self) -> String {
        format!("http://{}/control", self.addr)
    }

    /// Closes every connection and stops listening.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Serves the websocket at `/ws/chat` and the control API at `/control` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let sim = Arc::new(Sim::new(config, shutdown.clone()));
    let app = Router::new()
        .route("/ws/chat", get(websocket))
        .nest("/control", control::routes())
        .fallback(|| async { control::not_found() })
        .method_not_allowed_fallback(|| async { control::method_not_allowed() })
        .with_state(sim);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn websocket(State(sim): State<Arc<Sim>>, upgrade: WebSocketUpgrade) -> Response {
    if sim.in_outage() {
        bump(&sim.stats.refused, 1);
        return (StatusCode::SERVICE_UNAVAILABLE, "outage").into_response();
    }
    // Small buffers: the load generator holds thousands of these at once.
    let max = sim.config.max_frame_bytes + 64;
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| conn::serve(sim, socket))
}

/// `n` fresh pairing refs, shaped like WhatsApp's (`2@` and random base64).
pub(crate) fn fresh_refs(n: usize) -> Vec<String> {
    use base64::Engine as _;
    use rand::RngExt as _;
    (0..n)
        .map(|_| {
            let bytes: [u8; 30] = rand::rng().random();
            format!(
                "2@{}",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            )
        })
        .collect()
}

pub(crate) fn key32(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

pub(crate) fn unix_secs() -> u64 {
    unix_millis() / 1000
}

pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
