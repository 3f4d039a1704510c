//! whatsapp-rust clients on an instance's stored session: starting and stopping them,
//! and learning why one cannot reach WhatsApp. The sessions themselves are kept by a
//! [`SessionStore`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, mpsc};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use whatsapp_rust::async_channel;
use whatsapp_rust::bot::{Bot, EventDelivery};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::client::Client;
use whatsapp_rust::transport::{
    TokioWebSocketTransportFactory, Transport, TransportEvent, TransportFactory,
};
use whatsapp_rust::types::events::{
    ConnectFailureReason, Event, EventHandler, EventInterest, EventKind,
};

use super::Cause;
use crate::store::SessionStore;

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
const SOCKET_WAIT: Duration = Duration::from_secs(60);
/// A web version learnt from WhatsApp is asked again after this long.
const VERSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// A failure to learn it is told again, without asking, for this long.
const VERSION_RETRY: Duration = Duration::from_secs(10);

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
    EventKind::SelfPushNameUpdated,
];

type Version = (u32, u32, u32);

pub(crate) struct ClientFactory {
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) whatsapp_url: String,
    /// Configured with `--whatsapp-version`; otherwise learnt from WhatsApp.
    pub(crate) version: Option<(u32, u32, u32)>,
    /// The last version learnt (or why not), and when.
    pub(crate) learnt: AsyncMutex<Option<(Result<Version, String>, Instant)>>,
    pub(crate) tracker: TaskTracker,
    /// Sends and receives messages for the clients of instances.
    pub(crate) messaging: Arc<crate::messaging::Hub>,
    /// On a shared database: a client connects to WhatsApp only while this node holds
    /// its instance's lease at the epoch the client was started under.
    pub(crate) leases: Option<Arc<crate::store::leases::Leases>>,
}

/// A started client. It holds its instance's session lock until it is stopped, so two
/// clients never use one session at once.
pub(crate) struct Running {
    pub(crate) generation: u64,
    pub(crate) client: Arc<Client>,
    /// Cancelled when the client's run loop has ended.
    pub(crate) ended: CancellationToken,
    pub(crate) diagnosis: Arc<Diagnosis>,
    /// Aborts the client's run loop; also when a `Running` is dropped without a stop,
    /// so no client outlives the task that owned it.
    abort: CancellationToken,
    _abort_on_drop: tokio_util::sync::DropGuard,
    session: OwnedMutexGuard<()>,
    /// One of the sessions the open-file limit leaves room for, held while it runs.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Running {
    /// Stops the client and waits (each step within `within`) for its run loop to end,
    /// so it writes to its session no more; a client that does not end in time is aborted. Returns the
    /// session lock, for work that needs the file closed.
    pub(crate) async fn stop(self, within: Duration) -> OwnedMutexGuard<()> {
        self.client
            .enable_auto_reconnect
            .store(false, Ordering::Relaxed);
        let _ = timeout(within, self.client.disconnect()).await;
        if timeout(within, self.ended.cancelled()).await.is_err() {
            tracing::warn!(
                client.generation = self.generation,
                "a WhatsApp client did not stop in time; aborting it"
            );
            self.abort.cancel();
            let _ = timeout(ABORT_WAIT, self.ended.cancelled()).await;
        }
        self.session
    }
}

/// How long an aborted client's run loop may take to unwind.
const ABORT_WAIT: Duration = Duration::from_secs(1);

impl ClientFactory {
    /// The web version to announce when opening a linking window: configured, or learnt
    /// from WhatsApp (once a day). Its failure is the first thing a user must hear.
    pub(crate) async fn link_version(&self, within: Duration) -> Result<Version, Cause> {
        if let Some(version) = self.version {
            return Ok(version);
        }
        let learn = async {
            let mut learnt = self.learnt.lock().await;
            match &*learnt {
                Some((Ok(version), at)) if at.elapsed() < VERSION_TTL => return Ok(*version),
                Some((Err(why), at)) if at.elapsed() < VERSION_RETRY => {
                    return Err(Cause::VersionUnknown(why.clone()));
                }
                _ => {}
            }
            let http: Arc<dyn whatsapp_rust::http::HttpClient> =
                Arc::new(whatsapp_rust::http::UreqHttpClient::new());
            let fetched = whatsapp_rust::version::fetch_latest_app_version(&http)
                .await
                .map_err(|e| format!("{e:#}"));
            *learnt = Some((fetched.clone(), Instant::now()));
            fetched.map_err(Cause::VersionUnknown)
        };
        timeout(within, learn).await.unwrap_or_else(|_| {
            Err(Cause::VersionUnknown(
                "web.whatsapp.com did not answer in time".into(),
            ))
        })
    }

    /// Builds a client on the instance's session (created empty if absent) and
    /// starts it, once the session lock is free. Its events and its end arrive on
    /// `signals`; `version` overrides the configured one.
    pub(crate) async fn start(
        &self,
        instance: &str,
        generation: u64,
        session: OwnedMutexGuard<()>,
        slot: tokio::sync::OwnedSemaphorePermit,
        version: Option<(u32, u32, u32)>,
        signals: mpsc::Sender<Signal>,
    ) -> anyhow::Result<Running> {
        let lease = match &self.leases {
            Some(leases) => {
                use crate::store::leases::Held as _;
                let of = crate::store::instance_of(instance);
                let epoch = leases
                    .epoch(of)
                    .with_context(|| format!("this node no longer holds instance {of}"))?;
                Some(Lease {
                    leases: leases.clone(),
                    instance: of.to_owned(),
                    epoch,
                })
            }
            None => None,
        };
        let backend = self
            .sessions
            .open(instance)
            .await
            .with_context(|| format!("opening the session in {}", self.sessions.location()))?;
        let diagnosis = Arc::new(Diagnosis::default());
        let events = signals.clone();
        let mut builder = Bot::builder()
            .with_backend_arc(backend)
            .with_transport_factory(WatchedFactory {
                inner: TokioWebSocketTransportFactory::new().with_url(&self.whatsapp_url),
                diagnosis: diagnosis.clone(),
                tracker: self.tracker.clone(),
                lease,
            })
            .skip_history_sync()
            // One mailbox drained in order: the instance must see Disconnected before
            // the Connected that follows it. The instance's channel is bounded and its
            // task waits only on its database (seconds at most, when it is busy), so
            // waiting here only paces the client's own mailbox.
            .with_event_delivery(EventDelivery::Ordered { capacity: 256 })
            // Inline, before the run loop can end: whoever sees the client stop can
            // already tell whether WhatsApp had dropped the device.
            .with_event_handler(RemovedWatch(diagnosis.clone()))
            .on_event_for(INSTANCE_EVENTS, move |event, _client| {
                let events = events.clone();
                async move {
                    let _ = events
                        .send(Signal {
                            generation,
                            kind: SignalKind::Event(event),
                        })
                        .await;
                }
            });
        // The clients of instances (not those removing set-aside devices) carry
        // messages: received ones are recorded before they are acknowledged.
        if self.messaging.lane(instance).is_some() {
            let (hub, name) = (self.messaging.clone(), instance.to_owned());
            builder = builder
                .with_inbound_durability_hook(crate::messaging::Hook {
                    hub: hub.clone(),
                    instance: name.clone(),
                })
                .on_event_for(crate::messaging::MESSAGE_EVENTS, move |event, client| {
                    let (hub, name) = (hub.clone(), name.clone());
                    async move { hub.on_event(&name, &event, &client).await }
                });
        }
        if let Some(version) = version.or(self.version) {
            builder = builder.with_version(version);
        }
        let bot = builder
            .build()
            .await
            .context("building the WhatsApp client")?;
        let handle = bot.spawn();
        let client = handle.client();
        // Delivery receipts say "delivered" (not "inactive"): a gateway is always at work.
        client.set_force_active_delivery_receipts(true);
        let ended = CancellationToken::new();
        let (waiting, socket, stopped) = (client.clone(), signals.clone(), ended.clone());
        self.tracker.spawn(async move {
            tokio::select! {
                up = waiting.wait_for_socket(SOCKET_WAIT) => if up.is_ok() {
                    let _ = socket.send(Signal { generation, kind: SignalKind::SocketUp }).await;
                },
                () = stopped.cancelled() => {}
            }
        });
        let (end, abort) = (ended.clone(), CancellationToken::new());
        let aborted = abort.clone();
        self.tracker.spawn(async move {
            let mut handle = handle;
            tokio::select! {
                _ = &mut handle => {}
                () = aborted.cancelled() => {
                    handle.abort();
                    let _ = handle.await;
                }
            }
            end.cancel();
            let _ = signals
                .send(Signal {
                    generation,
                    kind: SignalKind::Stopped,
                })
                .await;
        });
        Ok(Running {
            generation,
            client,
            ended,
            diagnosis,
            _abort_on_drop: abort.clone().drop_guard(),
            abort,
            session,
            _slot: slot,
        })
    }
}

/// Why a client's latest failed attempt to reach WhatsApp failed, as far as its
/// transport saw. The client only logs its connection errors, so the transport watches
/// for them. Read only when the client did not get through.
#[derive(Default)]
pub(crate) struct Diagnosis {
    last: Mutex<Option<Cause>>,
    /// WhatsApp said the device is not linked (a `401` at login, or removed since).
    removed: AtomicBool,
}

impl Diagnosis {
    pub(crate) fn cause(&self) -> Option<Cause> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether WhatsApp said this device is not linked (any more): nothing is left to
    /// remove there.
    pub(crate) fn removed_at_whatsapp(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    fn record(&self, cause: Cause) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause);
    }
}

/// Notes, as the client dispatches it, that WhatsApp logged the device out because
/// it is not linked (not for an account locked or another refusal).
struct RemovedWatch(Arc<Diagnosis>);

impl EventHandler for RemovedWatch {
    fn handle_event(&self, event: Arc<Event>) {
        if let Event::LoggedOut(out) = &*event {
            if out.reason == ConnectFailureReason::LoggedOut {
                self.0.removed.store(true, Ordering::Relaxed);
            }
        }
    }

    fn interest(&self) -> EventInterest {
        EventInterest::of(&[EventKind::LoggedOut])
    }
}

struct WatchedFactory {
    inner: TokioWebSocketTransportFactory,
    diagnosis: Arc<Diagnosis>,
    tracker: TaskTracker,
    lease: Option<Lease>,
}

/// The lease a client was started under, on a shared database.
struct Lease {
    leases: Arc<crate::store::leases::Leases>,
    instance: String,
    epoch: i64,
}

#[whatsapp_rust::async_trait]
impl TransportFactory for WatchedFactory {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        // Every connect and reconnect passes here: once the lease moved on (or the node
        // lost its membership), the client never reaches WhatsApp again, so it cannot
        // replace the new owner's connection.
        if let Some(lease) = &self.lease {
            use crate::store::leases::Held as _;
            if lease.leases.epoch(&lease.instance) != Some(lease.epoch) {
                anyhow::bail!(
                    "this node no longer holds instance {} (epoch {})",
                    lease.instance,
                    lease.epoch
                );
            }
        }
        let (inner, events) = match self.inner.create_transport().await {
            Ok(created) => created,
            Err(e) => {
                self.diagnosis.record(Cause::Unreachable(format!("{e:#}")));
                return Err(e);
            }
        };
        let watch = Arc::new(Watch::default());
        // Pass the transport's events on, counting the server's frames and noting
        // whether it closed the connection itself.
        let (tx, rx) = async_channel::bounded(events.capacity().unwrap_or(64).max(1));
        let seen = watch.clone();
        self.tracker.spawn(async move {
            let mut frames = Frames::default();
            while let Ok(event) = events.recv().await {
                match &event {
                    // Only whether the server said more than its hello matters:
                    // past two frames, nothing more is counted.
                    TransportEvent::DataReceived(data)
                        if seen.frames.load(Ordering::Relaxed) < 2 =>
                    {
                        seen.frames.fetch_add(frames.count(data), Ordering::Relaxed);
                    }
                    TransportEvent::DataReceived(_) | TransportEvent::Connected => {}
                    TransportEvent::Disconnected(_) => {
                        seen.server_closed.store(true, Ordering::Relaxed)
                    }
                }
                if tx.send(event).await.is_err() {
                    break;
                }
            }
        });
        let transport = Watched {
            inner,
            watch,
            diagnosis: self.diagnosis.clone(),
        };
        Ok((Arc::new(transport), rx))
    }
}

#[derive(Default)]
struct Watch {
    sends: AtomicU32,
    /// Whole frames the server sent.
    frames: AtomicU32,
    server_closed: AtomicBool,
}

/// Counts the frames in the server's byte stream: each is a 3-byte big-endian length
/// and that many bytes, however websocket messages cut them.
#[derive(Default)]
struct Frames {
    /// How many bytes of the next frame's length are read (0 to 2), and their value.
    header: (u8, usize),
    /// Bytes of the current frame still to come.
    left: usize,
}

impl Frames {
    /// How many frames `data` completes.
    fn count(&mut self, data: &[u8]) -> u32 {
        let (mut done, mut at) = (0, 0);
        while at < data.len() {
            if self.left > 0 {
                let take = self.left.min(data.len() - at);
                (self.left, at) = (self.left - take, at + take);
                done += u32::from(self.left == 0);
                continue;
            }
            let (read, value) = &mut self.header;
            (*read, *value, at) = (*read + 1, *value << 8 | usize::from(data[at]), at + 1);
            if *read == 3 {
                self.left = std::mem::take(value);
                *read = 0;
                done += u32::from(self.left == 0);
            }
        }
        done
    }
}

struct Watched {
    inner: Arc<dyn Transport>,
    watch: Arc<Watch>,
    diagnosis: Arc<Diagnosis>,
}

#[whatsapp_rust::async_trait]
impl Transport for Watched {
    async fn send(&self, data: Bytes) -> Result<(), anyhow::Error> {
        self.watch.sends.fetch_add(1, Ordering::Relaxed);
        self.inner.send(data).await
    }

    /// The client hangs up after its hello and the server's, with nothing more said,
    /// only when the server's hello, which carries the certificate chain, did not
    /// verify: the handshake's one fatal outcome. A login WhatsApp refuses (a
    /// `<failure>` after a one-message IK handshake) is a second frame.
    async fn disconnect(&self) {
        let w = &self.watch;
        if w.sends.load(Ordering::Relaxed) == 1
            && w.frames.load(Ordering::Relaxed) == 1
            && !w.server_closed.load(Ordering::Relaxed)
        {
            self.diagnosis.record(Cause::CertificateRefused);
        }
        self.inner.disconnect().await
    }
}

#[cfg(test)]
mod tests {
    use super::Frames;

    #[test]
    fn frames_are_counted_however_the_messages_cut_them() {
        let mut frames = Frames::default();
        // A server hello alone: one frame.
        assert_eq!(frames.count(&[0, 0, 4, 1, 2, 3, 4]), 1);
        // A failure after it, in two messages cut inside its length and its body.
        assert_eq!(frames.count(&[0]), 0);
        assert_eq!(frames.count(&[0, 3, 9]), 0);
        assert_eq!(frames.count(&[9, 9]), 1);
        // Two frames in one message, an empty one among them.
        assert_eq!(frames.count(&[0, 0, 0, 0, 0, 1, 7]), 2);
        assert_eq!(frames.count(&[]), 0);
    }
}
