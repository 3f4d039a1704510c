//! One instance's WhatsApp session as whatsapp-rust's store traits see it: the rows of
//! one `session` in the shared sessions database. Each method is one statement, or one
//! transaction for a batch, so what the library expects to be atomic is.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::query_builder::Separated;
use sqlx::{Connection as _, QueryBuilder, Row, Sqlite};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::{Result, StoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore,
    SignalStore, TcTokenEntry,
};

use super::sessions::Db;

/// Rows per statement when a batch names its keys in `IN (...)`.
const CHUNK: usize = 500;
/// Rows per multi-row INSERT (each binds 3 or 4 values).
const ROWS: usize = 200;

pub(super) struct SessionKeys {
    db: Arc<Db>,
    id: i64,
}

impl SessionKeys {
    pub(super) fn new(db: Arc<Db>, id: i64) -> Self {
        Self { db, id }
    }
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Serialization(Box::new(e)))
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Serialization(Box::new(e)))
}

fn now() -> i64 {
    crate::unix_millis() / 1000
}

/// A device as stored, with what is never stored (the props this client announces and
/// its profile) set as the library sets them on every load.
pub(super) fn device_from_json(bytes: &[u8]) -> Result<Device> {
    let mut device: Device = from_json(bytes)?;
    device.device_props = Arc::new(whatsapp_rust::wacore::store::device::DEVICE_PROPS.clone());
    device.client_profile = whatsapp_rust::ClientProfile::web();
    Ok(device)
}

pub(super) fn device_to_json(device: &Device) -> Result<Vec<u8>> {
    to_json(device)
}

pub(super) fn sync_key_to_json(key: &AppStateSyncKey) -> Result<Vec<u8>> {
    to_json(key)
}

pub(super) fn hash_state_to_json(state: &HashState) -> Result<Vec<u8>> {
    to_json(state)
}

pub(super) fn key32(bytes: Vec<u8>) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| StoreError::Validation(format!("a {}-byte key", b.len())))
}

impl SessionKeys {
    async fn blob(&self, sql: &'static str, key: &str) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar(sql)
            .bind(self.id)
            .bind(key)
            .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
            .await
            .map_err(db)
    }

    /// Runs `sql`, bound to this session and `key`, on the writer.
    async fn write(&self, sql: &'static str, key: &str) -> Result<u64> {
        sqlx::query(sql)
            .bind(self.id)
            .bind(key)
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map(|done| done.rows_affected())
            .map_err(db)
    }

    /// Runs the statements `statement` makes for `rows`: one for up to [`ROWS`] rows, or
    /// one per chunk in one transaction. Statements of one row and of `ROWS` rows recur
    /// and are prepared once; other sizes vary and would crowd the statement cache.
    async fn write_chunked<T>(
        &self,
        rows: &[T],
        statement: impl Fn(&[T]) -> QueryBuilder<Sqlite>,
    ) -> Result<()> {
        let prepared = |n: usize| n == 1 || n == ROWS;
        match rows.len() {
            0 => Ok(()),
            n if n <= ROWS => statement(rows)
                .build()
                .persistent(prepared(n))
                .execute(&mut *self.db.writer().await.map_err(db)?)
                .await
                .map(drop)
                .map_err(db),
            _ => {
                let mut writer = self.db.writer().await.map_err(db)?;
                let mut tx = writer.begin().await.map_err(db)?;
                for chunk in rows.chunks(ROWS) {
                    statement(chunk)
                        .build()
                        .persistent(prepared(chunk.len()))
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)
            }
        }
    }

    /// Upserts rows of this session into `table`, each bound by `bind` after the
    /// session's id.
    async fn upsert<T>(
        &self,
        table: &Upsert,
        rows: &[T],
        bind: impl Fn(&mut Separated<'_, Sqlite, &'static str>, &T),
    ) -> Result<()> {
        self.write_chunked(rows, |chunk| {
            let mut query = QueryBuilder::<Sqlite>::new(table.insert);
            query.push_values(chunk, |mut row, item| {
                row.push_bind(self.id);
                bind(&mut row, item);
            });
            query.push(table.conflict);
            query
        })
        .await
    }

    /// Upserts `(key, blob)` rows of this session into `table`.
    async fn write_pairs(&self, table: &Upsert, rows: &[(&str, &[u8])]) -> Result<()> {
        self.upsert(table, rows, |row, (key, blob)| {
            row.push_bind(*key).push_bind(*blob);
        })
        .await
    }

    async fn any(&self, sql: &'static str, key: &str) -> Result<bool> {
        sqlx::query_scalar(sql)
            .bind(self.id)
            .bind(key)
            .fetch_one(&mut *self.db.read.lock().await.map_err(db)?)
            .await
            .map_err(db)
    }
}

/// An upsert into a table: its INSERT up to VALUES (the session first), and what a row
/// already there becomes.
struct Upsert {
    insert: &'static str,
    conflict: &'static str,
}

const IDENTITY: Upsert = Upsert {
    insert: "INSERT INTO identity (session, address, key) ",
    conflict: " ON CONFLICT (session, address) DO UPDATE SET key = excluded.key",
};
const SESSION: Upsert = Upsert {
    insert: "INSERT INTO signal_session (session, address, record) ",
    conflict: " ON CONFLICT (session, address) DO UPDATE SET record = excluded.record",
};
const SENDER_KEY: Upsert = Upsert {
    insert: "INSERT INTO sender_key (session, address, record) ",
    conflict: " ON CONFLICT (session, address) DO UPDATE SET record = excluded.record",
};
const SYNC_VERSION: Upsert = Upsert {
    insert: "INSERT INTO sync_version (session, name, state) ",
    conflict: " ON CONFLICT (session, name) DO UPDATE SET state = excluded.state",
};
const PREKEY: Upsert = Upsert {
    insert: "INSERT INTO prekey (session, id, record, uploaded) ",
    conflict: " ON CONFLICT (session, id) DO UPDATE SET \
               record = excluded.record, uploaded = excluded.uploaded",
};
const GROUP_METADATA: Upsert = Upsert {
    insert: "INSERT INTO group_metadata (session, group_jid, info) ",
    conflict: " ON CONFLICT (session, group_jid) DO UPDATE SET info = excluded.info",
};

#[async_trait]
impl SignalStore for SessionKeys {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.write_pairs(&IDENTITY, &[(address, &key[..])]).await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let rows: Vec<_> = identities.iter().map(|(a, k)| (&**a, &k[..])).collect();
        self.write_pairs(&IDENTITY, &rows).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        let sql = "SELECT key FROM identity WHERE session = ? AND address = ?";
        self.blob(sql, address).await?.map(key32).transpose()
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        let sql = "DELETE FROM identity WHERE session = ? AND address = ?";
        self.write(sql, address).await.map(drop)
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        let sql = "SELECT record FROM signal_session WHERE session = ? AND address = ?";
        Ok(self.blob(sql, address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.write_pairs(&SESSION, &[(address, session)]).await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<_> = sessions.iter().map(|(a, r)| (&**a, &r[..])).collect();
        self.write_pairs(&SESSION, &rows).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        let sql = "DELETE FROM signal_session WHERE session = ? AND address = ?";
        self.write(sql, address).await.map(drop)
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM signal_session WHERE session = ? AND address = ?)";
        self.any(sql, address).await
    }

    /// Addresses are `user@server` or `user:device@server`: a range scan on each.
    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM signal_session WHERE session = ?1 \
                 AND ((address >= ?2 || '@' AND address < ?2 || 'A') \
                   OR (address >= ?2 || ':' AND address < ?2 || ';'))) \
             OR EXISTS (SELECT 1 FROM identity WHERE session = ?1 \
                 AND ((address >= ?2 || '@' AND address < ?2 || 'A') \
                   OR (address >= ?2 || ':' AND address < ?2 || ';')))";
        self.any(sql, user).await
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        let record = Bytes::copy_from_slice(record);
        self.store_prekeys_batch(&[(id, record)], uploaded).await
    }

    /// A link's 812 prekeys in a few statements, in one transaction.
    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        self.upsert(&PREKEY, keys, |row, (id, record)| {
            row.push_bind(i64::from(*id))
                .push_bind(&record[..])
                .push_bind(uploaded);
        })
        .await
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        let found: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT record FROM prekey WHERE session = ? AND id = ?")
                .bind(self.id)
                .bind(i64::from(id))
                .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
        Ok(found.map(Bytes::from))
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let mut query =
                QueryBuilder::<Sqlite>::new("SELECT id, record FROM prekey WHERE session = ");
            query.push_bind(self.id).push(" AND id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(i64::from(*id));
            }
            query.push(")");
            let rows = query
                .build()
                .persistent(false)
                .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
            for row in rows {
                let id: i64 = row.try_get(0).map_err(db)?;
                let record: Vec<u8> = row.try_get(1).map_err(db)?;
                found.push((id as u32, Bytes::from(record)));
            }
        }
        Ok(found)
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut writer = self.db.writer().await.map_err(db)?;
        let mut tx = writer.begin().await.map_err(db)?;
        for chunk in ids.chunks(CHUNK) {
            let mut query =
                QueryBuilder::<Sqlite>::new("UPDATE prekey SET uploaded = 1 WHERE session = ");
            query.push_bind(self.id).push(" AND id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(i64::from(*id));
            }
            query.push(")");
            query
                .build()
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        sqlx::query("DELETE FROM prekey WHERE session = ? AND id = ?")
            .bind(self.id)
            .bind(i64::from(id))
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map(drop)
            .map_err(db)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let max: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM prekey WHERE session = ?")
                .bind(self.id)
                .fetch_one(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
        Ok(max as u32)
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO signed_prekey (session, id, record) VALUES (?, ?, ?) \
             ON CONFLICT (session, id) DO UPDATE SET record = excluded.record",
        )
        .bind(self.id)
        .bind(i64::from(id))
        .bind(record)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT record FROM signed_prekey WHERE session = ? AND id = ?")
            .bind(self.id)
            .bind(i64::from(id))
            .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
            .await
            .map_err(db)
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT id, record FROM signed_prekey WHERE session = ? ORDER BY id")
                .bind(self.id)
                .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
        Ok(rows.into_iter().map(|(id, r)| (id as u32, r)).collect())
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        sqlx::query("DELETE FROM signed_prekey WHERE session = ? AND id = ?")
            .bind(self.id)
            .bind(i64::from(id))
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map(drop)
            .map_err(db)
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.write_pairs(&SENDER_KEY, &[(address, record)]).await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<_> = sender_keys.iter().map(|(a, r)| (&**a, &r[..])).collect();
        self.write_pairs(&SENDER_KEY, &rows).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        let sql = "SELECT record FROM sender_key WHERE session = ? AND address = ?";
        self.blob(sql, address).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        let sql = "DELETE FROM sender_key WHERE session = ? AND address = ?";
        self.write(sql, address).await.map(drop)
    }
}

#[async_trait]
impl AppSyncStore for SessionKeys {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        let found: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT key FROM sync_key WHERE session = ? AND key_id = ?")
                .bind(self.id)
                .bind(key_id)
                .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
        // A key that does not read is as good as absent: the client asks for it again.
        Ok(found.and_then(|bytes| match from_json(&bytes) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "an app-state sync key that does not read");
                None
            }
        }))
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        sqlx::query(
            "INSERT INTO sync_key (session, key_id, key) VALUES (?, ?, ?) \
             ON CONFLICT (session, key_id) DO UPDATE SET key = excluded.key",
        )
        .bind(self.id)
        .bind(key_id)
        .bind(sync_key_to_json(&key)?)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    /// A collection never synced, or one whose state no longer reads, starts from 0.
    async fn get_version(&self, name: &str) -> Result<HashState> {
        let sql = "SELECT state FROM sync_version WHERE session = ? AND name = ?";
        let Some(bytes) = self.blob(sql, name).await? else {
            return Ok(HashState::default());
        };
        Ok(from_json(&bytes).unwrap_or_else(|e| {
            tracing::warn!(collection = name, error = %e, "an app-state version that does not read; syncing it again from 0");
            HashState::default()
        }))
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        let state = hash_state_to_json(&state)?;
        self.write_pairs(&SYNC_VERSION, &[(name, &state[..])]).await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        self.upsert(&MUTATION_MAC, mutations, |row, m| {
            row.push_bind(name)
                .push_bind(&m.index_mac[..])
                .push_bind(version as i64)
                .push_bind(&m.value_mac[..]);
        })
        .await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar(
            "SELECT value_mac FROM mutation_mac WHERE session = ? AND name = ? AND index_mac = ?",
        )
        .bind(self.id)
        .bind(name)
        .bind(index_mac)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        let mut found = HashMap::with_capacity(index_macs.len());
        for chunk in index_macs.chunks(CHUNK) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT index_mac, value_mac FROM mutation_mac WHERE session = ",
            );
            query
                .push_bind(self.id)
                .push(" AND name = ")
                .push_bind(name)
                .push(" AND index_mac IN (");
            let mut list = query.separated(", ");
            for index_mac in chunk {
                list.push_bind(&index_mac[..]);
            }
            query.push(")");
            let rows = query
                .build()
                .persistent(false)
                .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
            for row in rows {
                let index_mac: Vec<u8> = row.try_get(0).map_err(db)?;
                let value_mac: Vec<u8> = row.try_get(1).map_err(db)?;
                if let Ok(index_mac) = index_mac.try_into() {
                    found.insert(index_mac, value_mac);
                }
            }
        }
        Ok(found)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        if index_macs.is_empty() {
            return Ok(());
        }
        let mut writer = self.db.writer().await.map_err(db)?;
        let mut tx = writer.begin().await.map_err(db)?;
        for index_mac in index_macs {
            sqlx::query(
                "DELETE FROM mutation_mac WHERE session = ? AND name = ? AND index_mac = ?",
            )
            .bind(self.id)
            .bind(name)
            .bind(&index_mac[..])
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        let sql = "DELETE FROM mutation_mac WHERE session = ? AND name = ?";
        self.write(sql, name).await.map(drop)
    }

    /// The highest key id whose key reads: a key the session cannot use is never offered.
    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT key_id, key FROM sync_key WHERE session = ? ORDER BY key_id DESC",
        )
        .bind(self.id)
        .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .find(|(_, key)| from_json::<AppStateSyncKey>(key).is_ok())
            .map(|(id, _)| id))
    }
}

fn lid_entry(row: &sqlx::sqlite::SqliteRow) -> Result<LidPnMappingEntry> {
    Ok(LidPnMappingEntry {
        lid: row.try_get("lid").map_err(db)?,
        phone_number: row.try_get("phone").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
        learning_source: row.try_get("source").map_err(db)?,
    })
}

const LID: Upsert = Upsert {
    insert: "INSERT INTO lid_pn (session, lid, phone, created_at, updated_at, source) ",
    conflict: " ON CONFLICT (session, lid) DO UPDATE SET \
               phone = excluded.phone, updated_at = excluded.updated_at, source = excluded.source",
};
const DEVICE_LIST: Upsert = Upsert {
    insert: "INSERT INTO device_list (session, user, devices, timestamp, phash, raw_id) ",
    conflict: " ON CONFLICT (session, user) DO UPDATE SET devices = excluded.devices, \
               timestamp = excluded.timestamp, phash = excluded.phash, raw_id = excluded.raw_id",
};
const PENDING: Upsert = Upsert {
    insert: "INSERT INTO pending_inbound (session, chat, sender, id, message, inserted_at) ",
    conflict: " ON CONFLICT (session, chat, sender, id) DO UPDATE SET \
               message = excluded.message, inserted_at = excluded.inserted_at",
};
const SENDER_KEY_DEVICE: Upsert = Upsert {
    insert: "INSERT INTO sender_key_device (session, group_jid, device_jid, has_key) ",
    conflict: " ON CONFLICT (session, group_jid, device_jid) DO UPDATE SET has_key = excluded.has_key",
};
const MUTATION_MAC: Upsert = Upsert {
    insert: "INSERT INTO mutation_mac (session, name, index_mac, version, value_mac) ",
    conflict: " ON CONFLICT (session, name, index_mac) \
               DO UPDATE SET version = excluded.version, value_mac = excluded.value_mac",
};
/// On a key already stored: the new secret, the later deadline (0, never, wins) and the
/// later known message time.
const MSG_SECRET: Upsert = Upsert {
    insert: "INSERT INTO msg_secret (session, chat, sender, msg_id, secret, expires_at, message_ts) ",
    conflict: " ON CONFLICT (session, chat, sender, msg_id) DO UPDATE SET \
               secret = excluded.secret, \
               expires_at = CASE WHEN msg_secret.expires_at = 0 OR excluded.expires_at = 0 THEN 0 \
                                 ELSE max(msg_secret.expires_at, excluded.expires_at) END, \
               message_ts = max(msg_secret.message_ts, excluded.message_ts)",
};
const DELETE_PENDING: &str =
    "DELETE FROM pending_inbound WHERE session = ? AND chat = ? AND sender = ? AND id = ?";

impl SessionKeys {
    async fn put_lids(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        self.upsert(&LID, entries, |row, e| {
            row.push_bind(&e.lid)
                .push_bind(&e.phone_number)
                .push_bind(e.created_at)
                .push_bind(e.updated_at)
                .push_bind(&e.learning_source);
        })
        .await
    }

    async fn put_device_lists(&self, records: &[DeviceListRecord]) -> Result<()> {
        let rows = records
            .iter()
            .map(|r| Ok((r, serde_json::to_string(&r.devices)?)))
            .collect::<serde_json::Result<Vec<_>>>()
            .map_err(|e| StoreError::Serialization(Box::new(e)))?;
        self.upsert(&DEVICE_LIST, &rows, |row, (r, devices)| {
            row.push_bind(&r.user)
                .push_bind(devices)
                .push_bind(r.timestamp)
                .push_bind(&r.phash)
                .push_bind(r.raw_id.map(i64::from));
        })
        .await
    }

    async fn put_pending(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        let at = now();
        self.upsert(&PENDING, rows, |row, r| {
            row.push_bind(r.chat)
                .push_bind(r.sender)
                .push_bind(r.id)
                .push_bind(r.message)
                .push_bind(at);
        })
        .await
    }

    async fn delete_pending(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut writer = self.db.writer().await.map_err(db)?;
        let mut tx = writer.begin().await.map_err(db)?;
        for k in keys {
            sqlx::query(DELETE_PENDING)
                .bind(self.id)
                .bind(k.chat)
                .bind(k.sender)
                .bind(k.id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// Deletes this session's rows of `sql` older than `cutoff`; how many.
    async fn expire(&self, sql: &'static str, cutoff: i64) -> Result<u32> {
        sqlx::query(sql)
            .bind(self.id)
            .bind(cutoff)
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map(|done| done.rows_affected() as u32)
            .map_err(db)
    }
}

#[async_trait]
impl ProtocolStore for SessionKeys {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        sqlx::query_as(
            "SELECT device_jid, has_key FROM sender_key_device \
             WHERE session = ? AND group_jid = ? ORDER BY device_jid",
        )
        .bind(self.id)
        .bind(group_jid)
        .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        self.upsert(&SENDER_KEY_DEVICE, entries, |row, (device_jid, has_key)| {
            row.push_bind(group_jid)
                .push_bind(*device_jid)
                .push_bind(*has_key);
        })
        .await
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        let sql = "DELETE FROM sender_key_device WHERE session = ? AND group_jid = ?";
        self.write(sql, group_jid).await.map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        let mut writer = self.db.writer().await.map_err(db)?;
        let mut tx = writer.begin().await.map_err(db)?;
        for device_jid in device_jids {
            sqlx::query("DELETE FROM sender_key_device WHERE session = ? AND device_jid = ?")
                .bind(self.id)
                .bind(*device_jid)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        sqlx::query("DELETE FROM sender_key_device WHERE session = ?")
            .bind(self.id)
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map(drop)
            .map_err(db)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = sqlx::query("SELECT * FROM lid_pn WHERE session = ? AND lid = ?")
            .bind(self.id)
            .bind(lid)
            .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
            .await
            .map_err(db)?;
        row.as_ref().map(lid_entry).transpose()
    }

    /// The LID most recently learnt for the number.
    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = sqlx::query(
            "SELECT * FROM lid_pn WHERE session = ? AND phone = ? \
             ORDER BY updated_at DESC LIMIT 1",
        )
        .bind(self.id)
        .bind(phone)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)?;
        row.as_ref().map(lid_entry).transpose()
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lids(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        self.put_lids(entries).await
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let rows = sqlx::query("SELECT * FROM lid_pn WHERE session = ?")
            .bind(self.id)
            .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
            .await
            .map_err(db)?;
        rows.iter().map(lid_entry).collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO base_key (session, address, message_id, base_key) VALUES (?, ?, ?, ?) \
             ON CONFLICT (session, address, message_id) DO UPDATE SET base_key = excluded.base_key",
        )
        .bind(self.id)
        .bind(address)
        .bind(message_id)
        .bind(base_key)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT base_key FROM base_key WHERE session = ? AND address = ? AND message_id = ?",
        )
        .bind(self.id)
        .bind(address)
        .bind(message_id)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)?;
        Ok(stored.is_some_and(|stored| stored == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM base_key WHERE session = ? AND address = ? AND message_id = ?")
            .bind(self.id)
            .bind(address)
            .bind(message_id)
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map(drop)
            .map_err(db)
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.put_device_lists(std::slice::from_ref(&record)).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        self.put_device_lists(&records).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        let row = sqlx::query(
            "SELECT devices, timestamp, phash, raw_id FROM device_list \
             WHERE session = ? AND user = ?",
        )
        .bind(self.id)
        .bind(user)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let devices: String = row.try_get("devices").map_err(db)?;
        let raw_id: Option<i64> = row.try_get("raw_id").map_err(db)?;
        Ok(Some(DeviceListRecord {
            user: user.to_owned(),
            devices: from_json(devices.as_bytes())?,
            timestamp: row.try_get("timestamp").map_err(db)?,
            phash: row.try_get("phash").map_err(db)?,
            raw_id: raw_id.map(|id| id as u32),
        }))
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        let sql = "DELETE FROM device_list WHERE session = ? AND user = ?";
        self.write(sql, user).await.map(drop)
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        let sql = "SELECT info FROM group_metadata WHERE session = ? AND group_jid = ?";
        self.blob(sql, group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.write_pairs(&GROUP_METADATA, &[(group_jid, blob)])
            .await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        let sql = "DELETE FROM group_metadata WHERE session = ? AND group_jid = ?";
        self.write(sql, group_jid).await.map(drop)
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let row: Option<(Vec<u8>, i64, Option<i64>)> = sqlx::query_as(
            "SELECT token, token_timestamp, sender_timestamp FROM tc_token \
             WHERE session = ? AND jid = ?",
        )
        .bind(self.id)
        .bind(jid)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)?;
        Ok(
            row.map(|(token, token_timestamp, sender_timestamp)| TcTokenEntry {
                token,
                token_timestamp,
                sender_timestamp,
            }),
        )
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        sqlx::query(
            "INSERT INTO tc_token (session, jid, token, token_timestamp, sender_timestamp) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (session, jid) DO UPDATE SET \
             token = excluded.token, token_timestamp = excluded.token_timestamp, \
             sender_timestamp = excluded.sender_timestamp",
        )
        .bind(self.id)
        .bind(jid)
        .bind(&entry.token[..])
        .bind(entry.token_timestamp)
        .bind(entry.sender_timestamp)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        let sql = "DELETE FROM tc_token WHERE session = ? AND jid = ?";
        self.write(sql, jid).await.map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT jid FROM tc_token WHERE session = ? ORDER BY jid")
            .bind(self.id)
            .fetch_all(&mut *self.db.read.lock().await.map_err(db)?)
            .await
            .map_err(db)
    }

    /// A row goes once neither its received token nor its sender bucket is live.
    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        sqlx::query(
            "DELETE FROM tc_token WHERE session = ? \
             AND NOT (length(token) > 0 AND token_timestamp >= ?) \
             AND NOT (sender_timestamp IS NOT NULL AND sender_timestamp >= ?)",
        )
        .bind(self.id)
        .bind(token_cutoff)
        .bind(sender_cutoff)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(|done| done.rows_affected() as u32)
        .map_err(db)
    }

    /// One upsert: the sender bucket only moves forward, and a token stays.
    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO tc_token (session, jid, token, token_timestamp, sender_timestamp) \
             VALUES (?1, ?2, x'', ?3, ?3) ON CONFLICT (session, jid) DO UPDATE SET \
             sender_timestamp = max(coalesce(tc_token.sender_timestamp, excluded.sender_timestamp), \
                                    excluded.sender_timestamp)",
        )
        .bind(self.id)
        .bind(jid)
        .bind(sender_timestamp)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    /// One upsert: a placeholder or an older token is replaced, the sender bucket kept.
    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO tc_token (session, jid, token, token_timestamp, sender_timestamp) \
             VALUES (?, ?, ?, ?, NULL) ON CONFLICT (session, jid) DO UPDATE SET \
             token = excluded.token, token_timestamp = excluded.token_timestamp \
             WHERE length(tc_token.token) = 0 \
                OR excluded.token_timestamp >= tc_token.token_timestamp",
        )
        .bind(self.id)
        .bind(jid)
        .bind(token)
        .bind(token_timestamp)
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO sent_message (session, chat, message_id, payload, created_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (session, chat, message_id) DO UPDATE SET \
             payload = excluded.payload, created_at = excluded.created_at",
        )
        .bind(self.id)
        .bind(chat_jid)
        .bind(message_id)
        .bind(payload)
        .bind(now())
        .execute(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map(drop)
        .map_err(db)
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar(
            "DELETE FROM sent_message WHERE session = ? AND chat = ? AND message_id = ? \
             RETURNING payload",
        )
        .bind(self.id)
        .bind(chat_jid)
        .bind(message_id)
        .fetch_optional(&mut *self.db.writer().await.map_err(db)?)
        .await
        .map_err(db)
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        let sql = "DELETE FROM sent_message WHERE session = ? AND created_at < ?";
        self.expire(sql, cutoff_timestamp).await
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.put_pending(&[PendingInboundRow {
            chat,
            sender,
            id,
            message,
        }])
        .await
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar(
            "SELECT message FROM pending_inbound \
             WHERE session = ? AND chat = ? AND sender = ? AND id = ?",
        )
        .bind(self.id)
        .bind(chat)
        .bind(sender)
        .bind(id)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete_pending(&[PendingInboundKey { chat, sender, id }])
            .await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        let sql = "DELETE FROM pending_inbound WHERE session = ? AND inserted_at < ?";
        self.expire(sql, cutoff_timestamp).await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        self.put_pending(rows).await
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        self.delete_pending(keys).await
    }
}

#[async_trait]
impl MsgSecretStore for SessionKeys {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        self.upsert(&MSG_SECRET, &entries, |row, e| {
            row.push_bind(&*e.chat)
                .push_bind(&*e.sender)
                .push_bind(&*e.msg_id)
                .push_bind(&e.secret[..])
                .push_bind(e.expires_at)
                .push_bind(e.message_ts);
        })
        .await?;
        Ok(entries.len())
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_msg_secret_with_ts(chat, sender, msg_id)
            .await?
            .map(|(secret, _)| secret))
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        sqlx::query_as(
            "SELECT secret, message_ts FROM msg_secret \
             WHERE session = ? AND chat = ? AND sender = ? AND msg_id = ?",
        )
        .bind(self.id)
        .bind(chat)
        .bind(sender)
        .bind(msg_id)
        .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        let sql =
            "DELETE FROM msg_secret WHERE session = ? AND expires_at != 0 AND expires_at <= ?";
        self.expire(sql, cutoff_timestamp).await
    }
}

#[async_trait]
impl DeviceStore for SessionKeys {
    async fn save(&self, device: &Device) -> Result<()> {
        sqlx::query("UPDATE session SET device = ? WHERE id = ?")
            .bind(device_to_json(device)?)
            .bind(self.id)
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map_err(db)
            .and_then(|done| match done.rows_affected() {
                // The session was deleted under a client that outlived it.
                0 => Err(StoreError::DeviceNotFound(self.id as i32)),
                _ => Ok(()),
            })
    }

    async fn load(&self) -> Result<Option<Device>> {
        let found: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT device FROM session WHERE id = ?")
                .bind(self.id)
                .fetch_optional(&mut *self.db.read.lock().await.map_err(db)?)
                .await
                .map_err(db)?;
        found
            .flatten()
            .map(|bytes| device_from_json(&bytes))
            .transpose()
    }

    async fn exists(&self) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM session WHERE id = ? AND device IS NOT NULL)",
        )
        .bind(self.id)
        .fetch_one(&mut *self.db.read.lock().await.map_err(db)?)
        .await
        .map_err(db)
    }

    /// A fresh device (new keys) for a session that has none yet.
    async fn create(&self) -> Result<i32> {
        sqlx::query("UPDATE session SET device = ? WHERE id = ? AND device IS NULL")
            .bind(device_to_json(&Device::new())?)
            .bind(self.id)
            .execute(&mut *self.db.writer().await.map_err(db)?)
            .await
            .map_err(db)?;
        Ok(self.id as i32)
    }
}
