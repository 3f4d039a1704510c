//! Drives the unmodified whatsapp-rust client against an in-process wa-sim, and calls
//! the control API over real HTTP.

#![allow(dead_code, unreachable_pub)]

pub mod baileys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use wa_sim::{Config, Control, WaSim};
use whatsapp_rust::bot::{Bot, BotHandle};
use whatsapp_rust::client::Client;
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::types::events::Event;

/// Linking takes about a second on loopback; leave room for a loaded machine.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Harness {
    pub sim: WaSim,
    pub control: Control,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with_config(Config::default()).await
    }

    pub async fn with_config(config: Config) -> Self {
        let sim = WaSim::start(config).await.expect("wa-sim starts");
        let control = Control::new(sim.control_url());
        Self {
            sim,
            control,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn store(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }

    pub async fn companion(&self, store: &Path) -> Companion {
        Companion::start(&self.sim.ws_url(), store).await
    }

    /// A fresh companion scanned by `phone`, up to Connected.
    pub async fn linked_companion(&self, store: &Path, phone: &str) -> Companion {
        let mut companion = self.companion(store).await;
        let qr = companion.next_qr().await;
        let (status, body) = self.control.scan(&qr, Some(phone)).await.unwrap();
        assert_eq!(status, 200, "{body}");
        companion.wait_connected().await;
        companion
    }
}

impl Harness {
    /// Waits until wa-sim's `/control/stats` satisfy `done`; returns them.
    pub async fn stats_until(
        &self,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.control.stats().await.unwrap();
            if done(&stats) {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never got there: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until wa-sim's record of the device `jid` satisfies `done`; returns it.
    pub async fn device_until(
        &self,
        jid: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let devices = self.control.devices().await.unwrap();
            if let Some(device) = devices.iter().find(|d| d["jid"] == jid) {
                if done(device) {
                    return device.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{jid} never got there: {devices:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The length of the newest app-state sync key id a client's store kept, if any.
pub async fn kept_sync_key_len(store: &Path) -> Option<usize> {
    use whatsapp_rust::store::AppSyncStore as _;
    SqliteStore::new(store.to_str().unwrap())
        .await
        .unwrap()
        .get_latest_sync_key_id()
        .await
        .unwrap()
        .map(|id| id.len())
}

pub struct Companion {
    pub handle: Option<BotHandle>,
    pub client: Arc<Client>,
    events: mpsc::UnboundedReceiver<Arc<Event>>,
}

impl Companion {
    pub async fn start(ws_url: &str, store: &Path) -> Self {
        let backend = SqliteStore::new(store.to_str().unwrap())
            .await
            .expect("store opens");
        let (tx, events) = mpsc::unbounded_channel();
        let bot = Bot::builder()
            .with_backend(backend)
            .with_transport_factory(TokioWebSocketTransportFactory::new().with_url(ws_url))
            .with_version((2, 3000, 1_030_000_000))
            .skip_history_sync()
            .on_event(move |event, _client| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            })
            .build()
            .await
            .expect("client builds");
        let handle = bot.spawn();
        Self {
            client: handle.client(),
            handle: Some(handle),
            events,
        }
    }

    /// Waits for the first event `pick` accepts; fails naming what came instead.
    pub async fn wait_for<T>(&mut self, what: &str, pick: impl FnMut(&Event) -> Option<T>) -> T {
        self.wait_for_within(WAIT, what, pick).await
    }

    pub async fn wait_for_within<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                    seen.push(event_name(&event));
                }
                Ok(None) => panic!("client stopped before {what}; saw {seen:?}"),
                Err(_) => panic!("no {what} within {within:?}; saw {seen:?}"),
            }
        }
    }

    pub async fn next_qr(&mut self) -> String {
        self.wait_for("QR code", |e| match e {
            Event::PairingQrCode(q) => Some(q.code.clone()),
            _ => None,
        })
        .await
    }

    pub async fn wait_connected(&mut self) {
        self.wait_for("Connected", |e| {
            matches!(e, Event::Connected(_)).then_some(())
        })
        .await
    }

    pub async fn wait_logged_out(&mut self) {
        self.wait_for("LoggedOut", |e| {
            matches!(e, Event::LoggedOut(_)).then_some(())
        })
        .await
    }

    /// Events that arrived so far, without waiting.
    pub fn drain(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            names.push(event_name(&event));
        }
        names
    }

    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }
}

pub fn event_name(event: &Event) -> String {
    let debug = format!("{event:?}");
    debug
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}
