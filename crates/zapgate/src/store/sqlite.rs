//! The SQLite backend: one file in the data directory, WAL mode.

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteRow, SqliteSynchronous};
use sqlx::{Connection as _, QueryBuilder, Row};

use super::conns::Conns;
use super::{
    Attempt, InstanceRecord, Link, LinkPage, LinkPageMade, OutboxEntry, Page, Store, StoreError,
    WebhookEvent, WebhookKind, Webhooks,
};

/// The writing connection, held.
pub(super) type Writer<'a> = tokio::sync::MutexGuard<'a, sqlx::SqliteConnection>;

pub struct SqliteStore {
    /// The one connection that writes: writes queue for it instead of taking turns at
    /// SQLite's lock, whose busy handler sleeps (tens of milliseconds at a time) when
    /// several connections write at once.
    pub(super) write: Conns,
    /// Read-only connections beside it (WAL): a write on one of them fails loudly.
    pub(super) read: Conns,
}

/// A write waits this long for the writing connection before it fails as busy.
const WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl SqliteStore {
    /// Commits reach the disk at checkpoints (`synchronous = NORMAL`): a crash of the
    /// process loses none, a power cut may lose the last ones. What a user gave us (a
    /// message to send, a message received) is committed through [`Self::durable`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        // A caller waiting WRITE_WAIT for a connection hears "busy" and may retry.
        let write = Conns::open(&options, 1, WRITE_WAIT).await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut *write.lock().await?)
            .await?;
        let read = Conns::open(&options.read_only(true), 3, WRITE_WAIT).await?;
        Ok(Self { write, read })
    }

    /// The writing connection, set so that its next commit is on disk before it
    /// returns; give it back through [`relax`].
    pub(super) async fn durable(&self) -> Result<Writer<'_>, StoreError> {
        let mut conn = self.write.lock().await?;
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await?;
        Ok(conn)
    }
}

/// The writing connection back to commits at checkpoints. One not relaxed (an error
/// on the way) stays on `FULL`: slower, never less safe.
pub(super) async fn relax(mut conn: Writer<'_>) {
    let _ = sqlx::query("PRAGMA synchronous = NORMAL")
        .execute(&mut *conn)
        .await;
}

read_outbox_entry!(SqliteRow);
read_record!(SqliteRow);

#[async_trait]
impl Store for SqliteStore {
    async fn insert_instance(&self, i: &InstanceRecord) -> Result<(), StoreError> {
        sqlx::query(concat!(
            "INSERT INTO instances (",
            columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
        .execute(&mut *self.write.lock().await?)
        .await?;
        Ok(())
    }

    async fn all_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM instances ORDER BY created_at, rowid"
        ))
        .fetch_all(&mut *self.read.lock().await?)
        .await?;
        Ok(rows.iter().map(record).collect::<Result<_, _>>()?)
    }

    async fn page_instances(
        &self,
        page: u32,
        page_size: u32,
        query: Option<&str>,
    ) -> Result<Page, StoreError> {
        let filter = |q: &mut QueryBuilder<sqlx::Sqlite>| {
            q.push(" WHERE cancelled_at IS NULL");
            if let Some(text) = query {
                let pattern = format!(
                    "%{}%",
                    text.replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_")
                );
                q.push(" AND (name LIKE ")
                    .push_bind(pattern.clone())
                    .push(" ESCAPE '\\' OR id LIKE ")
                    .push_bind(pattern)
                    .push(" ESCAPE '\\')");
            }
        };
        let mut count = QueryBuilder::new("SELECT COUNT(*) FROM instances");
        filter(&mut count);
        let total: i64 = count
            .build_query_scalar()
            .fetch_one(&mut *self.read.lock().await?)
            .await?;

        let mut select = QueryBuilder::new(concat!("SELECT ", columns!(), " FROM instances"));
        filter(&mut select);
        select
            .push(" ORDER BY created_at, rowid LIMIT ")
            .push_bind(i64::from(page_size))
            .push(" OFFSET ")
            .push_bind(i64::from(page.saturating_sub(1)) * i64::from(page_size));
        let rows = select
            .build()
            .fetch_all(&mut *self.read.lock().await?)
            .await?;
        Ok(Page {
            items: rows.iter().map(record).collect::<Result<_, _>>()?,
            total: total as u64,
        })
    }

    async fn set_link(&self, id: &str, link: Option<&Link>) -> Result<(), StoreError> {
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin().await?;
        sqlx::query("UPDATE instances SET phone = ?, linked_at = ?, platform = ? WHERE id = ?")
            .bind(link.map(|l| &l.phone))
            .bind(link.map(|l| l.linked_at))
            .bind(link.and_then(|l| l.platform.as_deref()))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if let Some(link) = link {
            // The instance's link pages did their job.
            sqlx::query(
                "UPDATE link_pages SET used_at = ? WHERE instance_id = ? AND used_at IS NULL",
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
            " FROM instances WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&mut *self.read.lock().await?)
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
                "UPDATE instances SET connected_callback_url = ? WHERE id = ?"
            }
            WebhookKind::Disconnected => {
                "UPDATE instances SET disconnected_callback_url = ? WHERE id = ?"
            }
            WebhookKind::Received => "UPDATE instances SET received_callback_url = ? WHERE id = ?",
            WebhookKind::ReceivedDelivery => {
                "UPDATE instances SET received_delivery_callback_url = ? WHERE id = ?"
            }
            WebhookKind::Delivery => "UPDATE instances SET delivery_callback_url = ? WHERE id = ?",
            WebhookKind::MessageStatus => {
                "UPDATE instances SET message_status_callback_url = ? WHERE id = ?"
            }
            WebhookKind::ChatPresence => {
                "UPDATE instances SET presence_chat_callback_url = ? WHERE id = ?"
            }
        };
        let done = sqlx::query(statement)
            .bind(url)
            .bind(id)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_every_webhook(
        &self,
        id: &str,
        url: Option<&str>,
        notify_sent_by_me: Option<bool>,
    ) -> Result<bool, StoreError> {
        let statement = "UPDATE instances SET connected_callback_url = ?1, \
             disconnected_callback_url = ?1, received_callback_url = ?1, \
             received_delivery_callback_url = ?1, delivery_callback_url = ?1, \
             message_status_callback_url = ?1, presence_chat_callback_url = ?1, \
             notify_sent_by_me = COALESCE(?2, notify_sent_by_me) WHERE id = ?3";
        let done = sqlx::query(statement)
            .bind(url)
            .bind(notify_sent_by_me)
            .bind(id)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_notify_sent_by_me(&self, id: &str, notify: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE instances SET notify_sent_by_me = ? WHERE id = ?")
            .bind(notify)
            .bind(id)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn enqueue_webhook(&self, event: &WebhookEvent, cap: u64) -> Result<bool, StoreError> {
        let (kind, statement) = match event.kind {
            WebhookKind::Connected => (
                "connected",
                "INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
                 next_attempt_at) SELECT ?1, id, ?2, connected_callback_url, ?3, ?4, ?4 \
                 FROM instances WHERE id = ?5 AND connected_callback_url IS NOT NULL",
            ),
            WebhookKind::Disconnected => (
                "disconnected",
                "INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
                 next_attempt_at) SELECT ?1, id, ?2, disconnected_callback_url, ?3, ?4, ?4 \
                 FROM instances WHERE id = ?5 AND disconnected_callback_url IS NOT NULL",
            ),
            // Their events come with messaging.
            _ => return Ok(false),
        };
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin().await?;
        sqlx::query("UPDATE instances SET webhook_connected = ? WHERE id = ?")
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
            sqlx::query(
                "UPDATE webhook_outbox SET done_at = ?1, outcome = 'dropped' WHERE seq IN \
                 (SELECT seq FROM webhook_outbox WHERE instance_id = ?2 AND done_at IS NULL \
                  AND kind IN ('connected', 'disconnected') \
                  ORDER BY seq DESC LIMIT -1 OFFSET ?3)",
            )
            .bind(event.created_at)
            .bind(&event.instance_id)
            .bind(cap as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn webhook_announced(&self, instance_id: &str) -> Result<Option<bool>, StoreError> {
        let said: Option<Option<bool>> =
            sqlx::query_scalar("SELECT webhook_connected FROM instances WHERE id = ?")
                .bind(instance_id)
                .fetch_optional(&mut *self.read.lock().await?)
                .await?;
        Ok(said.flatten())
    }

    async fn stop_webhook_url(
        &self,
        instance_id: &str,
        url: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin().await?;
        for statement in [
            "UPDATE instances SET connected_callback_url = NULL WHERE id = ? AND connected_callback_url = ?",
            "UPDATE instances SET disconnected_callback_url = NULL WHERE id = ? AND disconnected_callback_url = ?",
            "UPDATE instances SET received_callback_url = NULL WHERE id = ? AND received_callback_url = ?",
            "UPDATE instances SET received_delivery_callback_url = NULL WHERE id = ? AND received_delivery_callback_url = ?",
            "UPDATE instances SET delivery_callback_url = NULL WHERE id = ? AND delivery_callback_url = ?",
            "UPDATE instances SET message_status_callback_url = NULL WHERE id = ? AND message_status_callback_url = ?",
        ] {
            sqlx::query(statement)
                .bind(instance_id)
                .bind(url)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE webhook_outbox SET done_at = ?, outcome = 'gone', \
             last_error = 'the receiver answered 410 Gone for this URL' \
             WHERE instance_id = ? AND url = ? AND done_at IS NULL",
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
        // A thousand at a time, each its own commit: other writes wait for the writer.
        const BATCH: i64 = 1000;
        let mut forgotten = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM webhook_outbox WHERE seq IN \
                 (SELECT seq FROM webhook_outbox WHERE done_at < ?1 LIMIT ?2)",
            )
            .bind(before)
            .bind(BATCH)
            .execute(&mut *self.write.lock().await?)
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
        let mut q = QueryBuilder::new(concat!(
            "SELECT ",
            outbox_columns!(),
            " FROM webhook_outbox WHERE seq IN (SELECT MIN(seq) FROM webhook_outbox \
             WHERE done_at IS NULL GROUP BY instance_id) AND next_attempt_at <= "
        ));
        q.push_bind(now);
        if !busy.is_empty() {
            q.push(" AND instance_id NOT IN (");
            let mut list = q.separated(", ");
            for id in busy {
                list.push_bind(id.clone());
            }
            q.push(")");
        }
        q.push(" ORDER BY next_attempt_at LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&mut *self.read.lock().await?).await?;
        Ok(rows.iter().map(outbox_entry).collect::<Result<_, _>>()?)
    }

    async fn next_webhook_due(&self, busy: &[String]) -> Result<Option<i64>, StoreError> {
        let mut q = QueryBuilder::new(
            "SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE seq IN \
             (SELECT MIN(seq) FROM webhook_outbox WHERE done_at IS NULL GROUP BY instance_id)",
        );
        if !busy.is_empty() {
            q.push(" AND instance_id NOT IN (");
            let mut list = q.separated(", ");
            for id in busy {
                list.push_bind(id.clone());
            }
            q.push(")");
        }
        Ok(q.build_query_scalar()
            .fetch_one(&mut *self.read.lock().await?)
            .await?)
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
            " FROM webhook_outbox WHERE instance_id = ? AND done_at IS NULL ORDER BY seq LIMIT ?"
        ))
        .bind(instance_id)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.read.lock().await?)
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
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = ?1, \
                 last_error = ?2, next_attempt_at = COALESCE(?3, next_attempt_at), \
                 done_at = ?4, outcome = ?5 WHERE seq = ?6 AND done_at IS NULL"
            };
        }
        // The read in the same call as the record (one trip to the connection's thread,
        // on the writing connection, which sees the record).
        const RECORD_AND_READ: &str = concat!(
            record!(),
            "; SELECT ",
            outbox_columns!(),
            " FROM webhook_outbox WHERE instance_id = \
             (SELECT instance_id FROM webhook_outbox WHERE seq = ?6) \
             AND done_at IS NULL ORDER BY seq LIMIT ?7"
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
        .bind(seq)
        .bind(i64::from(ahead));
        let rows = query.fetch_all(&mut *self.write.lock().await?).await?;
        due_from(&rows, at)
    }

    async fn outbox_stats(&self) -> Result<(u64, Option<i64>, u64), StoreError> {
        let (depth, oldest, dropped): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE done_at IS NULL), \
             MIN(created_at) FILTER (WHERE done_at IS NULL), \
             COUNT(*) FILTER (WHERE outcome = 'dropped') FROM webhook_outbox",
        )
        .fetch_one(&mut *self.read.lock().await?)
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
            " FROM webhook_outbox WHERE instance_id = ? ORDER BY seq DESC LIMIT ?"
        ))
        .bind(instance_id)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.read.lock().await?)
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
            "UPDATE webhook_outbox SET next_attempt_at = ? \
             WHERE instance_id = ? AND event_id = ? AND done_at IS NULL",
        )
        .bind(now)
        .bind(instance_id)
        .bind(event_id)
        .execute(&mut *self.write.lock().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_cancelled(&self, id: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE instances SET cancelled_at = COALESCE(cancelled_at, ?) WHERE id = ?")
            .bind(at)
            .bind(id)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(())
    }

    async fn delete_instance(&self, id: &str) -> Result<(), StoreError> {
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin().await?;
        for statement in [
            "DELETE FROM outbound_messages WHERE instance_id = ?",
            "DELETE FROM inbound_messages WHERE instance_id = ?",
            "DELETE FROM instances WHERE id = ?",
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
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin().await?;
        sqlx::query("DELETE FROM link_pages WHERE expires_at < ? OR revoked_at < ? OR used_at < ?")
            .bind(forget_before)
            .bind(forget_before)
            .bind(forget_before)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO link_pages (token_hash, instance_id, created_at, expires_at, revoked_at) \
             SELECT ?, ?, ?, ?, ? WHERE (SELECT COUNT(*) FROM link_pages WHERE instance_id = ? \
             AND revoked_at IS NULL AND used_at IS NULL AND expires_at > ?) < ? \
             AND (SELECT phone FROM instances WHERE id = ?) IS NULL",
        )
        .bind(&page.token_hash)
        .bind(&page.instance_id)
        .bind(page.created_at)
        .bind(page.expires_at)
        .bind(page.revoked_at)
        .bind(&page.instance_id)
        .bind(page.created_at)
        .bind(max_live as i64)
        .bind(&page.instance_id)
        .execute(&mut *tx)
        .await?;
        let made = if inserted.rows_affected() == 1 {
            LinkPageMade::Made
        } else {
            let linked: Option<bool> =
                sqlx::query_scalar("SELECT phone IS NOT NULL FROM instances WHERE id = ?")
                    .bind(&page.instance_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if linked == Some(true) {
                LinkPageMade::Linked
            } else {
                LinkPageMade::TooMany
            }
        };
        tx.commit().await?;
        Ok(made)
    }

    async fn link_page(&self, token_hash: &str) -> Result<Option<LinkPage>, StoreError> {
        let row = sqlx::query(
            "SELECT token_hash, instance_id, created_at, expires_at, revoked_at, used_at, \
             pair_codes FROM link_pages WHERE token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&mut *self.read.lock().await?)
        .await?;
        row.map(|row| {
            Ok(LinkPage {
                token_hash: row.try_get("token_hash")?,
                instance_id: row.try_get("instance_id")?,
                created_at: row.try_get("created_at")?,
                expires_at: row.try_get("expires_at")?,
                revoked_at: row.try_get("revoked_at")?,
                used_at: row.try_get("used_at")?,
                pair_codes: row.try_get("pair_codes")?,
            })
        })
        .transpose()
    }

    async fn count_link_page_codes(
        &self,
        token_hash: &str,
        pair_codes: u32,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE link_pages SET pair_codes = MAX(pair_codes, ?) WHERE token_hash = ?")
            .bind(pair_codes)
            .bind(token_hash)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(())
    }

    async fn revoke_link_pages(&self, instance_id: &str, at: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE link_pages SET revoked_at = ? WHERE instance_id = ? AND revoked_at IS NULL \
             AND used_at IS NULL AND expires_at > ?",
        )
        .bind(at)
        .bind(instance_id)
        .bind(at)
        .execute(&mut *self.write.lock().await?)
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
        let mut writer = self.write.lock().await?;
        let mut tx = writer.begin().await?;
        sqlx::query("DELETE FROM panel_sessions WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM panel_sessions WHERE session_key IN (SELECT session_key \
             FROM panel_sessions ORDER BY expires_at LIMIT \
             MAX(0, (SELECT COUNT(*) FROM panel_sessions) - ? + 1))",
        )
        .bind(i64::try_from(max_open).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO panel_sessions (session_key, csrf, expires_at) VALUES (?, ?, ?)")
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
            "SELECT csrf FROM panel_sessions WHERE session_key = ? AND expires_at > ?",
        )
        .bind(key)
        .bind(now)
        .fetch_optional(&mut *self.read.lock().await?)
        .await?)
    }

    async fn close_panel_session(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM panel_sessions WHERE session_key = ?")
            .bind(key)
            .execute(&mut *self.write.lock().await?)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.read.lock().await?)
            .await?;
        Ok(())
    }
}

/// The events of `rows` (one instance's pending, in order) if the first is due at
/// `now`: those after it wait for it.
fn due_from(rows: &[SqliteRow], now: i64) -> Result<Vec<OutboxEntry>, StoreError> {
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
    use crate::store::contract::instance;

    /// A write refused because another connection holds the lock is "busy" (the link
    /// of a new number is tried again on it); it goes through once the lock is gone.
    #[tokio::test]
    async fn a_write_kept_waiting_by_a_lock_is_busy() {
        use sqlx::Connection as _;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("z.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store
            .insert_instance(&instance("ID", "a", 1))
            .await
            .unwrap();
        let link = Link {
            phone: "5511999990001".into(),
            linked_at: 42,
            platform: None,
        };
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut other)
            .await
            .unwrap();
        let refused = store.set_link("ID", Some(&link)).await.unwrap_err();
        assert!(refused.is_busy(), "{refused:?}");
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        store.set_link("ID", Some(&link)).await.unwrap();
        assert_eq!(
            store.instance("ID").await.unwrap().unwrap().link,
            Some(link)
        );
        assert!(!StoreError::UnsupportedUrl("x".into()).is_busy());
    }

    /// Reopened, the file has what was written, and the migrations do not run twice.
    #[tokio::test]
    async fn a_reopened_file_keeps_its_instances() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("z.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        let mut linked = instance("ID1", "beta", 1);
        linked.link = Some(Link {
            phone: "5511999990001".into(),
            linked_at: 42,
            platform: Some("android".into()),
        });
        let written = [instance("ID0", "alpha", 0), linked];
        for record in &written {
            store.insert_instance(record).await.unwrap();
        }
        drop(store);
        let store = SqliteStore::connect(&url).await.unwrap();
        assert_eq!(store.all_instances().await.unwrap(), written);
    }
}
