//! The registry of instances: creates, finds and cancels them, starts one task each, and
//! reconnects stored sessions after a start at a bounded pace.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::RngExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{self, Command, Context};
use super::session::ClientFactory;
use super::{InstanceHandle, State};
use crate::store::{InstanceRecord, Store, StoreError};

/// Z-API instances are valid for a period; self-hosted ones do not lapse, so `due` is
/// set far ahead (one year) and only informs.
const DUE_AFTER_MS: i64 = 365 * 24 * 3600 * 1000;
/// How long a restoring session may hold its slot before the next one starts anyway.
const RESTORE_SLOT: Duration = Duration::from_secs(30);

pub struct Manager {
    instances: RwLock<HashMap<String, InstanceHandle>>,
    ctx: Arc<Context>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

pub struct NewInstance {
    pub name: String,
    pub session_name: Option<String>,
    pub connected_callback_url: Option<String>,
    pub disconnected_callback_url: Option<String>,
}

pub struct ManagerConfig {
    pub sessions_dir: std::path::PathBuf,
    pub whatsapp_url: String,
    pub whatsapp_version: Option<(u32, u32, u32)>,
    pub link_wait: Duration,
    pub restore_concurrency: usize,
}

impl Manager {
    /// Starts a task for every stored instance and reconnects the linked ones in the
    /// background, at most `restore_concurrency` handshakes at a time, with jitter.
    pub async fn start(
        store: Arc<dyn Store>,
        config: ManagerConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let ctx = Arc::new(Context {
            factory: ClientFactory {
                sessions_dir: config.sessions_dir,
                whatsapp_url: config.whatsapp_url,
                version: config.whatsapp_version,
            },
            store: store.clone(),
            link_wait: config.link_wait,
        });
        let manager = Arc::new(Self {
            instances: RwLock::new(HashMap::new()),
            ctx,
            tracker: TaskTracker::new(),
            shutdown,
        });
        let mut linked = Vec::new();
        for record in store.all_instances().await? {
            let handle = actor::spawn(
                record,
                manager.ctx.clone(),
                &manager.tracker,
                manager.shutdown.child_token(),
            );
            if handle.record.link.is_some() {
                linked.push(handle.clone());
            }
            manager.write().insert(handle.record.id.clone(), handle);
        }
        tracing::info!(
            instances = manager.read().len(),
            linked = linked.len(),
            "instances loaded"
        );
        manager.tracker.spawn(restore_paced(
            linked,
            config.restore_concurrency.max(1),
            manager.shutdown.clone(),
        ));
        Ok(manager)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, InstanceHandle>> {
        self.instances.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, InstanceHandle>> {
        self.instances.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<InstanceHandle> {
        self.read().get(id).cloned()
    }

    pub async fn create(&self, new: NewInstance) -> Result<InstanceHandle, StoreError> {
        let now = crate::unix_millis();
        let record = InstanceRecord {
            id: random_hex(16),
            token: random_hex(12),
            name: new.name,
            session_name: new.session_name,
            connected_callback_url: new.connected_callback_url,
            disconnected_callback_url: new.disconnected_callback_url,
            created_at: now,
            due_at: now + DUE_AFTER_MS,
            link: None,
        };
        self.ctx.store.insert_instance(&record).await?;
        let handle = actor::spawn(
            record,
            self.ctx.clone(),
            &self.tracker,
            self.shutdown.child_token(),
        );
        self.write()
            .insert(handle.record.id.clone(), handle.clone());
        tracing::info!(instance.id = %handle.record.id, "instance created");
        Ok(handle)
    }

    /// Unlinks the number, deletes the session and the instance. The row goes first: if
    /// the database refuses, nothing has changed and the caller gets the error.
    pub async fn cancel(&self, id: &str) -> Result<(), StoreError> {
        self.ctx.store.delete_instance(id).await?;
        let Some(handle) = self.write().remove(id) else {
            return Ok(());
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        if handle.commands.send(Command::Cancel(done)).await.is_ok() {
            let _ = finished.await;
        }
        tracing::info!(instance.id = %id, "instance cancelled");
        Ok(())
    }

    /// Stops every instance task (sessions are kept) and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Restores sessions so that at most `concurrency` are mid-handshake at once: each
/// holds a slot until it has reached WhatsApp, stops, or [`RESTORE_SLOT`] passes. The
/// app-state sync that follows the login does not hold a slot.
async fn restore_paced(
    linked: Vec<InstanceHandle>,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    for handle in linked {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        // Jitter inside the slot: starts are spread out, and the slot count alone
        // bounds how many handshakes are in flight.
        let jitter = Duration::from_millis(rand::rng().random_range(0..200));
        tokio::spawn(async move {
            tokio::time::sleep(jitter).await;
            if handle.restore().await.is_ok() {
                let mut rx = handle.snapshot.clone();
                let settled = rx.wait_for(|s| s.socket_up || s.state != State::Reconnecting);
                let _ = tokio::time::timeout(RESTORE_SLOT, settled).await;
            }
            drop(slot);
        });
    }
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02X}", rng.random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_upper_case_hex_of_the_zapi_lengths() {
        let id = super::random_hex(16);
        let token = super::random_hex(12);
        assert_eq!((id.len(), token.len()), (32, 24));
        assert!(
            id.chars()
                .chain(token.chars())
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        );
        assert_ne!(id, super::random_hex(16));
    }
}
