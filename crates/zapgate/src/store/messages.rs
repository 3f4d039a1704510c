//! Messages: each instance's queue of messages to send and what became of them, the
//! messages received, and the webhook events of both, written in the same transaction
//! as the change they announce.

use async_trait::async_trait;
use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Row, Sqlite, Transaction};

use super::conns::Conns;
use super::sqlite::relax;
use super::{SqliteStore, StoreError, WebhookEvent, WebhookKind};

/// A message to send, as the API accepted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutbound {
    pub zaap_id: String,
    pub instance_id: String,
    /// The WhatsApp id, minted now and used for every attempt.
    pub message_id: String,
    pub phone: String,
    pub text: String,
    pub reply_to: Option<String>,
    pub edit_of: Option<String>,
    pub delay_ms: Option<i64>,
    pub typing_ms: i64,
    /// The caller's `Idempotency-Key` and the SHA-256 of its request.
    pub idempotency: Option<(String, String)>,
    pub created_at: i64,
}

/// A message of an instance's queue, or sent from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub seq: i64,
    pub zaap_id: String,
    pub instance_id: String,
    pub message_id: String,
    pub phone: String,
    pub text: String,
    pub reply_to: Option<String>,
    pub edit_of: Option<String>,
    pub delay_ms: Option<i64>,
    pub typing_ms: i64,
    pub state: String,
    pub attempts: i64,
    pub error: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

/// How a message was taken into the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enqueued {
    New(Outbound),
    /// The same request came again with its idempotency key: the message it made.
    Replayed(Outbound),
    /// The key was used for another request.
    KeyReused,
    /// The instance has as many messages waiting as it may.
    Full,
}

/// Where a message's status stands, in the order statuses may only go forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Sent,
    Received,
    Read,
    Played,
}

impl Status {
    pub fn state(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Received => "received",
            Status::Read => "read",
            Status::Played => "played",
        }
    }

    /// The column that keeps when a message reached this status.
    pub(super) fn column(self) -> &'static str {
        match self {
            Status::Sent => "sent_at",
            Status::Received => "delivered_at",
            Status::Read | Status::Played => "read_at",
        }
    }

    /// The states a message may be in for this status to move it forward.
    pub(super) fn before(self) -> &'static [&'static str] {
        match self {
            Status::Sent => &["queued", "sending"],
            Status::Received => &["sending", "sent"],
            Status::Read => &["sending", "sent", "received"],
            Status::Played => &["sending", "sent", "received", "read"],
        }
    }
}

/// A message received, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    pub instance_id: String,
    pub chat: String,
    pub sender: String,
    pub message_id: String,
    /// Not decrypted yet: WhatsApp was asked to send it again.
    pub waiting: bool,
    pub text: Option<String>,
    pub from_me: bool,
    pub sent_at: i64,
    /// Its ReceivedCallback, if the instance has a URL for it.
    pub event: Option<WebhookEvent>,
}

/// Pending webhook events of one instance past which a received message is not
/// recorded (WhatsApp keeps it and sends it again later) rather than another event
/// being dropped.
pub const RECEIVED_BACKLOG: i64 = 100_000;
/// Pending status events (delivery and status callbacks) kept per instance; past it the
/// oldest of them are dropped, counted as `dropped`. The trigger of migration 0010
/// holds it, looking every [`STATUS_BOUND_EVERY`] events.
#[cfg(test)]
pub(super) const STATUS_BACKLOG: i64 = 20_000;
#[cfg(test)]
pub(super) const STATUS_BOUND_EVERY: i64 = 100;

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Messages waiting to be sent (or on their way), all instances, and when the
    /// oldest was queued.
    async fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError>;
    /// What an idempotency key of the instance already made, if anything: the
    /// message (its request's `hash` is the same) or `KeyReused`.
    async fn replayed(
        &self,
        instance_id: &str,
        key: &str,
        hash: &str,
    ) -> Result<Option<Enqueued>, StoreError>;
    /// Queues a message unless `max_pending` are already waiting; a known idempotency
    /// key gives back the message it made.
    async fn enqueue_message(
        &self,
        message: &NewOutbound,
        max_pending: i64,
    ) -> Result<Enqueued, StoreError>;
    /// The first `limit` messages of the instance's queue, in order.
    async fn queue_front(&self, instance_id: &str, limit: u32)
    -> Result<Vec<Outbound>, StoreError>;
    /// The first message of the instance's queue.
    async fn queue_head(&self, instance_id: &str) -> Result<Option<Outbound>, StoreError> {
        Ok(self.queue_front(instance_id, 1).await?.into_iter().next())
    }
    /// Instances with messages waiting.
    async fn instances_with_queue(&self) -> Result<Vec<String>, StoreError>;
    /// One page (1-based) of the instance's queue, and how many wait in all.
    async fn queue_page(
        &self,
        instance_id: &str,
        page: u32,
        page_size: u32,
    ) -> Result<(Vec<Outbound>, u64), StoreError>;
    /// Removes queued messages not yet on their way (one, or all); how many.
    async fn delete_queued(
        &self,
        instance_id: &str,
        zaap_id: Option<&str>,
    ) -> Result<u64, StoreError>;
    /// The message is going on the wire: its attempts count one more. False when it
    /// is no longer waiting (deleted from the queue, or settled).
    async fn message_sending(&self, message: &Outbound) -> Result<bool, StoreError>;
    /// WhatsApp took the message (its ack), with its DeliveryCallback and, unless a
    /// receipt already moved it further, its status event, in the same transaction.
    /// How many of the two it wrote: 0 (it was settled already), 1 or 2.
    async fn message_sent(
        &self,
        seq: i64,
        at: i64,
        delivery: &WebhookEvent,
        status: &WebhookEvent,
    ) -> Result<usize, StoreError>;
    /// The message will never be sent: why, and its events. False when it was no
    /// longer waiting (nothing written).
    async fn message_failed(
        &self,
        seq: i64,
        error: &str,
        events: &[WebhookEvent],
    ) -> Result<bool, StoreError>;
    /// A receipt for the instance's messages `ids`: moves those it advances to
    /// `status` and writes, in the same transaction, the events `event` makes of the
    /// ids it moved and their phone (a SENT first for those the receipt found still
    /// waiting for WhatsApp's ack). Returns the events, with the status each tells.
    async fn message_status(
        &self,
        instance_id: &str,
        ids: &[String],
        status: Status,
        at: i64,
        event: &(dyn for<'x> Fn(Status, &'x [String], &'x str) -> WebhookEvent + Sync),
    ) -> Result<Vec<(Status, WebhookEvent)>, StoreError>;
    /// A message of ours, by its WhatsApp id.
    async fn outbound_by_id(
        &self,
        instance_id: &str,
        message_id: &str,
    ) -> Result<Option<Outbound>, StoreError>;
    /// Records received messages and their events, all or nothing; a message already
    /// recorded is skipped with its event. Returns whether each was new.
    async fn record_inbound(&self, messages: &[Inbound]) -> Result<Vec<bool>, StoreError>;
    /// The text of a message received, by its WhatsApp id (for quoting it).
    async fn inbound_text(
        &self,
        instance_id: &str,
        message_id: &str,
    ) -> Result<Option<(String, String)>, StoreError>;
    /// Forgets messages settled (sent or failed) and received before `before`; how many.
    async fn forget_messages(&self, before: i64) -> Result<u64, StoreError>;
    /// `(auto_read_message, disable_enqueue_when_disconnected)`.
    async fn message_settings(&self, instance_id: &str) -> Result<(bool, bool), StoreError>;
    async fn set_auto_read(&self, instance_id: &str, on: bool) -> Result<bool, StoreError>;
    async fn set_enqueue_when_disconnected(
        &self,
        instance_id: &str,
        disabled: bool,
    ) -> Result<bool, StoreError>;
}

/// Rows deleted per statement when old messages are forgotten.
pub(super) const FORGET_BATCH: i64 = 1000;

read_outbound!(SqliteRow);

/// A message event's kind in the outbox, and the instance's URL for it (SQL).
pub(super) fn outbox_kind(kind: WebhookKind) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        WebhookKind::Received => (
            "received",
            "COALESCE(received_callback_url, received_delivery_callback_url)",
        ),
        WebhookKind::Delivery => (
            "delivery",
            "COALESCE(delivery_callback_url, received_delivery_callback_url)",
        ),
        WebhookKind::MessageStatus => ("message-status", "message_status_callback_url"),
        _ => return None,
    })
}

/// Runs `query` on the writing connection: statements from `BEGIN IMMEDIATE` to
/// `COMMIT` sharing their `?N` parameters, in one call to the connection's thread (each
/// call is a hand-over between threads, which costs more than these statements); the
/// rows they return. It runs in a task of its own, holding the connection until it is
/// done: a caller that goes away midway (a client hanging up, a shutdown) cannot leave
/// the connection inside the transaction. A failure rolls back, then runs `cleanup`.
async fn script(
    conns: &Conns,
    query: sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments>,
    cleanup: Option<&'static str>,
) -> Result<Vec<SqliteRow>, StoreError> {
    let mut conn = conns.lock_owned().await?;
    let run = tokio::spawn(async move {
        let done = query.fetch_all(&mut *conn).await;
        if done.is_err() {
            // Refused when no transaction is open (it failed before BEGIN): harmless.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            if let Some(cleanup) = cleanup {
                let _ = sqlx::query(cleanup).execute(&mut *conn).await;
            }
        }
        done
    });
    match run.await {
        Ok(done) => Ok(done?),
        // It panicked: as if the connection's thread had.
        Err(_) => Err(StoreError::Database(sqlx::Error::WorkerCrashed)),
    }
}

/// Writes a webhook event of a message kind if the instance has a URL for it; returns
/// whether it did. Status events past 20,000 drop the oldest of theirs (migration 0010).
pub(super) async fn write_message_event(
    tx: &mut Transaction<'_, Sqlite>,
    event: &WebhookEvent,
) -> Result<bool, StoreError> {
    let Some((kind, url)) = outbox_kind(event.kind) else {
        return Ok(false);
    };
    let statement = format!(
        "INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
         next_attempt_at) SELECT ?1, id, ?2, {url}, ?3, ?4, ?4 FROM instances \
         WHERE id = ?5 AND {url} IS NOT NULL"
    );
    let written = sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(&event.event_id)
        .bind(kind)
        .bind(&event.body)
        .bind(event.created_at)
        .bind(&event.instance_id)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    Ok(written)
}

/// Every transaction here writes: it takes the write lock at its start (waiting for it
/// up to the busy timeout), so one that reads first is never refused at its first
/// write because another wrote in between.
async fn write_events(
    tx: &mut Transaction<'_, Sqlite>,
    events: &[WebhookEvent],
) -> Result<(), StoreError> {
    for event in events {
        write_message_event(tx, event).await?;
    }
    Ok(())
}

/// The message queued in one transaction, on disk before this returns, and in one
/// call, unless a replay, a reused key or a full queue says otherwise.
async fn enqueue(
    store: &SqliteStore,
    m: &NewOutbound,
    max_pending: i64,
) -> Result<Enqueued, StoreError> {
    const QUEUE: &str = concat!(
        "PRAGMA synchronous = FULL; BEGIN IMMEDIATE; \
         INSERT INTO outbound_messages (zaap_id, instance_id, message_id, phone, text, \
         reply_to, edit_of, delay_ms, typing_ms, idempotency_key, request_hash, created_at) \
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 \
         WHERE (SELECT COUNT(*) FROM outbound_messages WHERE instance_id = ?2 \
                AND state IN ('queued', 'sending')) < ?13 \
         AND NOT EXISTS (SELECT 1 FROM outbound_messages WHERE instance_id = ?2 \
                         AND idempotency_key = ?10) \
         RETURNING ",
        outbound_columns!(),
        "; COMMIT; PRAGMA synchronous = NORMAL;"
    );
    let (key, hash) = match &m.idempotency {
        Some((key, hash)) => (Some(key.as_str()), Some(hash.as_str())),
        None => (None, None),
    };
    let query = sqlx::query(QUEUE)
        .bind(m.zaap_id.clone())
        .bind(m.instance_id.clone())
        .bind(m.message_id.clone())
        .bind(m.phone.clone())
        .bind(m.text.clone())
        .bind(m.reply_to.clone())
        .bind(m.edit_of.clone())
        .bind(m.delay_ms)
        .bind(m.typing_ms)
        .bind(key.map(str::to_owned))
        .bind(hash.map(str::to_owned))
        .bind(m.created_at)
        .bind(max_pending);
    let relax = Some("PRAGMA synchronous = NORMAL");
    let rows = match script(&store.write, query, relax).await {
        Ok(rows) => rows,
        // A failure after the commit (setting the connection back) still queued it.
        Err(e) => match store.outbound_by_id(&m.instance_id, &m.message_id).await {
            Ok(Some(queued)) => return Ok(Enqueued::New(queued)),
            _ => return Err(e),
        },
    };
    if let Some(row) = rows.first() {
        return Ok(Enqueued::New(outbound(row)?));
    }
    // Not queued: the key made a message before, or the queue is full.
    if let (Some(key), Some(hash)) = (key, hash) {
        let mut conn = store.read.lock().await?;
        if let Some(earlier) = replayed(&mut *conn, &m.instance_id, key, hash).await? {
            return Ok(earlier);
        }
    }
    Ok(Enqueued::Full)
}

/// What an idempotency key already made: the message (`Replayed`) when `hash` is its
/// request's, `KeyReused` when another request used the key; `None` when it is new.
async fn replayed<'c>(
    db: impl sqlx::SqliteExecutor<'c>,
    instance_id: &str,
    key: &str,
    hash: &str,
) -> Result<Option<Enqueued>, StoreError> {
    let earlier = sqlx::query(concat!(
        "SELECT ",
        outbound_columns!(),
        ", request_hash FROM outbound_messages WHERE instance_id = ? AND idempotency_key = ?"
    ))
    .bind(instance_id)
    .bind(key)
    .fetch_optional(db)
    .await?;
    let Some(row) = earlier else {
        return Ok(None);
    };
    let same: Option<String> = row.try_get("request_hash")?;
    Ok(Some(match same.as_deref() == Some(hash) {
        true => Enqueued::Replayed(outbound(&row)?),
        false => Enqueued::KeyReused,
    }))
}

/// Received messages recorded in one transaction on `conn`; how many were new.
async fn record_inbound(
    conn: &mut SqliteConnection,
    messages: &[Inbound],
) -> Result<Vec<bool>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut new = Vec::with_capacity(messages.len());
    for m in messages {
        if m.event.is_some() {
            let backlog: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM webhook_outbox WHERE instance_id = ? \
                 AND done_at IS NULL AND kind = 'received'",
            )
            .bind(&m.instance_id)
            .fetch_one(&mut *tx)
            .await?;
            if backlog >= RECEIVED_BACKLOG {
                return Err(StoreError::Backlog(m.instance_id.clone()));
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO inbound_messages (instance_id, chat, sender, message_id, waiting, \
             text, from_me, sent_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&m.instance_id)
        .bind(&m.chat)
        .bind(&m.sender)
        .bind(&m.message_id)
        .bind(m.waiting)
        .bind(&m.text)
        .bind(m.from_me)
        .bind(m.sent_at)
        .bind(crate::unix_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            if let Some(event) = &m.event {
                write_message_event(&mut tx, event).await?;
            }
        }
        new.push(inserted);
    }
    tx.commit().await?;
    Ok(new)
}

impl SqliteStore {
    /// A receipt for one message (the usual case), in one read and one call to the
    /// writer: the events are made from what the read saw, and written only if the
    /// message is still in the state it saw (else `None`: the caller goes the long
    /// way, in one transaction).
    async fn one_status(
        &self,
        instance_id: &str,
        id: &str,
        status: Status,
        at: i64,
        event: &(dyn for<'x> Fn(Status, &'x [String], &'x str) -> WebhookEvent + Sync),
    ) -> Result<Option<Vec<(Status, WebhookEvent)>>, StoreError> {
        let seen: Option<(String, String)> = sqlx::query_as(
            "SELECT phone, state FROM outbound_messages WHERE instance_id = ? AND message_id = ?",
        )
        .bind(instance_id)
        .bind(id)
        .fetch_optional(&mut *self.read.lock().await?)
        .await?;
        // States only move forward: one this receipt does not advance never will.
        let Some((phone, state)) =
            seen.filter(|(_, state)| status.before().contains(&state.as_str()))
        else {
            return Ok(Some(Vec::new()));
        };
        let ids = [id.to_owned()];
        let mut written = Vec::new();
        // A receipt that overtook WhatsApp's ack still proves the message was sent: its
        // SENT comes first.
        if state == "sending" && status != Status::Sent {
            written.push((Status::Sent, event(Status::Sent, &ids, &phone)));
        }
        written.push((status, event(status, &ids, &phone)));
        let (kind, url) = outbox_kind(WebhookKind::MessageStatus).expect("a message kind");
        let column = status.column();
        // The events follow only an UPDATE that moved the message (`changes()` is still
        // its count while the INSERT runs).
        let arm = |n: usize| {
            format!(
                "SELECT ?{e}, id, '{kind}', {url}, ?{b}, ?{c}, ?{c} FROM instances \
                 WHERE id = ?3 AND changes() = 1 AND {url} IS NOT NULL",
                e = 6 + 3 * n,
                b = 7 + 3 * n,
                c = 8 + 3 * n,
            )
        };
        let arms: Vec<String> = (0..written.len()).map(arm).collect();
        let statement = format!(
            "BEGIN IMMEDIATE; \
             UPDATE outbound_messages SET state = ?1, {column} = COALESCE({column}, ?2) \
             WHERE instance_id = ?3 AND message_id = ?4 AND state = ?5 RETURNING 1; \
             INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
             next_attempt_at) {}; \
             COMMIT;",
            arms.join(" UNION ALL ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(status.state())
            .bind(at)
            .bind(instance_id.to_owned())
            .bind(id.to_owned())
            .bind(state);
        for (_, made) in &written {
            query = query
                .bind(made.event_id.clone())
                .bind(made.body.clone())
                .bind(made.created_at);
        }
        let moved = !script(&self.write, query, None).await?.is_empty();
        Ok(moved.then_some(written))
    }
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (depth, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(created_at) FROM outbound_messages \
             WHERE state IN ('queued', 'sending')",
        )
        .fetch_one(&mut *self.read.lock().await?)
        .await?;
        Ok((depth as u64, oldest))
    }

    async fn replayed(
        &self,
        instance_id: &str,
        key: &str,
        hash: &str,
    ) -> Result<Option<Enqueued>, StoreError> {
        replayed(&mut *self.read.lock().await?, instance_id, key, hash).await
    }

    async fn enqueue_message(
        &self,
        m: &NewOutbound,
        max_pending: i64,
    ) -> Result<Enqueued, StoreError> {
        enqueue(self, m, max_pending).await
    }

    async fn queue_front(
        &self,
        instance_id: &str,
        limit: u32,
    ) -> Result<Vec<Outbound>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbound_columns!(),
            " FROM outbound_messages WHERE instance_id = ? AND state IN ('queued', 'sending') \
             ORDER BY seq LIMIT ?"
        ))
        .bind(instance_id)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.read.lock().await?)
        .await?;
        Ok(rows.iter().map(outbound).collect::<Result<_, _>>()?)
    }

    async fn instances_with_queue(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT instance_id FROM outbound_messages \
             WHERE state IN ('queued', 'sending')",
        )
        .fetch_all(&mut *self.read.lock().await?)
        .await?)
    }

    async fn queue_page(
        &self,
        instance_id: &str,
        page: u32,
        page_size: u32,
    ) -> Result<(Vec<Outbound>, u64), StoreError> {
        let total: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbound_messages WHERE instance_id = ? \
             AND state IN ('queued', 'sending')",
        )
        .bind(instance_id)
        .fetch_one(&mut *self.read.lock().await?)
        .await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbound_columns!(),
            " FROM outbound_messages WHERE instance_id = ? AND state IN ('queued', 'sending') \
             ORDER BY seq LIMIT ? OFFSET ?"
        ))
        .bind(instance_id)
        .bind(i64::from(page_size))
        .bind(i64::from(page.saturating_sub(1)) * i64::from(page_size))
        .fetch_all(&mut *self.read.lock().await?)
        .await?;
        let items = rows.iter().map(outbound).collect::<Result<_, _>>()?;
        Ok((items, total as u64))
    }

    async fn delete_queued(
        &self,
        instance_id: &str,
        zaap_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM outbound_messages WHERE instance_id = ?1 AND state = 'queued' \
             AND (?2 IS NULL OR zaap_id = ?2)",
        )
        .bind(instance_id)
        .bind(zaap_id)
        .execute(&mut *self.write.lock().await?)
        .await?;
        Ok(done.rows_affected())
    }

    async fn message_sending(&self, message: &Outbound) -> Result<bool, StoreError> {
        let moved = sqlx::query(
            "UPDATE outbound_messages SET state = 'sending', attempts = attempts + 1 \
             WHERE seq = ? AND state IN ('queued', 'sending')",
        )
        .bind(message.seq)
        .execute(&mut *self.write.lock().await?)
        .await?
        .rows_affected();
        Ok(moved == 1)
    }

    async fn message_sent(
        &self,
        seq: i64,
        at: i64,
        delivery: &WebhookEvent,
        status: &WebhookEvent,
    ) -> Result<usize, StoreError> {
        // The state after: 'sent' when it was on its way; further on when a receipt
        // overtook the ack (which then announced SENT itself). The events follow only
        // an UPDATE that moved it (`changes()` is still that statement's count while
        // the INSERT runs), the status only when it is 'sent'.
        static SENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let (delivery, delivery_url) = outbox_kind(WebhookKind::Delivery).unwrap();
            let (status, status_url) = outbox_kind(WebhookKind::MessageStatus).unwrap();
            format!(
                "BEGIN IMMEDIATE; \
                 UPDATE outbound_messages SET sent_at = ?1, error = NULL, \
                 state = CASE state WHEN 'sending' THEN 'sent' ELSE state END \
                 WHERE seq = ?2 AND sent_at IS NULL AND state NOT IN ('queued', 'failed') \
                 RETURNING state; \
                 INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, \
                 created_at, next_attempt_at) \
                 SELECT ?3, id, '{delivery}', {delivery_url}, ?4, ?5, ?5 FROM instances \
                 WHERE id = ?6 AND changes() = 1 AND {delivery_url} IS NOT NULL \
                 UNION ALL \
                 SELECT ?7, id, '{status}', {status_url}, ?8, ?9, ?9 FROM instances \
                 WHERE id = ?6 AND changes() = 1 AND {status_url} IS NOT NULL \
                 AND (SELECT state FROM outbound_messages WHERE seq = ?2) = 'sent'; \
                 COMMIT;"
            )
        });
        let query = sqlx::query(sqlx::AssertSqlSafe(SENT.as_str()))
            .bind(at)
            .bind(seq)
            .bind(delivery.event_id.clone())
            .bind(delivery.body.clone())
            .bind(delivery.created_at)
            .bind(delivery.instance_id.clone())
            .bind(status.event_id.clone())
            .bind(status.body.clone())
            .bind(status.created_at);
        let rows = script(&self.write, query, None).await?;
        let after: Option<String> = rows.first().map(|r| r.try_get(0)).transpose()?;
        Ok(match after.as_deref() {
            None => 0,
            Some("sent") => 2,
            Some(_) => 1,
        })
    }

    async fn message_failed(
        &self,
        seq: i64,
        error: &str,
        events: &[WebhookEvent],
    ) -> Result<bool, StoreError> {
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
        let moved = sqlx::query(
            "UPDATE outbound_messages SET state = 'failed', error = ? \
             WHERE seq = ? AND state IN ('queued', 'sending')",
        )
        .bind(error)
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 1 {
            write_events(&mut tx, events).await?;
        }
        tx.commit().await?;
        Ok(moved == 1)
    }

    async fn message_status(
        &self,
        instance_id: &str,
        ids: &[String],
        status: Status,
        at: i64,
        event: &(dyn for<'x> Fn(Status, &'x [String], &'x str) -> WebhookEvent + Sync),
    ) -> Result<Vec<(Status, WebhookEvent)>, StoreError> {
        if let [id] = ids {
            if let Some(written) = self.one_status(instance_id, id, status, at, event).await? {
                return Ok(written);
            }
        }
        let column = status.column();
        let before = status.before();
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
        // The ids each phone's messages moved, in the order they came.
        let mut moved: Vec<(String, Vec<String>)> = Vec::new();
        // A receipt that overtook WhatsApp's ack still proves the message was sent:
        // its SENT comes first.
        let mut unacked: Vec<(String, Vec<String>)> = Vec::new();
        for id in ids {
            let phone: Option<String> = sqlx::query_scalar(
                "SELECT phone FROM outbound_messages WHERE instance_id = ? AND message_id = ? \
                 AND state = 'sending'",
            )
            .bind(instance_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(phone) = phone.filter(|_| status != Status::Sent) {
                match unacked.iter_mut().find(|(p, _)| *p == phone) {
                    Some((_, list)) => list.push(id.clone()),
                    None => unacked.push((phone, vec![id.clone()])),
                }
            }
        }
        for id in ids {
            let statement = format!(
                "UPDATE outbound_messages SET state = ?1, {column} = COALESCE({column}, ?2) \
                 WHERE instance_id = ?3 AND message_id = ?4 AND state IN ({}) RETURNING phone",
                before
                    .iter()
                    .map(|s| format!("'{s}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let phone: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
                .bind(status.state())
                .bind(at)
                .bind(instance_id)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(phone) = phone {
                match moved.iter_mut().find(|(p, _)| *p == phone) {
                    Some((_, list)) => list.push(id.clone()),
                    None => moved.push((phone, vec![id.clone()])),
                }
            }
        }
        let mut written = Vec::new();
        for (phone, list) in &unacked {
            written.push((Status::Sent, event(Status::Sent, list, phone)));
        }
        for (phone, list) in &moved {
            written.push((status, event(status, list, phone)));
        }
        for (_, made) in &written {
            write_message_event(&mut tx, made).await?;
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn outbound_by_id(
        &self,
        instance_id: &str,
        message_id: &str,
    ) -> Result<Option<Outbound>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            outbound_columns!(),
            " FROM outbound_messages WHERE instance_id = ? AND message_id = ?"
        ))
        .bind(instance_id)
        .bind(message_id)
        .fetch_optional(&mut *self.read.lock().await?)
        .await?;
        Ok(row.as_ref().map(outbound).transpose()?)
    }

    async fn record_inbound(&self, messages: &[Inbound]) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.durable().await?;
        let recorded = record_inbound(&mut conn, messages).await;
        relax(conn).await;
        recorded
    }

    async fn inbound_text(
        &self,
        instance_id: &str,
        message_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT sender, text FROM inbound_messages WHERE instance_id = ? AND message_id = ? \
             AND waiting = 0 AND text IS NOT NULL LIMIT 1",
        )
        .bind(instance_id)
        .bind(message_id)
        .fetch_optional(&mut *self.read.lock().await?)
        .await?)
    }

    async fn forget_messages(&self, before: i64) -> Result<u64, StoreError> {
        // A thousand at a time, each its own commit: a week of messages at hundreds a
        // second is hundreds of thousands of rows, and sends wait for the writer.
        let statements = [
            "DELETE FROM outbound_messages WHERE seq IN (SELECT seq FROM outbound_messages \
             WHERE created_at < ?1 AND state NOT IN ('queued', 'sending') LIMIT ?2)",
            "DELETE FROM inbound_messages WHERE rowid IN (SELECT rowid FROM inbound_messages \
             WHERE received_at < ?1 LIMIT ?2)",
        ];
        let mut forgotten = 0;
        for statement in statements {
            loop {
                let done = sqlx::query(statement)
                    .bind(before)
                    .bind(FORGET_BATCH)
                    .execute(&mut *self.write.lock().await?)
                    .await?
                    .rows_affected();
                forgotten += done;
                if done < FORGET_BATCH as u64 {
                    break;
                }
            }
        }
        Ok(forgotten)
    }

    async fn message_settings(&self, instance_id: &str) -> Result<(bool, bool), StoreError> {
        let row: Option<(bool, bool)> = sqlx::query_as(
            "SELECT auto_read_message, disable_enqueue_when_disconnected FROM instances \
             WHERE id = ?",
        )
        .bind(instance_id)
        .fetch_optional(&mut *self.read.lock().await?)
        .await?;
        Ok(row.unwrap_or_default())
    }

    async fn set_auto_read(&self, instance_id: &str, on: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE instances SET auto_read_message = ? WHERE id = ?")
            .bind(on)
            .bind(instance_id)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_enqueue_when_disconnected(
        &self,
        instance_id: &str,
        disabled: bool,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE instances SET disable_enqueue_when_disconnected = ? WHERE id = ?")
                .bind(disabled)
                .bind(instance_id)
                .execute(&mut *self.write.lock().await?)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// What the message tests of every backend share: instance "I" and its messages.
#[cfg(test)]
pub(super) mod fixtures {
    use super::{NewOutbound, Status};
    use crate::store::{InstanceRecord, Store, WebhookEvent, WebhookKind, Webhooks};

    /// Instance "I", with URLs for its delivery and status events.
    pub(crate) fn instance() -> InstanceRecord {
        InstanceRecord {
            webhooks: Webhooks {
                message_status: Some("http://127.0.0.1:9/status".into()),
                delivery: Some("http://127.0.0.1:9/delivery".into()),
                ..Default::default()
            },
            ..crate::store::contract::instance("I", "n", 1)
        }
    }

    pub(crate) fn message(n: u32, key: Option<(&str, &str)>) -> NewOutbound {
        NewOutbound {
            zaap_id: format!("Z{n}"),
            instance_id: "I".into(),
            message_id: format!("M{n}"),
            phone: "5511999990001".into(),
            text: format!("text {n}"),
            reply_to: None,
            edit_of: None,
            delay_ms: None,
            typing_ms: 0,
            idempotency: key.map(|(k, h)| (k.into(), h.into())),
            created_at: 10,
        }
    }

    pub(crate) fn status_event(_: Status, ids: &[String], phone: &str) -> WebhookEvent {
        WebhookEvent {
            event_id: crate::random_hex(8),
            instance_id: "I".into(),
            kind: WebhookKind::MessageStatus,
            body: format!("{ids:?} {phone}"),
            created_at: 20,
        }
    }

    /// The kinds of the instance's events, oldest first.
    pub(crate) async fn pending_kinds(store: &dyn Store) -> Vec<String> {
        store
            .recent_webhooks("I", 100)
            .await
            .unwrap()
            .into_iter()
            .rev()
            .map(|e| e.kind)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! What only SQLite shows: its writer, its sequence, its script task. The rest of
    //! the message store's tests are the contract every backend passes
    //! (`store::contract::messages`).

    use super::fixtures::{instance, message, pending_kinds, status_event};
    use super::*;
    use crate::store::Store as _;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("z.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.insert_instance(&instance()).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn status_events_past_the_bound_drop_their_oldest_and_received_ones_stay() {
        let (_dir, store) = store().await;
        let received = |n: usize| WebhookEvent {
            event_id: format!("R{n}"),
            instance_id: "I".into(),
            kind: WebhookKind::Received,
            body: format!("{n}"),
            created_at: 20,
        };
        sqlx::query("UPDATE instances SET received_callback_url = 'http://127.0.0.1:9/r'")
            .execute(&mut *store.write.lock().await.unwrap())
            .await
            .unwrap();
        let written = STATUS_BACKLOG + 2 * STATUS_BOUND_EVERY;
        let mut writer = store.write.lock().await.unwrap();
        let mut tx = writer.begin().await.unwrap();
        assert!(write_message_event(&mut tx, &received(0)).await.unwrap());
        for n in 0..written {
            let mut event = status_event(Status::Sent, &[], "");
            event.body = format!("{n}");
            assert!(write_message_event(&mut tx, &event).await.unwrap());
        }
        assert!(write_message_event(&mut tx, &received(1)).await.unwrap());
        tx.commit().await.unwrap();
        drop(writer);

        let (depth, _, dropped) = store.outbox_stats().await.unwrap();
        let kept = written - dropped as i64;
        assert!(
            (STATUS_BACKLOG..STATUS_BACKLOG + STATUS_BOUND_EVERY).contains(&kept),
            "{kept} status events kept"
        );
        assert_eq!(depth as i64, kept + 2, "both received events stay");
        // The oldest went: the first status event left is the one after them.
        let head = store.due_webhooks_of("I", 20, 2).await.unwrap();
        assert_eq!(head[0].body, "0");
        assert_eq!(head[0].kind, "received");
        assert_eq!(head[1].body, dropped.to_string());
    }

    #[tokio::test]
    async fn an_ack_announces_the_delivery_and_sent_once() {
        let (_dir, store) = store().await;
        let Enqueued::New(m) = store.enqueue_message(&message(1, None), 10).await.unwrap() else {
            panic!()
        };
        store.message_sending(&m).await.unwrap();
        // The delivery event gets a seq the status bound looks at (every 100th): its
        // trigger runs inside the INSERT, and the SENT after it must still be written.
        let mut writer = store.write.lock().await.unwrap();
        let mut tx = writer.begin().await.unwrap();
        write_message_event(&mut tx, &status_event(Status::Read, &[], "earlier"))
            .await
            .unwrap();
        sqlx::query("UPDATE sqlite_sequence SET seq = 99 WHERE name = 'webhook_outbox'")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        drop(writer);
        let delivery = WebhookEvent {
            kind: WebhookKind::Delivery,
            ..status_event(Status::Sent, &["D".into()], "x")
        };
        let sent = status_event(Status::Sent, &["SENT".into()], "x");
        let written = store.message_sent(m.seq, 21, &delivery, &sent).await;
        assert_eq!(written.unwrap(), 2);
        let written = store.message_sent(m.seq, 22, &delivery, &sent).await;
        assert_eq!(written.unwrap(), 0, "acked twice: announced once");
        let events = store.recent_webhooks("I", 10).await.unwrap();
        let seen: Vec<(i64, &str, &str)> = events
            .iter()
            .rev()
            .map(|e| (e.seq, e.kind.as_str(), e.body.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, "message-status", "[] earlier"),
                (100, "delivery", "[\"D\"] x"),
                (101, "message-status", "[\"SENT\"] x"),
            ]
        );
        let after = store.outbound_by_id("I", "M1").await.unwrap().unwrap();
        assert_eq!((after.state.as_str(), after.sent_at), ("sent", Some(21)));
        // A message failed meanwhile (or never on its way) is not announced as sent.
        let Enqueued::New(queued) = store.enqueue_message(&message(2, None), 10).await.unwrap()
        else {
            panic!()
        };
        let written = store.message_sent(queued.seq, 23, &delivery, &sent).await;
        assert_eq!(written.unwrap(), 0);
        assert_eq!(store.recent_webhooks("I", 10).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn old_messages_are_forgotten_a_batch_at_a_time_and_waiting_ones_stay() {
        let (_dir, store) = store().await;
        let Enqueued::New(waiting) = store.enqueue_message(&message(1, None), 10).await.unwrap()
        else {
            panic!()
        };
        let mut writer = store.write.lock().await.unwrap();
        sqlx::query(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2500) \
             INSERT INTO outbound_messages (zaap_id, instance_id, message_id, phone, text, \
             state, created_at) SELECT 'Z-' || x, 'I', 'M-' || x, 'p', 't', 'read', 5 FROM n",
        )
        .execute(&mut *writer)
        .await
        .unwrap();
        sqlx::query(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1500) \
             INSERT INTO inbound_messages (instance_id, chat, sender, message_id, sent_at, \
             received_at) SELECT 'I', 'c', 's', 'R-' || x, 5, CASE WHEN x = 1 THEN 50 ELSE 5 END \
             FROM n",
        )
        .execute(&mut *writer)
        .await
        .unwrap();
        drop(writer);
        assert_eq!(store.forget_messages(11).await.unwrap(), 2500 + 1499);
        assert_eq!(store.queue_head("I").await.unwrap(), Some(waiting));
        let left: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM outbound_messages), (SELECT COUNT(*) FROM inbound_messages)",
        )
        .fetch_one(&mut *store.read.lock().await.unwrap())
        .await
        .unwrap();
        assert_eq!(left, (1, 1));
    }

    #[tokio::test]
    async fn a_caller_gone_midway_leaves_no_transaction_open() {
        let (_dir, store) = store().await;
        let Enqueued::New(m) = store.enqueue_message(&message(1, None), 10).await.unwrap() else {
            panic!()
        };
        store.message_sending(&m).await.unwrap();
        let delivery = WebhookEvent {
            kind: WebhookKind::Delivery,
            ..status_event(Status::Sent, &["D".into()], "x")
        };
        let sent = status_event(Status::Sent, &["SENT".into()], "x");
        // The caller goes away once its statements are on their way (a client hanging
        // up, a shutdown): they still run to their end. (On a fast run the call may end
        // at its first poll: what follows holds either way.)
        tokio::select! {
            biased;
            _ = store.message_sent(m.seq, 21, &delivery, &sent) => {}
            () = tokio::task::yield_now() => {}
        }
        let mut writer = store.write.lock().await.unwrap();
        let tx = writer.begin().await.expect("no transaction left open");
        tx.commit().await.unwrap();
        drop(writer);
        let after = store.outbound_by_id("I", "M1").await.unwrap().unwrap();
        assert_eq!((after.state.as_str(), after.sent_at), ("sent", Some(21)));
        assert_eq!(pending_kinds(&store).await, ["delivery", "message-status"]);
    }
}
