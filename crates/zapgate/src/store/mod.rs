//! Persistence of the instance registry behind a narrow, domain-shaped trait.
//! SQLite is the default backend; the URL scheme picks the backend.

mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: only sqlite: is supported")]
    UnsupportedUrl(String),
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
}

#[derive(Debug)]
pub struct Page {
    pub items: Vec<InstanceRecord>,
    pub total: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
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
    /// The first step of a cancel: from now on the instance is not listed.
    async fn mark_cancelled(&self, id: &str, at: i64) -> Result<(), StoreError>;
    /// The last step of a cancel, once the session is unlinked and deleted.
    async fn delete_instance(&self, id: &str) -> Result<(), StoreError>;
    /// Records a link page unless the instance already has `max_live` live ones (then
    /// returns false), and forgets its pages that expired or were revoked before
    /// `forget_before`.
    async fn insert_link_page(
        &self,
        page: &LinkPage,
        forget_before: i64,
        max_live: u64,
    ) -> Result<bool, StoreError>;
    async fn link_page(&self, token_hash: &str) -> Result<Option<LinkPage>, StoreError>;
    /// Revokes every live link page of the instance (not expired, revoked or used);
    /// returns how many.
    async fn revoke_link_pages(&self, instance_id: &str, at: i64) -> Result<u64, StoreError>;
    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the store a database URL names.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(
            url.split(':').next().unwrap_or_default().to_owned(),
        ))
    }
}
