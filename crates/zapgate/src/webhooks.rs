//! Delivering webhook events from the outbox: each instance's events in order, many
//! instances at once, so one dead receiver never delays another instance. A 2xx ends an
//! event, a 410 stops it, anything else is tried again with exponential backoff and
//! jitter until the event is older than the retry window. Nothing is lost to a crash:
//! an event leaves the outbox only once settled.
//!
//! Requests carry `X-Zapgate-Event-Id` (stable: the receiver deduplicates with it),
//! `X-Zapgate-Timestamp` and, with a secret, `X-Zapgate-Signature: sha256=<hex HMAC
//! of "timestamp.body">`. Unless private addresses are allowed, loopback, private,
//! link-local, metadata and every other non-public address is refused, checked on the
//! address actually connected to: a URL whose host is one, or a name that resolves only
//! to such, is refused for good at the first attempt (a name that does not resolve is
//! tried again). Redirects are not followed; response bodies are not read.

mod addresses;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Secret;
use crate::store::{Attempt, OutboxEntry, Store};

/// Deliveries in flight at once, across instances.
const CONCURRENCY: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry waits about this long, each next one twice as long, up to the cap.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(3600);
/// With nothing due, the outbox is looked at again after this (events also wake it).
const IDLE_LOOK: Duration = Duration::from_secs(5);
/// Settled events are kept this long (the deliveries list shows them), then forgotten.
const KEEP_SETTLED: Duration = Duration::from_secs(7 * 24 * 3600);
/// An instance whose delivery could not be recorded waits this long before the next.
const RECORD_BACKOFF: Duration = Duration::from_secs(5);
/// Events of one instance delivered one after the other before its slot is given up
/// for others to take.
const RUN: usize = 64;
/// Events of one instance read at once while it has a delivery slot.
const READ_AHEAD: u32 = 16;
/// The outbox is looked over at most this often: under load, the deliveries in flight
/// carry on with their instances' next events, and a look finds only idle ones.
const LOOK_GAP: Duration = Duration::from_millis(5);

pub struct DelivererConfig {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub allow_private: bool,
    pub secret: Option<Secret>,
    /// Events are retried until they are this old.
    pub retry_for: Duration,
}

/// Starts the delivery worker on `tracker`; it stops at `shutdown`.
pub fn start(
    store: Arc<dyn Store>,
    config: DelivererConfig,
    due: Arc<Notify>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve names itself, past the check of addresses.
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RESPONSE_TIMEOUT)
        .dns_resolver(Arc::new(addresses::Resolver {
            allow_private: config.allow_private,
        }))
        .user_agent(concat!("zapgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client builds");
    let worker = Worker {
        store,
        client,
        config: Arc::new(config),
        due,
        busy: Arc::new(Mutex::new(HashSet::new())),
        slots: Arc::new(Semaphore::new(CONCURRENCY)),
        tracker: tracker.clone(),
    };
    tracker.spawn(worker.run(shutdown));
}

struct Worker {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    config: Arc<DelivererConfig>,
    due: Arc<Notify>,
    /// Instances with a delivery in flight: their next event waits for it.
    busy: Arc<Mutex<HashSet<String>>>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Worker {
    async fn run(self, shutdown: CancellationToken) {
        let mut forget_at = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= forget_at {
                forget_at += Duration::from_secs(600);
                let before = crate::unix_millis() - KEEP_SETTLED.as_millis() as i64;
                if let Err(e) = self.store.forget_settled_webhooks(before).await {
                    tracing::warn!(error = %e, "could not forget old webhook deliveries");
                }
            }
            let wait = match self.dispatch().await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::error!(error = %e, "could not read the webhook outbox; trying again");
                    IDLE_LOOK
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.due.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LOOK_GAP) => {}
            }
        }
    }

    /// Starts every due delivery there is room for; returns how long to wait before
    /// looking again (a finished delivery wakes it sooner).
    async fn dispatch(&self) -> Result<Duration, crate::store::StoreError> {
        let now = crate::unix_millis();
        let busy: Vec<String> = self.busy().iter().cloned().collect();
        let room = self.slots.available_permits() as u32;
        if room == 0 {
            return Ok(IDLE_LOOK);
        }
        let mut dispatched = false;
        for entry in self.store.due_webhooks(now, &busy, room).await? {
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            self.busy().insert(entry.instance_id.clone());
            let guard = Busy {
                instance: entry.instance_id.clone(),
                busy: self.busy.clone(),
                due: self.due.clone(),
            };
            let (store, client, config) =
                (self.store.clone(), self.client.clone(), self.config.clone());
            self.tracker.spawn(async move {
                // The instance's next events, read ahead (in order).
                let mut next = std::collections::VecDeque::from([entry]);
                for _ in 0..RUN {
                    let Some(entry) = next.pop_front() else {
                        break;
                    };
                    // The last event read: its record reads the next ones, in the same
                    // call. Nothing due (a dispatch finds it when it is): the slot goes
                    // back.
                    let ahead = if next.is_empty() { READ_AHEAD } else { 0 };
                    match deliver(&*store, &client, &config, entry, ahead).await {
                        (Delivered::Yes, more) => next.extend(more),
                        // What was read ahead may have changed (a URL stopped by a 410);
                        // the dispatch reads it again.
                        (Delivered::No, _) => next.clear(),
                        (Delivered::Unrecorded, _) => {
                            // It is due again at once: wait before retrying.
                            tokio::time::sleep(RECORD_BACKOFF).await;
                            break;
                        }
                    }
                }
                drop(slot);
                drop(guard);
            });
            dispatched = true;
        }
        if dispatched {
            // Each delivery wakes the worker when it ends.
            return Ok(IDLE_LOOK);
        }
        let busy: Vec<String> = self.busy().iter().cloned().collect();
        let next = self.store.next_webhook_due(&busy).await?;
        Ok(next.map_or(IDLE_LOOK, |at| {
            Duration::from_millis(at.saturating_sub(crate::unix_millis()).max(0) as u64)
                .min(IDLE_LOOK)
        }))
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An instance with a delivery in flight; released however the delivery ends.
struct Busy {
    instance: String,
    busy: Arc<Mutex<HashSet<String>>>,
    due: Arc<Notify>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.instance);
        self.due.notify_one();
    }
}

/// What became of one attempt.
#[derive(PartialEq)]
enum Delivered {
    /// The receiver took it, and that is recorded.
    Yes,
    /// Anything else (to be tried again, refused, gone, expired), recorded.
    No,
    /// Its outcome could not be written: the event stays pending, to be delivered
    /// again (at least once).
    Unrecorded,
}

/// One attempt at one event, and its outcome written back; with `ahead` > 0, the
/// instance's next due events, read with the record.
async fn deliver(
    store: &dyn Store,
    client: &reqwest::Client,
    config: &DelivererConfig,
    entry: OutboxEntry,
    ahead: u32,
) -> (Delivered, Vec<OutboxEntry>) {
    let timestamp = crate::unix_millis() / 1000;
    let mut request = client
        .post(&entry.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Zapgate-Event-Id", &entry.event_id)
        .header("X-Zapgate-Timestamp", timestamp.to_string());
    if let Some(secret) = &config.secret {
        let signature = sign(secret.expose().as_bytes(), timestamp, &entry.body);
        request = request.header("X-Zapgate-Signature", format!("sha256={signature}"));
    }
    let started = std::time::Instant::now();
    let result = match addresses::check_literal_host(&entry.url, config.allow_private) {
        Err(why) => Err(Failure::Refused(why)),
        Ok(()) => request
            .body(entry.body.clone())
            .send()
            .await
            .map_err(|e| Failure::of(&e)),
    };
    let now = crate::unix_millis();
    let attempt = match result {
        // An address that is refused stays refused: not tried again.
        Err(Failure::Refused(why)) => Attempt::Done {
            outcome: "refused",
            status: None,
            error: Some(why),
        },
        Ok(response) if response.status().is_success() => Attempt::Done {
            outcome: "delivered",
            status: Some(i64::from(response.status().as_u16())),
            error: None,
        },
        Ok(response) if response.status() == reqwest::StatusCode::GONE => Attempt::Done {
            outcome: "gone",
            status: Some(410),
            error: Some("the receiver answered 410 Gone: not tried again".into()),
        },
        Ok(response) => retry(
            config,
            &entry,
            now,
            Some(i64::from(response.status().as_u16())),
            format!("the receiver answered {}", response.status()),
        ),
        Err(Failure::Failed(why)) => retry(config, &entry, now, None, why),
    };
    let result = match &attempt {
        Attempt::Done { outcome, .. } => *outcome,
        Attempt::Retry { .. } => "retry",
    };
    // Deliveries that went through are many and uneventful; the rest are worth a line.
    macro_rules! log {
        ($level:ident) => {
            tracing::$level!(
                instance.id = %entry.instance_id,
                event.id = %entry.event_id,
                kind = %entry.kind,
                attempt = entry.attempts + 1,
                took_ms = started.elapsed().as_millis() as u64,
                outcome = ?attempt,
                "webhook delivery"
            )
        };
    }
    match result {
        "delivered" => log!(debug),
        _ => log!(info),
    }
    config
        .metrics
        .webhook_deliveries
        .get_or_create(&crate::metrics::ResultLabel {
            result: result.to_owned(),
        })
        .inc();
    let more = match store
        .webhook_attempted(entry.seq, now, &attempt, ahead)
        .await
    {
        Ok(more) => more,
        Err(e) => {
            // The event stays pending: delivered again later, at least once.
            tracing::error!(event.id = %entry.event_id, error = %e, "could not record a webhook delivery");
            return (Delivered::Unrecorded, Vec::new());
        }
    };
    if matches!(
        attempt,
        Attempt::Done {
            outcome: "gone",
            ..
        }
    ) {
        if let Err(e) = store
            .stop_webhook_url(&entry.instance_id, &entry.url, now)
            .await
        {
            tracing::error!(instance.id = %entry.instance_id, error = %e, "could not stop a webhook URL that answered 410");
        }
    }
    match result {
        "delivered" => (Delivered::Yes, more),
        _ => (Delivered::No, Vec::new()),
    }
}

/// The next try, with exponential backoff and jitter, or the end of the window.
fn retry(
    config: &DelivererConfig,
    entry: &OutboxEntry,
    now: i64,
    status: Option<i64>,
    error: String,
) -> Attempt {
    let exponent = entry.attempts.clamp(0, 20) as u32;
    let wait = FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(MAX_RETRY_WAIT);
    // Between half and the whole wait, so receivers coming back are not stampeded.
    let wait_ms = wait.as_millis() as i64;
    let jittered = wait_ms / 2 + (rand::random::<u64>() % (wait_ms as u64 / 2 + 1)) as i64;
    let next_attempt_at = now + jittered;
    if next_attempt_at > entry.created_at + config.retry_for.as_millis() as i64 {
        return Attempt::Done {
            outcome: "expired",
            status,
            error: Some(format!("{error}; not delivered within the retry window")),
        };
    }
    Attempt::Retry {
        status,
        error,
        next_attempt_at,
    }
}

/// Why a request got no answer: refused for good, or failed for now.
enum Failure {
    Refused(String),
    Failed(String),
}

impl Failure {
    fn of(error: &reqwest::Error) -> Self {
        match addresses::OnlyPrivate::cause_of(error) {
            Some(refused) => Failure::Refused(refused.to_string()),
            None => Failure::Failed(describe(error)),
        }
    }
}

fn describe(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// HMAC-SHA256 of `timestamp.body`, in hex.
pub fn sign(secret: &[u8], timestamp: i64, body: &str) -> String {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let body = "ya want for nothing?";
        let mac = {
            use hmac::{KeyInit as _, Mac as _};
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
            m.update(b"what do ya want for nothing?");
            m.finalize().into_bytes()
        };
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Ours signs "timestamp.body": HMAC-SHA256("Jefe", "7.x"), computed elsewhere.
        let _ = body;
        assert_eq!(
            sign(b"Jefe", 7, "x"),
            "90855e9032d6166b9ee389b66d32d3423879e259ee44a45208c6599dd22283b2"
        );
    }
}
