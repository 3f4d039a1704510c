//! Metrics an operator can alert on, in Prometheus' text format at `GET /metrics`
//! (admin token). Counters of what instances do are read off the instances' event bus,
//! the one place their tasks publish from; gauges are read at scrape time.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::api::events_state_name;
use crate::instance::{EventKind, Manager, State};
use crate::messaging::zapi::status_name;
use crate::messaging::{Hub, Told};
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabel {
    pub route: String,
    pub method: String,
}

pub struct Metrics {
    registry: Registry,
    instances: Family<StateLabel, Gauge>,
    linking_windows: Gauge,
    qr_codes: Counter,
    pairing_codes: Counter,
    logins: Counter,
    reconnects: Counter,
    events_missed: Counter,
    connection_errors: Family<CauseLabel, Counter>,
    pub webhook_deliveries: Family<ResultLabel, Counter>,
    outbox_depth: Gauge,
    outbox_oldest_seconds: Gauge,
    outbox_dropped: Gauge,
    pub http_requests: Family<RouteLabel, Counter>,
    pub http_seconds: Family<LatencyLabel, Histogram>,
    messages_received: Counter,
    messages_sent: Counter,
    messages_not_sent: Counter,
    message_statuses: Family<StatusLabel, Counter>,
    message_send_seconds: Histogram,
    message_queue_depth: Gauge,
    message_queue_oldest_seconds: Gauge,
    leases_held: Gauge,
    lease_renewal_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    lease_renewal_max_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    lease_renewal_failures: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zapgate");
        let metrics = Self {
            instances: Family::default(),
            linking_windows: Gauge::default(),
            qr_codes: Counter::default(),
            pairing_codes: Counter::default(),
            logins: Counter::default(),
            reconnects: Counter::default(),
            events_missed: Counter::default(),
            connection_errors: Family::default(),
            webhook_deliveries: Family::default(),
            outbox_depth: Gauge::default(),
            outbox_oldest_seconds: Gauge::default(),
            outbox_dropped: Gauge::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0])
            }),
            messages_received: Counter::default(),
            messages_sent: Counter::default(),
            messages_not_sent: Counter::default(),
            message_statuses: Family::default(),
            message_send_seconds: Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0, 3600.0,
            ]),
            message_queue_depth: Gauge::default(),
            message_queue_oldest_seconds: Gauge::default(),
            leases_held: Gauge::default(),
            lease_renewal_seconds: Gauge::default(),
            lease_renewal_max_seconds: Gauge::default(),
            lease_renewal_failures: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("instances", "Instances by state", metrics.instances.clone());
        registry.register(
            "linking_windows_open",
            "Linking windows open (instances showing codes)",
            metrics.linking_windows.clone(),
        );
        registry.register(
            "qr_codes",
            "QR codes WhatsApp issued",
            metrics.qr_codes.clone(),
        );
        registry.register(
            "pairing_codes",
            "Pairing codes WhatsApp issued",
            metrics.pairing_codes.clone(),
        );
        registry.register("logins", "Numbers that connected", metrics.logins.clone());
        registry.register(
            "reconnects",
            "Numbers that connected again after being down",
            metrics.reconnects.clone(),
        );
        registry.register(
            "events_missed",
            "Instance events the metrics fell behind on",
            metrics.events_missed.clone(),
        );
        registry.register(
            "whatsapp_connection_errors",
            "Clients that could not reach WhatsApp (or open their session), by cause",
            metrics.connection_errors.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by result",
            metrics.webhook_deliveries.clone(),
        );
        registry.register(
            "webhook_outbox_depth",
            "Webhook events waiting to be delivered",
            metrics.outbox_depth.clone(),
        );
        registry.register(
            "webhook_outbox_oldest_seconds",
            "Age of the oldest webhook event waiting",
            metrics.outbox_oldest_seconds.clone(),
        );
        registry.register(
            "webhook_events_dropped",
            "Webhook events dropped because their instance had too many waiting",
            metrics.outbox_dropped.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by matched route, method and status",
            metrics.http_requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "HTTP request latency by matched route and method",
            metrics.http_seconds.clone(),
        );
        registry.register(
            "messages_received",
            "Messages received (each announced by a ReceivedCallback)",
            metrics.messages_received.clone(),
        );
        registry.register(
            "messages_sent",
            "Messages WhatsApp took (their DeliveryCallback)",
            metrics.messages_sent.clone(),
        );
        registry.register(
            "messages_not_sent",
            "Messages given up (a DeliveryCallback with an error)",
            metrics.messages_not_sent.clone(),
        );
        registry.register(
            "message_statuses",
            "Status changes of messages sent (MessageStatusCallback), by status",
            metrics.message_statuses.clone(),
        );
        registry.register(
            "message_send_seconds",
            "Time from a send call to WhatsApp's ack, pauses and queueing included",
            metrics.message_send_seconds.clone(),
        );
        registry.register(
            "message_queue_depth",
            "Messages waiting to be sent (or on their way)",
            metrics.message_queue_depth.clone(),
        );
        registry.register(
            "message_queue_oldest_seconds",
            "Age of the oldest message waiting to be sent",
            metrics.message_queue_oldest_seconds.clone(),
        );
        registry.register(
            "leases_held",
            "On a shared PostgreSQL: the instances this node holds a lease on",
            metrics.leases_held.clone(),
        );
        registry.register(
            "lease_renewal_seconds",
            "On a shared PostgreSQL: the round trip of this node's last lease renewal",
            metrics.lease_renewal_seconds.clone(),
        );
        registry.register(
            "lease_renewal_max_seconds",
            "On a shared PostgreSQL: the longest renewal round trip since the node joined (it fences itself at 60% of the lease)",
            metrics.lease_renewal_max_seconds.clone(),
        );
        registry.register(
            "lease_renewal_failures",
            "On a shared PostgreSQL: renewals of this node's lease that failed since it joined",
            metrics.lease_renewal_failures.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition, with the gauges read now.
    pub async fn render(&self, manager: &Manager, store: &dyn Store) -> String {
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for snapshot in manager.snapshots() {
            *counts.entry(events_state_name(snapshot.state)).or_default() += 1;
        }
        for state in [
            State::NoSession,
            State::Linking,
            State::Connected,
            State::Reconnecting,
            State::Stopped,
            State::SessionMissing,
            State::Unlinking,
        ] {
            let name = events_state_name(state);
            self.instances
                .get_or_create(&StateLabel {
                    state: name.to_owned(),
                })
                .set(counts.get(name).copied().unwrap_or(0));
        }
        self.linking_windows
            .set(counts.get("linking").copied().unwrap_or(0));
        if let Ok((depth, oldest, dropped)) = store.outbox_stats().await {
            self.outbox_depth.set(depth as i64);
            self.outbox_dropped.set(dropped as i64);
            self.outbox_oldest_seconds.set(age_secs(oldest));
        }
        if let Ok((depth, oldest)) = store.queue_stats().await {
            self.message_queue_depth.set(depth as i64);
            self.message_queue_oldest_seconds.set(age_secs(oldest));
        }
        if let Some(leases) = manager.leases() {
            let renewals = leases.renewals();
            self.leases_held.set(leases.held().len() as i64);
            self.lease_renewal_seconds.set(renewals.last.as_secs_f64());
            self.lease_renewal_max_seconds
                .set(renewals.longest.as_secs_f64());
            self.lease_renewal_failures.set(renewals.failed as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a string");
        text
    }

    /// Counts the messages sent and received, off messaging's events, until `shutdown`.
    pub fn follow_messages(self: &Arc<Self>, hub: &Hub, shutdown: CancellationToken) {
        let mut notes = hub.notes();
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                let note = tokio::select! {
                    () = shutdown.cancelled() => return,
                    note = notes.recv() => note,
                };
                match note {
                    Ok(note) => match note.told {
                        Told::Received => metrics.messages_received.inc(),
                        Told::Sent { waited_ms } => {
                            metrics
                                .message_send_seconds
                                .observe(waited_ms.max(0) as f64 / 1000.0);
                            metrics.messages_sent.inc()
                        }
                        Told::NotSent => metrics.messages_not_sent.inc(),
                        Told::Status(status) => metrics
                            .message_statuses
                            .get_or_create(&StatusLabel {
                                status: status_name(status).to_owned(),
                            })
                            .inc(),
                    },
                    Err(RecvError::Lagged(n)) => {
                        metrics.events_missed.inc_by(n);
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
            }
        });
    }

    /// Counts what the instances do, off their event bus, until `shutdown`.
    pub fn follow(self: &Arc<Self>, manager: &Manager, shutdown: CancellationToken) {
        let mut events = manager.events();
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut states: HashMap<Arc<str>, State> = HashMap::new();
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = events.recv() => event,
                };
                match event {
                    Ok(event) => match &event.kind {
                        EventKind::Qr(_) => {
                            metrics.qr_codes.inc();
                        }
                        EventKind::PairCode(_) => {
                            metrics.pairing_codes.inc();
                        }
                        EventKind::ConnectionError(cause) => {
                            metrics
                                .connection_errors
                                .get_or_create(&CauseLabel {
                                    cause: cause.kind().to_owned(),
                                })
                                .inc();
                        }
                        EventKind::State { state, .. } => {
                            let before = states.insert(event.instance.clone(), *state);
                            if *state == State::Connected && before != Some(State::Connected) {
                                metrics.logins.inc();
                                if matches!(
                                    before,
                                    Some(
                                        State::Reconnecting
                                            | State::Stopped
                                            | State::SessionMissing
                                    )
                                ) {
                                    metrics.reconnects.inc();
                                }
                            }
                        }
                    },
                    Err(RecvError::Lagged(n)) => {
                        metrics.events_missed.inc_by(n);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }
}

/// Seconds since `at` (unix ms); 0 for nothing.
fn age_secs(at: Option<i64>) -> i64 {
    at.map_or(0, |at| (crate::unix_millis() - at).max(0) / 1000)
}
