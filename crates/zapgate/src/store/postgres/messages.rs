//! Messages on PostgreSQL: the same queue, statuses and received messages as on SQLite.
//!
//! SQLite had one writer, so a read and the write that follows it could not be overtaken;
//! here several gateway nodes write at once (READ COMMITTED). Every transaction that
//! decides from what it read, or writes webhook events, first locks its instance's row:
//! writers of one instance take turns, as they did on SQLite, and the events they write
//! get their seq in commit order, which is the order the delivery worker reads them in.
//! Single-statement writes whose WHERE says the state they expect need no more: the row
//! lock of their UPDATE (or DELETE) does the work.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row as _};

use super::PgStore;
use crate::store::messages::{FORGET_BATCH, outbox_kind};
use crate::store::{
    Enqueued, Inbound, MessageStore, NewOutbound, Outbound, RECEIVED_BACKLOG, Status, StoreError,
    WebhookEvent,
};

/// Takes the instance's row lock until the transaction ends (see the module's doc).
async fn lock_instance(tx: &mut PgConnection, instance_id: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR NO KEY UPDATE")
        .bind(instance_id)
        .fetch_optional(tx)
        .await?;
    Ok(())
}

/// Takes the row lock of the instance whose message `seq` is.
async fn lock_instance_of(tx: &mut PgConnection, seq: i64) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT 1 FROM instances WHERE id = \
         (SELECT instance_id FROM outbound_messages WHERE seq = $1) FOR NO KEY UPDATE",
    )
    .bind(seq)
    .fetch_optional(tx)
    .await?;
    Ok(())
}

/// Writes a webhook event of a message kind if the instance has a URL for it; returns
/// whether it did. Status events past 20,000 drop the oldest of theirs (the trigger of
/// migration 0002). The caller holds the instance's row lock.
async fn write_message_event(
    tx: &mut PgConnection,
    event: &WebhookEvent,
) -> Result<bool, StoreError> {
    let Some((kind, url)) = outbox_kind(event.kind) else {
        return Ok(false);
    };
    let statement = format!(
        "INSERT INTO webhook_outbox (event_id, instance_id, kind, url, body, created_at, \
         next_attempt_at) SELECT $1, id, $2, {url}, $3, $4, $4 FROM instances \
         WHERE id = $5 AND {url} IS NOT NULL"
    );
    let written = sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(&event.event_id)
        .bind(kind)
        .bind(&event.body)
        .bind(event.created_at)
        .bind(&event.instance_id)
        .execute(tx)
        .await?
        .rows_affected()
        == 1;
    Ok(written)
}

/// What an idempotency key already made: the message (`Replayed`) when `hash` is its
/// request's, `KeyReused` when another request used the key; `None` when it is new.
async fn replayed(
    db: &mut PgConnection,
    instance_id: &str,
    key: &str,
    hash: &str,
) -> Result<Option<Enqueued>, StoreError> {
    let earlier = sqlx::query(concat!(
        "SELECT ",
        outbound_columns!(),
        ", request_hash FROM outbound_messages WHERE instance_id = $1 AND idempotency_key = $2"
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

/// The message queued, committed before this returns, unless a replay, a reused key or a
/// full queue says otherwise.
async fn enqueue(
    store: &PgStore,
    m: &NewOutbound,
    max_pending: i64,
) -> Result<Enqueued, StoreError> {
    const QUEUE: &str = concat!(
        "INSERT INTO outbound_messages (zaap_id, instance_id, message_id, phone, text, \
         reply_to, edit_of, delay_ms, typing_ms, idempotency_key, request_hash, created_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 \
         WHERE (SELECT COUNT(*) FROM outbound_messages WHERE instance_id = $2 \
                AND state IN ('queued', 'sending')) < $13 \
         AND NOT EXISTS (SELECT 1 FROM outbound_messages WHERE instance_id = $2 \
                         AND idempotency_key = $10) \
         ON CONFLICT (instance_id, idempotency_key) WHERE idempotency_key IS NOT NULL \
         DO NOTHING RETURNING ",
        outbound_columns!()
    );
    let (key, hash) = match &m.idempotency {
        Some((key, hash)) => (Some(key.as_str()), Some(hash.as_str())),
        None => (None, None),
    };
    let mut tx = store.pool.begin().await?;
    // The count of waiting messages and the look for the key read what every earlier
    // enqueue of the instance committed: two at once could both see room for one more,
    // or both miss the key. The ON CONFLICT is for an instance without a row (nothing
    // to lock): a second message with the key waits for the first, then writes nothing.
    lock_instance(&mut tx, &m.instance_id).await?;
    let row = sqlx::query(QUEUE)
        .bind(&m.zaap_id)
        .bind(&m.instance_id)
        .bind(&m.message_id)
        .bind(&m.phone)
        .bind(&m.text)
        .bind(&m.reply_to)
        .bind(&m.edit_of)
        .bind(m.delay_ms)
        .bind(m.typing_ms)
        .bind(key)
        .bind(hash)
        .bind(m.created_at)
        .bind(max_pending)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(row) = row {
        let queued = outbound(&row)?;
        return match tx.commit().await {
            Ok(()) => Ok(Enqueued::New(queued)),
            // The connection went during the commit: it may have been queued.
            Err(e) => match store.outbound_by_id(&m.instance_id, &m.message_id).await {
                Ok(Some(queued)) => Ok(Enqueued::New(queued)),
                _ => Err(e.into()),
            },
        };
    }
    // Not queued: the key made a message before, or the queue is full.
    let earlier = match (key, hash) {
        (Some(key), Some(hash)) => replayed(&mut tx, &m.instance_id, key, hash).await?,
        _ => None,
    };
    tx.commit().await?;
    Ok(earlier.unwrap_or(Enqueued::Full))
}

read_outbound!(PgRow);

/// Appends `id` to the list of `phone`, in the order phones first came.
fn group(by_phone: &mut Vec<(String, Vec<String>)>, phone: &str, id: &str) {
    match by_phone.iter_mut().find(|(p, _)| p == phone) {
        Some((_, list)) => list.push(id.to_owned()),
        None => by_phone.push((phone.to_owned(), vec![id.to_owned()])),
    }
}

/// Received messages recorded in one transaction; whether each was new.
async fn record_inbound(store: &PgStore, messages: &[Inbound]) -> Result<Vec<bool>, StoreError> {
    let mut instances: Vec<&str> = messages.iter().map(|m| m.instance_id.as_str()).collect();
    instances.sort_unstable();
    instances.dedup();
    let mut tx = store.pool.begin().await?;
    // The backlog count must not be raced past by another node recording for the same
    // instance, and the events go in commit order. In id order, so two batches of
    // several instances cannot each hold what the other waits for.
    sqlx::query("SELECT 1 FROM instances WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&instances)
        .fetch_all(&mut *tx)
        .await?;
    let mut new = Vec::with_capacity(messages.len());
    for m in messages {
        if m.event.is_some() {
            let backlog: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM webhook_outbox WHERE instance_id = $1 \
                 AND done_at IS NULL AND kind = 'received'",
            )
            .bind(&m.instance_id)
            .fetch_one(&mut *tx)
            .await?;
            if backlog >= RECEIVED_BACKLOG {
                return Err(StoreError::Backlog(m.instance_id.clone()));
            }
        }
        // A copy recorded at the same moment elsewhere is waited for, then skipped.
        let inserted = sqlx::query(
            "INSERT INTO inbound_messages (instance_id, chat, sender, message_id, waiting, \
             text, from_me, sent_at, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
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

#[async_trait]
impl MessageStore for PgStore {
    async fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (depth, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(created_at) FROM outbound_messages \
             WHERE state IN ('queued', 'sending')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((depth as u64, oldest))
    }

    async fn replayed(
        &self,
        instance_id: &str,
        key: &str,
        hash: &str,
    ) -> Result<Option<Enqueued>, StoreError> {
        replayed(&mut *self.pool.acquire().await?, instance_id, key, hash).await
    }

    async fn enqueue_message(
        &self,
        message: &NewOutbound,
        max_pending: i64,
    ) -> Result<Enqueued, StoreError> {
        enqueue(self, message, max_pending).await
    }

    async fn queue_front(
        &self,
        instance_id: &str,
        limit: u32,
    ) -> Result<Vec<Outbound>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbound_columns!(),
            " FROM outbound_messages WHERE instance_id = $1 \
             AND state IN ('queued', 'sending') ORDER BY seq LIMIT $2"
        ))
        .bind(instance_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(outbound).collect::<Result<_, _>>()?)
    }

    async fn instances_with_queue(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT instance_id FROM outbound_messages \
             WHERE state IN ('queued', 'sending')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn queue_page(
        &self,
        instance_id: &str,
        page: u32,
        page_size: u32,
    ) -> Result<(Vec<Outbound>, u64), StoreError> {
        let total: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbound_messages WHERE instance_id = $1 \
             AND state IN ('queued', 'sending')",
        )
        .bind(instance_id)
        .fetch_one(&self.pool)
        .await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            outbound_columns!(),
            " FROM outbound_messages WHERE instance_id = $1 \
             AND state IN ('queued', 'sending') ORDER BY seq LIMIT $2 OFFSET $3"
        ))
        .bind(instance_id)
        .bind(i64::from(page_size))
        .bind(i64::from(page.saturating_sub(1)) * i64::from(page_size))
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(outbound).collect::<Result<_, _>>()?;
        Ok((items, total as u64))
    }

    async fn delete_queued(
        &self,
        instance_id: &str,
        zaap_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        // A message going on its way at the same moment holds its row: this waits for
        // it, sees 'sending' and leaves it.
        let done = sqlx::query(
            "DELETE FROM outbound_messages WHERE instance_id = $1 AND state = 'queued' \
             AND ($2::text IS NULL OR zaap_id = $2)",
        )
        .bind(instance_id)
        .bind(zaap_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn message_sending(&self, message: &Outbound) -> Result<bool, StoreError> {
        // Only the node holding the instance starts a send: one that lost its lease
        // (and may not know yet) is refused, so the message goes once, from the new
        // owner. What WhatsApp said back (acks, receipts, messages received) is written
        // by whichever node heard it: each such write is serialized by the instance's
        // row and moves a state only forward, and one refused would be lost.
        let mut tx = self.owner_tx(&message.instance_id).await?;
        let moved = sqlx::query(
            "UPDATE outbound_messages SET state = 'sending', attempts = attempts + 1 \
             WHERE seq = $1 AND instance_id = $2 AND state IN ('queued', 'sending')",
        )
        .bind(message.seq)
        .bind(&message.instance_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(moved == 1)
    }

    async fn message_sent(
        &self,
        seq: i64,
        at: i64,
        delivery: &WebhookEvent,
        status: &WebhookEvent,
    ) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A receipt for the message at the same moment decides whether this ack still
        // announces SENT: one of the two goes first, whole.
        lock_instance_of(&mut tx, seq).await?;
        // The state after: 'sent' when it was on its way; further on when a receipt
        // overtook the ack (which then announced SENT itself).
        let after: Option<String> = sqlx::query_scalar(
            "UPDATE outbound_messages SET sent_at = $1, error = NULL, \
             state = CASE state WHEN 'sending' THEN 'sent' ELSE state END \
             WHERE seq = $2 AND sent_at IS NULL AND state NOT IN ('queued', 'failed') \
             RETURNING state",
        )
        .bind(at)
        .bind(seq)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(after) = after else {
            return Ok(0);
        };
        write_message_event(&mut tx, delivery).await?;
        if after == "sent" {
            write_message_event(&mut tx, status).await?;
        }
        tx.commit().await?;
        Ok(if after == "sent" { 2 } else { 1 })
    }

    async fn message_failed(
        &self,
        seq: i64,
        error: &str,
        events: &[WebhookEvent],
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Its events go in the instance's order.
        lock_instance_of(&mut tx, seq).await?;
        let moved = sqlx::query(
            "UPDATE outbound_messages SET state = 'failed', error = $1 \
             WHERE seq = $2 AND state IN ('queued', 'sending')",
        )
        .bind(error)
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved != 1 {
            return Ok(false);
        }
        for event in events {
            write_message_event(&mut tx, event).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn message_status(
        &self,
        instance_id: &str,
        ids: &[String],
        status: Status,
        at: i64,
        event: &(dyn for<'x> Fn(Status, &'x [String], &'x str) -> WebhookEvent + Sync),
    ) -> Result<Vec<(Status, WebhookEvent)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // An ack or another receipt for these messages at the same moment: the states
        // read below are the ones moved from, and the SENT a receipt writes for a
        // message still waiting for its ack is never written by that ack too.
        lock_instance(&mut tx, instance_id).await?;
        // The messages' rows too, in seq order as a DELETE of the queue takes them: a
        // message going on its way meanwhile waits for this receipt.
        let mut states: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT message_id, phone, state FROM outbound_messages \
             WHERE instance_id = $1 AND message_id = ANY($2) ORDER BY seq FOR UPDATE",
        )
        .bind(instance_id)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        // A receipt that overtook WhatsApp's ack still proves the message was sent:
        // its SENT comes first.
        let mut unacked: Vec<(String, Vec<String>)> = Vec::new();
        for id in ids {
            if let Some((_, phone, state)) = states.iter().find(|(m, _, _)| m == id) {
                if state == "sending" && status != Status::Sent {
                    group(&mut unacked, phone, id);
                }
            }
        }
        // The ids each phone's messages moved, in the order they came; a repeated id
        // moves once.
        let mut moved: Vec<(String, Vec<String>)> = Vec::new();
        let mut to_move: Vec<&str> = Vec::new();
        for id in ids {
            if let Some((_, phone, state)) = states.iter_mut().find(|(m, _, _)| m == id) {
                if status.before().contains(&state.as_str()) {
                    group(&mut moved, phone, id);
                    to_move.push(id);
                    *state = status.state().to_owned();
                }
            }
        }
        if !to_move.is_empty() {
            let column = status.column();
            let statement = format!(
                "UPDATE outbound_messages SET state = $1, {column} = COALESCE({column}, $2) \
                 WHERE instance_id = $3 AND message_id = ANY($4)"
            );
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(status.state())
                .bind(at)
                .bind(instance_id)
                .bind(&to_move)
                .execute(&mut *tx)
                .await?;
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
            " FROM outbound_messages WHERE instance_id = $1 AND message_id = $2"
        ))
        .bind(instance_id)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(outbound).transpose()?)
    }

    async fn record_inbound(&self, messages: &[Inbound]) -> Result<Vec<bool>, StoreError> {
        record_inbound(self, messages).await
    }

    async fn inbound_text(
        &self,
        instance_id: &str,
        message_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT sender, text FROM inbound_messages WHERE instance_id = $1 \
             AND message_id = $2 AND NOT waiting AND text IS NOT NULL LIMIT 1",
        )
        .bind(instance_id)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn forget_messages(&self, before: i64) -> Result<u64, StoreError> {
        // A thousand at a time, each its own commit: a week of messages at hundreds a
        // second is hundreds of thousands of rows, and long deletes hold back vacuum.
        let statements = [
            "DELETE FROM outbound_messages WHERE seq IN (SELECT seq FROM outbound_messages \
             WHERE created_at < $1 AND state NOT IN ('queued', 'sending') LIMIT $2)",
            "DELETE FROM inbound_messages WHERE (instance_id, chat, sender, message_id, \
             waiting) IN (SELECT instance_id, chat, sender, message_id, waiting \
             FROM inbound_messages WHERE received_at < $1 LIMIT $2)",
        ];
        let mut forgotten = 0;
        for statement in statements {
            loop {
                let done = sqlx::query(statement)
                    .bind(before)
                    .bind(FORGET_BATCH)
                    .execute(&self.pool)
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
             WHERE id = $1",
        )
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.unwrap_or_default())
    }

    async fn set_auto_read(&self, instance_id: &str, on: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE instances SET auto_read_message = $1 WHERE id = $2")
            .bind(on)
            .bind(instance_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_enqueue_when_disconnected(
        &self,
        instance_id: &str,
        disabled: bool,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE instances SET disable_enqueue_when_disconnected = $1 WHERE id = $2",
        )
        .bind(disabled)
        .bind(instance_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    //! What only PostgreSQL shows: the status bound's trigger, the outbox's sequence,
    //! batched forgetting, and several nodes writing at once. The rest is the contract
    //! every backend passes (`store::contract::messages`).

    use std::sync::Arc;

    use super::*;
    use crate::store::messages::fixtures::{instance, message, status_event};
    use crate::store::messages::{STATUS_BACKLOG, STATUS_BOUND_EVERY};
    use crate::store::{Store as _, WebhookKind};

    async fn store() -> PgStore {
        let url = crate::store::test_pg::database().await;
        let store = PgStore::connect(&url).await.unwrap();
        store.insert_instance(&instance()).await.unwrap();
        store
    }

    #[tokio::test]
    async fn status_events_past_the_bound_drop_their_oldest_and_received_ones_stay() {
        let store = store().await;
        let received = |n: usize| WebhookEvent {
            event_id: format!("R{n}"),
            instance_id: "I".into(),
            kind: WebhookKind::Received,
            body: format!("{n}"),
            created_at: 20,
        };
        let url = Some("http://127.0.0.1:9/r");
        assert!(
            store
                .set_webhook("I", WebhookKind::Received, url)
                .await
                .unwrap()
        );
        let written = STATUS_BACKLOG + 2 * STATUS_BOUND_EVERY;
        let mut tx = store.pool.begin().await.unwrap();
        assert!(write_message_event(&mut tx, &received(0)).await.unwrap());
        for n in 0..written {
            let mut event = status_event(Status::Sent, &[], "");
            event.body = format!("{n}");
            assert!(write_message_event(&mut tx, &event).await.unwrap());
        }
        assert!(write_message_event(&mut tx, &received(1)).await.unwrap());
        tx.commit().await.unwrap();

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
        let store = store().await;
        let Enqueued::New(m) = store.enqueue_message(&message(1, None), 10).await.unwrap() else {
            panic!()
        };
        store.message_sending(&m).await.unwrap();
        // The delivery event gets a seq the status bound looks at (every 100th): its
        // trigger runs with the INSERT, and the SENT after it must still be written.
        let mut tx = store.pool.begin().await.unwrap();
        write_message_event(&mut tx, &status_event(Status::Read, &[], "earlier"))
            .await
            .unwrap();
        sqlx::query("SELECT setval(pg_get_serial_sequence('webhook_outbox', 'seq'), 99)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
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
        let store = store().await;
        let Enqueued::New(waiting) = store.enqueue_message(&message(1, None), 10).await.unwrap()
        else {
            panic!()
        };
        sqlx::query(
            "INSERT INTO outbound_messages (zaap_id, instance_id, message_id, phone, text, \
             state, created_at) SELECT 'Z-' || x, 'I', 'M-' || x, 'p', 't', 'read', 5 \
             FROM generate_series(1, 2500) AS x",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO inbound_messages (instance_id, chat, sender, message_id, sent_at, \
             received_at) SELECT 'I', 'c', 's', 'R-' || x, 5, CASE WHEN x = 1 THEN 50 ELSE 5 END \
             FROM generate_series(1, 1500) AS x",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        assert_eq!(store.forget_messages(11).await.unwrap(), 2500 + 1499);
        assert_eq!(store.queue_head("I").await.unwrap(), Some(waiting));
        let left: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM outbound_messages), (SELECT COUNT(*) FROM inbound_messages)",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(left, (1, 1));
    }

    /// Two gateway nodes (two pools, each with connections open) on one database.
    async fn two_nodes() -> [Arc<PgStore>; 2] {
        let url = crate::store::test_pg::database().await;
        let nodes = [
            Arc::new(PgStore::connect(&url).await.unwrap()),
            Arc::new(PgStore::connect(&url).await.unwrap()),
        ];
        nodes[0].insert_instance(&instance()).await.unwrap();
        for node in &nodes {
            let open = (0..CALLS / 2).map(|_| node.pool.acquire());
            for conn in futures_util::future::join_all(open).await {
                conn.unwrap();
            }
        }
        nodes
    }

    /// Enqueues at once, half on each node.
    const CALLS: u32 = 16;

    /// The messages `first..first + CALLS` enqueued at once, started together, half on
    /// each node; the answers.
    async fn enqueue_at_once(
        nodes: &[Arc<PgStore>; 2],
        first: u32,
        key: impl Fn(u32) -> Option<(&'static str, &'static str)>,
        max_pending: i64,
    ) -> Vec<(NewOutbound, Enqueued)> {
        let start = Arc::new(tokio::sync::Barrier::new(CALLS as usize));
        let mut running = Vec::new();
        for n in first..first + CALLS {
            let node = nodes[n as usize % 2].clone();
            let m = message(n, key(n));
            let start = start.clone();
            running.push(tokio::spawn(async move {
                start.wait().await;
                let answer = node.enqueue_message(&m, max_pending).await;
                (m, answer.expect("an answer, never a database error"))
            }));
        }
        let mut answers = Vec::new();
        for call in running {
            answers.push(call.await.unwrap());
        }
        answers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_enqueueing_at_once_keep_the_bound() {
        let nodes = two_nodes().await;
        for round in 0..10 {
            let answers = enqueue_at_once(&nodes, round * CALLS, |_| None, 5).await;
            let queued = answers
                .iter()
                .filter(|(_, a)| matches!(a, Enqueued::New(_)))
                .count();
            assert_eq!(queued, 5, "{answers:?}");
            assert!(
                answers
                    .iter()
                    .all(|(_, a)| matches!(a, Enqueued::New(_) | Enqueued::Full))
            );
            assert_eq!(nodes[1].queue_page("I", 1, 100).await.unwrap().1, 5);
            assert_eq!(nodes[0].delete_queued("I", None).await.unwrap(), 5);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_enqueueing_one_key_at_once_make_one_message() {
        let nodes = two_nodes().await;
        const KEYS: [&str; 10] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
        for (round, key) in (0..).zip(KEYS) {
            // Two requests with the key: whichever came first made the one message; the
            // same request again is answered with it, the other is refused.
            let hash = |n: u32| if n % 4 < 2 { "h1" } else { "h2" };
            let keyed = |n| Some((key, hash(n)));
            let answers = enqueue_at_once(&nodes, round * CALLS, keyed, 1_000).await;
            let made: Vec<&(NewOutbound, Enqueued)> = answers
                .iter()
                .filter(|(_, a)| matches!(a, Enqueued::New(_)))
                .collect();
            let [(first, Enqueued::New(queued))] = made.as_slice() else {
                panic!("one message for the key: {answers:?}")
            };
            for (asked, answer) in &answers {
                if asked.message_id == first.message_id {
                    continue;
                }
                match asked.idempotency == first.idempotency {
                    true => assert_eq!(answer, &Enqueued::Replayed(queued.clone())),
                    false => assert_eq!(answer, &Enqueued::KeyReused),
                }
            }
            let with_key: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM outbound_messages WHERE idempotency_key = $1",
            )
            .bind(key)
            .fetch_one(&nodes[0].pool)
            .await
            .unwrap();
            assert_eq!(with_key, 1);
        }
    }
}
