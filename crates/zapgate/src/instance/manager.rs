//! The registry of instances: creates, finds and cancels them, starts one task each, and
//! reconnects stored sessions after a start at a bounded pace.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::RngExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{self, Context};
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
    shutdown: CancellationToken,
}

pub struct NewInstance {
    pub name: String,
    pub session_name: Option<String>,
    pub webhooks: crate::store::Webhooks,
}

pub struct ManagerConfig {
    /// Every instance's WhatsApp session.
    pub sessions: Arc<dyn crate::store::SessionStore>,
    pub whatsapp_url: String,
    pub whatsapp_version: Option<(u32, u32, u32)>,
    pub link_wait: Duration,
    pub link_rate_per_minute: u32,
    pub restore_concurrency: usize,
    /// Woken when a webhook event is written.
    pub webhooks_due: Arc<tokio::sync::Notify>,
    /// Sessions that may run at once (what the open-file limit leaves room for).
    pub max_sessions: usize,
    pub messaging: Arc<crate::messaging::Hub>,
    /// On a shared database, the instances this node holds a lease on: it runs only
    /// those, and takes the lease of each instance it creates.
    pub leases: Option<Arc<crate::store::leases::Leases>>,
}

impl Manager {
    /// Starts a task for every stored instance, finishes interrupted cancels, sets
    /// aside sessions no instance claims, and reconnects the linked ones in the
    /// background, at most `restore_concurrency` handshakes at a time, with jitter;
    /// beside them, removes at WhatsApp the devices set-aside sessions left linked.
    pub async fn start(
        store: Arc<dyn Store>,
        config: ManagerConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let tracker = TaskTracker::new();
        let ctx = Arc::new(Context {
            factory: ClientFactory {
                sessions: config.sessions,
                whatsapp_url: config.whatsapp_url,
                version: config.whatsapp_version,
                learnt: Default::default(),
                tracker: tracker.clone(),
                messaging: config.messaging,
            },
            store: store.clone(),
            link_wait: config.link_wait,
            link_rate_per_minute: config.link_rate_per_minute,
            tracker,
            shutdown: shutdown.clone(),
            bus: tokio::sync::broadcast::channel(super::events::BUS_BACKLOG).0,
            webhooks_due: config.webhooks_due,
            sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
            max_sessions: config.max_sessions,
            leases: config.leases,
        });
        let manager = Arc::new(Self {
            instances: RwLock::new(HashMap::new()),
            ctx,
            shutdown,
        });
        let mut records = store.all_instances().await?;
        if let Some(leases) = &manager.ctx.leases {
            let held = leases.held();
            records.retain(|r| held.contains_key(&r.id));
        }
        let stored = set_aside_unclaimed(&*manager.ctx.factory.sessions, &records).await;
        // Linked instances whose session is not there: a set-aside one may be it.
        let missing = records
            .iter()
            .filter(|r| r.cancelled_at.is_none())
            .filter(|r| !stored.as_ref().is_ok_and(|s| s.contains(&r.id)))
            .filter_map(|r| Some((r.id.clone(), r.link.as_ref()?.phone.clone())))
            .collect();
        let mut linked = Vec::new();
        for record in records {
            let cancelled = record.cancelled_at.is_some();
            let found = match &stored {
                Ok(stored) => Ok(stored.contains(&record.id)),
                Err(e) => Err(e.clone()),
            };
            let handle = actor::spawn(
                record,
                found,
                manager.ctx.clone(),
                manager.shutdown.child_token(),
            );
            if cancelled {
                tracing::info!(instance.id = %handle.record.id, "finishing an interrupted cancel");
                manager
                    .ctx
                    .tracker
                    .spawn(async move { handle.cancel().await });
                continue;
            }
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
        // Restores and the removal of devices left linked share the pace: at most
        // `restore_concurrency` logins at once between them.
        let slots = Arc::new(Semaphore::new(config.restore_concurrency.max(1)));
        manager.ctx.tracker.spawn(restore_paced(
            manager.ctx.tracker.clone(),
            linked,
            slots.clone(),
            manager.shutdown.clone(),
        ));
        let ctx = manager.ctx.clone();
        manager
            .ctx
            .tracker
            .spawn(super::ghosts::remove_all(ctx, slots, missing));
        Ok(manager)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, InstanceHandle>> {
        self.instances.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, InstanceHandle>> {
        self.instances.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every instance's events from now on.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<Arc<super::Event>> {
        self.ctx.bus.subscribe()
    }

    /// Every instance's snapshot, as it stands.
    pub fn snapshots(&self) -> Vec<super::Snapshot> {
        self.read().values().map(InstanceHandle::snapshot).collect()
    }

    pub fn get(&self, id: &str) -> Option<InstanceHandle> {
        self.read().get(id).cloned()
    }

    pub async fn create(&self, new: NewInstance) -> Result<InstanceHandle, StoreError> {
        let now = crate::unix_millis();
        let record = InstanceRecord {
            id: crate::random_hex(16),
            token: crate::random_hex(12),
            name: new.name,
            session_name: new.session_name,
            webhooks: new.webhooks,
            created_at: now,
            due_at: now + DUE_AFTER_MS,
            link: None,
            cancelled_at: None,
        };
        self.ctx.store.insert_instance(&record).await?;
        if let Some(leases) = &self.ctx.leases {
            // A new instance's lease is free until claimed: this node runs it. Another
            // node taking it first would be a fault of its own (it claims only what it
            // is to run); the instance is left to it.
            if leases.claim_instance(&record.id).await?.is_none() {
                return Err(StoreError::Moved(record.id));
            }
        }
        let handle = actor::spawn(
            record,
            Ok(false),
            self.ctx.clone(),
            self.shutdown.child_token(),
        );
        self.write()
            .insert(handle.record.id.clone(), handle.clone());
        tracing::info!(instance.id = %handle.record.id, "instance created");
        Ok(handle)
    }

    /// Unlinks the number, deletes the session and the instance. The row is marked
    /// first: if the database refuses, nothing has changed and the caller gets the
    /// error; if the process dies after, the next start finishes the cancel.
    pub async fn cancel(&self, id: &str) -> Result<(), StoreError> {
        self.ctx
            .store
            .mark_cancelled(id, crate::unix_millis())
            .await?;
        let Some(handle) = self.write().remove(id) else {
            return Ok(()); // another caller is cancelling it
        };
        if let Err(e) = handle.cancel().await {
            tracing::warn!(instance.id = %id, error = %e, "the cancel is finished at the next start");
        }
        Ok(())
    }

    /// Stops every instance task (sessions are kept) and waits for them and their
    /// child tasks.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.ctx.tracker.close();
        self.ctx.tracker.wait().await;
    }
}

/// A session with no recorded link holds nothing a user linked for sure (a window that
/// never completed, or a crash before its link was stored), but it is set aside, not
/// deleted, at start. One of an instance that is there and unlinked is marked for
/// `ghosts` to remove the device it left linked at WhatsApp; but when more sessions
/// than a crash could leave have no link (more than [`UNCLAIMED_AT_MOST`], and a tenth
/// of them all), the instance database is likely not the one the sessions belong with
/// (a wrong `--database-url`, a backup restored on one side only): none is marked, and
/// every one is kept.
/// Returns the sessions the instances keep, or why they could not be listed.
async fn set_aside_unclaimed(
    sessions: &dyn crate::store::SessionStore,
    records: &[InstanceRecord],
) -> Result<std::collections::HashSet<String>, String> {
    let stored = match sessions.stored().await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::error!(error = %e, "could not list the sessions");
            return Err(e.to_string());
        }
    };
    let unclaimed = |id: &String| !records.iter().any(|r| &r.id == id && r.link.is_some());
    let count = stored.iter().filter(|id| unclaimed(id)).count();
    let mismatch = count > UNCLAIMED_AT_MOST && count * 10 > stored.len();
    if mismatch {
        tracing::error!(
            sessions = stored.len(),
            unclaimed = count,
            "most sessions have no recorded link: is this the instance database they belong with (--database-url)? They are set aside and kept; no device is removed at WhatsApp"
        );
    }
    let mut kept = std::collections::HashSet::new();
    for id in stored {
        if !unclaimed(&id) {
            kept.insert(id);
            continue;
        }
        // Only an instance that is there, unlinked, had a linking window to crash in.
        let to_unlink = !mismatch
            && records
                .iter()
                .any(|r| r.id == id && r.link.is_none() && r.cancelled_at.is_none());
        match sessions.set_aside(&id, to_unlink).await {
            Ok(to) => tracing::warn!(
                instance.id = %id, kept_as = %to,
                "a session without a recorded link was set aside"
            ),
            Err(e) => {
                tracing::error!(instance.id = %id, error = %e, "could not set aside a session")
            }
        }
    }
    Ok(kept)
}

/// Sessions without a link a crash may leave at one start (the windows open then),
/// before the instance database is doubted.
const UNCLAIMED_AT_MOST: usize = 32;

/// Restores sessions so that at most as many as `slots` are mid-handshake at once:
/// each holds a slot until it has reached WhatsApp, stops, or [`RESTORE_SLOT`] passes.
/// The app-state sync that follows the login does not hold a slot.
async fn restore_paced(
    tracker: TaskTracker,
    linked: Vec<InstanceHandle>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
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
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            tokio::time::sleep(jitter).await;
            if handle.restore().await.is_ok() {
                let mut rx = handle.watch();
                let settled = rx.wait_for(|s| s.socket_up || s.state != State::Reconnecting);
                tokio::select! {
                    _ = tokio::time::timeout(RESTORE_SLOT, settled) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_upper_case_hex_of_the_zapi_lengths() {
        let id = crate::random_hex(16);
        let token = crate::random_hex(12);
        assert_eq!((id.len(), token.len()), (32, 24));
        assert!(
            id.chars()
                .chain(token.chars())
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        );
        assert_ne!(id, crate::random_hex(16));
    }
}
