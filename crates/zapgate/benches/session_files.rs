//! The session store's layout: whatsapp-rust's SQLite store with one file per session
//! (what the gateway did), or with one file holding every session, each with its own
//! store as the library allows (`with_config_for_device`); and the gateway's own store,
//! every session in one database behind one writing connection (`SqliteSessions`).
//! Reports the open files and memory each layout costs per session, and how long a
//! link's prekeys take to write, measured in this process.
//!
//! `cargo bench -p zapgate --bench session_files -- [--sessions 1000]`

#[path = "support/procfs.rs"]
mod procfs;

use std::time::Instant;

use futures_util::{StreamExt, stream};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::store::{SqliteStore, SqliteStoreConfig};
use whatsapp_rust::wacore::store::traits::Backend;
use zapgate::store::{SessionStore, SqliteSessions};

/// The three layouts measured.
#[derive(Clone, Copy)]
enum Layout {
    FilePerSession,
    OneFileManyStores,
    Gateway,
}

/// As the gateway opened them, when it kept a file per session.
fn config() -> SqliteStoreConfig {
    SqliteStoreConfig {
        cache_size_kib: 16,
        ..SqliteStoreConfig::default()
    }
}

/// Linking writes 812 prekeys per session: every store writes that batch, 32 at a time,
/// as the bench links. Milliseconds per store, wall time.
async fn write_burst(stores: &[std::sync::Arc<dyn Backend>]) -> f64 {
    let keys: Vec<(u32, Bytes)> = (1..=812)
        .map(|id| (id, Bytes::from(vec![7u8; 70])))
        .collect();
    let started = Instant::now();
    stream::iter(stores)
        .for_each_concurrent(32, |store| {
            let keys = &keys;
            async move {
                store
                    .store_prekeys_batch(keys, false)
                    .await
                    .expect("written")
            }
        })
        .await;
    started.elapsed().as_secs_f64() * 1000.0 / stores.len() as f64
}

async fn measure(n: usize, layout: Layout) -> (f64, f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (rss, fds, started) = (
        procfs::status_kib("self", "VmRSS:"),
        procfs::open_files("self"),
        Instant::now(),
    );
    let gateway = match layout {
        Layout::Gateway => Some(
            SqliteSessions::open(&dir.path().join("sessions.db"), &dir.path().join("none"))
                .await
                .expect("the sessions database opens"),
        ),
        _ => None,
    };
    let mut stores: Vec<std::sync::Arc<dyn Backend>> = Vec::with_capacity(n);
    for i in 0..n {
        let store: std::sync::Arc<dyn Backend> = match (layout, &gateway) {
            (Layout::Gateway, Some(sessions)) => {
                sessions.open(&format!("session {i}")).await.expect("opens")
            }
            (Layout::OneFileManyStores, _) => {
                let path = dir.path().join("sessions.db");
                std::sync::Arc::new(
                    SqliteStore::with_config_for_device(
                        &path.to_string_lossy(),
                        i as i32 + 1,
                        config(),
                    )
                    .await
                    .expect("the store opens"),
                )
            }
            _ => {
                let path = dir.path().join(format!("{i}.db"));
                std::sync::Arc::new(
                    SqliteStore::with_config(&path.to_string_lossy(), config())
                        .await
                        .expect("the store opens"),
                )
            }
        };
        // A first query, as a client's start makes: the schema is read, a statement made.
        store.exists().await.expect("a query");
        stores.push(store);
    }
    let secs = started.elapsed().as_secs_f64();
    let per = |now: u64, before: u64| now.saturating_sub(before) as f64 / n as f64;
    let result = (
        per(procfs::open_files("self") as u64, fds as u64),
        per(procfs::status_kib("self", "VmRSS:"), rss),
        secs * 1000.0 / n as f64,
        write_burst(&stores).await,
    );
    drop(stores);
    drop(gateway);
    result
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip_while(|a| a != "--sessions")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for (label, layout) in [
        ("one file per session", Layout::FilePerSession),
        ("one file for all", Layout::OneFileManyStores),
        ("the gateway's store", Layout::Gateway),
    ] {
        let (fds, kib, ms, write_ms) = measure(n, layout).await;
        println!(
            "{label:>22}: {n} stores, {fds:.1} open files and {kib:.0} KiB each, {ms:.1} ms to open one, {write_ms:.1} ms per store to write 812 prekeys (32 at once)"
        );
    }
}
