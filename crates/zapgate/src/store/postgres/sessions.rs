//! WhatsApp sessions on PostgreSQL: every instance's session in the shared database, as
//! SQLite keeps them in sessions.db, each write fenced by the lease of the instance the
//! session belongs to (`session_keys::begin_fenced`).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use whatsapp_rust::wacore::store::traits::Backend;

use super::leases::Held;
use super::session_keys::{FENCE_REFUSED, Fenced, Lease, PgSessionKeys, begin_fenced};
use crate::store::{Pairing, SET_ASIDE, SessionStore, StoreError, TO_UNLINK, instance_of};

/// Every instance's WhatsApp session in the shared database. Only the node that holds an
/// instance's lease writes its session, and a session opened under one epoch of the
/// lease is written under that epoch only.
pub struct PgSessions {
    pool: PgPool,
    held: Arc<dyn Held>,
}

impl PgSessions {
    pub fn new(pool: PgPool, held: Arc<dyn Held>) -> Self {
        Self { pool, held }
    }

    /// Whether `error`, or an error beneath it, is a write refused because the lease it
    /// was fenced by moved on: from a session's keys (`Fenced`) or from these sessions
    /// (ZG001). Trying again cannot help; this node no longer owns the instance.
    pub fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut layer = Some(error);
        while let Some(error) = layer {
            let refused = match error.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::Database(e)) => e.code().as_deref() == Some(FENCE_REFUSED),
                _ => error.is::<Fenced>(),
            };
            if refused {
                return true;
            }
            layer = error.source();
        }
        false
    }

    /// The lease that fences writes to the session kept under `name`, as this node holds
    /// it now.
    fn lease(&self, name: &str) -> Lease {
        let instance = instance_of(name);
        Lease {
            instance: instance.to_owned(),
            node: self.held.node().to_owned(),
            epoch: self.held.epoch(instance),
        }
    }

    async fn session_id(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM session WHERE instance = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Deletes a set-aside session of an instance that was deleted (its lease went with
    /// it): no node owns what is left, and any may delete it. The one write to sessions
    /// that [`begin_fenced`] does not open; it names the session it deletes as the fence
    /// would, for the tables' guards, and deletes nothing if the instance's lease is back.
    async fn wipe_unowned(&self, name: &str) -> Result<(), StoreError> {
        let Some(id) = self.session_id(name).await? else {
            return Ok(());
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('zapgate.session', $1, true)")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM session WHERE id = $1 AND instance = $2 \
             AND NOT EXISTS (SELECT 1 FROM zg_lease WHERE instance = $3)",
        )
        .bind(id)
        .bind(name)
        .bind(instance_of(name))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl SessionStore for PgSessions {
    fn location(&self) -> String {
        let options = self.pool.connect_options();
        format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        )
    }

    /// Refused (the fence's ZG001) when this node does not hold the instance; the
    /// session's writes stay bound to the epoch it holds now.
    async fn open(&self, instance: &str) -> Result<Arc<dyn Backend>, StoreError> {
        let lease = self.lease(instance);
        loop {
            // A new row's id is drawn first: the fence names the session it may write.
            let found = self.session_id(instance).await?;
            let id = match found {
                Some(id) => id,
                None => {
                    sqlx::query_scalar("SELECT nextval('session_id')")
                        .fetch_one(&self.pool)
                        .await?
                }
            };
            let mut tx = begin_fenced(&self.pool, &lease, Some(id)).await?;
            if found.is_none() {
                sqlx::query(
                    "INSERT INTO session (id, instance, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (instance) DO NOTHING",
                )
                .bind(id)
                .bind(instance)
                .bind(crate::unix_millis() / 1000)
                .execute(&mut *tx)
                .await?;
            }
            // Another open may have made the row first (its id is the session's).
            let id: Option<i64> = sqlx::query_scalar("SELECT id FROM session WHERE instance = $1")
                .bind(instance)
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            if let Some(id) = id {
                return Ok(Arc::new(PgSessionKeys::new(self.pool.clone(), id, lease)));
            }
            // A wipe deleted the row between the two reads: made anew on the next turn.
        }
    }

    async fn exists(&self, instance: &str) -> Result<bool, StoreError> {
        Ok(self.session_id(instance).await?.is_some())
    }

    /// A set-aside session is fenced by the lease of the instance it was set aside from,
    /// while that instance is there.
    async fn wipe(&self, instance: &str) -> Result<(), StoreError> {
        if instance.starts_with(SET_ASIDE) {
            let leased: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM zg_lease WHERE instance = $1)")
                    .bind(instance_of(instance))
                    .fetch_one(&self.pool)
                    .await?;
            if !leased {
                return self.wipe_unowned(instance).await;
            }
        }
        let id = self.session_id(instance).await?;
        let mut tx = begin_fenced(&self.pool, &self.lease(instance), id).await?;
        if let Some(id) = id {
            // Every other row goes with it (ON DELETE CASCADE), under the same fence.
            sqlx::query("DELETE FROM session WHERE id = $1 AND instance = $2")
                .bind(id)
                .bind(instance)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn stored(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT instance FROM session WHERE NOT starts_with(instance, 'set-aside/') \
             ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn set_aside(&self, instance: &str, to_unlink: bool) -> Result<String, StoreError> {
        let mark = if to_unlink { TO_UNLINK } else { "" };
        let name = format!("{SET_ASIDE}{instance}/{}{mark}", crate::unix_millis());
        let id = self.session_id(instance).await?;
        let mut tx = begin_fenced(&self.pool, &self.lease(instance), id).await?;
        if let Some(id) = id {
            sqlx::query("UPDATE session SET instance = $1 WHERE id = $2 AND instance = $3")
                .bind(&name)
                .bind(id)
                .bind(instance)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(name)
    }

    async fn pairings(&self) -> Result<Vec<(String, Pairing)>, StoreError> {
        // Each device whole, read here: picked out by the database, the first device that
        // is not JSON would fail the query, where it must only say so of itself.
        let rows: Vec<(String, Option<Vec<u8>>)> =
            sqlx::query_as("SELECT instance, device FROM session ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(name, device)| (name, pairing(device.as_deref())))
            .collect())
    }
}

/// What a session's device (JSON, once saved) says of its pairing, in SQLite's words.
fn pairing(device: Option<&[u8]>) -> Pairing {
    let Some(device) = device else {
        return Pairing::Never;
    };
    let Ok(device) = serde_json::from_slice::<serde_json::Value>(device) else {
        return Pairing::Unreadable("its device is not JSON".into());
    };
    let pn = match device.get("pn") {
        None | Some(serde_json::Value::Null) => return Pairing::Never,
        Some(pn) => pn.clone(),
    };
    match serde_json::from_value::<whatsapp_rust::Jid>(pn) {
        Ok(jid) if !jid.user.is_empty() => Pairing::As(format!("{}:{}", jid.user, jid.device)),
        Ok(_) => Pairing::Unreadable("a device number without a phone".into()),
        Err(e) => Pairing::Unreadable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures_util::future::BoxFuture;
    use whatsapp_rust::bytes::Bytes;
    use whatsapp_rust::wacore::appstate::hash::HashState;
    use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
    use whatsapp_rust::wacore::store::Device;
    use whatsapp_rust::wacore::store::error::StoreError as KeysError;
    use whatsapp_rust::wacore::store::traits::*;

    use crate::store::contract::sessions::{self as contract, KEY_TABLES, fill, lid};
    use crate::store::leases::Held as _;

    /// A write through a session's keys, its answer dropped.
    type Write = for<'a> fn(&'a dyn Backend) -> BoxFuture<'a, Result<(), KeysError>>;

    /// Every write whatsapp-rust's store traits have, each once, with rows to write.
    fn writes() -> Vec<(&'static str, Write)> {
        vec![
            ("put_identity", |k| Box::pin(k.put_identity("a", [1; 32]))),
            ("put_identities_batch", |k| {
                Box::pin(async move { k.put_identities_batch(&[(Arc::from("a"), [1; 32])]).await })
            }),
            ("delete_identity", |k| Box::pin(k.delete_identity("a"))),
            ("put_session", |k| Box::pin(k.put_session("a", b"r"))),
            ("put_sessions_batch", |k| {
                Box::pin(async move {
                    k.put_sessions_batch(&[(Arc::from("a"), Bytes::from_static(b"r"))])
                        .await
                })
            }),
            ("delete_session", |k| Box::pin(k.delete_session("a"))),
            ("store_prekey", |k| Box::pin(k.store_prekey(1, b"p", true))),
            ("store_prekeys_batch", |k| {
                Box::pin(async move {
                    k.store_prekeys_batch(&[(1, Bytes::from_static(b"p"))], false)
                        .await
                })
            }),
            ("mark_prekeys_uploaded", |k| {
                Box::pin(async move { k.mark_prekeys_uploaded(&[1]).await })
            }),
            ("remove_prekey", |k| Box::pin(k.remove_prekey(1))),
            ("store_signed_prekey", |k| {
                Box::pin(k.store_signed_prekey(1, b"s"))
            }),
            ("remove_signed_prekey", |k| {
                Box::pin(k.remove_signed_prekey(1))
            }),
            ("put_sender_key", |k| Box::pin(k.put_sender_key("g", b"c"))),
            ("put_sender_keys_batch", |k| {
                Box::pin(async move {
                    k.put_sender_keys_batch(&[(Arc::from("g"), Bytes::from_static(b"c"))])
                        .await
                })
            }),
            ("delete_sender_key", |k| Box::pin(k.delete_sender_key("g"))),
            ("set_sync_key", |k| {
                Box::pin(async move {
                    let key = AppStateSyncKey {
                        key_data: vec![1],
                        fingerprint: vec![2],
                        timestamp: 3,
                    };
                    k.set_sync_key(b"k", key).await
                })
            }),
            ("set_version", |k| {
                Box::pin(k.set_version("regular", HashState::default()))
            }),
            ("put_mutation_macs", |k| {
                Box::pin(async move {
                    let mac = AppStateMutationMAC {
                        index_mac: vec![1; 32],
                        value_mac: vec![2; 32],
                    };
                    k.put_mutation_macs("regular", 1, &[mac]).await
                })
            }),
            ("delete_mutation_macs", |k| {
                Box::pin(async move { k.delete_mutation_macs("regular", &[vec![1; 32]]).await })
            }),
            ("clear_mutation_macs", |k| {
                Box::pin(k.clear_mutation_macs("regular"))
            }),
            ("set_sender_key_status", |k| {
                Box::pin(async move { k.set_sender_key_status("g", &[("d", true)]).await })
            }),
            ("clear_sender_key_devices", |k| {
                Box::pin(k.clear_sender_key_devices("g"))
            }),
            ("delete_sender_key_device_rows", |k| {
                Box::pin(async move { k.delete_sender_key_device_rows(&["d"]).await })
            }),
            ("clear_all_sender_key_devices", |k| {
                Box::pin(k.clear_all_sender_key_devices())
            }),
            ("put_lid_mapping", |k| {
                Box::pin(async move { k.put_lid_mapping(&lid("1", "p", 1)).await })
            }),
            ("put_lid_mappings", |k| {
                Box::pin(async move { k.put_lid_mappings(&[lid("1", "p", 1)]).await })
            }),
            ("save_base_key", |k| {
                Box::pin(k.save_base_key("a", "m", b"b"))
            }),
            ("delete_base_key", |k| Box::pin(k.delete_base_key("a", "m"))),
            ("update_device_list", |k| {
                Box::pin(k.update_device_list(DeviceListRecord {
                    user: "u".into(),
                    devices: vec![DeviceInfo::new(0, None)],
                    timestamp: 1,
                    phash: None,
                    raw_id: None,
                }))
            }),
            ("update_device_lists", |k| {
                Box::pin(k.update_device_lists(vec![DeviceListRecord {
                    user: "u".into(),
                    devices: Vec::new(),
                    timestamp: 1,
                    phash: None,
                    raw_id: None,
                }]))
            }),
            ("delete_devices", |k| Box::pin(k.delete_devices("u"))),
            ("put_group_metadata", |k| {
                Box::pin(k.put_group_metadata("g", b"i"))
            }),
            ("delete_group_metadata", |k| {
                Box::pin(k.delete_group_metadata("g"))
            }),
            ("put_tc_token", |k| {
                Box::pin(async move {
                    let entry = TcTokenEntry {
                        token: b"t".to_vec(),
                        token_timestamp: 1,
                        sender_timestamp: None,
                    };
                    k.put_tc_token("j", &entry).await
                })
            }),
            ("delete_tc_token", |k| Box::pin(k.delete_tc_token("j"))),
            ("delete_expired_tc_tokens", |k| {
                Box::pin(async move { k.delete_expired_tc_tokens(1, 1).await.map(drop) })
            }),
            ("touch_tc_token_sender_timestamp", |k| {
                Box::pin(k.touch_tc_token_sender_timestamp("j", 1))
            }),
            ("store_received_tc_token", |k| {
                Box::pin(k.store_received_tc_token("j", b"t", 1))
            }),
            ("store_sent_message", |k| {
                Box::pin(k.store_sent_message("c", "m", b"p"))
            }),
            ("take_sent_message", |k| {
                Box::pin(async move { k.take_sent_message("c", "m").await.map(drop) })
            }),
            ("delete_expired_sent_messages", |k| {
                Box::pin(async move { k.delete_expired_sent_messages(1).await.map(drop) })
            }),
            ("store_pending_inbound", |k| {
                Box::pin(k.store_pending_inbound("c", "s", "i", b"m"))
            }),
            ("delete_pending_inbound", |k| {
                Box::pin(k.delete_pending_inbound("c", "s", "i"))
            }),
            ("delete_expired_pending_inbound", |k| {
                Box::pin(async move { k.delete_expired_pending_inbound(1).await.map(drop) })
            }),
            ("store_pending_inbound_batch", |k| {
                Box::pin(async move {
                    let row = PendingInboundRow {
                        chat: "c",
                        sender: "s",
                        id: "i",
                        message: b"m",
                    };
                    k.store_pending_inbound_batch(&[row]).await
                })
            }),
            ("delete_pending_inbound_batch", |k| {
                Box::pin(async move {
                    let key = PendingInboundKey {
                        chat: "c",
                        sender: "s",
                        id: "i",
                    };
                    k.delete_pending_inbound_batch(&[key]).await
                })
            }),
            ("put_msg_secret", |k| {
                Box::pin(k.put_msg_secret("c", "s", "m", &[1; 32]))
            }),
            ("put_msg_secrets", |k| {
                Box::pin(async move {
                    let entry = MsgSecretEntry {
                        chat: "c".into(),
                        sender: "s".into(),
                        msg_id: "m".into(),
                        secret: [1; 32],
                        expires_at: 0,
                        message_ts: 0,
                    };
                    k.put_msg_secrets(vec![entry]).await.map(drop)
                })
            }),
            ("delete_expired_msg_secrets", |k| {
                Box::pin(async move { k.delete_expired_msg_secrets(1).await.map(drop) })
            }),
            ("save", |k| {
                Box::pin(async move { k.save(&Device::new()).await })
            }),
            ("create", |k| {
                Box::pin(async move { k.create().await.map(drop) })
            }),
        ]
    }

    fn fenced(e: &(dyn std::error::Error + 'static)) -> bool {
        super::PgSessions::refused(e)
    }

    /// The SQLSTATE a statement failed with.
    fn code(e: sqlx::Error) -> String {
        match e {
            sqlx::Error::Database(e) => e.code().unwrap_or_default().into_owned(),
            e => panic!("not a database error: {e}"),
        }
    }

    async fn session_id(pool: &sqlx::PgPool, instance: &str) -> i64 {
        sqlx::query_scalar("SELECT id FROM session WHERE instance = $1")
            .bind(instance)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    async fn rows(pool: &sqlx::PgPool) -> i64 {
        let sql = KEY_TABLES
            .map(|t| format!("(SELECT count(*) FROM {t})"))
            .join(" + ");
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {sql} + (SELECT count(*) FROM session)"
        )))
        .fetch_one(pool)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_session_opened_under_an_epoch_writes_nothing_once_the_lease_moved_on() {
        let sessions = contract::postgres().await;
        let (pool, node) = sessions.pg();
        let device = Device::new();
        let keys = sessions.store.open("A").await.unwrap();
        fill(&*keys, &device).await;
        assert!(!writes().is_empty());
        for (name, write) in writes() {
            write(&*keys)
                .await
                .unwrap_or_else(|e| panic!("{name} while the lease is held: {e}"));
        }
        fill(&*keys, &device).await;
        let before = rows(pool).await;

        // Another claim of the instance, which this node has not heard of yet.
        sqlx::query("UPDATE zg_lease SET epoch = nextval('zg_epoch') WHERE instance = 'A'")
            .execute(pool)
            .await
            .unwrap();
        for (name, write) in writes() {
            let e = write(&*keys).await.expect_err(name);
            assert!(fenced(&e), "{name}: {e:?}");
            assert!(
                e.source_text().contains("no longer owned by node node-1"),
                "{name}: {e:?}"
            );
        }
        let store = &*sessions.store;
        assert!(fenced(&store.open("A").await.err().unwrap()));
        assert!(fenced(&store.wipe("A").await.unwrap_err()));
        assert!(fenced(&store.set_aside("A", false).await.unwrap_err()));
        assert_eq!(rows(pool).await, before, "nothing was written");
        // What it wrote before still reads.
        assert_eq!(
            keys.load().await.unwrap().unwrap().registration_id,
            device.registration_id
        );
        assert_eq!(keys.get_max_prekey_id().await.unwrap(), 812);
        assert_eq!(
            keys.load_identity("5511@s.whatsapp.net").await.unwrap(),
            Some([7; 32])
        );
        assert!(store.exists("A").await.unwrap());

        // Claimed again by this node: a session opened now writes, the old one never.
        node.claim(pool, "A").await;
        let again = store.open("A").await.unwrap();
        again.put_identity("b", [2; 32]).await.unwrap();
        let e = keys.put_identity("b", [3; 32]).await.unwrap_err();
        assert!(fenced(&e), "{e:?}");
        assert_eq!(keys.load_identity("b").await.unwrap(), Some([2; 32]));

        // A node that does not hold an instance opens nothing of it.
        node.forget("B");
        assert!(fenced(&store.open("B").await.err().unwrap()));
        assert!(!store.exists("B").await.unwrap(), "nothing made");
    }

    /// What the error says underneath whatsapp-rust's words.
    trait SourceText {
        fn source_text(&self) -> String;
    }

    impl SourceText for KeysError {
        fn source_text(&self) -> String {
            std::error::Error::source(self)
                .map(ToString::to_string)
                .unwrap_or_default()
        }
    }

    #[tokio::test]
    async fn a_write_to_a_session_without_its_fence_is_refused() {
        let sessions = contract::postgres().await;
        let (pool, node) = sessions.pg();
        fill(&*sessions.store.open("A").await.unwrap(), &Device::new()).await;
        sessions.store.open("B").await.unwrap();
        let a = session_id(pool, "A").await;
        let b = session_id(pool, "B").await;
        let before = rows(pool).await;

        // Straight to the tables, no fence at all.
        let insert =
            sqlx::query("INSERT INTO identity (session, address, key) VALUES ($1, 'x', '\\x01')")
                .bind(a)
                .execute(pool)
                .await;
        assert_eq!(code(insert.unwrap_err()), "ZG002");
        for table in KEY_TABLES {
            let delete = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE session = $1"
            )))
            .bind(a)
            .execute(pool)
            .await;
            match delete {
                // The tables `fill` leaves empty have no row to guard.
                Ok(done) => assert_eq!(done.rows_affected(), 0, "{table}"),
                Err(e) => assert_eq!(code(e), "ZG002", "{table}"),
            }
        }
        let guarded = sqlx::query("UPDATE session SET device = NULL WHERE id = $1")
            .bind(a)
            .execute(pool)
            .await
            .unwrap_err();
        assert!(!fenced(&guarded), "a bug, not a lost lease: {guarded}");
        let update = sqlx::query("UPDATE session SET device = NULL WHERE id = $1")
            .bind(a)
            .execute(pool)
            .await;
        assert_eq!(code(update.unwrap_err()), "ZG002");
        let wipe = sqlx::query("DELETE FROM session WHERE id = $1")
            .bind(a)
            .execute(pool)
            .await;
        assert_eq!(code(wipe.unwrap_err()), "ZG002");

        // Fenced, but for another session: B's fence does not let it write A's rows.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT zg_fence('B', $1, $2, $3)")
            .bind(node.node())
            .bind(node.epoch("B"))
            .bind(b)
            .execute(&mut *tx)
            .await
            .unwrap();
        let across = sqlx::query("DELETE FROM prekey WHERE session = $1")
            .bind(a)
            .execute(&mut *tx)
            .await;
        assert_eq!(code(across.unwrap_err()), "ZG002");
        drop(tx);
        assert_eq!(rows(pool).await, before, "nothing was written");
    }

    #[tokio::test]
    async fn a_write_queued_behind_a_claim_is_refused_once_the_claim_commits() {
        let sessions = contract::postgres().await;
        let (pool, node) = sessions.pg();
        let keys = sessions.store.open("A").await.unwrap();
        keys.put_identity("before", [1; 32]).await.unwrap();

        let mut claim = pool.begin().await.unwrap();
        sqlx::query(
            "UPDATE zg_lease SET node = $1, epoch = nextval('zg_epoch') WHERE instance = 'A'",
        )
        .bind(node.node())
        .execute(&mut *claim)
        .await
        .unwrap();
        let late = tokio::spawn({
            let keys = keys.clone();
            async move { keys.put_identity("late", [2; 32]).await }
        });
        // The write waits on the lease row the claim locked.
        let mut waited = 0;
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            waited += 1;
            assert!(waited < 500, "the write never waited for the claim");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!late.is_finished());
        claim.commit().await.unwrap();
        let e = late.await.unwrap().unwrap_err();
        assert!(fenced(&e), "{e:?}");
        assert_eq!(keys.load_identity("late").await.unwrap(), None);
        assert_eq!(keys.load_identity("before").await.unwrap(), Some([1; 32]));
    }

    /// Not a check but a measure: how long a link's 812 prekeys take to store, with the
    /// guard on each row and without. `-- --nocapture` prints it.
    #[tokio::test]
    async fn the_prekeys_of_a_link_are_stored_in_one_go() {
        let sessions = contract::postgres().await;
        let (pool, _) = sessions.pg();
        let prekeys: Vec<(u32, Bytes)> = (1..=812)
            .map(|i| (i, Bytes::from(vec![i as u8; 120])))
            .collect();
        let store = &*sessions.store;
        let median = async || {
            let mut took = Vec::new();
            for _ in 0..9 {
                store.wipe("A").await.unwrap();
                let keys = store.open("A").await.unwrap();
                let started = Instant::now();
                keys.store_prekeys_batch(&prekeys, false).await.unwrap();
                took.push(started.elapsed());
                assert_eq!(keys.get_max_prekey_id().await.unwrap(), 812);
            }
            took.sort();
            took[took.len() / 2]
        };
        let guarded = median().await;
        sqlx::query("ALTER TABLE prekey DISABLE TRIGGER prekey_guard")
            .execute(pool)
            .await
            .unwrap();
        let unguarded = median().await;
        eprintln!(
            "store_prekeys_batch of 812 prekeys (median of 9): {guarded:?} with the guard, \
             {unguarded:?} without"
        );
    }
}
