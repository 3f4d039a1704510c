//! What both backends read alike: the column lists (macros, so statements stay
//! `&'static str`) and the readers of a row into a record, written once and made for
//! each backend's row type (`read_record!(SqliteRow)`).

/// The instance columns, as a macro so statements stay `&'static str`.
macro_rules! columns {
    () => {
        "id, token, name, session_name, connected_callback_url, \
         disconnected_callback_url, created_at, due_at, phone, linked_at, platform, \
         cancelled_at, received_callback_url, received_delivery_callback_url, \
         delivery_callback_url, message_status_callback_url, presence_chat_callback_url, \
         notify_sent_by_me"
    };
}

macro_rules! outbox_columns {
    () => {
        "seq, event_id, instance_id, kind, url, body, created_at, attempts, next_attempt_at, \
         last_status, last_error, done_at, outcome"
    };
}

/// A message's columns, as `read_outbound!` reads them.
macro_rules! outbound_columns {
    () => {
        "seq, zaap_id, instance_id, message_id, phone, text, reply_to, edit_of, delay_ms, \
         typing_ms, state, attempts, error, created_at, sent_at"
    };
}

/// `fn outbox_entry(&$row)`: an outbox event.
macro_rules! read_outbox_entry {
    ($row:ty) => {
        fn outbox_entry(row: &$row) -> Result<OutboxEntry, sqlx::Error> {
            Ok(OutboxEntry {
                seq: row.try_get("seq")?,
                event_id: row.try_get("event_id")?,
                instance_id: row.try_get("instance_id")?,
                kind: row.try_get("kind")?,
                url: row.try_get("url")?,
                body: row.try_get("body")?,
                created_at: row.try_get("created_at")?,
                attempts: row.try_get("attempts")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                last_status: row.try_get("last_status")?,
                last_error: row.try_get("last_error")?,
                done_at: row.try_get("done_at")?,
                outcome: row.try_get("outcome")?,
            })
        }
    };
}

/// `fn record(&$row)`: an instance.
macro_rules! read_record {
    ($row:ty) => {
        fn record(row: &$row) -> Result<InstanceRecord, sqlx::Error> {
            let phone: Option<String> = row.try_get("phone")?;
            let linked_at: Option<i64> = row.try_get("linked_at")?;
            let platform: Option<String> = row.try_get("platform")?;
            Ok(InstanceRecord {
                id: row.try_get("id")?,
                token: row.try_get("token")?,
                name: row.try_get("name")?,
                session_name: row.try_get("session_name")?,
                webhooks: Webhooks {
                    connected: row.try_get("connected_callback_url")?,
                    disconnected: row.try_get("disconnected_callback_url")?,
                    received: row.try_get("received_callback_url")?,
                    received_delivery: row.try_get("received_delivery_callback_url")?,
                    delivery: row.try_get("delivery_callback_url")?,
                    message_status: row.try_get("message_status_callback_url")?,
                    chat_presence: row.try_get("presence_chat_callback_url")?,
                    notify_sent_by_me: row.try_get("notify_sent_by_me")?,
                },
                created_at: row.try_get("created_at")?,
                due_at: row.try_get("due_at")?,
                link: phone.map(|phone| Link {
                    phone,
                    linked_at: linked_at.unwrap_or_default(),
                    platform,
                }),
                cancelled_at: row.try_get("cancelled_at")?,
            })
        }
    };
}

/// `fn outbound(&$row)`: a message of ours.
macro_rules! read_outbound {
    ($row:ty) => {
        fn outbound(row: &$row) -> Result<Outbound, sqlx::Error> {
            Ok(Outbound {
                seq: row.try_get("seq")?,
                zaap_id: row.try_get("zaap_id")?,
                instance_id: row.try_get("instance_id")?,
                message_id: row.try_get("message_id")?,
                phone: row.try_get("phone")?,
                text: row.try_get("text")?,
                reply_to: row.try_get("reply_to")?,
                edit_of: row.try_get("edit_of")?,
                delay_ms: row.try_get("delay_ms")?,
                typing_ms: row.try_get("typing_ms")?,
                state: row.try_get("state")?,
                attempts: row.try_get("attempts")?,
                error: row.try_get("error")?,
                created_at: row.try_get("created_at")?,
                sent_at: row.try_get("sent_at")?,
            })
        }
    };
}
