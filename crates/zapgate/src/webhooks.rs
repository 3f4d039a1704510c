//! Delivering webhook events from the outbox: each instance's events in order, many
//! instances at once, so one dead receiver never delays another instance. A 2xx ends an
//! event, a 410 stops it, anything else is tried again with exponential backoff and
//! jitter until the event is older than the retry window. Nothing is lost to a crash:
//! an event leaves the outbox only once settled.
//!
//! Requests carry `X-Zapgate-Event-Id` (stable: the receiver deduplicates with it),
//! `X-Zapgate-Timestamp` and, with a secret, `X-Zapgate-Signature: sha256=<hex HMAC
//! of "timestamp.body">`. Unless private addresses are allowed, a URL whose host
//! resolves to a loopback, private, link-local or metadata address is refused, checked
//! on the address actually connected to. Redirects are not followed; response bodies
//! are not read.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
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
        .dns_resolver(Arc::new(Resolver {
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
                if !deliver(&*store, &client, &config, entry).await {
                    // Not recorded: it is due again at once, so wait before retrying.
                    tokio::time::sleep(RECORD_BACKOFF).await;
                }
                drop(slot);
                drop(guard);
            });
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

/// One attempt at one event, and its outcome written back; false if it could not be
/// written (the event stays pending, to be delivered again: at least once).
async fn deliver(
    store: &dyn Store,
    client: &reqwest::Client,
    config: &DelivererConfig,
    entry: OutboxEntry,
) -> bool {
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
    let refused = check_literal_host(&entry.url, config.allow_private).err();
    let result = match &refused {
        Some(why) => Err(why.clone()),
        None => request
            .body(entry.body.clone())
            .send()
            .await
            .map_err(|e| describe(&e)),
    };
    let now = crate::unix_millis();
    let attempt = match result {
        // An address that is refused stays refused: not tried again.
        Err(why) if refused.is_some() => Attempt::Done {
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
        Err(why) => retry(config, &entry, now, None, why),
    };
    tracing::info!(
        instance.id = %entry.instance_id,
        event.id = %entry.event_id,
        kind = %entry.kind,
        attempt = entry.attempts + 1,
        took_ms = started.elapsed().as_millis() as u64,
        outcome = ?attempt,
        "webhook delivery"
    );
    let result = match &attempt {
        Attempt::Done { outcome, .. } => *outcome,
        Attempt::Retry { .. } => "retry",
    };
    config
        .metrics
        .webhook_deliveries
        .get_or_create(&crate::metrics::ResultLabel {
            result: result.to_owned(),
        })
        .inc();
    if let Err(e) = store.webhook_attempted(entry.seq, now, &attempt).await {
        // The event stays pending: delivered again later, at least once.
        tracing::error!(event.id = %entry.event_id, error = %e, "could not record a webhook delivery");
        return false;
    }
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
    true
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

/// Addresses no webhook may reach without `--webhook-allow-private`: loopback,
/// private, link-local (cloud metadata among them), unspecified, shared and
/// unique-local ranges.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || a == 0
                || a >= 224 // multicast and reserved
                || (a == 100 && (64..128).contains(&b)) // shared address space
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || (a == 192 && b == 0 && c == 0) // protocol assignments
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let v4 = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            // An IPv4 address carried inside: mapped, compatible, NAT64, 6to4.
            let embedded = if let Some(mapped) = v6.to_ipv4_mapped() {
                Some(mapped)
            } else if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                Some(v4(s[6], s[7]))
            } else if s[0] == 0x2002 {
                Some(v4(s[1], s[2]))
            } else {
                None
            };
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xff00) == 0xff00
                || embedded.is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// A URL whose host is an address (no name to resolve) is checked here.
fn check_literal_host(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    // Parsed as the HTTP client parses it: `2130706433` and `127.1` are addresses too.
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
    match host.and_then(|h| h.parse::<IpAddr>().ok()) {
        Some(ip) if is_private(ip) => Err(format!(
            "refused: {ip} is a private address (--webhook-allow-private allows it)"
        )),
        _ => Ok(()),
    }
}

/// Resolves names as the system does, then keeps only the addresses webhooks may
/// reach: the check is on what is actually connected to.
struct Resolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || !is_private(a.ip()))
                .collect();
            if allowed.is_empty() {
                let why = format!(
                    "refused: {host} resolves only to private addresses ({}); --webhook-allow-private allows them",
                    found
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Err(why.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
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

    #[test]
    fn private_and_metadata_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "198.18.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
        assert!(check_literal_host("https://127.0.0.1/x", false).is_err());
        assert!(check_literal_host("https://[::1]/x", false).is_err());
        assert!(check_literal_host("https://127.0.0.1/x", true).is_ok());
        for numeric in [
            "https://2130706433/x",
            "https://127.1/x",
            "https://0x7f.0.0.1/x",
        ] {
            assert!(check_literal_host(numeric, false).is_err(), "{numeric}");
        }
        assert!(check_literal_host("https://hooks.example.com/x", false).is_ok());
    }
}
