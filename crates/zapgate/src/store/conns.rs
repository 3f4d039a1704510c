//! SQLite connections held open for the store's life and taken in turn. No pool sits
//! between the store and SQLite: sqlx's pool tests a connection when it is handed back
//! (and, by default, when taken), each a trip to the connection's thread, which on
//! this gateway's busiest paths cost more than the statements themselves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::{Mutex, MutexGuard};

pub(crate) struct Conns {
    conns: Vec<Mutex<SqliteConnection>>,
    next: AtomicUsize,
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
            conns.push(Mutex::new(SqliteConnection::connect_with(options).await?));
        }
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
            wait,
        })
    }

    /// A free connection, or the next in turn once it is free (callers queue in order).
    pub(crate) async fn lock(&self) -> Result<MutexGuard<'_, SqliteConnection>, sqlx::Error> {
        for conn in &self.conns {
            if let Ok(conn) = conn.try_lock() {
                return Ok(conn);
            }
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        tokio::time::timeout(self.wait, self.conns[turn].lock())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }
}
