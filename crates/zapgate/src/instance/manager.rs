//! The registry of instances: creates, finds and cancels them, starts one task each, and
//! reconnects stored sessions after a start at a bounded pace.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::RngExt as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{self, Context};
use super::session::ClientFactory;
use super::{InstanceHandle, State};
use crate::store::leases::{Grant, Leases};
use crate::store::{InstanceRecord, Store, StoreError};

/// Z-API instances are valid for a period; self-hosted ones do not lapse, so `due` is
/// set far ahead (one year) and only informs.
const DUE_AFTER_MS: i64 = 365 * 24 * 3600 * 1000;
/// How long a restoring session may hold its slot before the next one starts anyway.
const RESTORE_SLOT: Duration = Duration::from_secs(30);

pub struct Manager {
    instances: RwLock<HashMap<String, InstanceHandle>>,
    /// Stops one instance's task (and its messaging lane): it is handed to another
    /// node. Cancelled with the gateway's shutdown too.
    stops: std::sync::Mutex<HashMap<String, CancellationToken>>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    /// Linked instances to reconnect, at the restore pace.
    restores: mpsc::UnboundedSender<InstanceHandle>,
    /// Held while this node's share of a shared database changes, and while it
    /// creates an instance: one does not see the other half done.
    sharing: tokio::sync::Mutex<()>,
    /// Instances stopped here that have not ended yet (slow to stop).
    leaving: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Restores and removals of devices left linked share these: at most
    /// `restore_concurrency` logins at once between them.
    slots: Arc<Semaphore>,
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
                leases: config.leases.clone(),
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
        let (restores, to_restore) = mpsc::unbounded_channel();
        let manager = Arc::new(Self {
            instances: RwLock::new(HashMap::new()),
            stops: Default::default(),
            ctx,
            shutdown,
            restores,
            sharing: Default::default(),
            leaving: Default::default(),
            slots: Arc::new(Semaphore::new(config.restore_concurrency.max(1))),
        });
        let mut records = store.all_instances().await?;
        if let Some(leases) = &manager.ctx.leases {
            let held = leases.held();
            records.retain(|r| held.contains_key(&r.id));
        }
        let missing = manager.run_records(records).await;
        tracing::info!(instances = manager.read().len(), "instances loaded");
        manager.ctx.tracker.spawn(restore_paced(
            manager.ctx.tracker.clone(),
            to_restore,
            manager.slots.clone(),
            manager.shutdown.clone(),
        ));
        let ctx = manager.ctx.clone();
        manager.ctx.tracker.spawn(super::ghosts::remove_all(
            ctx,
            manager.slots.clone(),
            missing,
            None,
        ));
        if let Some(leases) = manager.ctx.leases.clone() {
            manager
                .ctx
                .tracker
                .spawn(manager.clone().follow_leases(leases));
        }
        Ok(manager)
    }

    /// Starts a task for each of `records` (instances this node runs from now on):
    /// finishes interrupted cancels, sets aside their sessions no link claims, and
    /// queues the linked ones for a paced reconnect. Returns the linked instances whose
    /// session is not there (a set-aside one may be it), with their numbers.
    async fn run_records(&self, records: Vec<InstanceRecord>) -> HashMap<String, String> {
        // On a shared database the sessions listed are every node's: only those of
        // `records` are this node's to judge.
        let scope = self.ctx.leases.is_some().then_some(&records[..]);
        let stored = set_aside_unclaimed(&*self.ctx.factory.sessions, &records, scope).await;
        let missing = records
            .iter()
            .filter(|r| r.cancelled_at.is_none())
            .filter(|r| !stored.as_ref().is_ok_and(|s| s.contains(&r.id)))
            .filter_map(|r| Some((r.id.clone(), r.link.as_ref()?.phone.clone())))
            .collect();
        let mut linked = 0;
        for record in records {
            if self.get(&record.id).is_some() {
                continue; // runs already
            }
            let cancelled = record.cancelled_at.is_some();
            let found = match &stored {
                Ok(stored) => Ok(stored.contains(&record.id)),
                Err(e) => Err(e.clone()),
            };
            let stop = self.shutdown.child_token();
            let handle = actor::spawn(record, found, self.ctx.clone(), stop.clone());
            if cancelled {
                tracing::info!(instance.id = %handle.record.id, "finishing an interrupted cancel");
                let id = handle.record.id.clone();
                drop(self.let_go(&id, handle.clone()));
                self.ctx.tracker.spawn(async move { handle.cancel().await });
                continue;
            }
            if handle.record.link.is_some() {
                linked += 1;
                let _ = self.restores.send(handle.clone());
            }
            self.stops_lock().insert(handle.record.id.clone(), stop);
            self.write().insert(handle.record.id.clone(), handle);
        }
        if linked > 0 {
            tracing::info!(linked, "linked numbers reconnecting");
        }
        missing
    }

    fn stops_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.stops.lock().unwrap_or_else(|p| p.into_inner())
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

    /// On a shared database, this node's leases.
    pub fn leases(&self) -> Option<&Arc<Leases>> {
        self.ctx.leases.as_ref()
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
        // Not while this node's share is being changed: the round would find the new
        // lease in the database and run the instance a second time.
        let _sharing = self.sharing.lock().await;
        self.ctx.store.insert_instance(&record).await?;
        if let Some(leases) = &self.ctx.leases {
            // The database leased it to this node as it was created; it is run here
            // unless the node lost its membership meanwhile.
            if leases.take_created(&record.id).await?.is_none() {
                return Err(StoreError::Moved(record.id));
            }
        }
        let stop = self.shutdown.child_token();
        let handle = actor::spawn(record, Ok(false), self.ctx.clone(), stop.clone());
        self.stops_lock().insert(handle.record.id.clone(), stop);
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
        self.stops_lock().remove(id);
        // Not run again by a lease round while it unlinks.
        drop(self.let_go(id, handle.clone()));
        if let Err(e) = handle.cancel().await {
            tracing::warn!(instance.id = %id, error = %e, "the cancel is finished at the next start");
        }
        Ok(())
    }

    /// On a shared database, each [`LEASE_ROUND`]: removes the nodes that stopped
    /// renewing, lets go of instances whose lease this node no longer has, and takes
    /// or hands over instances toward an equal share among the live nodes.
    async fn follow_leases(self: Arc<Self>, leases: Arc<Leases>) {
        let mut round = tokio::time::interval(LEASE_ROUND);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = round.tick() => {}
            }
            if let Err(e) = self.share(&leases).await {
                tracing::warn!(error = %e, "could not share the instances with the other nodes this round");
            }
        }
    }

    async fn share(&self, leases: &Leases) -> Result<(), StoreError> {
        let sharing = self.sharing.lock().await;
        let reaped = leases.reap().await?;
        if !reaped.is_empty() {
            tracing::warn!(nodes = ?reaped, "nodes that stopped renewing were removed; their instances are free");
        }
        let (dropped, _) = leases.sync().await?;
        // Deleted, or its lease moved: whatever of it still runs here stops now (any
        // write it makes is refused by now); one taken back at a new epoch meanwhile
        // runs again once it ended.
        let stopping: Vec<(String, oneshot::Receiver<()>)> = dropped
            .into_iter()
            .filter_map(|id| Some((id.clone(), self.begin_stop(&id)?)))
            .collect();
        let (instances, nodes) = leases.census().await?;
        let target = instances.div_ceil(nodes.max(1));
        let held = leases.held().len() as u64;
        if held < target {
            leases
                .claim((target - held).min(CLAIM_PER_ROUND) as u32)
                .await?;
        }
        // Every lease held whose instance does not run here: just granted, or left
        // over by a round that failed half-way.
        let idle: Vec<Grant> = leases
            .held()
            .into_iter()
            .filter(|(id, _)| self.get(id).is_none() && !self.leaving_lock().contains(id))
            .collect();
        let adopted = self.adopt(idle).await;
        drop(sharing);
        // Waited for outside the lock: creations need not wait for slow stops.
        for (id, end) in stopping {
            let ended = tokio::time::timeout(super::work::STOP_TIMEOUT * 3, end).await;
            tracing::warn!(instance.id = %id, ended_in_time = ended.is_ok(), "this node no longer holds the instance; it stopped here");
        }
        adopted?;
        if held > target + (target / 50).max(1) {
            self.hand_over(leases, (held - target).min(HAND_OVER_PER_ROUND))
                .await;
        }
        Ok(())
    }

    /// Runs instances whose lease this node holds and which do not run here yet.
    async fn adopt(&self, grants: Vec<Grant>) -> Result<(), StoreError> {
        if grants.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(grants.len());
        for (id, epoch) in &grants {
            match self.ctx.store.instance(id).await? {
                Some(record) => records.push(record),
                // Deleted meanwhile: its lease went with it.
                None => {
                    if let Some(leases) = &self.ctx.leases {
                        leases.forget(id, *epoch);
                    }
                }
            }
        }
        tracing::info!(instances = records.len(), "this node took over instances");
        let ids = records.iter().map(|r| r.id.clone()).collect();
        let missing = self.run_records(records).await;
        // Their pending webhook events are this node's to deliver now, and devices
        // their set-aside sessions left linked are removed from here.
        self.ctx.webhooks_due.notify_one();
        self.ctx.tracker.spawn(super::ghosts::remove_all(
            self.ctx.clone(),
            self.slots.clone(),
            missing,
            Some(ids),
        ));
        Ok(())
    }

    /// Gives up to `n` instances back for the other nodes to take: unlinked ones
    /// first, never one that is linking, unlinking or reconnecting. Each is stopped
    /// here first, so that its lease is free only once nothing of this node uses it;
    /// one slow to stop keeps its lease.
    async fn hand_over(&self, leases: &Leases, n: u64) {
        let held = leases.held();
        let mut candidates: Vec<(bool, String)> = self
            .snapshots_by_id()
            .into_iter()
            .filter(|(id, _)| held.contains_key(id))
            .filter(|(_, s)| !busy(s.state))
            .map(|(id, s)| (s.device.is_some(), id))
            .collect();
        candidates.sort();
        let mut handed = 0;
        for (_, id) in candidates {
            if handed == n {
                break;
            }
            let Some(epoch) = held.get(&id).copied() else {
                continue;
            };
            // Looked at again: a linking window may have opened since.
            if self.get(&id).is_none_or(|h| busy(h.snapshot().state)) {
                continue;
            }
            match self.stop_one(&id).await {
                Some(true) => {}
                Some(false) => {
                    tracing::warn!(instance.id = %id, "an instance was slow to stop; it keeps its lease here and runs again from the next round");
                    continue;
                }
                None => continue,
            }
            handed += 1;
            match leases.release(&id, epoch).await {
                Ok(true) => tracing::info!(instance.id = %id, "handed over to another node"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(instance.id = %id, error = %e, "could not release an instance; it runs here again from the next round")
                }
            }
        }
    }

    /// Takes the task of an instance out of this node's map while it may still run:
    /// the instance is not run here again before it ended (two clients would share
    /// its session). The receiver hears when it ended.
    fn let_go(&self, id: &str, handle: InstanceHandle) -> oneshot::Receiver<()> {
        self.leaving_lock().insert(id.to_owned());
        let mut watch = handle.watch();
        drop(handle);
        let (ended, end) = oneshot::channel();
        let (leaving, id) = (self.leaving.clone(), id.to_owned());
        self.ctx.tracker.spawn(async move {
            // The task's end drops its side of the watch.
            while watch.changed().await.is_ok() {}
            leaving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            let _ = ended.send(());
        });
        end
    }

    /// Tells one instance's task here to stop; `None` if it was not running here.
    fn begin_stop(&self, id: &str) -> Option<oneshot::Receiver<()>> {
        let handle = self.write().remove(id)?;
        if let Some(stop) = self.stops_lock().remove(id) {
            stop.cancel();
        }
        self.ctx.factory.messaging.close_lane(id);
        Some(self.let_go(id, handle))
    }

    /// Stops one instance's task here and waits (a bounded time) until it ended:
    /// `None` if it was not running here, else whether it ended in time.
    async fn stop_one(&self, id: &str) -> Option<bool> {
        let end = self.begin_stop(id)?;
        Some(
            tokio::time::timeout(super::work::STOP_TIMEOUT * 3, end)
                .await
                .is_ok(),
        )
    }

    fn leaving_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.leaving.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshots_by_id(&self) -> Vec<(String, super::Snapshot)> {
        self.read()
            .iter()
            .map(|(id, handle)| (id.clone(), handle.snapshot()))
            .collect()
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
/// With `scope`, only the sessions of those instances are looked at.
async fn set_aside_unclaimed(
    sessions: &dyn crate::store::SessionStore,
    records: &[InstanceRecord],
    scope: Option<&[InstanceRecord]>,
) -> Result<std::collections::HashSet<String>, String> {
    let stored = match sessions.stored().await {
        Ok(stored) => match scope {
            Some(scope) => stored
                .into_iter()
                .filter(|id| scope.iter().any(|r| &r.id == id))
                .collect(),
            None => stored,
        },
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

/// States an instance is not handed over in: it is in the middle of something.
fn busy(state: State) -> bool {
    matches!(
        state,
        State::Linking | State::Unlinking | State::Reconnecting
    )
}

/// How often a node on a shared database looks at the other nodes and its share.
const LEASE_ROUND: Duration = Duration::from_secs(1);
/// Instances a node claims in one round, at most (each reconnects at the restore pace).
const CLAIM_PER_ROUND: u64 = 500;
/// Instances a node over its share hands over in one round, at most: a new node fills
/// up without a storm of reconnects.
const HAND_OVER_PER_ROUND: u64 = 5;

/// Sessions without a link a crash may leave at one start (the windows open then),
/// before the instance database is doubted.
const UNCLAIMED_AT_MOST: usize = 32;

/// Restores sessions so that at most as many as `slots` are mid-handshake at once:
/// each holds a slot until it has reached WhatsApp, stops, or [`RESTORE_SLOT`] passes.
/// The app-state sync that follows the login does not hold a slot.
async fn restore_paced(
    tracker: TaskTracker,
    mut linked: mpsc::UnboundedReceiver<InstanceHandle>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let handle = tokio::select! {
            handle = linked.recv() => match handle {
                Some(handle) => handle,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
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
