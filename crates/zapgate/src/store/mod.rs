//! Persistence of the instance registry behind a narrow, domain-shaped trait.
//! SQLite is the default backend; the URL scheme picks the backend.

#[macro_use]
mod rows;

mod conns;
#[cfg(test)]
mod contract;
mod messages;
mod postgres;
mod session_import;
mod session_keys;
mod sessions;
mod sqlite;
/// The throwaway PostgreSQL the integration tests use, for the contract suite.
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
#[allow(unreachable_pub)]
mod test_pg;

use std::sync::Arc;

use async_trait::async_trait;

pub use messages::{
    Enqueued, Inbound, MessageStore, NewOutbound, Outbound, RECEIVED_BACKLOG, Status,
};
pub use postgres::sessions::PgSessions;
pub use postgres::{PgStore, leases};
pub use sessions::{Pairing, SET_ASIDE, SessionStore, SqliteSessions, TO_UNLINK, instance_of};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use sqlite: or postgres:")]
    UnsupportedUrl(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("importing a session file: {0}")]
    Import(String),
    #[error("instance {0} is run by another gateway node")]
    Moved(String),
    #[error("instance {0} has too many webhook events waiting to record more messages")]
    Backlog(String),
}

impl StoreError {
    /// The database was too busy or out of reach for a moment (locked, a conflict with
    /// another transaction, no connection free in time, the connection lost): trying
    /// again later may work, unlike a full disk, a broken file or a refused statement.
    pub fn is_busy(&self) -> bool {
        match self {
            // No connection free in time, or the one in use lost (PostgreSQL restarting,
            // the network between).
            Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => true,
            Self::Database(sqlx::Error::Database(e)) => {
                match e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    // A serialization failure, a deadlock, a lock not available, or
                    // any connection exception (class 08). PostgreSQL's codes are five
                    // characters: some read as numbers, and must not be taken for
                    // SQLite's below (42501, "insufficient privilege", is 5 there).
                    Some(e) => {
                        matches!(e.code(), "40001" | "40P01" | "55P03")
                            || e.code().starts_with("08")
                    }
                    None => e
                        .code()
                        .and_then(|code| code.parse::<i32>().ok())
                        // SQLITE_BUSY and SQLITE_LOCKED, with their extended codes
                        .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
                }
            }
            _ => false,
        }
    }
}

/// An instance as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceRecord {
    pub id: String,
    pub token: String,
    pub name: String,
    pub session_name: Option<String>,
    pub webhooks: Webhooks,
    pub created_at: i64,
    pub due_at: i64,
    pub link: Option<Link>,
    /// Set when a cancel began; the instance is gone for its users from then on.
    pub cancelled_at: Option<i64>,
}

/// An instance's webhook URLs, by Z-API's names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Webhooks {
    pub connected: Option<String>,
    pub disconnected: Option<String>,
    pub received: Option<String>,
    pub received_delivery: Option<String>,
    pub delivery: Option<String>,
    pub message_status: Option<String>,
    pub chat_presence: Option<String>,
    pub notify_sent_by_me: bool,
}

/// One of an instance's webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookKind {
    Connected,
    Disconnected,
    Received,
    ReceivedDelivery,
    Delivery,
    MessageStatus,
    ChatPresence,
}

/// A webhook event to deliver: the instance's URL for its kind is read when it is
/// written, in the same transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEvent {
    pub event_id: String,
    pub instance_id: String,
    pub kind: WebhookKind,
    pub body: String,
    pub created_at: i64,
}

/// An event in the outbox, as the delivery worker and `/webhook-deliveries` see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: i64,
    pub event_id: String,
    pub instance_id: String,
    pub kind: String,
    pub url: String,
    pub body: String,
    pub created_at: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub done_at: Option<i64>,
    pub outcome: Option<String>,
}

/// How one delivery attempt went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Settled: `outcome` is delivered, gone, refused, or expired.
    Done {
        outcome: &'static str,
        status: Option<i64>,
        error: Option<String>,
    },
    /// To try again at `next_attempt_at`.
    Retry {
        status: Option<i64>,
        error: String,
        next_attempt_at: i64,
    },
}

/// The number an instance is linked to while its session is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub phone: String,
    pub linked_at: i64,
    pub platform: Option<String>,
}

/// A link page: its token's SHA-256 (hex), the instance it links, and its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPage {
    pub token_hash: String,
    pub instance_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// When the number linked while the page lived: the page is spent.
    pub used_at: Option<i64>,
    /// Pairing codes asked through the page over its life.
    pub pair_codes: u32,
}

/// How making a link page went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPageMade {
    Made,
    /// The instance has as many live pages as it may.
    TooMany,
    /// The instance's number is linked: a page would link nothing, or another number
    /// once it is disconnected.
    Linked,
}

#[derive(Debug)]
pub struct Page {
    pub items: Vec<InstanceRecord>,
    pub total: u64,
}

#[async_trait]
pub trait Store: MessageStore + Send + Sync + 'static {
    async fn insert_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError>;
    /// Every instance, oldest first, cancelled ones included (start-up finishes them).
    async fn all_instances(&self) -> Result<Vec<InstanceRecord>, StoreError>;
    /// One page (1-based) of the instances not cancelled, oldest first, optionally
    /// filtered by a name or id fragment.
    async fn page_instances(
        &self,
        page: u32,
        page_size: u32,
        query: Option<&str>,
    ) -> Result<Page, StoreError>;
    async fn set_link(&self, id: &str, link: Option<&Link>) -> Result<(), StoreError>;
    /// One instance as stored now (cancelled ones included).
    async fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, StoreError>;
    /// Sets (or with `None` clears) one webhook; false if there is no such instance.
    async fn set_webhook(
        &self,
        id: &str,
        kind: WebhookKind,
        url: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Sets every webhook to one URL, and "notify sent by me" when given.
    async fn set_every_webhook(
        &self,
        id: &str,
        url: Option<&str>,
        notify_sent_by_me: Option<bool>,
    ) -> Result<bool, StoreError>;
    async fn set_notify_sent_by_me(&self, id: &str, notify: bool) -> Result<bool, StoreError>;
    /// Records what the connection webhooks now say for the instance and, in the same
    /// transaction, writes the event if the instance has a URL for its kind (returns
    /// whether it did). Past `cap` pending events for the instance, its oldest are
    /// dropped (outcome `dropped`).
    async fn enqueue_webhook(&self, event: &WebhookEvent, cap: u64) -> Result<bool, StoreError>;
    /// What the connection webhooks last said: connected (true), disconnected (false).
    async fn webhook_announced(&self, instance_id: &str) -> Result<Option<bool>, StoreError>;
    /// A receiver answered 410 for `url`: the instance's webhooks with that URL are
    /// cleared and its events still waiting for it settle as `gone`.
    async fn stop_webhook_url(
        &self,
        instance_id: &str,
        url: &str,
        at: i64,
    ) -> Result<(), StoreError>;
    /// Forgets settled events older than `before`.
    async fn forget_settled_webhooks(&self, before: i64) -> Result<u64, StoreError>;
    /// The oldest pending event of each instance (not in `busy`) that is due at `now`.
    async fn due_webhooks(
        &self,
        now: i64,
        busy: &[String],
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// When the next event at the head of an instance's queue (not in `busy`) is due.
    async fn next_webhook_due(&self, busy: &[String]) -> Result<Option<i64>, StoreError>;
    /// The oldest pending events of one instance, at most `limit`, in order, if the
    /// first is due at `now` (those after it wait for it).
    async fn due_webhooks_of(
        &self,
        instance_id: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Records an attempt at an event; with `ahead` > 0, reads in the same call what
    /// `due_webhooks_of` would then answer for its instance (at most `ahead`, at `at`).
    async fn webhook_attempted(
        &self,
        seq: i64,
        at: i64,
        attempt: &Attempt,
        ahead: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Events waiting, when the oldest of them was written, and how many were dropped.
    async fn outbox_stats(&self) -> Result<(u64, Option<i64>, u64), StoreError>;
    /// The instance's last `limit` events, newest first.
    async fn recent_webhooks(
        &self,
        instance_id: &str,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Makes a pending event of the instance due now; false if there is none such.
    async fn retry_webhook_now(
        &self,
        instance_id: &str,
        event_id: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// The first step of a cancel: from now on the instance is not listed.
    async fn mark_cancelled(&self, id: &str, at: i64) -> Result<(), StoreError>;
    /// The last step of a cancel, once the session is unlinked and deleted.
    async fn delete_instance(&self, id: &str) -> Result<(), StoreError>;
    /// Records a link page unless the instance already has `max_live` live ones or its
    /// number is linked (checked in the same statement, so a link recorded at the same
    /// moment either comes first or spends the page), and forgets its pages that
    /// expired or were revoked before `forget_before`.
    async fn insert_link_page(
        &self,
        page: &LinkPage,
        forget_before: i64,
        max_live: u64,
    ) -> Result<LinkPageMade, StoreError>;
    async fn link_page(&self, token_hash: &str) -> Result<Option<LinkPage>, StoreError>;
    /// Records that the page was given `pair_codes` pairing codes so far (a count never
    /// goes down).
    async fn count_link_page_codes(
        &self,
        token_hash: &str,
        pair_codes: u32,
    ) -> Result<(), StoreError>;
    /// Revokes every live link page of the instance (not expired, revoked or used);
    /// returns how many.
    async fn revoke_link_pages(&self, instance_id: &str, at: i64) -> Result<u64, StoreError>;
    /// Opens an admin panel session, kept under `key` until `expires_at`, and forgets
    /// those expired at `now`; while `max_open` are open, the one closest to expiry
    /// makes room.
    async fn open_panel_session(
        &self,
        key: &str,
        csrf: &str,
        expires_at: i64,
        now: i64,
        max_open: u64,
    ) -> Result<(), StoreError>;
    /// The CSRF token of the panel session kept under `key`, if it is open at `now`.
    async fn panel_session(&self, key: &str, now: i64) -> Result<Option<String>, StoreError>;
    async fn close_panel_session(&self, key: &str) -> Result<(), StoreError>;
    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Whether a database URL names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

/// Opens the store a database URL names.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if is_postgres(url) {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(
            url.split(':').next().unwrap_or_default().to_owned(),
        ))
    }
}
