//! The sessions' contract: what a client writes through a session's keys reads back the
//! same, and wipes, set-asides and listings answer alike, on SQLite and on PostgreSQL.
//! A test here sees the sessions through `SessionStore` and the keys through
//! whatsapp-rust's `Backend`; only counting rows and writing a broken device look
//! underneath, through [`Sessions`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::{Connection as _, PgPool};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::*;

use crate::store::leases::Held;
use crate::store::{Pairing, PgSessions, SessionStore, SqliteSessions, TO_UNLINK};

/// The session tables but `session`, whose rows belong to one.
pub(in crate::store) const KEY_TABLES: [&str; 17] = [
    "identity",
    "signal_session",
    "prekey",
    "signed_prekey",
    "sender_key",
    "sync_key",
    "sync_version",
    "mutation_mac",
    "sender_key_device",
    "lid_pn",
    "base_key",
    "device_list",
    "group_metadata",
    "tc_token",
    "sent_message",
    "pending_inbound",
    "msg_secret",
];

/// The instances the PostgreSQL sessions are made for, their leases held by the node.
const INSTANCES: [&str; 4] = ["A", "B", "C", "D"];

/// Sessions on one backend, with what the tests need underneath them.
pub(in crate::store) struct Sessions {
    pub(in crate::store) store: Box<dyn SessionStore>,
    under: Under,
}

enum Under {
    Sqlite(tempfile::TempDir),
    Postgres(PgPool, Arc<Node>),
}

pub(in crate::store) async fn sqlite() -> Sessions {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteSessions::open(
        &dir.path().join("sessions.db"),
        &dir.path().join("sessions"),
    )
    .await
    .unwrap();
    Sessions {
        store: Box::new(store),
        under: Under::Sqlite(dir),
    }
}

/// Sessions on a fresh database, as a node that holds instances A to D sees them.
pub(in crate::store) async fn postgres() -> Sessions {
    let url = crate::store::test_pg::database().await;
    let pool = crate::store::PgStore::connect(&url).await.unwrap().pool;
    let node = Node::join(&pool, "node-1").await;
    for id in INSTANCES {
        sqlx::query(
            "INSERT INTO instances (id, token, name, created_at, due_at) \
             VALUES ($1, $1, $1, 0, 1)",
        )
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
        node.claim(&pool, id).await;
    }
    Sessions {
        store: Box::new(PgSessions::new(pool.clone(), node.clone())),
        under: Under::Postgres(pool, node),
    }
}

impl Sessions {
    /// The database and node under PostgreSQL's sessions.
    pub(in crate::store) fn pg(&self) -> (&PgPool, &Arc<Node>) {
        match &self.under {
            Under::Postgres(pool, node) => (pool, node),
            Under::Sqlite(_) => panic!("sessions on SQLite"),
        }
    }

    /// The rows of every session's keys, all tables together.
    async fn key_rows(&self) -> i64 {
        let sql = KEY_TABLES
            .map(|t| format!("(SELECT count(*) FROM {t})"))
            .join(" + ");
        let sql = sqlx::AssertSqlSafe(format!("SELECT {sql}"));
        match &self.under {
            Under::Sqlite(dir) => {
                let url = format!("sqlite://{}", dir.path().join("sessions.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
            }
            Under::Postgres(pool, _) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        }
    }

    /// Makes a session for `instance` whose device is `device` as it is, JSON or not.
    async fn put_device(&self, instance: &str, device: &[u8]) {
        match &self.under {
            Under::Sqlite(dir) => {
                let url = format!("sqlite://{}", dir.path().join("sessions.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query("INSERT INTO session (instance, created_at, device) VALUES (?, 0, ?)")
                    .bind(instance)
                    .bind(device)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            Under::Postgres(pool, node) => {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SELECT zg_fence($1, $2, $3, nextval('session_id'))")
                    .bind(instance)
                    .bind(node.node())
                    .bind(node.epoch(instance))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query(
                    "INSERT INTO session (id, instance, created_at, device) \
                     VALUES (currval('session_id'), $1, 0, $2)",
                )
                .bind(instance)
                .bind(device)
                .execute(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        }
    }
}

/// A gateway node of the tests: what it holds is what it claimed here.
pub(in crate::store) struct Node {
    id: String,
    epochs: Mutex<HashMap<String, i64>>,
}

impl Held for Node {
    fn node(&self) -> &str {
        &self.id
    }

    fn epoch(&self, instance: &str) -> Option<i64> {
        self.epochs.lock().unwrap().get(instance).copied()
    }
}

impl Node {
    pub(in crate::store) async fn join(pool: &PgPool, id: &str) -> Arc<Self> {
        sqlx::query(
            "INSERT INTO zg_node (id, name, addr, capacity, expires_at) \
             VALUES ($1, $1, '127.0.0.1:1', 100, clock_timestamp() + interval '1 hour')",
        )
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
        Arc::new(Self {
            id: id.to_owned(),
            epochs: Mutex::new(HashMap::new()),
        })
    }

    /// Takes the instance's lease at a new epoch, as a claim does; returns the epoch.
    pub(in crate::store) async fn claim(&self, pool: &PgPool, instance: &str) -> i64 {
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE zg_lease SET node = $1, epoch = nextval('zg_epoch') \
             WHERE instance = $2 RETURNING epoch",
        )
        .bind(&self.id)
        .bind(instance)
        .fetch_one(pool)
        .await
        .unwrap();
        self.epochs
            .lock()
            .unwrap()
            .insert(instance.to_owned(), epoch);
        epoch
    }

    /// Forgets the instance, as a node that lost it does.
    pub(in crate::store) fn forget(&self, instance: &str) {
        self.epochs.lock().unwrap().remove(instance);
    }
}

pub(in crate::store) fn lid(lid: &str, phone: &str, at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: phone.into(),
        created_at: at,
        updated_at: at,
        learning_source: "usync".into(),
    }
}

/// Writes one of everything through `keys`, as a client would.
pub(in crate::store) async fn fill(keys: &dyn Backend, device: &Device) {
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
pub(in crate::store) async fn check(keys: &dyn Backend, device: &Device) {
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

/// Runs each named test (an `async fn(&Sessions)`) on both backends.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::sqlite().await).await
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::postgres().await).await
                }
            )*
        }
    };
}

on_both_backends!(
    a_session_keeps_what_its_client_wrote_apart_from_the_others,
    a_wiped_session_is_gone_and_a_client_that_outlived_it_writes_nothing,
    a_set_aside_session_is_kept_under_another_name,
    pairings_tell_which_sessions_paired_and_as_what,
    the_merging_writes_merge_in_the_database,
);

async fn a_session_keeps_what_its_client_wrote_apart_from_the_others(sessions: &Sessions) {
    let sessions = &*sessions.store;
    let device = Device::new();
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
    assert!(sessions.exists("A").await.unwrap());
    assert!(!sessions.exists("C").await.unwrap());
    // A client started again opens the same session.
    check(&*sessions.open("A").await.unwrap(), &device).await;
}

async fn a_wiped_session_is_gone_and_a_client_that_outlived_it_writes_nothing(sessions: &Sessions) {
    let old = sessions.store.open("A").await.unwrap();
    fill(&*old, &Device::new()).await;
    fill(&*sessions.store.open("B").await.unwrap(), &Device::new()).await;
    let of_b = sessions.key_rows().await / 2;
    assert!(of_b > 812, "{of_b}");
    sessions.store.wipe("A").await.unwrap();
    assert!(!sessions.store.exists("A").await.unwrap());
    assert_eq!(sessions.store.stored().await.unwrap(), ["B"]);
    // A late write of the wiped session is refused, not kept for a later one.
    assert!(old.put_identity("x@s.whatsapp.net", [1; 32]).await.is_err());
    assert!(old.save(&Device::new()).await.is_err());
    let new = sessions.store.open("A").await.unwrap();
    assert_eq!(
        new.load_identity("5511@s.whatsapp.net").await.unwrap(),
        None
    );
    assert_eq!(new.get_max_prekey_id().await.unwrap(), 0);
    assert_eq!(
        sessions.key_rows().await,
        of_b,
        "the wiped session's rows went with it, the other's stayed"
    );
    // Wiping what is not there is no error.
    sessions.store.wipe("C").await.unwrap();
}

async fn a_set_aside_session_is_kept_under_another_name(sessions: &Sessions) {
    let sessions = &*sessions.store;
    let device = Device::new();
    fill(&*sessions.open("A").await.unwrap(), &device).await;
    sessions.open("B").await.unwrap();
    let name = sessions.set_aside("A", false).await.unwrap();
    assert!(name.starts_with("set-aside/A/"), "{name}");
    assert!(!name.ends_with(TO_UNLINK), "{name}");
    assert!(!sessions.exists("A").await.unwrap());
    assert!(sessions.exists(&name).await.unwrap());
    assert_eq!(sessions.stored().await.unwrap(), ["B"]);
    let names: Vec<String> = sessions
        .pairings()
        .await
        .unwrap()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names, [name.clone(), "B".into()]);
    // Whoever recovers it finds every key.
    check(&*sessions.open(&name).await.unwrap(), &device).await;
    let fresh = sessions.open("A").await.unwrap();
    assert!(fresh.load().await.unwrap().is_none());
    // And once it is dealt with, it goes.
    sessions.wipe(&name).await.unwrap();
    assert!(!sessions.exists(&name).await.unwrap());
}

async fn pairings_tell_which_sessions_paired_and_as_what(sessions: &Sessions) {
    let mut paired = Device::new();
    paired.pn = Some("5511999990001:7@s.whatsapp.net".parse().unwrap());
    let store = &*sessions.store;
    store.open("A").await.unwrap().save(&paired).await.unwrap();
    let fresh = store.open("B").await.unwrap();
    fresh.create().await.unwrap();
    store.open("C").await.unwrap(); // no device at all yet
    let aside = store.set_aside("A", true).await.unwrap();
    assert!(aside.ends_with(TO_UNLINK), "{aside}");
    sessions.put_device("D", b"{").await;
    assert_eq!(
        store.pairings().await.unwrap(),
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

async fn the_merging_writes_merge_in_the_database(sessions: &Sessions) {
    let keys = sessions.store.open("A").await.unwrap();
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
    // Within one batch too, each row merging with the ones before it.
    keys.put_msg_secrets(vec![secret(300, 0), secret(250, 9)])
        .await
        .unwrap();
    assert_eq!(
        keys.get_msg_secret_with_ts("c", "s", "m").await.unwrap(),
        Some((vec![1; 32], 9))
    );
    assert_eq!(keys.delete_expired_msg_secrets(299).await.unwrap(), 0);
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
    // lid mappings: the phone's latest lid; one learnt twice keeps when it was first.
    keys.put_lid_mappings(&[lid("1", "p", 1), lid("2", "p", 2), lid("1", "q", 3)])
        .await
        .unwrap();
    assert_eq!(keys.get_pn_mapping("p").await.unwrap().unwrap().lid, "2");
    let first = keys.get_lid_mapping("1").await.unwrap().unwrap();
    assert_eq!(
        (
            first.phone_number.as_str(),
            first.created_at,
            first.updated_at
        ),
        ("q", 1, 3)
    );
    assert_eq!(keys.get_all_lid_mappings().await.unwrap().len(), 2);
}
