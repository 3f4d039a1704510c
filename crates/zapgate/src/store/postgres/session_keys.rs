//! One instance's WhatsApp session on PostgreSQL, as whatsapp-rust's store traits see it:
//! the rows of one `session`, with the same meaning as on SQLite (`store::session_keys`).
//! Every write is made in a transaction [`begin_fenced`] opened for the lease the session
//! was opened under, so a node that lost the instance writes nothing more to it, however
//! late its write arrives. Reads take any pooled connection.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Row as _, Transaction};
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

use crate::store::session_keys::{
    device_from_json, device_to_json, from_json, hash_state_to_json, key32, sync_key_to_json,
};

/// The lease writes to a session are fenced by: `instance`'s, held by `node` at `epoch`.
/// Without an epoch (the node does not hold the instance) the database refuses them all.
#[derive(Clone, Debug)]
pub(super) struct Lease {
    pub(super) instance: String,
    pub(super) node: String,
    pub(super) epoch: Option<i64>,
}

/// The SQLSTATE of a write refused by its fence (migration 0003's `zg_fence`).
pub(super) const FENCE_REFUSED: &str = "ZG001";

/// The one way into a write to the sessions: a transaction whose first statement is
/// `zg_fence`, which refuses it unless `lease` is still the instance's, and names
/// `session` as the one whose rows it may write (the tables' guards refuse any other).
/// Holding the lease row `FOR SHARE` until the end, it also makes a claim of the
/// instance wait for the write, and a write queued behind a claim fail.
pub(super) async fn begin_fenced(
    pool: &PgPool,
    lease: &Lease,
    session: Option<i64>,
) -> std::result::Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT zg_fence($1, $2, $3, $4)")
        .bind(&lease.instance)
        .bind(&lease.node)
        .bind(lease.epoch)
        .bind(session)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// A write refused because the lease the session was opened under moved on: this node
/// no longer owns the instance at that epoch, and never will again (an epoch is never
/// reused). whatsapp-rust sees a `StoreError::Database` with this as its source; trying
/// again cannot help, only a session opened anew under a new lease can write.
#[derive(Debug, thiserror::Error)]
#[error("fenced: {0}")]
pub(crate) struct Fenced(String);

fn db(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(refused) if refused.code().as_deref() == Some(FENCE_REFUSED) => {
            StoreError::Database(Box::new(Fenced(refused.message().to_owned())))
        }
        _ => StoreError::Database(Box::new(e)),
    }
}

fn now() -> i64 {
    crate::unix_millis() / 1000
}

/// A statement with its values bound.
type Statement = Query<'static, Postgres, PgArguments>;

pub(super) struct PgSessionKeys {
    pool: PgPool,
    session: i64,
    lease: Lease,
}

impl PgSessionKeys {
    pub(super) fn new(pool: PgPool, session: i64, lease: Lease) -> Self {
        Self {
            pool,
            session,
            lease,
        }
    }

    /// This session's write path: each write method makes its changes in the
    /// transaction this opens, and commits it.
    async fn fenced(&self) -> Result<Transaction<'static, Postgres>> {
        begin_fenced(&self.pool, &self.lease, Some(self.session))
            .await
            .map_err(db)
    }

    /// Runs one statement as a write; how many rows it touched.
    async fn write(&self, statement: Statement) -> Result<u64> {
        let mut tx = self.fenced().await?;
        let done = statement.execute(&mut *tx).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(done.rows_affected())
    }

    /// `sql` bound to this session (`$1`) and `key` (`$2`).
    fn keyed(&self, sql: &'static str, key: &str) -> Statement {
        sqlx::query(sql).bind(self.session).bind(key)
    }

    async fn blob(&self, sql: &'static str, key: &str) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar(sql)
            .bind(self.session)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn any(&self, sql: &'static str, key: &str) -> Result<bool> {
        sqlx::query_scalar(sql)
            .bind(self.session)
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }

    /// Upserts `rows` in one transaction, one statement per round of [`rounds`] (one,
    /// unless a key repeats), each statement made by `statement` with the round's
    /// values as arrays.
    async fn upsert<'r, T: Sync, K: Eq + Hash>(
        &self,
        rows: &'r [T],
        key: impl Fn(&'r T) -> K + Send,
        statement: impl Fn(&[&'r T]) -> Statement + Send,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let rounds = rounds(rows, key);
        let mut tx = self.fenced().await?;
        for round in &rounds {
            statement(round).execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// Upserts `(key, blob)` rows with `sql`, whose `$2` and `$3` are their arrays.
    async fn pairs(&self, sql: &'static str, rows: &[(&str, &[u8])]) -> Result<()> {
        self.upsert(
            rows,
            |(key, _)| *key,
            |round| {
                sqlx::query(sql)
                    .bind(self.session)
                    .bind(round.iter().map(|(key, _)| *key).collect::<Vec<_>>())
                    .bind(round.iter().map(|(_, blob)| *blob).collect::<Vec<_>>())
            },
        )
        .await
    }
}

/// `rows` in rounds in which no key repeats: a row goes in the round after the one its
/// key last went in. Run in order, the rounds write as one upsert per row in turn would
/// (as a multi-row upsert does on SQLite: the last row of a key winning, or merging
/// with the earlier ones), where one PostgreSQL statement may not touch a row twice.
fn rounds<'r, T, K: Eq + Hash>(rows: &'r [T], key: impl Fn(&'r T) -> K) -> Vec<Vec<&'r T>> {
    let mut seen: HashMap<K, usize> = HashMap::with_capacity(rows.len());
    let mut rounds: Vec<Vec<&T>> = Vec::new();
    for row in rows {
        let times = seen.entry(key(row)).or_insert(0);
        if rounds.len() == *times {
            rounds.push(Vec::new());
        }
        rounds[*times].push(row);
        *times += 1;
    }
    rounds
}

const IDENTITY: &str = "INSERT INTO identity (session, address, key) \
     SELECT $1, * FROM UNNEST($2::text[], $3::bytea[]) \
     ON CONFLICT (session, address) DO UPDATE SET key = excluded.key";
const SESSION: &str = "INSERT INTO signal_session (session, address, record) \
     SELECT $1, * FROM UNNEST($2::text[], $3::bytea[]) \
     ON CONFLICT (session, address) DO UPDATE SET record = excluded.record";
const SENDER_KEY: &str = "INSERT INTO sender_key (session, address, record) \
     SELECT $1, * FROM UNNEST($2::text[], $3::bytea[]) \
     ON CONFLICT (session, address) DO UPDATE SET record = excluded.record";
const SYNC_VERSION: &str = "INSERT INTO sync_version (session, name, state) \
     SELECT $1, * FROM UNNEST($2::text[], $3::bytea[]) \
     ON CONFLICT (session, name) DO UPDATE SET state = excluded.state";
const GROUP_METADATA: &str = "INSERT INTO group_metadata (session, group_jid, info) \
     SELECT $1, * FROM UNNEST($2::text[], $3::bytea[]) \
     ON CONFLICT (session, group_jid) DO UPDATE SET info = excluded.info";
const PREKEY: &str = "INSERT INTO prekey (session, id, record, uploaded) \
     SELECT $1, id, record, $4 FROM UNNEST($2::bigint[], $3::bytea[]) AS r (id, record) \
     ON CONFLICT (session, id) DO UPDATE SET \
     record = excluded.record, uploaded = excluded.uploaded";
const MUTATION_MAC: &str = "INSERT INTO mutation_mac \
     (session, name, index_mac, version, value_mac) \
     SELECT $1, $2, index_mac, $3, value_mac \
     FROM UNNEST($4::bytea[], $5::bytea[]) AS r (index_mac, value_mac) \
     ON CONFLICT (session, name, index_mac) \
     DO UPDATE SET version = excluded.version, value_mac = excluded.value_mac";
const SENDER_KEY_DEVICE: &str = "INSERT INTO sender_key_device \
     (session, group_jid, device_jid, has_key) \
     SELECT $1, $2, device_jid, has_key \
     FROM UNNEST($3::text[], $4::boolean[]) AS r (device_jid, has_key) \
     ON CONFLICT (session, group_jid, device_jid) DO UPDATE SET has_key = excluded.has_key";
const LID: &str = "INSERT INTO lid_pn (session, lid, phone, created_at, updated_at, source) \
     SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[]) \
     ON CONFLICT (session, lid) DO UPDATE SET \
     phone = excluded.phone, updated_at = excluded.updated_at, source = excluded.source";
const DEVICE_LIST: &str = "INSERT INTO device_list \
     (session, user_id, devices, timestamp, phash, raw_id) \
     SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[]) \
     ON CONFLICT (session, user_id) DO UPDATE SET devices = excluded.devices, \
     timestamp = excluded.timestamp, phash = excluded.phash, raw_id = excluded.raw_id";
const PENDING: &str = "INSERT INTO pending_inbound \
     (session, chat, sender, id, message, inserted_at) \
     SELECT $1, chat, sender, id, message, $6 \
     FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bytea[]) AS r (chat, sender, id, message) \
     ON CONFLICT (session, chat, sender, id) DO UPDATE SET \
     message = excluded.message, inserted_at = excluded.inserted_at";
/// On a key already stored: the new secret, the later deadline (0, never, wins) and the
/// later known message time.
const MSG_SECRET: &str = "INSERT INTO msg_secret \
     (session, chat, sender, msg_id, secret, expires_at, message_ts) \
     SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bytea[], \
                              $6::bigint[], $7::bigint[]) \
     ON CONFLICT (session, chat, sender, msg_id) DO UPDATE SET \
     secret = excluded.secret, \
     expires_at = CASE WHEN msg_secret.expires_at = 0 OR excluded.expires_at = 0 THEN 0 \
                       ELSE GREATEST(msg_secret.expires_at, excluded.expires_at) END, \
     message_ts = GREATEST(msg_secret.message_ts, excluded.message_ts)";

#[async_trait]
impl SignalStore for PgSessionKeys {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.pairs(IDENTITY, &[(address, &key[..])]).await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let rows: Vec<_> = identities.iter().map(|(a, k)| (&**a, &k[..])).collect();
        self.pairs(IDENTITY, &rows).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        let sql = "SELECT key FROM identity WHERE session = $1 AND address = $2";
        self.blob(sql, address).await?.map(key32).transpose()
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        let sql = "DELETE FROM identity WHERE session = $1 AND address = $2";
        self.write(self.keyed(sql, address)).await.map(drop)
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        let sql = "SELECT record FROM signal_session WHERE session = $1 AND address = $2";
        Ok(self.blob(sql, address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.pairs(SESSION, &[(address, session)]).await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<_> = sessions.iter().map(|(a, r)| (&**a, &r[..])).collect();
        self.pairs(SESSION, &rows).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        let sql = "DELETE FROM signal_session WHERE session = $1 AND address = $2";
        self.write(self.keyed(sql, address)).await.map(drop)
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        let sql =
            "SELECT EXISTS (SELECT 1 FROM signal_session WHERE session = $1 AND address = $2)";
        self.any(sql, address).await
    }

    /// Addresses are `user@server` or `user:device@server`: a range scan on each (the
    /// columns compare bytes, COLLATE "C", as on SQLite).
    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM signal_session WHERE session = $1 \
                 AND ((address >= $2::text || '@' AND address < $2::text || 'A') \
                   OR (address >= $2::text || ':' AND address < $2::text || ';'))) \
             OR EXISTS (SELECT 1 FROM identity WHERE session = $1 \
                 AND ((address >= $2::text || '@' AND address < $2::text || 'A') \
                   OR (address >= $2::text || ':' AND address < $2::text || ';')))";
        self.any(sql, user).await
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        let record = Bytes::copy_from_slice(record);
        self.store_prekeys_batch(&[(id, record)], uploaded).await
    }

    /// A link's 812 prekeys in one statement.
    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        self.upsert(
            keys,
            |(id, _)| *id,
            |round| {
                sqlx::query(PREKEY)
                    .bind(self.session)
                    .bind(
                        round
                            .iter()
                            .map(|(id, _)| i64::from(*id))
                            .collect::<Vec<_>>(),
                    )
                    .bind(round.iter().map(|(_, r)| &r[..]).collect::<Vec<_>>())
                    .bind(uploaded)
            },
        )
        .await
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        let found: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT record FROM prekey WHERE session = $1 AND id = $2")
                .bind(self.session)
                .bind(i64::from(id))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(found.map(Bytes::from))
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, record FROM prekey WHERE session = $1 AND id = ANY($2::bigint[]) \
             ORDER BY id",
        )
        .bind(self.session)
        .bind(ids.iter().map(|id| i64::from(*id)).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(id, record)| (id as u32, Bytes::from(record)))
            .collect())
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let statement = sqlx::query(
            "UPDATE prekey SET uploaded = true WHERE session = $1 AND id = ANY($2::bigint[])",
        )
        .bind(self.session)
        .bind(ids.iter().map(|id| i64::from(*id)).collect::<Vec<_>>());
        self.write(statement).await.map(drop)
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        let statement = sqlx::query("DELETE FROM prekey WHERE session = $1 AND id = $2")
            .bind(self.session)
            .bind(i64::from(id));
        self.write(statement).await.map(drop)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let max: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM prekey WHERE session = $1")
                .bind(self.session)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
        Ok(max as u32)
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        let statement = sqlx::query(
            "INSERT INTO signed_prekey (session, id, record) VALUES ($1, $2, $3) \
             ON CONFLICT (session, id) DO UPDATE SET record = excluded.record",
        )
        .bind(self.session)
        .bind(i64::from(id))
        .bind(record);
        self.write(statement).await.map(drop)
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT record FROM signed_prekey WHERE session = $1 AND id = $2")
            .bind(self.session)
            .bind(i64::from(id))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT id, record FROM signed_prekey WHERE session = $1 ORDER BY id")
                .bind(self.session)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        Ok(rows.into_iter().map(|(id, r)| (id as u32, r)).collect())
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        let statement = sqlx::query("DELETE FROM signed_prekey WHERE session = $1 AND id = $2")
            .bind(self.session)
            .bind(i64::from(id));
        self.write(statement).await.map(drop)
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.pairs(SENDER_KEY, &[(address, record)]).await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<_> = sender_keys.iter().map(|(a, r)| (&**a, &r[..])).collect();
        self.pairs(SENDER_KEY, &rows).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        let sql = "SELECT record FROM sender_key WHERE session = $1 AND address = $2";
        self.blob(sql, address).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        let sql = "DELETE FROM sender_key WHERE session = $1 AND address = $2";
        self.write(self.keyed(sql, address)).await.map(drop)
    }
}

#[async_trait]
impl AppSyncStore for PgSessionKeys {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        let found: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT key FROM sync_key WHERE session = $1 AND key_id = $2")
                .bind(self.session)
                .bind(key_id)
                .fetch_optional(&self.pool)
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
        let statement = sqlx::query(
            "INSERT INTO sync_key (session, key_id, key) VALUES ($1, $2, $3) \
             ON CONFLICT (session, key_id) DO UPDATE SET key = excluded.key",
        )
        .bind(self.session)
        .bind(key_id)
        .bind(sync_key_to_json(&key)?);
        self.write(statement).await.map(drop)
    }

    /// A collection never synced, or one whose state no longer reads, starts from 0.
    async fn get_version(&self, name: &str) -> Result<HashState> {
        let sql = "SELECT state FROM sync_version WHERE session = $1 AND name = $2";
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
        self.pairs(SYNC_VERSION, &[(name, &state[..])]).await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        self.upsert(
            mutations,
            |m| &m.index_mac[..],
            |round| {
                sqlx::query(MUTATION_MAC)
                    .bind(self.session)
                    .bind(name)
                    .bind(version as i64)
                    .bind(round.iter().map(|m| &m.index_mac[..]).collect::<Vec<_>>())
                    .bind(round.iter().map(|m| &m.value_mac[..]).collect::<Vec<_>>())
            },
        )
        .await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar(
            "SELECT value_mac FROM mutation_mac \
             WHERE session = $1 AND name = $2 AND index_mac = $3",
        )
        .bind(self.session)
        .bind(name)
        .bind(index_mac)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        if index_macs.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT index_mac, value_mac FROM mutation_mac \
             WHERE session = $1 AND name = $2 AND index_mac = ANY($3::bytea[])",
        )
        .bind(self.session)
        .bind(name)
        .bind(index_macs.iter().map(|m| &m[..]).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .filter_map(|(index_mac, value_mac)| Some((index_mac.try_into().ok()?, value_mac)))
            .collect())
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        if index_macs.is_empty() {
            return Ok(());
        }
        let statement = sqlx::query(
            "DELETE FROM mutation_mac \
             WHERE session = $1 AND name = $2 AND index_mac = ANY($3::bytea[])",
        )
        .bind(self.session)
        .bind(name)
        .bind(index_macs.iter().map(|m| &m[..]).collect::<Vec<_>>());
        self.write(statement).await.map(drop)
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        let sql = "DELETE FROM mutation_mac WHERE session = $1 AND name = $2";
        self.write(self.keyed(sql, name)).await.map(drop)
    }

    /// The highest key id whose key reads: a key the session cannot use is never offered.
    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT key_id, key FROM sync_key WHERE session = $1 ORDER BY key_id DESC",
        )
        .bind(self.session)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .find(|(_, key)| from_json::<AppStateSyncKey>(key).is_ok())
            .map(|(id, _)| id))
    }
}

fn lid_entry(row: &PgRow) -> Result<LidPnMappingEntry> {
    Ok(LidPnMappingEntry {
        lid: row.try_get("lid").map_err(db)?,
        phone_number: row.try_get("phone").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
        learning_source: row.try_get("source").map_err(db)?,
    })
}

impl PgSessionKeys {
    async fn put_lids(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        self.upsert(
            entries,
            |e| e.lid.as_str(),
            |round| {
                sqlx::query(LID)
                    .bind(self.session)
                    .bind(round.iter().map(|e| e.lid.as_str()).collect::<Vec<_>>())
                    .bind(
                        round
                            .iter()
                            .map(|e| e.phone_number.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(round.iter().map(|e| e.created_at).collect::<Vec<_>>())
                    .bind(round.iter().map(|e| e.updated_at).collect::<Vec<_>>())
                    .bind(
                        round
                            .iter()
                            .map(|e| e.learning_source.as_str())
                            .collect::<Vec<_>>(),
                    )
            },
        )
        .await
    }

    async fn put_device_lists(&self, records: &[DeviceListRecord]) -> Result<()> {
        let rows = records
            .iter()
            .map(|r| Ok((r, serde_json::to_string(&r.devices)?)))
            .collect::<serde_json::Result<Vec<_>>>()
            .map_err(|e| StoreError::Serialization(Box::new(e)))?;
        self.upsert(
            &rows,
            |(r, _)| r.user.as_str(),
            |round| {
                sqlx::query(DEVICE_LIST)
                    .bind(self.session)
                    .bind(
                        round
                            .iter()
                            .map(|(r, _)| r.user.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(round.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>())
                    .bind(round.iter().map(|(r, _)| r.timestamp).collect::<Vec<_>>())
                    .bind(
                        round
                            .iter()
                            .map(|(r, _)| r.phash.as_deref())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        round
                            .iter()
                            .map(|(r, _)| r.raw_id.map(i64::from))
                            .collect::<Vec<_>>(),
                    )
            },
        )
        .await
    }

    async fn put_pending(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        let at = now();
        self.upsert(
            rows,
            |r| (r.chat, r.sender, r.id),
            |round| {
                sqlx::query(PENDING)
                    .bind(self.session)
                    .bind(round.iter().map(|r| r.chat).collect::<Vec<_>>())
                    .bind(round.iter().map(|r| r.sender).collect::<Vec<_>>())
                    .bind(round.iter().map(|r| r.id).collect::<Vec<_>>())
                    .bind(round.iter().map(|r| r.message).collect::<Vec<_>>())
                    .bind(at)
            },
        )
        .await
    }

    async fn delete_pending(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let statement = sqlx::query(
            "DELETE FROM pending_inbound p \
             USING UNNEST($2::text[], $3::text[], $4::text[]) AS k (chat, sender, id) \
             WHERE p.session = $1 AND p.chat = k.chat AND p.sender = k.sender AND p.id = k.id",
        )
        .bind(self.session)
        .bind(keys.iter().map(|k| k.chat).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.sender).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.id).collect::<Vec<_>>());
        self.write(statement).await.map(drop)
    }

    /// Deletes this session's rows of `sql` older than `cutoff`; how many.
    async fn expire(&self, sql: &'static str, cutoff: i64) -> Result<u32> {
        let statement = sqlx::query(sql).bind(self.session).bind(cutoff);
        Ok(self.write(statement).await? as u32)
    }
}

#[async_trait]
impl ProtocolStore for PgSessionKeys {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        sqlx::query_as(
            "SELECT device_jid, has_key FROM sender_key_device \
             WHERE session = $1 AND group_jid = $2 ORDER BY device_jid",
        )
        .bind(self.session)
        .bind(group_jid)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        self.upsert(
            entries,
            |(device_jid, _)| *device_jid,
            |round| {
                sqlx::query(SENDER_KEY_DEVICE)
                    .bind(self.session)
                    .bind(group_jid)
                    .bind(round.iter().map(|(d, _)| *d).collect::<Vec<_>>())
                    .bind(round.iter().map(|(_, has)| *has).collect::<Vec<_>>())
            },
        )
        .await
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        let sql = "DELETE FROM sender_key_device WHERE session = $1 AND group_jid = $2";
        self.write(self.keyed(sql, group_jid)).await.map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        let statement = sqlx::query(
            "DELETE FROM sender_key_device WHERE session = $1 AND device_jid = ANY($2::text[])",
        )
        .bind(self.session)
        .bind(device_jids.to_vec());
        self.write(statement).await.map(drop)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        let statement =
            sqlx::query("DELETE FROM sender_key_device WHERE session = $1").bind(self.session);
        self.write(statement).await.map(drop)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = sqlx::query(
            "SELECT lid, phone, created_at, updated_at, source FROM lid_pn \
             WHERE session = $1 AND lid = $2",
        )
        .bind(self.session)
        .bind(lid)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(lid_entry).transpose()
    }

    /// The LID most recently learnt for the number (of two learnt at once, the greater,
    /// as SQLite's index gives it).
    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = sqlx::query(
            "SELECT lid, phone, created_at, updated_at, source FROM lid_pn \
             WHERE session = $1 AND phone = $2 ORDER BY updated_at DESC, lid DESC LIMIT 1",
        )
        .bind(self.session)
        .bind(phone)
        .fetch_optional(&self.pool)
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
        let rows = sqlx::query(
            "SELECT lid, phone, created_at, updated_at, source FROM lid_pn \
             WHERE session = $1 ORDER BY lid",
        )
        .bind(self.session)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(lid_entry).collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        let statement = sqlx::query(
            "INSERT INTO base_key (session, address, message_id, base_key) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (session, address, message_id) \
             DO UPDATE SET base_key = excluded.base_key",
        )
        .bind(self.session)
        .bind(address)
        .bind(message_id)
        .bind(base_key);
        self.write(statement).await.map(drop)
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT base_key FROM base_key \
             WHERE session = $1 AND address = $2 AND message_id = $3",
        )
        .bind(self.session)
        .bind(address)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(stored.is_some_and(|stored| stored == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        let statement = sqlx::query(
            "DELETE FROM base_key WHERE session = $1 AND address = $2 AND message_id = $3",
        )
        .bind(self.session)
        .bind(address)
        .bind(message_id);
        self.write(statement).await.map(drop)
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.put_device_lists(std::slice::from_ref(&record)).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        self.put_device_lists(&records).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        let row: Option<(String, i64, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT devices, timestamp, phash, raw_id FROM device_list \
             WHERE session = $1 AND user_id = $2",
        )
        .bind(self.session)
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some((devices, timestamp, phash, raw_id)) = row else {
            return Ok(None);
        };
        Ok(Some(DeviceListRecord {
            user: user.to_owned(),
            devices: from_json(devices.as_bytes())?,
            timestamp,
            phash,
            raw_id: raw_id.map(|id| id as u32),
        }))
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        let sql = "DELETE FROM device_list WHERE session = $1 AND user_id = $2";
        self.write(self.keyed(sql, user)).await.map(drop)
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        let sql = "SELECT info FROM group_metadata WHERE session = $1 AND group_jid = $2";
        self.blob(sql, group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.pairs(GROUP_METADATA, &[(group_jid, blob)]).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        let sql = "DELETE FROM group_metadata WHERE session = $1 AND group_jid = $2";
        self.write(self.keyed(sql, group_jid)).await.map(drop)
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let row: Option<(Vec<u8>, i64, Option<i64>)> = sqlx::query_as(
            "SELECT token, token_timestamp, sender_timestamp FROM tc_token \
             WHERE session = $1 AND jid = $2",
        )
        .bind(self.session)
        .bind(jid)
        .fetch_optional(&self.pool)
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
        let statement = sqlx::query(
            "INSERT INTO tc_token (session, jid, token, token_timestamp, sender_timestamp) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session, jid) DO UPDATE SET \
             token = excluded.token, token_timestamp = excluded.token_timestamp, \
             sender_timestamp = excluded.sender_timestamp",
        )
        .bind(self.session)
        .bind(jid)
        .bind(&entry.token[..])
        .bind(entry.token_timestamp)
        .bind(entry.sender_timestamp);
        self.write(statement).await.map(drop)
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        let sql = "DELETE FROM tc_token WHERE session = $1 AND jid = $2";
        self.write(self.keyed(sql, jid)).await.map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT jid FROM tc_token WHERE session = $1 ORDER BY jid")
            .bind(self.session)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// A row goes once neither its received token nor its sender bucket is live.
    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        let statement = sqlx::query(
            "DELETE FROM tc_token WHERE session = $1 \
             AND NOT (octet_length(token) > 0 AND token_timestamp >= $2) \
             AND NOT (sender_timestamp IS NOT NULL AND sender_timestamp >= $3)",
        )
        .bind(self.session)
        .bind(token_cutoff)
        .bind(sender_cutoff);
        Ok(self.write(statement).await? as u32)
    }

    /// One upsert: the sender bucket only moves forward, and a token stays.
    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        let statement = sqlx::query(
            "INSERT INTO tc_token (session, jid, token, token_timestamp, sender_timestamp) \
             VALUES ($1, $2, '\\x'::bytea, $3, $3) ON CONFLICT (session, jid) DO UPDATE SET \
             sender_timestamp = GREATEST(COALESCE(tc_token.sender_timestamp, \
                                                  excluded.sender_timestamp), \
                                         excluded.sender_timestamp)",
        )
        .bind(self.session)
        .bind(jid)
        .bind(sender_timestamp);
        self.write(statement).await.map(drop)
    }

    /// One upsert: a placeholder or an older token is replaced, the sender bucket kept.
    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        let statement = sqlx::query(
            "INSERT INTO tc_token (session, jid, token, token_timestamp, sender_timestamp) \
             VALUES ($1, $2, $3, $4, NULL) ON CONFLICT (session, jid) DO UPDATE SET \
             token = excluded.token, token_timestamp = excluded.token_timestamp \
             WHERE octet_length(tc_token.token) = 0 \
                OR excluded.token_timestamp >= tc_token.token_timestamp",
        )
        .bind(self.session)
        .bind(jid)
        .bind(token)
        .bind(token_timestamp);
        self.write(statement).await.map(drop)
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        let statement = sqlx::query(
            "INSERT INTO sent_message (session, chat, message_id, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session, chat, message_id) DO UPDATE SET \
             payload = excluded.payload, created_at = excluded.created_at",
        )
        .bind(self.session)
        .bind(chat_jid)
        .bind(message_id)
        .bind(payload)
        .bind(now());
        self.write(statement).await.map(drop)
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        let mut tx = self.fenced().await?;
        let taken = sqlx::query_scalar(
            "DELETE FROM sent_message WHERE session = $1 AND chat = $2 AND message_id = $3 \
             RETURNING payload",
        )
        .bind(self.session)
        .bind(chat_jid)
        .bind(message_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(taken)
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        let sql = "DELETE FROM sent_message WHERE session = $1 AND created_at < $2";
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
             WHERE session = $1 AND chat = $2 AND sender = $3 AND id = $4",
        )
        .bind(self.session)
        .bind(chat)
        .bind(sender)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete_pending(&[PendingInboundKey { chat, sender, id }])
            .await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        let sql = "DELETE FROM pending_inbound WHERE session = $1 AND inserted_at < $2";
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
impl MsgSecretStore for PgSessionKeys {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        self.upsert(
            &entries,
            |e| (&*e.chat, &*e.sender, &*e.msg_id),
            |round| {
                sqlx::query(MSG_SECRET)
                    .bind(self.session)
                    .bind(round.iter().map(|e| &*e.chat).collect::<Vec<_>>())
                    .bind(round.iter().map(|e| &*e.sender).collect::<Vec<_>>())
                    .bind(round.iter().map(|e| &*e.msg_id).collect::<Vec<_>>())
                    .bind(round.iter().map(|e| &e.secret[..]).collect::<Vec<_>>())
                    .bind(round.iter().map(|e| e.expires_at).collect::<Vec<_>>())
                    .bind(round.iter().map(|e| e.message_ts).collect::<Vec<_>>())
            },
        )
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
             WHERE session = $1 AND chat = $2 AND sender = $3 AND msg_id = $4",
        )
        .bind(self.session)
        .bind(chat)
        .bind(sender)
        .bind(msg_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        let sql =
            "DELETE FROM msg_secret WHERE session = $1 AND expires_at <> 0 AND expires_at <= $2";
        self.expire(sql, cutoff_timestamp).await
    }
}

#[async_trait]
impl DeviceStore for PgSessionKeys {
    async fn save(&self, device: &Device) -> Result<()> {
        let statement = sqlx::query("UPDATE session SET device = $1 WHERE id = $2")
            .bind(device_to_json(device)?)
            .bind(self.session);
        match self.write(statement).await? {
            // The session was deleted under a client that outlived it.
            0 => Err(StoreError::DeviceNotFound(self.session as i32)),
            _ => Ok(()),
        }
    }

    async fn load(&self) -> Result<Option<Device>> {
        let found: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT device FROM session WHERE id = $1")
                .bind(self.session)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        found
            .flatten()
            .map(|bytes| device_from_json(&bytes))
            .transpose()
    }

    async fn exists(&self) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM session WHERE id = $1 AND device IS NOT NULL)",
        )
        .bind(self.session)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// A fresh device (new keys) for a session that has none yet.
    async fn create(&self) -> Result<i32> {
        let statement =
            sqlx::query("UPDATE session SET device = $1 WHERE id = $2 AND device IS NULL")
                .bind(device_to_json(&Device::new())?)
                .bind(self.session);
        self.write(statement).await?;
        Ok(self.session as i32)
    }
}
