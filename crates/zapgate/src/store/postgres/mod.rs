//! The PostgreSQL backend: the registry, link pages, outbox and messages in one
//! database that several gateway nodes share. Times are unix milliseconds, as on SQLite.
//!
//! SQLite has one writer, so a write that reads before it writes sees nothing change in
//! between. Here transactions run side by side (READ COMMITTED), from several nodes: a
//! write that depends on what it read first locks the instance's row, and every write
//! that reads the instance's webhook URLs or link state takes that same lock, so they
//! take turns per instance as they did on SQLite.

pub mod leases;
mod messages;
mod session_keys;
pub(super) mod sessions;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, Row as _, Transaction};

use leases::Held;
use session_keys::{FENCE_REFUSED, Lease, begin_fenced};

use super::{
    Attempt, InstanceRecord, Link, LinkPage, LinkPageMade, OutboxEntry, Page, Store, StoreError,
    WebhookEvent, WebhookKind, Webhooks,
};

pub struct PgStore {
    pub(super) pool: PgPool,
    options: PgConnectOptions,
    /// The node this store serves, when it is one of several: it delivers the webhook
    /// events of the instances it holds.
    node: Option<String>,
    /// What that node holds, once it joined: the writes only an instance's owner makes
    /// are fenced by it.
    held: std::sync::OnceLock<std::sync::Arc<dyn Held>>,
}

/// How long a start waits for a PostgreSQL that is starting up or full.
const FIRST_CONNECT: std::time::Duration = std::time::Duration::from_secs(10);

/// A first connection, tried again while the server refuses it (not listening yet),
/// says it is starting up (57P03) or has no connection free (53300), up to
/// [`FIRST_CONNECT`], as a pool would: a database started beside the gateway is waited
/// for. Anything else (a wrong password, no such database) is said at once.
async fn connect_patiently(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + FIRST_CONNECT;
    loop {
        let tried = tokio::time::timeout_at(deadline, PgConnection::connect_with(options)).await;
        let error = match tried {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", FIRST_CONNECT.as_secs()),
                )));
            }
        };
        let again = match &error {
            sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
            sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("57P03" | "53300")),
            _ => false,
        };
        if !again || tokio::time::Instant::now() + std::time::Duration::from_millis(250) >= deadline
        {
            return Err(error);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(url, None).await
    }

    /// Opens the database as node `node` (its connections say so to the server).
    pub async fn connect_as(url: &str, node: &str) -> Result<Self, StoreError> {
        Self::open(url, Some(node.to_owned())).await
    }

    async fn open(url: &str, node: Option<String>) -> Result<Self, StoreError> {
        let application = match &node {
            Some(node) => format!("zapgate/{node}"),
            None => "zapgate".into(),
        };
        let options = url
            .parse::<PgConnectOptions>()?
            .application_name(&application)
            // A paused node's open transaction holds row locks the others wait on:
            // the server ends it. No statement of the gateway's runs for long.
            .options([
                ("idle_in_transaction_session_timeout", "10s"),
                ("statement_timeout", "60s"),
            ]);
        // Migrations on a connection of their own, without the statement timeout: a
        // node may wait on another's migration (sqlx takes an advisory lock), and a
        // migration of a big table may take long. Made first: a wrong address, user
        // or database is said as the server said it (a pool would try again until its
        // wait ran out, and say only that).
        let mut migrating = connect_patiently(
            &url.parse::<PgConnectOptions>()?
                .application_name(&application),
        )
        .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&mut migrating)
            .await?;
        migrating.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            pool,
            options,
            node,
            held: std::sync::OnceLock::new(),
        })
    }

    /// From now on, the writes only an instance's owner makes (its link, its connection
    /// events, its deletion) are refused unless `held` holds the instance's lease.
    pub fn fence_with(&self, held: std::sync::Arc<dyn Held>) {
        let _ = self.held.set(held);
    }

    /// A transaction for a write only `instance`'s owner makes: once the store is
    /// fenced, it opens with `zg_fence`, and is refused ([`StoreError::Moved`]) when
    /// this node does not hold the instance's lease (any more).
    async fn owner_tx(&self, instance: &str) -> Result<Transaction<'static, Postgres>, StoreError> {
        let Some(held) = self.held.get() else {
            return Ok(self.pool.begin().await?);
        };
        let lease = Lease {
            instance: instance.to_owned(),
            node: held.node().to_owned(),
            epoch: held.epoch(instance),
        };
        begin_fenced(&self.pool, &lease, None)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(refused)
                    if refused.code().as_deref() == Some(FENCE_REFUSED) =>
                {
                    StoreError::Moved(instance.to_owned())
                }
                _ => StoreError::from(e),
            })
    }

    /// The connections' pool, shared with the node's leases.
    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// How the store connects, for a connection of one's own.
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }
}

/// The instances a listing shows: not cancelled and, when `$1` is a pattern, with a name
/// or id like it (ASCII letters of either case: the columns are `COLLATE "C"`).
macro_rules! listed {
    () => {
        " FROM instances WHERE cancelled_at IS NULL AND ($1::text IS NULL \
         OR name ILIKE $1 ESCAPE '\\' OR id ILIKE $1 ESCAPE '\\')"
    };
}

/// Whether node `$n` delivers the events of `o.instance_id` (NULL: a store of no node
/// delivers every one): those of the instances it holds, and, when it is the oldest
/// live node not draining, those of deleted instances.
macro_rules! delivers {
    ($n:literal) => {
        concat!(
            "($", $n, "::text IS NULL \
             OR EXISTS (SELECT 1 FROM zg_lease l WHERE l.instance = o.instance_id AND l.node = $", $n, ") \
             OR (NOT EXISTS (SELECT 1 FROM zg_lease l WHERE l.instance = o.instance_id) \
               AND $", $n, " = (SELECT id FROM zg_node \
                 WHERE expires_at > clock_timestamp() AND NOT draining \
                 ORDER BY started_at, id LIMIT 1)))"
        )
    };
}

/// The head of each instance's queue (its oldest pending event) that this node
/// (`$2`) delivers.
macro_rules! heads {
    () => {
        concat!(
            " FROM webhook_outbox o WHERE seq IN (SELECT MIN(seq) FROM webhook_outbox \
             WHERE done_at IS NULL GROUP BY instance_id) AND instance_id <> ALL($1) AND ",
            delivers!("2")
        )
    };
}

fn link_page_from(row: &PgRow) -> Result<LinkPage, sqlx::Error> {
    let pair_codes: i64 = row.try_get("pair_codes")?;
    Ok(LinkPage {
        token_hash: row.try_get("token_hash")?,
        instance_id: row.try_get("instance_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        used_at: row.try_get("used_at")?,
        pair_codes: u32::try_from(pair_codes).map_err(|e| sqlx::Error::Decode(e.into()))?,
    })
}

read_outbox_entry!(PgRow);
read_record!(PgRow);

#[async_trait]
impl Store for PgStore {
    async fn insert_instance(&self, i: &InstanceRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(node) = &self.node {
            // The new instance is leased to this node in the same transaction.
            sqlx::query("SELECT set_config('zapgate.node', $1, true)")
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(concat!(
            "INSERT INTO instances (",
            columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16, $17, $18)"
        ))
        .bind(&i.id)
        .bind(&i.token)
        .bind(&i.name)
        .bind(&i.session_name)
        .bind(&i.webhooks.connected)
        .bind(&i.webhooks.disconnected)
        .bind(i.created_at)
        .bind(i.due_at)
        .bind(i.link.as_ref().map(|l| &l.phone))
        .bind(i.link.as_ref().map(|l| l.linked_at))
        .bind(i.link.as_ref().and_then(|l| l.platform.as_deref()))
        .bind(i.cancelled_at)
        .bind(&i.webhooks.received)
        .bind(&i.webhooks.received_delivery)
        .bind(&i.webhooks.delivery)
        .bind(&i.webhooks.message_status)
        .bind(&i.webhooks.chat_presence)
        .bind(i.webhooks.notify_sent_by_me)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn all_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM instances ORDER BY created_at, seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record).collect::<Result<_, _>>()?)
    }

    async fn page_instances(
        &self,
        page: u32,
        page_size: u32,
        query: Option<&str>,
    ) -> Result<Page, StoreError> {
        // `%`, `_` and the escape itself stand for themselves.
        let pattern = query.map(|text| {
            format!(
                "%{}%",
                text.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
        let total: i64 = sqlx::query_scalar(concat!("SELECT COUNT(*)", listed!()))
            .bind(&pattern)
            .fetch_one(&self.pool)
            .await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            listed!(),
            " ORDER BY created_at, seq LIMIT $2 OFFSET $3"
        ))
        .bind(&pattern)
        .bind(i64::from(page_size))
        .bind(i64::from(page.saturating_sub(1)) * i64::from(page_size))
        .fetch_all(&self.pool)
        .await?;
        Ok(Page {
            items: rows.iter().map(record).collect::<Result<_, _>>()?,
            total: total as u64,
        })
    }

    async fn set_link(&self, id: &str, link: Option<&Link>) -> Result<(), StoreError> {
        let mut tx = self.owner_tx(id).await?;
        // Holds the instance's row until the commit: a link page being made meanwhile
        // (which locks it too) either comes first and is spent below, or comes after and
        // sees the number linked.
        sqlx::query("UPDATE instances SET phone = $1, linked_at = $2, platform = $3 WHERE id = $4")
            .bind(link.map(|l| &l.phone))
            .bind(link.map(|l| l.linked_at))
            .bind(link.and_then(|l| l.platform.as_deref()))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if let Some(link) = link {
            // The instance's link pages did their job.
            sqlx::query(
                "UPDATE link_pages SET used_at = $1 WHERE instance_id = $2 AND used_at IS NULL",
            )
            .bind(link.linked_at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM instances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    async fn set_webhook(
        &self,
        id: &str,
        kind: WebhookKind,
        url: Option<&str>,
    ) -> Result<bool, StoreError> {
        let statement = match kind {
            WebhookKind::Connected => {
                "UPDATE instances SET connected_callback_url = $1 WHERE id = $2"
            }
            WebhookKind::Disconnected => {
                "UPDATE instances SET disconnected_callback_url = $1 WHERE id = $2"
            }
            WebhookKind::Received => {
                "UPDATE instances SET received_callback_url = $1 WHERE id = $2"
            }
            WebhookKind::ReceivedDelivery => {
                "UPDATE instances SET received_delivery_callback_url = $1 WHERE id = $2"
            }
            WebhookKind::Delivery => {
                "UPDATE instances SET delivery_callback_url = $1 WHERE id = $2"
            }
            WebhookKind::MessageStatus => {
                "UPDATE instances SET message_status_callback_url = $1 WHERE id = $2"
            }
            WebhookKind::ChatPresence => {
                "UPDATE instances SET presence_chat_callback_url = $1 WHERE id = $2"
            }
        };
        let done = sqlx::query(statement)
            .bind(url)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_every_webhook(
        &self,
        id: &str,
        url: Option<&str>,
        notify_sent_by_me: Option<bool>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE instances SET connected_callback_url = $1, \
             disconnected_callback_url = $1, received_callback_url = $1, \
             received_delivery_callback_url = $1, delivery_callback_url = $1, \
             message_status_callback_url = $1, presence_chat_callback_url = $1, \
             notify_sent_by_me = COALESCE($2, notify_sent_by_me) WHERE id = $3",
        )
        .bind(url)
        .bind(notify_sent_by_me)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_notify_sent_by_me(&self, id: &str, notify: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE instances SET notify_sent_by_me = $1 WHERE id = $2")
            .bind(notify)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn enqueue_webhook(&self, event: &WebhookEvent, cap: u64) -> Result<bool, StoreError> {
        let (kind, statement) = match event.kind {
            WebhookKind::Connected => (
                "connected",
                "INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
                 next_attempt_at) SELECT $1, id, $2, connected_callback_url, $3, $4, $4 \
                 FROM instances WHERE id = $5 AND connected_callback_url IS NOT NULL",
            ),
            WebhookKind::Disconnected => (
                "disconnected",
                "INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
                 next_attempt_at) SELECT $1, id, $2, disconnected_callback_url, $3, $4, $4 \
                 FROM instances WHERE id = $5 AND disconnected_callback_url IS NOT NULL",
            ),
            // Their events come with messaging.
            _ => return Ok(false),
        };
        let mut tx = self.owner_tx(&event.instance_id).await?;
        // This UPDATE also locks the instance's row until the commit, so the instance's
        // events are written one transaction at a time, from any node: the count under
        // the cap below sees every pending event (two at once would each miss the
        // other's), the URL read is the one a 410 or an API call left, and the events'
        // seq order is the order they were committed in, which the delivery follows.
        sqlx::query("UPDATE instances SET webhook_connected = $1 WHERE id = $2")
            .bind(event.kind == WebhookKind::Connected)
            .bind(&event.instance_id)
            .execute(&mut *tx)
            .await?;
        let written = sqlx::query(statement)
            .bind(&event.event_id)
            .bind(kind)
            .bind(&event.body)
            .bind(event.created_at)
            .bind(&event.instance_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if written {
            // `done_at IS NULL` outside the subquery too: an event settled by a delivery
            // while this waited for its row keeps its outcome.
            sqlx::query(
                "UPDATE webhook_outbox SET done_at = $1, outcome = 'dropped' \
                 WHERE done_at IS NULL AND seq IN (SELECT seq FROM webhook_outbox \
                 WHERE instance_id = $2 AND done_at IS NULL \
                 AND kind IN ('connected', 'disconnected') ORDER BY seq DESC OFFSET $3)",
            )
            .bind(event.created_at)
            .bind(&event.instance_id)
            .bind(i64::try_from(cap).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn webhook_announced(&self, instance_id: &str) -> Result<Option<bool>, StoreError> {
        let said: Option<Option<bool>> =
            sqlx::query_scalar("SELECT webhook_connected FROM instances WHERE id = $1")
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(said.flatten())
    }

    async fn stop_webhook_url(
        &self,
        instance_id: &str,
        url: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // The chat presence URL stays, as on SQLite: its events do not go through the
        // outbox. This UPDATE locks the instance's row until the commit: an event being
        // written meanwhile (which locks it too) is either committed before, and settles
        // below, or reads the cleared URL after.
        sqlx::query(
            "UPDATE instances SET \
             connected_callback_url = NULLIF(connected_callback_url, $2), \
             disconnected_callback_url = NULLIF(disconnected_callback_url, $2), \
             received_callback_url = NULLIF(received_callback_url, $2), \
             received_delivery_callback_url = NULLIF(received_delivery_callback_url, $2), \
             delivery_callback_url = NULLIF(delivery_callback_url, $2), \
             message_status_callback_url = NULLIF(message_status_callback_url, $2) \
             WHERE id = $1",
        )
        .bind(instance_id)
        .bind(url)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_outbox SET done_at = $1, outcome = 'gone', \
             last_error = 'the receiver answered 410 Gone for this URL' \
             WHERE instance_id = $2 AND url = $3 AND done_at IS NULL",
        )
        .bind(at)
        .bind(instance_id)
        .bind(url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn forget_settled_webhooks(&self, before: i64) -> Result<u64, StoreError> {
        // A thousand at a time, each its own commit: no transaction holds many rows long.
        const BATCH: i64 = 1000;
        let mut forgotten = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM webhook_outbox WHERE seq IN \
                 (SELECT seq FROM webhook_outbox WHERE done_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(BATCH)
            .execute(&self.pool)
            .await?
            .rows_affected();
            forgotten += done;
            if done < BATCH as u64 {
                return Ok(forgotten);
            }
        }
    }

    async fn due_webhooks(
        &self,
        now: i64,
        busy: &[String],
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        // Heads due at the same moment go in queue order (seq).
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbox_columns!(),
            heads!(),
            " AND next_attempt_at <= $3 ORDER BY next_attempt_at, seq LIMIT $4"
        ))
        .bind(busy)
        .bind(&self.node)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(outbox_entry).collect::<Result<_, _>>()?)
    }

    async fn next_webhook_due(&self, busy: &[String]) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar(concat!("SELECT MIN(next_attempt_at)", heads!()))
                .bind(busy)
                .bind(&self.node)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn due_webhooks_of(
        &self,
        instance_id: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbox_columns!(),
            " FROM webhook_outbox o WHERE instance_id = $1 AND done_at IS NULL AND ",
            // Handed over meanwhile: the next owner delivers the rest.
            delivers!("3"),
            " ORDER BY seq LIMIT $2"
        ))
        .bind(instance_id)
        .bind(i64::from(limit))
        .bind(&self.node)
        .fetch_all(&self.pool)
        .await?;
        due_from(&rows, now)
    }

    async fn webhook_attempted(
        &self,
        seq: i64,
        at: i64,
        attempt: &Attempt,
        ahead: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let (status, error, next, done, outcome) = match attempt {
            Attempt::Done {
                outcome,
                status,
                error,
            } => (*status, error.clone(), None, Some(at), Some(*outcome)),
            Attempt::Retry {
                status,
                error,
                next_attempt_at,
            } => (
                *status,
                Some(error.clone()),
                Some(*next_attempt_at),
                None,
                None,
            ),
        };
        macro_rules! record {
            () => {
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = $1, \
                 last_error = $2, next_attempt_at = COALESCE($3, next_attempt_at), \
                 done_at = $4, outcome = $5 WHERE seq = $6 AND done_at IS NULL"
            };
        }
        // The record and the read in one statement, one round trip. The read sees the
        // table as it was before the record, so the recorded event is taken from what
        // the record returned (still pending after a retry, gone once settled).
        const RECORD_AND_READ: &str = concat!(
            "WITH recorded AS (",
            record!(),
            " RETURNING ",
            outbox_columns!(),
            ") SELECT ",
            outbox_columns!(),
            " FROM webhook_outbox WHERE instance_id = \
             (SELECT instance_id FROM webhook_outbox WHERE seq = $6) \
             AND done_at IS NULL AND seq NOT IN (SELECT seq FROM recorded) \
             UNION ALL SELECT ",
            outbox_columns!(),
            " FROM recorded WHERE done_at IS NULL ORDER BY seq LIMIT $7"
        );
        let query = sqlx::query(if ahead > 0 {
            RECORD_AND_READ
        } else {
            record!()
        })
        .bind(status)
        .bind(error)
        .bind(next)
        .bind(done)
        .bind(outcome)
        .bind(seq);
        let query = if ahead > 0 {
            query.bind(i64::from(ahead))
        } else {
            query
        };
        let rows = query.fetch_all(&self.pool).await?;
        due_from(&rows, at)
    }

    async fn outbox_stats(&self) -> Result<(u64, Option<i64>, u64), StoreError> {
        let (depth, oldest, dropped): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE done_at IS NULL), \
             MIN(created_at) FILTER (WHERE done_at IS NULL), \
             COUNT(*) FILTER (WHERE outcome = 'dropped') FROM webhook_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((depth as u64, oldest, dropped as u64))
    }

    async fn recent_webhooks(
        &self,
        instance_id: &str,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbox_columns!(),
            " FROM webhook_outbox WHERE instance_id = $1 ORDER BY seq DESC LIMIT $2"
        ))
        .bind(instance_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(outbox_entry).collect::<Result<_, _>>()?)
    }

    async fn retry_webhook_now(
        &self,
        instance_id: &str,
        event_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_outbox SET next_attempt_at = $1 \
             WHERE instance_id = $2 AND event_id = $3 AND done_at IS NULL",
        )
        .bind(now)
        .bind(instance_id)
        .bind(event_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_cancelled(&self, id: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE instances SET cancelled_at = COALESCE(cancelled_at, $1) WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_instance(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.owner_tx(id).await?;
        // The instance's row first: a message being recorded for it meanwhile (its
        // writers lock the row too) either comes first and is deleted below, or finds
        // no instance after.
        sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for statement in [
            "DELETE FROM outbound_messages WHERE instance_id = $1",
            "DELETE FROM inbound_messages WHERE instance_id = $1",
            "DELETE FROM instances WHERE id = $1",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_link_page(
        &self,
        page: &LinkPage,
        forget_before: i64,
        max_live: u64,
    ) -> Result<LinkPageMade, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The instance's row, locked until the commit: two pages asked for at once (on
        // any node) are counted one after the other, so `max_live` holds, and a link
        // being recorded (set_link updates the row) either comes first and is seen
        // here, or comes after and spends the page. Taken before anything else, so
        // this waits for nothing while holding the pages the forgetting below locks.
        let linked: Option<bool> = sqlx::query_scalar(
            "SELECT phone IS NOT NULL FROM instances WHERE id = $1 FOR NO KEY UPDATE",
        )
        .bind(&page.instance_id)
        .fetch_optional(&mut *tx)
        .await?;
        // Old pages of every instance go. SKIP LOCKED: one another transaction is
        // changing (or forgetting too, on another node) is left for next time, so this
        // neither waits for it nor deadlocks with it.
        sqlx::query(
            "DELETE FROM link_pages WHERE token_hash IN (SELECT token_hash FROM link_pages \
             WHERE expires_at < $1 OR revoked_at < $1 OR used_at < $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(forget_before)
        .execute(&mut *tx)
        .await?;
        if linked == Some(true) {
            tx.commit().await?;
            return Ok(LinkPageMade::Linked);
        }
        // With no such instance, the page's reference to it fails, as on SQLite.
        let inserted = sqlx::query(
            "INSERT INTO link_pages (token_hash, instance_id, created_at, expires_at, revoked_at) \
             SELECT $1, $2, $3, $4, $5 WHERE (SELECT COUNT(*) FROM link_pages \
             WHERE instance_id = $2 AND revoked_at IS NULL AND used_at IS NULL \
             AND expires_at > $3) < $6",
        )
        .bind(&page.token_hash)
        .bind(&page.instance_id)
        .bind(page.created_at)
        .bind(page.expires_at)
        .bind(page.revoked_at)
        .bind(i64::try_from(max_live).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if inserted.rows_affected() == 1 {
            LinkPageMade::Made
        } else {
            LinkPageMade::TooMany
        })
    }

    async fn link_page(&self, token_hash: &str) -> Result<Option<LinkPage>, StoreError> {
        let row = sqlx::query(
            "SELECT token_hash, instance_id, created_at, expires_at, revoked_at, used_at, \
             pair_codes FROM link_pages WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(link_page_from).transpose()?)
    }

    async fn count_link_page_codes(
        &self,
        token_hash: &str,
        pair_codes: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE link_pages SET pair_codes = GREATEST(pair_codes, $1) WHERE token_hash = $2",
        )
        .bind(i64::from(pair_codes))
        .bind(token_hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revoke_link_pages(&self, instance_id: &str, at: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE link_pages SET revoked_at = $1 WHERE instance_id = $2 AND revoked_at IS NULL \
             AND used_at IS NULL AND expires_at > $1",
        )
        .bind(at)
        .bind(instance_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn open_panel_session(
        &self,
        key: &str,
        csrf: &str,
        expires_at: i64,
        now: i64,
        max_open: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Sign-ins on several nodes at once count one after the other.
        sqlx::query("LOCK TABLE panel_sessions IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM panel_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM panel_sessions WHERE session_key IN (SELECT session_key \
             FROM panel_sessions ORDER BY expires_at \
             LIMIT GREATEST(0, (SELECT count(*) FROM panel_sessions) - $1 + 1))",
        )
        .bind(i64::try_from(max_open).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO panel_sessions (session_key, csrf, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(key)
        .bind(csrf)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn panel_session(&self, key: &str, now: i64) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT csrf FROM panel_sessions WHERE session_key = $1 AND expires_at > $2",
        )
        .bind(key)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn close_panel_session(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM panel_sessions WHERE session_key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// The events of `rows` (one instance's pending, in order) if the first is due at
/// `now`: those after it wait for it.
fn due_from(rows: &[PgRow], now: i64) -> Result<Vec<OutboxEntry>, StoreError> {
    let entries = rows
        .iter()
        .map(outbox_entry)
        .collect::<Result<Vec<_>, _>>()?;
    match entries.first() {
        Some(head) if head.next_attempt_at <= now => Ok(entries),
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{contract, test_pg};

    /// Two nodes on one database.
    async fn two_nodes() -> (PgStore, PgStore) {
        let url = test_pg::database().await;
        // The second finds the migrations done.
        let one = PgStore::connect(&url).await.unwrap();
        let two = PgStore::connect(&url).await.unwrap();
        (one, two)
    }

    /// Two pages asked for at once, on two nodes, for an instance that may have one:
    /// one is made, the other refused. Counting without the instance's lock, each
    /// would see none and both would be made.
    #[tokio::test]
    async fn two_nodes_asking_for_a_link_page_at_once_make_one() {
        let (one, two) = two_nodes().await;
        for round in 0..20 {
            let id = format!("I{round}");
            one.insert_instance(&contract::instance(&id, "n", round))
                .await
                .unwrap();
            let page = |hash: &str| LinkPage {
                token_hash: format!("{hash}{round}"),
                instance_id: id.clone(),
                created_at: 100,
                expires_at: 1_000,
                revoked_at: None,
                used_at: None,
                pair_codes: 0,
            };
            let (first, second) = (page("a"), page("b"));
            let (a, b) = tokio::join!(
                one.insert_link_page(&first, 0, 1),
                two.insert_link_page(&second, 0, 1)
            );
            let mut made = [a.unwrap(), b.unwrap()];
            made.sort_by_key(|m| *m != LinkPageMade::Made);
            assert_eq!(
                made,
                [LinkPageMade::Made, LinkPageMade::TooMany],
                "round {round}"
            );
        }
    }

    /// Connection events written at once on two nodes keep the cap: the instance's
    /// oldest pending one is dropped, as if they had come one after the other.
    #[tokio::test]
    async fn two_nodes_writing_connection_events_at_once_keep_the_cap() {
        let (one, two) = two_nodes().await;
        for round in 0..20 {
            let id = format!("I{round}");
            let record = InstanceRecord {
                webhooks: Webhooks {
                    connected: Some("http://h/c".into()),
                    disconnected: Some("http://h/d".into()),
                    ..Webhooks::default()
                },
                ..contract::instance(&id, "n", round)
            };
            one.insert_instance(&record).await.unwrap();
            let event = |n: u32, kind| WebhookEvent {
                event_id: format!("{id}-{n}"),
                instance_id: id.clone(),
                kind,
                body: String::new(),
                created_at: 10,
            };
            let (first, second) = (
                event(1, WebhookKind::Connected),
                event(2, WebhookKind::Disconnected),
            );
            let (a, b) = tokio::join!(
                one.enqueue_webhook(&first, 1),
                two.enqueue_webhook(&second, 1)
            );
            assert!(a.unwrap() && b.unwrap());
            let pending = one.due_webhooks_of(&id, 10, 10).await.unwrap();
            assert_eq!(pending.len(), 1, "round {round}");
        }
        let (depth, _, dropped) = one.outbox_stats().await.unwrap();
        assert_eq!((depth, dropped), (20, 20));
    }

    /// PostgreSQL's failures worth a retry are "busy"; others are not, whatever their
    /// code would mean on SQLite.
    #[tokio::test]
    async fn conflicts_locks_and_lost_connections_are_busy() {
        let url = test_pg::database().await;
        let store = PgStore::connect(&url).await.unwrap();
        for (code, busy) in [
            ("40001", true),
            ("40P01", true),
            ("55P03", true),
            ("08006", true),
            ("08P01", true),
            ("23505", false),
            // 42501 & 0xff is SQLITE_BUSY's 5.
            ("42501", false),
            ("ZG001", false),
        ] {
            let raise =
                format!("DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{code}'; END $$");
            let error = sqlx::query(sqlx::AssertSqlSafe(raise))
                .execute(&store.pool)
                .await
                .unwrap_err();
            assert_eq!(StoreError::from(error).is_busy(), busy, "{code}");
        }
        // A row another transaction holds, asked for without waiting.
        store
            .insert_instance(&contract::instance("A", "a", 0))
            .await
            .unwrap();
        let mut holder = store.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM instances WHERE id = 'A' FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let error = sqlx::query("SELECT 1 FROM instances WHERE id = 'A' FOR UPDATE NOWAIT")
            .execute(&store.pool)
            .await
            .unwrap_err();
        assert!(StoreError::from(error).is_busy());
        holder.rollback().await.unwrap();
    }
}
