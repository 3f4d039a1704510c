//! The WhatsApp sessions of every instance, behind [`SessionStore`]: what whatsapp-rust
//! keeps for a linked device. The SQLite implementation puts every session in one
//! database, `<data-dir>/sessions.db`, written through one connection and read through
//! two, so a session costs rows, not a database connection and its open files.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

use super::StoreError;
use super::conns::Conns;
use super::session_keys::SessionKeys;
use whatsapp_rust::wacore::store::traits::Backend;

/// Every instance's WhatsApp session.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Where the sessions are kept, for logs.
    fn location(&self) -> String;
    /// The instance's session for a client, created empty when it has none.
    async fn open(&self, instance: &str) -> Result<Arc<dyn Backend>, StoreError>;
    async fn exists(&self, instance: &str) -> Result<bool, StoreError>;
    /// Deletes the instance's session, every key of it.
    async fn wipe(&self, instance: &str) -> Result<(), StoreError>;
    /// The instances that have a session.
    async fn stored(&self) -> Result<Vec<String>, StoreError>;
    /// Keeps the instance's session apart, where an operator can still recover it, and
    /// leaves the instance with none. Returns the name it is kept under. `to_unlink`
    /// marks it for the removal of the device it holds at WhatsApp (its name ends with
    /// [`TO_UNLINK`]); any other is kept as it is.
    async fn set_aside(&self, instance: &str, to_unlink: bool) -> Result<String, StoreError>;
    /// Every session, the set-aside ones too, by the name it is kept under, with the
    /// device it paired as.
    async fn pairings(&self) -> Result<Vec<(String, Pairing)>, StoreError>;
}

/// Names a set-aside session is kept under start with this.
pub const SET_ASIDE: &str = "set-aside/";
/// A set-aside session whose device is to be removed at WhatsApp ends with this.
pub const TO_UNLINK: &str = "/unlink";

/// What a session holds of a device linked at WhatsApp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// It never paired: no device of it was ever linked to a number we know.
    Never,
    /// It paired as this device, `phone:device` (`5511999990001:3`).
    As(String),
    /// Its device does not read.
    Unreadable(String),
}

/// Writes wait this long for the one writing connection before they fail as busy.
const WRITE_WAIT: Duration = Duration::from_secs(60);

/// All sessions in one SQLite database.
pub struct SqliteSessions {
    path: PathBuf,
    db: Arc<Db>,
}

/// The database's connections: one writes, so sessions' writes queue instead of taking
/// turns at SQLite's lock; two read beside it (WAL).
pub(super) struct Db {
    pub(super) write: Conns,
    pub(super) read: Conns,
}

impl SqliteSessions {
    /// Opens (creating) the database at `path`, then brings in the session files an
    /// earlier version kept one per instance in `legacy_dir`.
    pub async fn open(path: &Path, legacy_dir: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(WRITE_WAIT);
        let write = Conns::open(&options, 1, WRITE_WAIT).await?;
        sqlx::migrate!("./migrations/sessions")
            .run(&mut *write.lock().await?)
            .await?;
        // Both opened now: the open files a session costs do not move later.
        let read = Conns::open(&options.read_only(true), 2, WRITE_WAIT).await?;
        let sessions = Self {
            path: path.to_owned(),
            db: Arc::new(Db { write, read }),
        };
        super::session_import::import_files(&sessions.db, legacy_dir).await?;
        Ok(sessions)
    }
}

#[async_trait]
impl SessionStore for SqliteSessions {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    async fn open(&self, instance: &str) -> Result<Arc<dyn Backend>, StoreError> {
        let id = self.db.session_id(instance).await?;
        Ok(Arc::new(SessionKeys::new(self.db.clone(), id)))
    }

    async fn exists(&self, instance: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM session WHERE instance = ?")
            .bind(instance)
            .fetch_optional(&mut *self.db.read.lock().await?)
            .await?;
        Ok(found.is_some())
    }

    async fn wipe(&self, instance: &str) -> Result<(), StoreError> {
        // Every other row goes with it (ON DELETE CASCADE).
        sqlx::query("DELETE FROM session WHERE instance = ?")
            .bind(instance)
            .execute(&mut *self.db.write.lock().await?)
            .await?;
        Ok(())
    }

    async fn stored(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT instance FROM session WHERE instance NOT LIKE 'set-aside/%' ORDER BY id",
        )
        .fetch_all(&mut *self.db.read.lock().await?)
        .await?)
    }

    async fn set_aside(&self, instance: &str, to_unlink: bool) -> Result<String, StoreError> {
        let mark = if to_unlink { TO_UNLINK } else { "" };
        let name = format!("{SET_ASIDE}{instance}/{}{mark}", crate::unix_millis());
        sqlx::query("UPDATE session SET instance = ? WHERE instance = ?")
            .bind(&name)
            .bind(instance)
            .execute(&mut *self.db.write.lock().await?)
            .await?;
        Ok(name)
    }

    async fn pairings(&self) -> Result<Vec<(String, Pairing)>, StoreError> {
        // Only the device's number, not its keys: the whole device is kilobytes.
        let rows: Vec<(String, Option<bool>, Option<String>)> = sqlx::query_as(
            "SELECT instance, json_valid(CAST(device AS TEXT)), \
             CASE WHEN json_valid(CAST(device AS TEXT)) \
             THEN json_extract(CAST(device AS TEXT), '$.pn') END \
             FROM session ORDER BY id",
        )
        .fetch_all(&mut *self.db.read.lock().await?)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, valid, pn)| (name, pairing(valid, pn.as_deref())))
            .collect())
    }
}

/// What a session's device says of its pairing: `valid` is whether it is JSON (`None`:
/// there is no device), `pn` its `pn` field, as JSON.
fn pairing(valid: Option<bool>, pn: Option<&str>) -> Pairing {
    let pn = match (valid, pn) {
        (Some(false), _) => return Pairing::Unreadable("its device is not JSON".into()),
        (None, _) | (Some(true), None) => return Pairing::Never,
        (Some(true), Some(pn)) => pn,
    };
    match serde_json::from_str::<whatsapp_rust::Jid>(pn) {
        Ok(jid) if !jid.user.is_empty() => Pairing::As(format!("{}:{}", jid.user, jid.device)),
        Ok(_) => Pairing::Unreadable("a device number without a phone".into()),
        Err(e) => Pairing::Unreadable(e.to_string()),
    }
}

impl Db {
    /// The instance's session row, created if absent.
    pub(super) async fn session_id(&self, instance: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO session (instance, created_at) VALUES (?, ?) \
             ON CONFLICT (instance) DO UPDATE SET instance = excluded.instance RETURNING id",
        )
        .bind(instance)
        .bind(crate::unix_millis() / 1000)
        .fetch_one(&mut *self.write.lock().await?)
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use whatsapp_rust::bytes::Bytes;
    use whatsapp_rust::store::SqliteStore as FileStore;
    use whatsapp_rust::wacore::appstate::hash::HashState;
    use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
    use whatsapp_rust::wacore::store::Device;
    use whatsapp_rust::wacore::store::traits::*;

    use super::{Pairing, SessionStore, SqliteSessions};

    async fn open(dir: &std::path::Path) -> SqliteSessions {
        SqliteSessions::open(&dir.join("sessions.db"), &dir.join("sessions"))
            .await
            .unwrap()
    }

    fn lid(lid: &str, phone: &str, at: i64) -> LidPnMappingEntry {
        LidPnMappingEntry {
            lid: lid.into(),
            phone_number: phone.into(),
            created_at: at,
            updated_at: at,
            learning_source: "usync".into(),
        }
    }

    /// Writes one of everything through `keys`, as a client would.
    async fn fill(keys: &dyn Backend, device: &Device) {
        keys.save(device).await.unwrap();
        keys.put_identity("5511@s.whatsapp.net", [7; 32])
            .await
            .unwrap();
        keys.put_session("5511:3@s.whatsapp.net", b"ratchet")
            .await
            .unwrap();
        let prekeys: Vec<(u32, Bytes)> = (1..=812)
            .map(|i| (i, Bytes::from(vec![i as u8; 40])))
            .collect();
        keys.store_prekeys_batch(&prekeys, false).await.unwrap();
        keys.mark_prekeys_uploaded(&[1, 2]).await.unwrap();
        keys.store_signed_prekey(1, b"signed").await.unwrap();
        keys.put_sender_key("group:5511", b"chain").await.unwrap();
        let key = AppStateSyncKey {
            key_data: vec![2; 32],
            fingerprint: vec![3],
            timestamp: 9,
        };
        keys.set_sync_key(b"\x00\x01", key).await.unwrap();
        let state = HashState {
            version: 4,
            ..Default::default()
        };
        keys.set_version("regular", state).await.unwrap();
        let mac = AppStateMutationMAC {
            index_mac: vec![5; 32],
            value_mac: vec![6; 32],
        };
        keys.put_mutation_macs("regular", 4, &[mac]).await.unwrap();
        keys.put_lid_mapping(&lid("100", "5511", 10)).await.unwrap();
        keys.set_sender_key_status("group", &[("5511:3@s.whatsapp.net", true)])
            .await
            .unwrap();
        keys.store_received_tc_token("100@lid", b"token", 50)
            .await
            .unwrap();
        keys.store_sent_message("5511@s.whatsapp.net", "M1", b"payload")
            .await
            .unwrap();
    }

    /// Reads back what `fill` wrote.
    async fn check(keys: &dyn Backend, device: &Device) {
        let loaded = keys.load().await.unwrap().expect("the device");
        assert_eq!(loaded.registration_id, device.registration_id);
        assert_eq!(
            loaded.identity_key.public_key,
            device.identity_key.public_key
        );
        assert_eq!(
            loaded.noise_key.private_key.serialize(),
            device.noise_key.private_key.serialize()
        );
        assert_eq!(loaded.adv_secret_key, device.adv_secret_key);
        assert_eq!(
            keys.load_identity("5511@s.whatsapp.net").await.unwrap(),
            Some([7; 32])
        );
        assert_eq!(
            keys.get_session("5511:3@s.whatsapp.net")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"ratchet"[..])
        );
        assert!(keys.has_signal_state_for_user("5511").await.unwrap());
        assert!(!keys.has_signal_state_for_user("551").await.unwrap());
        assert_eq!(keys.get_max_prekey_id().await.unwrap(), 812);
        let some = keys.load_prekeys_batch(&[1, 600, 900]).await.unwrap();
        assert_eq!(some.iter().map(|(id, _)| *id).collect::<Vec<_>>().len(), 2);
        assert_eq!(
            keys.load_prekey(600).await.unwrap().unwrap()[..],
            [600u32 as u8; 40]
        );
        assert_eq!(
            keys.load_signed_prekey(1).await.unwrap().as_deref(),
            Some(&b"signed"[..])
        );
        assert_eq!(
            keys.get_sender_key("group:5511").await.unwrap().as_deref(),
            Some(&b"chain"[..])
        );
        let key = keys.get_sync_key(b"\x00\x01").await.unwrap().unwrap();
        assert_eq!(
            (key.key_data, key.fingerprint, key.timestamp),
            (vec![2; 32], vec![3], 9)
        );
        assert_eq!(
            keys.get_latest_sync_key_id().await.unwrap(),
            Some(vec![0, 1])
        );
        assert_eq!(keys.get_version("regular").await.unwrap().version, 4);
        assert_eq!(keys.get_version("never").await.unwrap().version, 0);
        let macs = keys
            .get_mutation_macs("regular", &[[5; 32], [8; 32]])
            .await
            .unwrap();
        assert_eq!(macs.len(), 1);
        assert_eq!(macs[&[5; 32]], vec![6; 32]);
        assert_eq!(
            keys.get_pn_mapping("5511").await.unwrap().unwrap().lid,
            "100"
        );
        assert_eq!(
            keys.get_sender_key_devices("group").await.unwrap(),
            vec![("5511:3@s.whatsapp.net".to_owned(), true)]
        );
        assert_eq!(
            keys.get_tc_token("100@lid").await.unwrap().unwrap().token,
            b"token"
        );
        assert_eq!(
            keys.take_sent_message("5511@s.whatsapp.net", "M1")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"payload"[..])
        );
        assert_eq!(
            keys.take_sent_message("5511@s.whatsapp.net", "M1")
                .await
                .unwrap(),
            None,
            "taken once"
        );
    }

    #[tokio::test]
    async fn sessions_keep_apart_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::new();
        {
            let sessions = open(dir.path()).await;
            let a = sessions.open("A").await.unwrap();
            let b = sessions.open("B").await.unwrap();
            assert!(!a.exists().await.unwrap(), "no device until one is made");
            a.create().await.unwrap();
            let made = a.load().await.unwrap().expect("a fresh device");
            a.create().await.unwrap();
            assert_eq!(
                a.load().await.unwrap().unwrap().identity_key.public_key,
                made.identity_key.public_key,
                "made once"
            );
            fill(&*a, &device).await;
            assert!(b.load().await.unwrap().is_none());
            assert_eq!(b.load_identity("5511@s.whatsapp.net").await.unwrap(), None);
            assert_eq!(b.get_max_prekey_id().await.unwrap(), 0);
            assert_eq!(sessions.stored().await.unwrap(), ["A", "B"]);
        }
        let sessions = open(dir.path()).await;
        check(&*sessions.open("A").await.unwrap(), &device).await;
    }

    #[tokio::test]
    async fn a_wiped_session_is_gone_and_a_client_that_outlived_it_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).await;
        let old = sessions.open("A").await.unwrap();
        fill(&*old, &Device::new()).await;
        sessions.wipe("A").await.unwrap();
        assert!(!sessions.exists("A").await.unwrap());
        // A late write of the wiped session is refused, not kept for a later one.
        assert!(old.put_identity("x@s.whatsapp.net", [1; 32]).await.is_err());
        assert!(old.save(&Device::new()).await.is_err());
        let new = sessions.open("A").await.unwrap();
        assert_eq!(
            new.load_identity("5511@s.whatsapp.net").await.unwrap(),
            None
        );
        assert_eq!(new.get_max_prekey_id().await.unwrap(), 0);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM prekey")
            .fetch_one(&mut *sessions.db.read.lock().await.unwrap())
            .await
            .unwrap();
        assert_eq!(rows, 0, "the wiped session's rows went with it");
    }

    #[tokio::test]
    async fn a_set_aside_session_is_kept_under_another_name() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).await;
        let device = Device::new();
        fill(&*sessions.open("A").await.unwrap(), &device).await;
        let name = sessions.set_aside("A", false).await.unwrap();
        assert!(name.starts_with("set-aside/A/"), "{name}");
        assert!(!name.ends_with(super::TO_UNLINK), "{name}");
        assert!(!sessions.exists("A").await.unwrap());
        assert!(sessions.stored().await.unwrap().is_empty());
        // Whoever recovers it finds every key.
        check(&*sessions.open(&name).await.unwrap(), &device).await;
        assert!(
            sessions
                .open("A")
                .await
                .unwrap()
                .load()
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn pairings_tell_which_sessions_paired_and_as_what() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).await;
        let mut paired = Device::new();
        paired.pn = Some("5511999990001:7@s.whatsapp.net".parse().unwrap());
        sessions
            .open("A")
            .await
            .unwrap()
            .save(&paired)
            .await
            .unwrap();
        let fresh = sessions.open("B").await.unwrap();
        fresh.create().await.unwrap();
        sessions.open("C").await.unwrap(); // no device at all yet
        let aside = sessions.set_aside("A", true).await.unwrap();
        assert!(aside.ends_with(super::TO_UNLINK), "{aside}");
        sqlx::query("INSERT INTO session (instance, created_at, device) VALUES ('D', 0, x'7b')")
            .execute(&mut *sessions.db.write.lock().await.unwrap())
            .await
            .unwrap();
        assert_eq!(
            sessions.pairings().await.unwrap(),
            [
                (aside, Pairing::As("5511999990001:7".into())),
                ("B".into(), Pairing::Never),
                ("C".into(), Pairing::Never),
                (
                    "D".into(),
                    Pairing::Unreadable("its device is not JSON".into())
                ),
            ]
        );
    }

    #[tokio::test]
    async fn the_merging_writes_merge_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).await;
        let keys = sessions.open("A").await.unwrap();
        // tc tokens: the sender bucket only moves forward and keeps the token...
        keys.touch_tc_token_sender_timestamp("j", 100)
            .await
            .unwrap();
        keys.store_received_tc_token("j", b"t1", 10).await.unwrap();
        keys.touch_tc_token_sender_timestamp("j", 50).await.unwrap();
        let entry = keys.get_tc_token("j").await.unwrap().unwrap();
        assert_eq!(
            (entry.token, entry.token_timestamp, entry.sender_timestamp),
            (b"t1".to_vec(), 10, Some(100))
        );
        // ...and an older token does not replace a newer one.
        keys.store_received_tc_token("j", b"t0", 5).await.unwrap();
        assert_eq!(keys.get_tc_token("j").await.unwrap().unwrap().token, b"t1");
        assert_eq!(keys.delete_expired_tc_tokens(11, 101).await.unwrap(), 1);
        // msg secrets: a deadline never shrinks, 0 (never) wins, a known time stays.
        let secret = |expires_at, message_ts| MsgSecretEntry {
            chat: "c".into(),
            sender: "s".into(),
            msg_id: "m".into(),
            secret: [1; 32],
            expires_at,
            message_ts,
        };
        keys.put_msg_secrets(vec![secret(200, 7)]).await.unwrap();
        keys.put_msg_secrets(vec![secret(100, 0)]).await.unwrap();
        assert_eq!(
            keys.get_msg_secret_with_ts("c", "s", "m").await.unwrap(),
            Some((vec![1; 32], 7))
        );
        assert_eq!(keys.delete_expired_msg_secrets(150).await.unwrap(), 0);
        keys.put_msg_secrets(vec![secret(0, 0)]).await.unwrap();
        assert_eq!(
            keys.delete_expired_msg_secrets(i64::MAX).await.unwrap(),
            0,
            "never expires"
        );
        // A batch larger than one statement: every row, the last write of a key winning.
        let mut batch: Vec<(Arc<str>, Bytes)> = (0..450)
            .map(|i| {
                (
                    Arc::from(format!("{i}@s.whatsapp.net")),
                    Bytes::from(vec![1]),
                )
            })
            .collect();
        batch.push((Arc::from("7@s.whatsapp.net"), Bytes::from(vec![2])));
        keys.put_sessions_batch(&batch).await.unwrap();
        assert!(keys.has_session("449@s.whatsapp.net").await.unwrap());
        assert_eq!(
            keys.get_session("7@s.whatsapp.net").await.unwrap().unwrap()[..],
            [2]
        );
        // And within one statement.
        let small: Vec<(Arc<str>, Bytes)> = [("a", 1), ("b", 1), ("a", 3)]
            .into_iter()
            .map(|(a, v)| (Arc::from(a), Bytes::from(vec![v])))
            .collect();
        keys.put_sessions_batch(&small).await.unwrap();
        assert_eq!(keys.get_session("a").await.unwrap().unwrap()[..], [3]);
        // device lists: the record as written, the newer one replacing it.
        let list = |timestamp, devices: Vec<u32>| DeviceListRecord {
            user: "5511".into(),
            devices: devices
                .into_iter()
                .map(|d| DeviceInfo::new(d, Some(d)))
                .collect(),
            timestamp,
            phash: Some("2:abc".into()),
            raw_id: Some(9),
        };
        keys.update_device_lists(vec![list(1, vec![0]), list(2, vec![0, 3])])
            .await
            .unwrap();
        let stored = keys.get_devices("5511").await.unwrap().unwrap();
        let ids: Vec<_> = stored
            .devices
            .iter()
            .map(|d| (d.device_id, d.key_index))
            .collect();
        assert_eq!(
            (stored.timestamp, ids),
            (2, vec![(0, Some(0)), (3, Some(3))])
        );
        assert_eq!(
            (stored.phash.as_deref(), stored.raw_id),
            (Some("2:abc"), Some(9))
        );
        // the pending inbound buffer: kept by (chat, sender, id) until deleted.
        let pending = |id, message| PendingInboundRow {
            chat: "c",
            sender: "s",
            id,
            message,
        };
        keys.store_pending_inbound_batch(&[pending("1", b"one"), pending("2", b"two")])
            .await
            .unwrap();
        assert_eq!(
            keys.get_pending_inbound("c", "s", "2")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"two"[..])
        );
        keys.delete_pending_inbound_batch(&[PendingInboundKey {
            chat: "c",
            sender: "s",
            id: "1",
        }])
        .await
        .unwrap();
        assert_eq!(keys.get_pending_inbound("c", "s", "1").await.unwrap(), None);
        assert_eq!(
            keys.delete_expired_pending_inbound(i64::MAX).await.unwrap(),
            1
        );
        // lid mappings: the phone's latest lid.
        keys.put_lid_mappings(&[lid("1", "p", 1), lid("2", "p", 2)])
            .await
            .unwrap();
        assert_eq!(keys.get_pn_mapping("p").await.unwrap().unwrap().lid, "2");
        assert_eq!(keys.get_all_lid_mappings().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_session_file_of_an_earlier_version_is_brought_in_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("sessions");
        std::fs::create_dir_all(&legacy).unwrap();
        let device = Device::new();
        {
            // The file an earlier version wrote: whatsapp-rust's own store.
            let file = FileStore::new(&legacy.join("A.db").to_string_lossy())
                .await
                .unwrap();
            let id = file.create().await.unwrap();
            assert_eq!(id, 1);
            fill(&file, &device).await;
        }
        let sessions = open(dir.path()).await;
        assert_eq!(sessions.stored().await.unwrap(), ["A"]);
        check(&*sessions.open("A").await.unwrap(), &device).await;
        assert!(!legacy.join("A.db").exists());
        let kept: Vec<_> = std::fs::read_dir(legacy.join("imported"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(kept.iter().any(|f| f.ends_with("-A.db")), "{kept:?}");
        // A second start has nothing more to bring in.
        drop(sessions);
        let sessions = open(dir.path()).await;
        assert_eq!(sessions.stored().await.unwrap(), ["A"]);

        // The file put back later comes in again, and what the instance had is set
        // aside, not replaced.
        drop(sessions);
        let old = kept.iter().find(|f| f.ends_with("-A.db")).unwrap();
        std::fs::copy(legacy.join("imported").join(old), legacy.join("A.db")).unwrap();
        let sessions = open(dir.path()).await;
        let names: Vec<String> = sqlx::query_scalar("SELECT instance FROM session ORDER BY id")
            .fetch_all(&mut *sessions.db.read.lock().await.unwrap())
            .await
            .unwrap();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].starts_with("set-aside/A/"), "{names:?}");
        assert_eq!(names[1], "A");
        check(&*sessions.open("A").await.unwrap(), &device).await;
        let aside = sessions.open(&names[0]).await.unwrap();
        assert_eq!(
            aside.load().await.unwrap().unwrap().registration_id,
            device.registration_id
        );
        assert_eq!(aside.get_max_prekey_id().await.unwrap(), 812);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_session_stays_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("sessions");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(legacy.join("B.db"), b"not a database").unwrap();
        let sessions = open(dir.path()).await;
        assert!(sessions.stored().await.unwrap().is_empty());
        assert_eq!(
            std::fs::read(legacy.join("B.db")).unwrap(),
            b"not a database"
        );
    }
}
