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

/// The instance a session kept under `name` belongs to: the instance itself, or the
/// one a set-aside session (`set-aside/<instance>/<ms>[/unlink]`) was set aside from.
pub fn instance_of(name: &str) -> &str {
    name.strip_prefix(SET_ASIDE)
        .map(|rest| rest.strip_suffix(TO_UNLINK).unwrap_or(rest))
        .and_then(|rest| rest.rsplit_once('/'))
        .map_or(name, |(instance, _)| instance)
}

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
    /// Reached only through [`Db::writer`].
    write: Conns,
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
            .execute(&mut *self.db.writer().await?)
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
            .execute(&mut *self.db.writer().await?)
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
    /// The writing connection: the one path of every write to sessions (their keys, a
    /// wipe, a set-aside, an import), so that a check that the writer may still write
    /// (on a shared database, that its node still owns the instance) has one place.
    pub(super) async fn writer(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, sqlx::SqliteConnection>, sqlx::Error> {
        self.write.lock().await
    }

    /// The instance's session row, created if absent.
    pub(super) async fn session_id(&self, instance: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO session (instance, created_at) VALUES (?, ?) \
             ON CONFLICT (instance) DO UPDATE SET instance = excluded.instance RETURNING id",
        )
        .bind(instance)
        .bind(crate::unix_millis() / 1000)
        .fetch_one(&mut *self.writer().await?)
        .await
    }
}

#[cfg(test)]
mod tests {
    use whatsapp_rust::store::SqliteStore as FileStore;
    use whatsapp_rust::wacore::store::Device;
    use whatsapp_rust::wacore::store::traits::*;

    use super::{SessionStore, SqliteSessions};
    use crate::store::contract::sessions::{check, fill};

    async fn open(dir: &std::path::Path) -> SqliteSessions {
        SqliteSessions::open(&dir.join("sessions.db"), &dir.join("sessions"))
            .await
            .unwrap()
    }

    /// What else a session keeps is the contract's (`contract::sessions`), on both
    /// backends; here, that it is kept in the file.
    #[tokio::test]
    async fn sessions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::new();
        {
            let sessions = open(dir.path()).await;
            fill(&*sessions.open("A").await.unwrap(), &device).await;
            sessions.open("B").await.unwrap();
        }
        let sessions = open(dir.path()).await;
        assert_eq!(sessions.stored().await.unwrap(), ["A", "B"]);
        check(&*sessions.open("A").await.unwrap(), &device).await;
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
