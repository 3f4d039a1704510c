//! Instance leases on a shared PostgreSQL: which node owns which instance, at which
//! epoch (migration 0003). An owner's writes carry its epoch into the database, which
//! refuses them once the lease moved on; WhatsApp takes no such token, so a node that
//! cannot renew its row stops its own connections before any other node may claim its
//! instances (self-fencing).
//!
//! Times: a node's row expires `ttl` after a renewal, on the database's clock. The node
//! counts, on its own monotonic clock, from the moment it *sent* its last renewal that
//! succeeded, and fences itself at `fence_after` (60% of `ttl`) past it: a renewal sent
//! at t reaches the database after t, so the row expires after t + ttl, long after the
//! node stopped at t + 0.6 ttl, whatever the two clocks read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::StoreError;

/// What this node holds: its id, and the epoch of each instance lease it holds now.
/// Writes an owner makes are fenced with what this answers when they are bound (a
/// session's keys: when the session is opened).
pub trait Held: Send + Sync {
    fn node(&self) -> &str;
    fn epoch(&self, instance: &str) -> Option<i64>;
}

/// How this node presents itself to the others.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    /// Where the other nodes reach this one.
    pub addr: String,
    /// Instances it takes at most.
    pub capacity: u32,
    pub ttl: Duration,
}

/// The share of the instances this node holds, and its life as a member.
pub struct Leases {
    id: String,
    pool: PgPool,
    held: Mutex<HashMap<String, i64>>,
    /// Flips to true, once, when the node lost its row (or could not renew in time):
    /// every lease it held is gone then.
    lost: watch::Sender<bool>,
    /// Ends the renewing thread: the node left.
    stop: tokio_util::sync::CancellationToken,
    /// When the node holds nothing any more unless a renewal succeeds first: 60% of
    /// the lease past the last renewal sent that succeeded. Read by every check, so
    /// that a node that wakes from a pause holds nothing from its first instant, before
    /// its renewing thread has run.
    deadline: Mutex<std::time::Instant>,
    /// The renewals' round trips, in microseconds: the last and the longest since the
    /// node joined; and the renewals that failed. A round trip nearing 60% of the lease
    /// is a node about to fence itself.
    renewal_last_us: std::sync::atomic::AtomicU64,
    renewal_max_us: std::sync::atomic::AtomicU64,
    renewal_failures: std::sync::atomic::AtomicU64,
}

/// How the renewals of a node's row go.
#[derive(Clone, Copy, Debug)]
pub struct Renewals {
    pub last: Duration,
    pub longest: Duration,
    pub failed: u64,
}

impl Held for Leases {
    fn node(&self) -> &str {
        &self.id
    }

    fn epoch(&self, instance: &str) -> Option<i64> {
        if self.gone() {
            return None;
        }
        self.held.lock().unwrap().get(instance).copied()
    }
}

/// A lease granted: the instance and the epoch this node writes it at.
pub type Grant = (String, i64);

/// Instances claimed per statement.
const CLAIM_BATCH: u32 = 500;

impl Leases {
    /// A fresh node id: one per process start, never reused. The node's connections
    /// carry it (`application_name` `zapgate/<id>`), so that once it expired, the others
    /// can end them (see [`Self::reap`]).
    pub fn new_id() -> String {
        crate::random_hex(8)
    }

    /// Joins as node `id` (from [`Self::new_id`]) and starts renewing its row on a
    /// thread and a connection of its own, so a busy runtime or pool cannot starve the
    /// renewals (a node late to renew fences itself, and its instances move).
    pub async fn join(
        id: String,
        pool: PgPool,
        options: &PgConnectOptions,
        node: &NodeInfo,
    ) -> Result<Arc<Self>, StoreError> {
        sqlx::query(
            "INSERT INTO zg_node (id, name, addr, capacity, expires_at) \
             VALUES ($1, $2, $3, $4, clock_timestamp() + $5 * interval '1 millisecond')",
        )
        .bind(&id)
        .bind(&node.name)
        .bind(&node.addr)
        .bind(node.capacity as i32)
        .bind(node.ttl.as_millis() as i64)
        .execute(&pool)
        .await?;
        let leases = Arc::new(Self {
            id,
            pool,
            held: Mutex::new(HashMap::new()),
            lost: watch::channel(false).0,
            stop: tokio_util::sync::CancellationToken::new(),
            // The row was written just now.
            deadline: Mutex::new(std::time::Instant::now() + fence_after(node.ttl)),
            renewal_last_us: Default::default(),
            renewal_max_us: Default::default(),
            renewal_failures: Default::default(),
        });
        let renewer = Renewer {
            leases: leases.clone(),
            options: options.clone(),
            ttl: node.ttl,
        };
        std::thread::Builder::new()
            .name("zapgate-leases".into())
            .spawn(move || renewer.run())?;
        Ok(leases)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// How the renewals of this node's row went so far.
    pub fn renewals(&self) -> Renewals {
        use std::sync::atomic::Ordering::Relaxed;
        Renewals {
            last: Duration::from_micros(self.renewal_last_us.load(Relaxed)),
            longest: Duration::from_micros(self.renewal_max_us.load(Relaxed)),
            failed: self.renewal_failures.load(Relaxed),
        }
    }

    /// Watches whether the node lost its membership (and with it every lease).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.subscribe()
    }

    /// The instances held now, with their epochs.
    pub fn held(&self) -> HashMap<String, i64> {
        if self.gone() {
            return HashMap::new();
        }
        self.held.lock().unwrap().clone()
    }

    /// Whether the node lost its membership or left: it holds nothing then.
    fn gone(&self) -> bool {
        *self.lost.borrow()
            || self.stop.is_cancelled()
            || std::time::Instant::now() >= *self.deadline.lock().unwrap()
    }

    /// Stops everything this node holds, at once: on a failed renewal, nothing it
    /// holds may be used a moment longer.
    fn fence(&self, why: &str) {
        if !self.lost.send_replace(true) {
            tracing::error!(node = %self.id, why, "this node lost its membership: every instance it held is stopped here and moves to another node");
        }
        self.held.lock().unwrap().clear();
    }

    /// Claims up to `k` free instances, linked ones first, oldest lease first (cancelled
    /// ones too: their owner finishes the cancel, fenced like any write). A node
    /// whose row expired claims nothing (checked in the same statement).
    pub async fn claim(&self, k: u32) -> Result<Vec<Grant>, StoreError> {
        self.claim_where("TRUE", None, k).await
    }

    /// Claims one instance if it is free.
    pub async fn claim_instance(&self, instance: &str) -> Result<Option<i64>, StoreError> {
        let grants = self
            .claim_where("l.instance = $3", Some(instance), 1)
            .await?;
        Ok(grants.into_iter().next().map(|(_, epoch)| epoch))
    }

    /// Takes in the lease of an instance this node just created (the database leases
    /// a new instance to its creator, in the creating transaction); its epoch, or
    /// `None` if the node no longer has it.
    pub async fn take_created(&self, instance: &str) -> Result<Option<i64>, StoreError> {
        let epoch: Option<i64> =
            sqlx::query_scalar("SELECT epoch FROM zg_lease WHERE instance = $1 AND node = $2")
                .bind(instance)
                .bind(&self.id)
                .fetch_optional(&self.pool)
                .await?;
        let mut held = self.held.lock().unwrap();
        match epoch {
            Some(epoch) if !self.gone() => {
                held.insert(instance.to_owned(), epoch);
                Ok(Some(epoch))
            }
            _ => Ok(None),
        }
    }

    async fn claim_where(
        &self,
        filter: &'static str,
        instance: Option<&str>,
        k: u32,
    ) -> Result<Vec<Grant>, StoreError> {
        if self.gone() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH pick AS (SELECT l.instance FROM zg_lease l JOIN instances i ON i.id = l.instance \
               WHERE l.node IS NULL AND {filter} \
                 AND EXISTS (SELECT 1 FROM zg_node WHERE id = $1 AND expires_at > clock_timestamp()) \
               ORDER BY (i.phone IS NOT NULL) DESC, l.granted_at LIMIT $2 \
               FOR UPDATE OF l SKIP LOCKED), \
             granted AS (UPDATE zg_lease l SET node = $1, epoch = nextval('zg_epoch'), \
                 granted_at = clock_timestamp() \
               FROM pick WHERE l.instance = pick.instance RETURNING l.instance, l.epoch), \
             logged AS (INSERT INTO zg_lease_log (instance, node, epoch, what) \
               SELECT instance, $1, epoch, 'claimed' FROM granted) \
             SELECT instance::text, epoch FROM granted"
        );
        let grants: Vec<Grant> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&self.id)
            .bind(i64::from(k))
            .bind(instance)
            .fetch_all(&self.pool)
            .await?;
        let mut held = self.held.lock().unwrap();
        if !self.gone() {
            held.extend(grants.iter().cloned());
        }
        Ok(grants)
    }

    /// Claims every free instance, a batch at a time.
    pub async fn claim_all(&self) -> Result<Vec<Grant>, StoreError> {
        let mut all = Vec::new();
        loop {
            let grants = self.claim(CLAIM_BATCH).await?;
            let last = grants.len() < CLAIM_BATCH as usize;
            all.extend(grants);
            if last {
                return Ok(all);
            }
        }
    }

    /// Brings what this node holds in line with the database: leases it no longer has
    /// there (the instance was deleted, or its lease moved) are dropped here, and any
    /// it has there but not here (a claim whose answer was lost) taken in. Returns
    /// `(dropped, taken)`.
    pub async fn sync(&self) -> Result<(Vec<String>, Vec<Grant>), StoreError> {
        let there: HashMap<String, i64> = sqlx::query_as(
            "SELECT l.instance::text, l.epoch FROM zg_lease l JOIN zg_node n ON n.id = l.node \
             WHERE l.node = $1 AND n.expires_at > clock_timestamp()",
        )
        .bind(&self.id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let mut held = self.held.lock().unwrap();
        if self.gone() {
            return Ok((Vec::new(), Vec::new()));
        }
        let dropped: Vec<String> = held
            .iter()
            .filter(|(instance, epoch)| there.get(*instance) != Some(epoch))
            .map(|(instance, _)| instance.clone())
            .collect();
        for instance in &dropped {
            held.remove(instance);
        }
        let taken: Vec<Grant> = there
            .into_iter()
            .filter(|(instance, _)| !held.contains_key(instance))
            .collect();
        held.extend(taken.iter().cloned());
        Ok((dropped, taken))
    }

    /// How many instances there are, and how many nodes share them (alive and not
    /// draining, this one included unless it drains).
    pub async fn census(&self) -> Result<(u64, u64), StoreError> {
        let (instances, nodes): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM zg_lease), \
                    (SELECT count(*) FROM zg_node \
                      WHERE expires_at > clock_timestamp() AND NOT draining)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((instances as u64, nodes as u64))
    }

    /// Says this node is leaving: the others stop counting it when they share the
    /// instances, and take each one it releases.
    pub async fn drain(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE zg_node SET draining = true WHERE id = $1")
            .bind(&self.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The address of the node that holds `instance` now, if another node holds it.
    pub async fn owner_addr(&self, instance: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT n.addr FROM zg_lease l JOIN zg_node n ON n.id = l.node \
             WHERE l.instance = $1 AND n.id <> $2 AND n.expires_at > clock_timestamp()",
        )
        .bind(instance)
        .bind(&self.id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The other nodes alive now: their names and addresses.
    pub async fn others(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT name, addr FROM zg_node WHERE id <> $1 AND expires_at > clock_timestamp() \
             ORDER BY started_at",
        )
        .bind(&self.id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Gives an instance back, free for any node, once nothing of this node uses it any
    /// more (its client stopped and flushed). False if the lease had moved already.
    pub async fn release(&self, instance: &str, epoch: i64) -> Result<bool, StoreError> {
        self.forget(instance, epoch);
        let released = sqlx::query(
            "WITH freed AS (UPDATE zg_lease SET node = NULL \
               WHERE instance = $1 AND node = $2 AND epoch = $3 RETURNING instance, epoch) \
             INSERT INTO zg_lease_log (instance, node, epoch, what) \
               SELECT instance, $2, epoch, 'released' FROM freed",
        )
        .bind(instance)
        .bind(&self.id)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected() == 1)
    }

    /// Stops treating an instance as held (a write of it was refused: it moved).
    pub fn forget(&self, instance: &str, epoch: i64) {
        let mut held = self.held.lock().unwrap();
        if held.get(instance) == Some(&epoch) {
            held.remove(instance);
        }
    }

    /// Removes the rows of nodes that stopped renewing, which frees their instances.
    /// Their connections are ended first: an open transaction of a paused node holds
    /// row locks the removal would wait behind. Returns the nodes removed.
    pub async fn reap(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN zg_node n \
               ON a.application_name = 'zapgate/' || n.id \
             WHERE n.expires_at < clock_timestamp() AND a.pid <> pg_backend_pid()",
        )
        .execute(&self.pool)
        .await?;
        let reaped: Vec<String> = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM zg_node WHERE expires_at < clock_timestamp() \
               RETURNING id), \
             logged AS (INSERT INTO zg_lease_log (instance, node, epoch, what) \
               SELECT l.instance, l.node, l.epoch, 'reaped' FROM zg_lease l \
               JOIN gone ON l.node = gone.id) \
             SELECT id::text FROM gone",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(reaped)
    }

    /// Removes the row of a node known to be gone (an earlier run of this very
    /// gateway, on the data directory it now holds), not waiting for it to expire.
    pub async fn remove_gone(&self, id: &str) -> Result<bool, StoreError> {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'zapgate/' || $1 AND pid <> pg_backend_pid()",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        let removed = sqlx::query(
            "WITH gone AS (DELETE FROM zg_node WHERE id = $1 AND id <> $2 RETURNING id), \
             logged AS (INSERT INTO zg_lease_log (instance, node, epoch, what) \
               SELECT l.instance, l.node, l.epoch, 'reaped' FROM zg_lease l \
               JOIN gone ON l.node = gone.id) \
             SELECT 1 FROM gone",
        )
        .bind(id)
        .bind(&self.id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(removed.is_some())
    }

    /// Leaves the cluster: the node's row goes, and with it what it still holds.
    pub async fn leave(&self) -> Result<(), StoreError> {
        self.stop.cancel();
        self.held.lock().unwrap().clear();
        sqlx::query(
            "WITH freed AS (UPDATE zg_lease SET node = NULL WHERE node = $1 \
               RETURNING instance, epoch), \
             logged AS (INSERT INTO zg_lease_log (instance, node, epoch, what) \
               SELECT instance, $1, epoch, 'released' FROM freed) \
             DELETE FROM zg_node WHERE id = $1",
        )
        .bind(&self.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// How long past its last renewal a node goes on holding anything.
fn fence_after(ttl: Duration) -> Duration {
    ttl.mul_f64(0.6)
}

/// Renews the node's row every tenth of the lease, on a connection of its own.
struct Renewer {
    leases: Arc<Leases>,
    options: PgConnectOptions,
    ttl: Duration,
}

impl Renewer {
    fn run(self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the lease renewals");
        runtime.block_on(self.renew_until_lost());
    }

    async fn renew_until_lost(&self) {
        let every = self.ttl / 10;
        let fence_after = fence_after(self.ttl);
        let options = self
            .options
            .clone()
            .application_name(&format!("zapgate/{}", self.leases.id));
        let mut conn: Option<PgConnection> = None;
        // Joined: the row was written before this started.
        let mut renewed = Instant::from_std(*self.leases.deadline.lock().unwrap()) - fence_after;
        let stop = self.leases.stop.clone();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let deadline = renewed + fence_after;
            let sent = Instant::now();
            let attempt = async {
                if conn.is_none() {
                    conn = Some(PgConnection::connect_with(&options).await?);
                }
                let conn = conn.as_mut().expect("connected just now");
                let done = sqlx::query(
                    "UPDATE zg_node SET expires_at = clock_timestamp() + $2 * interval '1 millisecond' \
                     WHERE id = $1 AND expires_at > clock_timestamp()",
                )
                .bind(&self.leases.id)
                .bind(self.ttl.as_millis() as i64)
                .execute(conn)
                .await?;
                Ok::<bool, sqlx::Error>(done.rows_affected() == 1)
            };
            let result = tokio::time::timeout_at(deadline, attempt).await;
            match result {
                Ok(Ok(true)) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    let took = sent.elapsed().as_micros() as u64;
                    self.leases.renewal_last_us.store(took, Relaxed);
                    self.leases.renewal_max_us.fetch_max(took, Relaxed);
                    renewed = sent;
                    *self.leases.deadline.lock().unwrap() = (sent + fence_after).into_std();
                }
                Ok(Ok(false)) => return self.leases.fence("its row expired or was reaped"),
                Ok(Err(e)) => {
                    self.leases
                        .renewal_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(node = %self.leases.id, error = %e, "could not renew this node's lease");
                    conn = None;
                }
                Err(_) => return self.leases.fence("no renewal succeeded in time"),
            }
            if Instant::now() >= renewed + fence_after {
                return self.leases.fence("no renewal succeeded in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PgStore, Store as _, contract};

    async fn database(instances: usize) -> (String, PgStore) {
        let url = crate::store::test_pg::database().await;
        let store = PgStore::connect(&url).await.unwrap();
        for i in 0..instances {
            store
                .insert_instance(&contract::instance(&format!("I{i:02}"), "n", i as i64))
                .await
                .unwrap();
        }
        (url, store)
    }

    async fn join(url: &str, store: &PgStore, ttl: Duration) -> Arc<Leases> {
        let node = NodeInfo {
            name: "test".into(),
            addr: "http://127.0.0.1:1".into(),
            capacity: 100,
            ttl,
        };
        Leases::join(
            Leases::new_id(),
            store.pool.clone(),
            &url.parse().unwrap(),
            &node,
        )
        .await
        .unwrap()
    }

    /// An owner-only write as a write path makes it: fenced by `(node, epoch)`.
    async fn fenced_write(
        store: &PgStore,
        instance: &str,
        node: &str,
        epoch: i64,
    ) -> Result<(), sqlx::Error> {
        let mut tx = store.pool.begin().await?;
        sqlx::query("SELECT zg_fence($1, $2, $3, NULL)")
            .bind(instance)
            .bind(node)
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    fn code(e: sqlx::Error) -> Option<String> {
        e.as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned())
    }

    #[tokio::test]
    async fn nodes_claiming_at_once_share_the_instances_and_every_epoch_is_new() {
        let (url, store) = database(20).await;
        let (a, b) = tokio::join!(
            join(&url, &store, Duration::from_secs(10)),
            join(&url, &store, Duration::from_secs(10))
        );
        let (ga, gb) = tokio::join!(a.claim(15), b.claim(15));
        let (ga, gb) = (ga.unwrap(), gb.unwrap());
        assert_eq!(ga.len() + gb.len(), 20, "every instance claimed once");
        let mut all: Vec<&Grant> = ga.iter().chain(&gb).collect();
        all.sort();
        all.dedup_by(|x, y| x.0 == y.0);
        assert_eq!(all.len(), 20, "no instance claimed twice");
        let mut epochs: Vec<i64> = ga.iter().chain(&gb).map(|g| g.1).collect();
        epochs.sort();
        epochs.dedup();
        assert_eq!(epochs.len(), 20);
        assert!(epochs[0] > 0, "a claimed epoch is never the free lease's 0");
        assert_eq!(a.held().len(), ga.len());
        let (instance, epoch) = ga.first().or(gb.first()).unwrap().clone();
        let owner = if a.epoch(&instance) == Some(epoch) {
            &a
        } else {
            &b
        };
        fenced_write(&store, &instance, owner.id(), epoch)
            .await
            .unwrap();
        let other = if Arc::ptr_eq(owner, &a) { &b } else { &a };
        let refused = fenced_write(&store, &instance, other.id(), epoch)
            .await
            .unwrap_err();
        assert_eq!(code(refused).as_deref(), Some("ZG001"));
        assert!(
            a.claim(5).await.unwrap().is_empty(),
            "nothing left to claim"
        );

        // Released, it is free again, and its next epoch is new: the old one stays refused.
        assert!(owner.release(&instance, epoch).await.unwrap());
        assert!(
            !owner.release(&instance, epoch).await.unwrap(),
            "released once"
        );
        assert_eq!(owner.epoch(&instance), None);
        let again = other.claim_instance(&instance).await.unwrap().unwrap();
        assert!(again > epoch);
        let refused = fenced_write(&store, &instance, owner.id(), epoch)
            .await
            .unwrap_err();
        assert_eq!(code(refused).as_deref(), Some("ZG001"));
        fenced_write(&store, &instance, other.id(), again)
            .await
            .unwrap();

        // A node that leaves frees what it held at once, and has not "lost" anything.
        let before = owner.held();
        assert!(!before.is_empty());
        owner.leave().await.unwrap();
        assert!(!*owner.lost().borrow());
        assert!(owner.held().is_empty());
        assert!(
            owner.claim(5).await.unwrap().is_empty(),
            "a node gone claims nothing"
        );
        let taken = other.claim(100).await.unwrap();
        assert_eq!(taken.len(), before.len());
    }

    #[tokio::test]
    async fn the_registry_writes_of_an_owner_are_fenced_and_a_creation_is_leased_to_its_node() {
        use crate::store::messages::{Enqueued, MessageStore as _, NewOutbound};
        use crate::store::{Link, StoreError, WebhookEvent, WebhookKind};
        let (url, store) = database(1).await;
        let a = join(&url, &store, Duration::from_secs(10)).await;
        let b = join(&url, &store, Duration::from_secs(10)).await;
        // Node a's own store, fenced by what a holds.
        let mine = PgStore::connect_as(&url, a.id()).await.unwrap();
        mine.fence_with(a.clone());
        let link = Link {
            phone: "5511999990000".into(),
            linked_at: 1,
            platform: None,
        };
        let moved =
            |r: Result<(), StoreError>| matches!(r, Err(StoreError::Moved(i)) if i == "I00");
        assert!(moved(mine.set_link("I00", Some(&link)).await), "not held");
        let epoch = b.claim_instance("I00").await.unwrap().unwrap();
        assert!(moved(mine.set_link("I00", None).await), "held by another");
        let event = WebhookEvent {
            event_id: "E1".into(),
            instance_id: "I00".into(),
            kind: WebhookKind::Disconnected,
            body: "{}".into(),
            created_at: 1,
        };
        assert!(matches!(
            mine.enqueue_webhook(&event, 10).await,
            Err(StoreError::Moved(_))
        ));
        assert!(moved(mine.delete_instance("I00").await));
        assert_eq!(store.instance("I00").await.unwrap().unwrap().link, None);
        // A message queued through any node: only the holder starts sending it.
        let queued = NewOutbound {
            zaap_id: "Z1".into(),
            instance_id: "I00".into(),
            message_id: "M1".into(),
            phone: "5511988880000".into(),
            text: "hi".into(),
            reply_to: None,
            edit_of: None,
            delay_ms: None,
            typing_ms: 0,
            idempotency: None,
            created_at: 1,
        };
        let Enqueued::New(queued) = mine.enqueue_message(&queued, 10).await.unwrap() else {
            panic!("queued");
        };
        assert!(matches!(
            mine.message_sending(&queued).await,
            Err(StoreError::Moved(_))
        ));
        assert!(b.release("I00", epoch).await.unwrap());
        assert!(matches!(
            mine.message_sending(&queued).await,
            Err(StoreError::Moved(_))
        ));

        // Handed over to a: its writes pass now, b's epoch stays refused for good.
        a.claim_instance("I00").await.unwrap().unwrap();
        assert!(mine.message_sending(&queued).await.unwrap());
        mine.set_link("I00", Some(&link)).await.unwrap();
        assert_eq!(
            store.instance("I00").await.unwrap().unwrap().link,
            Some(link)
        );

        // An instance a's store creates is a's from its first instant, at a new epoch.
        let created = contract::instance("I01", "n", 1);
        mine.insert_instance(&created).await.unwrap();
        let epoch = a.take_created("I01").await.unwrap().unwrap();
        assert!(epoch > 0);
        assert!(
            b.claim(10).await.unwrap().is_empty(),
            "nothing free to claim"
        );
        mine.delete_instance("I01").await.unwrap();
        assert!(store.instance("I01").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_node_whose_row_expired_fences_itself_and_its_instances_move() {
        let (url, store) = database(3).await;
        let a = join(&url, &store, Duration::from_secs(3)).await;
        let b = join(&url, &store, Duration::from_secs(30)).await;
        let held = a.claim(10).await.unwrap();
        assert_eq!(held.len(), 3);
        let mut lost = a.lost();
        // As if it had been paused past its lease: its row expired.
        sqlx::query(
            "UPDATE zg_node SET expires_at = clock_timestamp() - interval '1 second' WHERE id = $1",
        )
        .bind(a.id())
        .execute(&store.pool)
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), lost.wait_for(|lost| *lost))
            .await
            .expect("the node sees it lost its row within a renewal")
            .unwrap();
        assert!(a.held().is_empty());
        assert_eq!(a.epoch(&held[0].0), None);
        assert!(
            a.claim(10).await.unwrap().is_empty(),
            "a lost node claims nothing"
        );
        assert_eq!(b.reap().await.unwrap(), vec![a.id().to_owned()]);
        let moved = b.claim(10).await.unwrap();
        assert_eq!(moved.len(), 3);
        for (instance, epoch) in &held {
            let refused = fenced_write(&store, instance, a.id(), *epoch)
                .await
                .unwrap_err();
            assert_eq!(code(refused).as_deref(), Some("ZG001"));
            assert!(moved.iter().any(|(i, e)| i == instance && e > epoch));
        }
        let log: Vec<(String, String)> = sqlx::query_as(
            "SELECT instance::text, what FROM zg_lease_log WHERE instance = 'I00' ORDER BY seq",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(what, ["claimed", "reaped", "claimed"]);
    }

    #[tokio::test]
    async fn a_node_that_cannot_reach_the_database_fences_itself_before_its_row_expires() {
        let (url, store) = database(1).await;
        // Its renewals go to a port where nothing listens; its pool still works.
        let node = NodeInfo {
            name: "cut off".into(),
            addr: "http://127.0.0.1:1".into(),
            capacity: 10,
            ttl: Duration::from_secs(4),
        };
        let nowhere: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().port(1);
        let a = Leases::join(Leases::new_id(), store.pool.clone(), &nowhere, &node)
            .await
            .unwrap();
        assert_eq!(a.claim(1).await.unwrap().len(), 1);
        let mut lost = a.lost();
        tokio::time::timeout(Duration::from_secs(10), lost.wait_for(|lost| *lost))
            .await
            .expect("the node fences itself")
            .unwrap();
        // Fenced before the database would let another node claim its instance.
        let expired: bool =
            sqlx::query_scalar("SELECT expires_at < clock_timestamp() FROM zg_node WHERE id = $1")
                .bind(a.id())
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert!(!expired, "the row still lives when the node stops");
        assert!(a.held().is_empty());
    }
}
