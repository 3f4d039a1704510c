//! Starting whatsapp-rust clients on an instance's stored session, and wiping it.
//! Each session is one SQLite file under `<data-dir>/sessions/`, so a wipe is a delete.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use whatsapp_rust::bot::{Bot, EventDelivery};
use whatsapp_rust::client::Client;
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::types::events::{Event, EventKind};

/// What a running client tells its instance, tagged with the client's generation so
/// events from a client that was already replaced are ignored.
pub(crate) struct Signal {
    pub(crate) generation: u64,
    pub(crate) kind: SignalKind,
}

pub(crate) enum SignalKind {
    Event(Arc<Event>),
    /// The client finished its handshake with WhatsApp (it is logging in).
    SocketUp,
    /// The client's run loop ended.
    Stopped,
}

/// How long a starting client may take to reach WhatsApp before nobody waits for it.
const SOCKET_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The client events an instance acts on; the client skips building the others.
const INSTANCE_EVENTS: &[EventKind] = &[
    EventKind::PairingQrCode,
    EventKind::PairingCode,
    EventKind::PairingQrCodesExhausted,
    EventKind::PairSuccess,
    EventKind::Connected,
    EventKind::Disconnected,
    EventKind::LoggedOut,
    EventKind::StreamReplaced,
    EventKind::ConnectFailure,
    EventKind::TemporaryBan,
    EventKind::ClientOutdated,
];

pub(crate) struct ClientFactory {
    pub(crate) sessions_dir: PathBuf,
    pub(crate) whatsapp_url: String,
    pub(crate) version: Option<(u32, u32, u32)>,
}

pub(crate) struct Running {
    pub(crate) generation: u64,
    pub(crate) client: Arc<Client>,
}

impl ClientFactory {
    fn session_path(&self, instance: &str) -> PathBuf {
        self.sessions_dir.join(format!("{instance}.db"))
    }

    pub(crate) fn has_session_file(&self, instance: &str) -> bool {
        self.session_path(instance).exists()
    }

    /// Builds a client on the instance's session file (created empty if absent) and
    /// starts it. Its events and its end arrive on `signals`.
    pub(crate) async fn start(
        &self,
        instance: &str,
        generation: u64,
        signals: mpsc::UnboundedSender<Signal>,
    ) -> anyhow::Result<Running> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&self.sessions_dir).context("creating the sessions directory")?;
        let path = self.session_path(instance);
        let backend = SqliteStore::new(&path.to_string_lossy())
            .await
            .with_context(|| format!("opening session {}", path.display()))?;
        let events = signals.clone();
        let mut builder = Bot::builder()
            .with_backend(backend)
            .with_transport_factory(
                TokioWebSocketTransportFactory::new().with_url(&self.whatsapp_url),
            )
            .skip_history_sync()
            // One mailbox drained in order: the instance must see Disconnected before
            // the Connected that follows it. Our handler never blocks, so nothing drops.
            .with_event_delivery(EventDelivery::Ordered { capacity: 256 })
            .on_event_for(INSTANCE_EVENTS, move |event, _client| {
                let _ = events.send(Signal {
                    generation,
                    kind: SignalKind::Event(event),
                });
                std::future::ready(())
            });
        if let Some(version) = self.version {
            builder = builder.with_version(version);
        }
        let bot = builder
            .build()
            .await
            .context("building the WhatsApp client")?;
        let handle = bot.spawn();
        let client = handle.client();
        let (waiting, socket) = (client.clone(), signals.clone());
        tokio::spawn(async move {
            if waiting.wait_for_socket(SOCKET_WAIT).await.is_ok() {
                let _ = socket.send(Signal {
                    generation,
                    kind: SignalKind::SocketUp,
                });
            }
        });
        tokio::spawn(async move {
            handle.await;
            let _ = signals.send(Signal {
                generation,
                kind: SignalKind::Stopped,
            });
        });
        Ok(Running { generation, client })
    }

    /// Deletes the session's keys (the database and its WAL files).
    pub(crate) fn wipe(&self, instance: &str) -> std::io::Result<()> {
        let path = self.session_path(instance);
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
