//! Messaging: each instance's durable queue of messages to send, sent in order by one
//! task per instance (`sender`), and what the client reports about messages, sent or
//! received (`inbound`), turned into Z-API's webhooks (`zapi`). The instance's task
//! decides whether its number is linked and connected and publishes it as a [`Line`];
//! messaging only reads that.

mod inbound;
mod sender;
pub(crate) mod zapi;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use whatsapp_rust::client::Client;

use crate::store::{Enqueued, NewOutbound, Outbound, Store, StoreError};

pub(crate) use inbound::{Hook, MESSAGE_EVENTS};

/// How long a message on the wire waits for WhatsApp's ack before it goes again.
pub const ACK_WAIT: Duration = Duration::from_secs(20);

/// Messages sent and received are kept this long (to quote them, to recognise a
/// redelivery, to answer an idempotency key again), then forgotten.
pub const KEEP_MESSAGES: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the messages past [`KEEP_MESSAGES`] are looked for.
const FORGET_EVERY: Duration = Duration::from_secs(600);

/// Messages waiting per instance, as Z-API allows.
pub const MAX_QUEUE: i64 = 1000;

/// Where an instance's number stands, for sending.
#[derive(Clone)]
pub enum Line {
    /// No number is linked: nothing can be sent, now or later.
    Unlinked,
    /// Linked but not connected: messages wait.
    Down,
    /// Connected through this client.
    Up(Arc<Client>),
}

impl Line {
    fn same(&self, other: &Line) -> bool {
        match (self, other) {
            (Line::Up(a), Line::Up(b)) => Arc::ptr_eq(a, b),
            (Line::Unlinked, Line::Unlinked) | (Line::Down, Line::Down) => true,
            _ => false,
        }
    }

    /// Publishes `next` if it differs from what `line` holds.
    pub(crate) fn publish(line: &watch::Sender<Line>, next: Line) {
        line.send_if_modified(|current| {
            let changed = !current.same(&next);
            *current = next;
            changed
        });
    }
}

/// The pause between two messages of an instance, unless a message says its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    pub min: Duration,
    pub max: Duration,
}

impl Pacing {
    /// Z-API's: a random 1 to 3 seconds.
    pub const ZAPI: Pacing = Pacing {
        min: Duration::from_secs(1),
        max: Duration::from_secs(3),
    };

    fn pick(&self) -> Duration {
        use rand::RngExt as _;
        if self.max <= self.min {
            return self.min;
        }
        let span = (self.max - self.min).as_millis() as u64;
        self.min + Duration::from_millis(rand::rng().random_range(0..=span))
    }
}

impl std::str::FromStr for Pacing {
    type Err = String;

    /// `MS` or `MIN_MS-MAX_MS`.
    fn from_str(s: &str) -> Result<Self, String> {
        let ms = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{t:?} is not a number of milliseconds"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (ms(a)?, ms(b)?),
            None => (ms(s)?, ms(s)?),
        };
        if max < min {
            return Err("the pause's maximum is below its minimum".into());
        }
        if max > Duration::from_secs(60) {
            return Err("the pause may be at most 60000 ms".into());
        }
        Ok(Pacing { min, max })
    }
}

pub struct MessagingConfig {
    pub pacing: Pacing,
    /// How long a message on the wire may wait for WhatsApp's ack before it is sent
    /// again (with the same id).
    pub ack_wait: Duration,
}

/// Why a message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("You are not connected.")]
    NotLinked,
    #[error(
        "You are not connected. Messages are not queued while the number is disconnected (disableEnqueueWhenDisconnected)."
    )]
    NotQueuedWhileDown,
    #[error(
        "The queue already holds {MAX_QUEUE} messages waiting to be sent: wait until some are sent, or delete some from the queue."
    )]
    QueueFull,
    #[error("This Idempotency-Key was already used for a different request.")]
    KeyReused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A message as the API asks for it, checked.
#[derive(Debug)]
pub struct Outgoing {
    pub phone: String,
    pub text: String,
    pub reply_to: Option<String>,
    pub edit_of: Option<String>,
    pub delay: Option<Duration>,
    pub typing: Duration,
    /// The caller's key and the hash of its request.
    pub idempotency: Option<(String, String)>,
}

/// What a message event tells, for those that count them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Told {
    /// A message came in (a ReceivedCallback).
    Received,
    /// WhatsApp took a message of ours (its DeliveryCallback), this long after the
    /// API took it.
    Sent { waited_ms: i64 },
    /// A message of ours was given up (a DeliveryCallback with an error).
    NotSent,
    /// A message of ours moved to this status (a MessageStatusCallback).
    Status(crate::store::Status),
}

/// A message event, as its webhook tells it, for the instance's event stream and the
/// metrics.
#[derive(Clone, Debug)]
pub struct Note {
    pub instance: Arc<str>,
    pub told: Told,
    /// `message` (a ReceivedCallback) or `status` (a DeliveryCallback or a
    /// MessageStatusCallback).
    pub name: &'static str,
    pub body: Arc<str>,
}

/// Notes a slow reader of the event streams may fall behind by; past it, it misses
/// some (the webhooks carry every one).
const NOTES_BACKLOG: usize = 1024;

/// What every instance's messaging shares.
pub struct Hub {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) webhooks_due: Arc<Notify>,
    pub(crate) config: MessagingConfig,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    notes: broadcast::Sender<Note>,
}

/// One instance's messaging: its sender, and the acks its sends wait for.
pub(crate) struct Lane {
    pub(crate) instance: String,
    /// Woken when a message is queued.
    wake: Notify,
    /// Messages on the wire, by WhatsApp id: told the ack's refusal code, if any.
    acks: Mutex<HashMap<String, oneshot::Sender<Option<String>>>>,
    line: watch::Receiver<Line>,
    /// Ended when the instance's task ends.
    stop: CancellationToken,
}

impl Lane {
    /// Expects WhatsApp's ack of `id`: registered before the message goes out.
    fn expect_ack(&self, id: &str) -> oneshot::Receiver<Option<String>> {
        let (tx, rx) = oneshot::channel();
        self.acks().insert(id.to_owned(), tx);
        rx
    }

    fn forget_ack(&self, id: &str) {
        self.acks().remove(id);
    }

    /// WhatsApp acked a message stanza.
    pub(crate) fn acked(&self, id: &str, error: Option<String>) {
        if let Some(waiter) = self.acks().remove(id) {
            let _ = waiter.send(error);
        }
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Option<String>>>> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn line(&self) -> Line {
        self.line.borrow().clone()
    }
}

impl Hub {
    pub fn new(
        store: Arc<dyn Store>,
        webhooks_due: Arc<Notify>,
        config: MessagingConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let hub = Arc::new(Self {
            store,
            webhooks_due,
            config,
            lanes: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            shutdown,
            notes: broadcast::channel(NOTES_BACKLOG).0,
        });
        hub.tracker
            .spawn(forget_old(hub.store.clone(), hub.shutdown.clone()));
        hub
    }

    /// Starts an instance's sender, reading its line; it ends with `stop`.
    pub(crate) fn open_lane(
        self: &Arc<Self>,
        instance: &str,
        line: watch::Receiver<Line>,
        stop: CancellationToken,
    ) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            instance: instance.to_owned(),
            wake: Notify::new(),
            acks: Mutex::new(HashMap::new()),
            line,
            stop,
        });
        self.lanes_map().insert(instance.to_owned(), lane.clone());
        self.tracker.spawn(sender::run(
            self.clone(),
            lane.clone(),
            self.shutdown.clone(),
        ));
        lane
    }

    /// The instance's lane is gone with its task.
    pub(crate) fn close_lane(&self, instance: &str) {
        if let Some(lane) = self.lanes_map().remove(instance) {
            lane.stop.cancel();
        }
    }

    pub(crate) fn lane(&self, instance: &str) -> Option<Arc<Lane>> {
        self.lanes_map().get(instance).cloned()
    }

    fn lanes_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Lane>>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits a message to the instance's queue, then wakes its sender. The message
    /// is durable once this returns.
    pub async fn send(&self, instance: &str, message: Outgoing) -> Result<Outbound, SendError> {
        // A request made again answers as it did, whatever the number does since.
        if let Some((key, hash)) = &message.idempotency {
            match self.store.replayed(instance, key, hash).await? {
                Some(Enqueued::Replayed(earlier)) => return Ok(earlier),
                Some(_) => return Err(SendError::KeyReused),
                None => {}
            }
        }
        let lane = self.lane(instance).ok_or(SendError::NotLinked)?;
        match lane.line() {
            Line::Unlinked => return Err(SendError::NotLinked),
            Line::Down => {
                let (_, no_queue) = self.store.message_settings(instance).await?;
                if no_queue {
                    return Err(SendError::NotQueuedWhileDown);
                }
            }
            Line::Up(_) => {}
        }
        let now = crate::unix_millis();
        let new = NewOutbound {
            zaap_id: zaap_id(now),
            instance_id: instance.to_owned(),
            message_id: message_id(),
            phone: message.phone,
            text: message.text,
            reply_to: message.reply_to,
            edit_of: message.edit_of,
            delay_ms: message.delay.map(|d| d.as_millis() as i64),
            typing_ms: message.typing.as_millis() as i64,
            idempotency: message.idempotency,
            created_at: now,
        };
        match self.store.enqueue_message(&new, MAX_QUEUE).await? {
            Enqueued::New(queued) => {
                lane.wake.notify_one();
                Ok(queued)
            }
            Enqueued::Replayed(earlier) => Ok(earlier),
            Enqueued::KeyReused => Err(SendError::KeyReused),
            Enqueued::Full => Err(SendError::QueueFull),
        }
    }

    /// The client of a connected instance.
    pub fn connected(&self, instance: &str) -> Option<Arc<Client>> {
        match self.lane(instance)?.line() {
            Line::Up(client) => Some(client),
            _ => None,
        }
    }

    /// Every message event from now on, of every instance.
    pub fn notes(&self) -> broadcast::Receiver<Note> {
        self.notes.subscribe()
    }

    /// Tells the event streams and the metrics about a webhook event just committed.
    pub(crate) fn note(&self, told: Told, event: &crate::store::WebhookEvent) {
        if self.notes.receiver_count() == 0 {
            return;
        }
        let name = match told {
            Told::Received => "message",
            _ => "status",
        };
        let _ = self.notes.send(Note {
            instance: event.instance_id.as_str().into(),
            told,
            name,
            body: event.body.as_str().into(),
        });
    }

    /// Wakes an instance's sender (its queue changed).
    pub fn poke(&self, instance: &str) {
        if let Some(lane) = self.lane(instance) {
            lane.wake.notify_one();
        }
    }

    /// Waits for the senders to stop (after the shutdown).
    pub async fn stopped(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Forgets old messages every [`FORGET_EVERY`], until the shutdown.
async fn forget_old(store: Arc<dyn Store>, shutdown: CancellationToken) {
    loop {
        let before = crate::unix_millis() - KEEP_MESSAGES.as_millis() as i64;
        match store.forget_messages(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, "forgot messages older than 7 days"),
            Err(e) => tracing::warn!(error = %e, "could not forget old messages"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FORGET_EVERY) => {}
        }
    }
}

/// A WhatsApp message id as WhatsApp Web makes them: `3EB0` and 18 hex digits.
fn message_id() -> String {
    format!("3EB0{}", &crate::random_hex(9))
}

/// Z-API's id of a queued message: 32 characters, ordered by time.
fn zaap_id(now_ms: i64) -> String {
    format!("{:012X}{}", now_ms, crate::random_hex(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_is_one_value_or_a_range() {
        let fixed: Pacing = "0".parse().unwrap();
        assert_eq!((fixed.min, fixed.max), (Duration::ZERO, Duration::ZERO));
        let range: Pacing = "1000-3000".parse().unwrap();
        assert_eq!(range, Pacing::ZAPI);
        for _ in 0..50 {
            let pause = range.pick();
            assert!(pause >= range.min && pause <= range.max);
        }
        assert!("3000-1000".parse::<Pacing>().is_err());
        assert!("fast".parse::<Pacing>().is_err());
        assert!("61000".parse::<Pacing>().is_err());
    }

    #[test]
    fn ids_look_like_whatsapp_and_zapi_ones() {
        let id = message_id();
        assert!(id.starts_with("3EB0") && id.len() == 22);
        let a = zaap_id(1_700_000_000_000);
        assert_eq!(a.len(), 32);
        assert!(a < zaap_id(1_700_000_000_001));
    }
}
