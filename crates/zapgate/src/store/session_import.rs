//! Brings in the session files of earlier versions, which kept one SQLite file per
//! instance (`<data-dir>/sessions/<instance>.db`, whatsapp-rust's own store), into the
//! shared sessions database. Each file is copied in one transaction, then moved to
//! `sessions/imported/`, never deleted.

use std::path::{Path, PathBuf};

use sqlx::Connection as _;
use whatsapp_rust::store::SqliteStore as FileStore;
use whatsapp_rust::wacore::store::traits::{AppSyncStore as _, DeviceStore as _};

use super::StoreError;
use super::session_keys::{device_to_json, hash_state_to_json, sync_key_to_json};
use super::sessions::Db;

/// The device whatsapp-rust's file store keeps a session under.
const FILE_DEVICE: i64 = 1;

/// Rows copied as they are: (table here, its columns, table there, the same columns).
const COPIED: &[(&str, &str, &str, &str)] = &[
    ("identity", "address, key", "identities", "address, key"),
    (
        "signal_session",
        "address, record",
        "sessions",
        "address, record",
    ),
    (
        "prekey",
        "id, record, uploaded",
        "prekeys",
        "id, key, uploaded",
    ),
    (
        "signed_prekey",
        "id, record",
        "signed_prekeys",
        "id, record",
    ),
    (
        "sender_key",
        "address, record",
        "sender_keys",
        "address, record",
    ),
    (
        "mutation_mac",
        "name, index_mac, version, value_mac",
        "app_state_mutation_macs",
        "name, index_mac, version, value_mac",
    ),
    (
        "sender_key_device",
        "group_jid, device_jid, has_key",
        "sender_key_devices",
        "group_jid, device_jid, has_key",
    ),
    (
        "lid_pn",
        "lid, phone, created_at, updated_at, source",
        "lid_pn_mapping",
        "lid, phone_number, created_at, updated_at, learning_source",
    ),
    (
        "base_key",
        "address, message_id, base_key",
        "base_keys",
        "address, message_id, base_key",
    ),
    (
        "device_list",
        "user, devices, timestamp, phash, raw_id",
        "device_registry",
        "user_id, devices_json, timestamp, phash, raw_id",
    ),
    (
        "group_metadata",
        "group_jid, info",
        "group_metadata",
        "group_jid, info",
    ),
    (
        "tc_token",
        "jid, token, token_timestamp, sender_timestamp",
        "tc_tokens",
        "jid, token, token_timestamp, sender_timestamp",
    ),
    (
        "sent_message",
        "chat, message_id, payload, created_at",
        "sent_messages",
        "chat_jid, message_id, payload, created_at",
    ),
    (
        "pending_inbound",
        "chat, sender, id, message, inserted_at",
        "pending_inbound_messages",
        "chat, sender, id, message, inserted_at",
    ),
    (
        "msg_secret",
        "chat, sender, msg_id, secret, expires_at, message_ts",
        "msg_secrets",
        "chat, sender, msg_id, secret, expires_at, message_ts",
    ),
];

/// Imports every `<instance>.db` in `dir`. A file that cannot be imported stays where
/// it is, is logged, and is tried again at the next start.
pub(super) async fn import_files(db: &Db, dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Io(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(instance) = name.to_str().and_then(|n| n.strip_suffix(".db"))
            && entry.file_type()?.is_file()
        {
            files.push((instance.to_owned(), entry.path()));
        }
    }
    for (instance, path) in files {
        match import(db, &instance, &path).await {
            Ok(rows) => {
                let to = move_to_imported(dir, &path)?;
                tracing::info!(instance.id = %instance, rows, from = %path.display(), kept = %to.display(), "a session file was brought into the sessions database");
            }
            Err(e) => {
                tracing::error!(instance.id = %instance, path = %path.display(), error = %e, "could not bring a session file into the sessions database; it stays where it is")
            }
        }
    }
    Ok(())
}

/// Copies one session file in; returns how many rows it had. Once it is in, the file
/// is moved away whatever else fails, so it is never brought in twice over a session
/// already in use.
async fn import(db: &Db, instance: &str, path: &Path) -> Result<u64, StoreError> {
    let lost =
        |e: whatsapp_rust::wacore::store::error::StoreError| StoreError::Import(e.to_string());
    let mut header = [0u8; 16];
    let read = std::io::Read::read(&mut std::fs::File::open(path)?, &mut header)?;
    if read < header.len() || &header != b"SQLite format 3\0" {
        return Err(StoreError::Import("not a SQLite database".into()));
    }
    // What the library encodes its own way is read through the library.
    let file = FileStore::new(&path.to_string_lossy())
        .await
        .map_err(lost)?;
    let device = file.load().await.map_err(lost)?;
    let mut conn = db.writer().await?;
    // An earlier import that could not detach its file left it here.
    let _ = sqlx::query("DETACH DATABASE old").execute(&mut *conn).await;
    sqlx::query("ATTACH DATABASE ? AS old")
        .bind(path.to_string_lossy().into_owned())
        .execute(&mut *conn)
        .await?;
    let copied = async {
        let key_ids: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT key_id FROM old.app_state_keys WHERE device_id = ?")
                .bind(FILE_DEVICE)
                .fetch_all(&mut *conn)
                .await?;
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM old.app_state_versions WHERE device_id = ?")
                .bind(FILE_DEVICE)
                .fetch_all(&mut *conn)
                .await?;
        let mut keys = Vec::new();
        for key_id in key_ids {
            if let Some(key) = file.get_sync_key(&key_id).await.map_err(lost)? {
                keys.push((key_id, sync_key_to_json(&key).map_err(lost)?));
            }
        }
        let mut versions = Vec::new();
        for name in names {
            let state = file.get_version(&name).await.map_err(lost)?;
            versions.push((name, hash_state_to_json(&state).map_err(lost)?));
        }
        let device = device
            .as_ref()
            .map(device_to_json)
            .transpose()
            .map_err(lost)?;

        let mut tx = conn.begin().await?;
        // A session the instance already has here (an import cut short before its file
        // was moved, or a file put back later) is set aside, never replaced.
        sqlx::query("UPDATE session SET instance = ? WHERE instance = ?")
            .bind(format!("set-aside/{instance}/{}", crate::unix_millis()))
            .bind(instance)
            .execute(&mut *tx)
            .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO session (instance, created_at, device) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(instance)
        .bind(crate::unix_millis() / 1000)
        .bind(device)
        .fetch_one(&mut *tx)
        .await?;
        let mut rows = 0;
        for (here, columns, there, theirs) in COPIED {
            let sql = format!(
                "INSERT INTO main.{here} (session, {columns}) \
                 SELECT ?, {theirs} FROM old.{there} WHERE device_id = ?"
            );
            // Built from the constant table above, nothing from outside.
            rows += sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .bind(FILE_DEVICE)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        for (key_id, key) in &keys {
            sqlx::query("INSERT INTO sync_key (session, key_id, key) VALUES (?, ?, ?)")
                .bind(id)
                .bind(key_id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        for (name, state) in &versions {
            sqlx::query("INSERT INTO sync_version (session, name, state) VALUES (?, ?, ?)")
                .bind(id)
                .bind(name)
                .bind(state)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<_, StoreError>(rows + (keys.len() + versions.len()) as u64)
    }
    .await;
    if let Err(e) = sqlx::query("DETACH DATABASE old").execute(&mut *conn).await {
        // The writing connection keeps the file attached (and open) until the next
        // import detaches it; nothing reads it through that name.
        tracing::warn!(path = %path.display(), error = %e, "could not detach an imported session file");
    }
    drop(file);
    copied
}

/// Moves an imported file (and whatever SQLite keeps beside it) to `imported/`.
fn move_to_imported(dir: &Path, path: &Path) -> Result<PathBuf, StoreError> {
    let imported = dir.join("imported");
    std::fs::create_dir_all(&imported)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let target = imported.join(format!("{}-{name}", crate::unix_millis()));
    for suffix in ["-wal", "-shm", "-journal", ""] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}{suffix}", target.display()));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io(e)),
        }
    }
    Ok(target)
}
