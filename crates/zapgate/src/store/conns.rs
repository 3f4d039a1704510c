//! SQLite connections held open for the store's life and taken in turn. No pool sits
//! between the store and SQLite: sqlx's pool tests a connection when it is handed back
//! (and, by default, when taken), each a trip to the connection's thread, which on
//! this gateway's busiest paths cost more than the statements themselves.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

pub(crate) struct Conns {
    conns: Vec<Arc<Mutex<SqliteConnection>>>,
    /// How long a caller waits for a connection before hearing that the database is
    /// busy (`PoolTimedOut`, as a pool would say).
    wait: Duration,
}

impl Conns {
    /// `n` connections opened with `options`.
    pub(crate) async fn open(
        options: &SqliteConnectOptions,
        n: usize,
        wait: Duration,
    ) -> Result<Self, sqlx::Error> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            conns.push(Arc::new(Mutex::new(
                SqliteConnection::connect_with(options).await?,
            )));
        }
        Ok(Self { conns, wait })
    }

    /// A free connection, or the first to be freed (a caller waits in line at each).
    pub(crate) async fn lock(&self) -> Result<MutexGuard<'_, SqliteConnection>, sqlx::Error> {
        for conn in &self.conns {
            if let Ok(conn) = conn.try_lock() {
                return Ok(conn);
            }
        }
        let waits = self.conns.iter().map(|conn| Box::pin(conn.lock()));
        tokio::time::timeout(self.wait, futures_util::future::select_all(waits))
            .await
            .map(|(conn, _, _)| conn)
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    /// As [`Self::lock`], for a task of its own (one that must finish what it began on
    /// the connection even if its caller goes away).
    pub(crate) async fn lock_owned(
        &self,
    ) -> Result<OwnedMutexGuard<SqliteConnection>, sqlx::Error> {
        for conn in &self.conns {
            if let Ok(conn) = conn.clone().try_lock_owned() {
                return Ok(conn);
            }
        }
        let waits = self
            .conns
            .iter()
            .map(|conn| Box::pin(conn.clone().lock_owned()));
        tokio::time::timeout(self.wait, futures_util::future::select_all(waits))
            .await
            .map(|(conn, _, _)| conn)
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }
}
