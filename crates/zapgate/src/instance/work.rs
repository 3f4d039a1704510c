//! The slow work of an instance, in child tasks that report back to its task: starting
//! a client, stopping one, asking for a pairing code, unlinking. Each is bounded in
//! time and tracked, so shutdown waits for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};
use whatsapp_rust::client::Client;
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::wacore::iq::devices::RemoveCompanionDeviceSpec;

use super::actor::{Actor, Context};
use super::linking::group_code;
use super::session::Running;
use super::session::Signal;
use super::{Cause, LinkError, Unlinked};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Mutex as AsyncMutex;

/// How long a client may take to stop before we move on (twice: to disconnect, then
/// for its run loop to end).
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a database write may take before it counts as failed.
pub(super) const STORE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) enum Work {
    Started {
        generation: u64,
        result: Result<Running, StartError>,
    },
    PairCode {
        generation: u64,
        request: u64,
        result: Result<String, LinkError>,
    },
    Unlinked {
        generation: u64,
        outcome: Unlinked,
    },
}

#[derive(Debug)]
pub(crate) enum StartError {
    Unavailable(Cause),
    /// The stored session is not there (any more).
    SessionMissing,
    /// The gateway is stopping, or the task moved on to another client.
    Superseded,
}

async fn start(
    ctx: &Context,
    id: &str,
    (generation, current): (u64, &AtomicU64),
    fresh: bool,
    lock: Arc<AsyncMutex<()>>,
    signals: mpsc::Sender<Signal>,
) -> Result<Running, StartError> {
    let factory = &ctx.factory;
    // Half the link wait: a caller waiting for a code hears this cause, not a timeout.
    let version = match fresh {
        true => Some(
            factory
                .link_version(ctx.link_wait / 2)
                .await
                .map_err(StartError::Unavailable)?,
        ),
        false => None,
    };
    let session = tokio::select! {
        biased;
        () = ctx.shutdown.cancelled() => return Err(StartError::Superseded),
        session = lock.lock_owned() => session,
    };
    if ctx.shutdown.is_cancelled() || current.load(Ordering::Relaxed) != generation {
        return Err(StartError::Superseded);
    }
    match (fresh, factory.sessions.exists(id).await) {
        // Whatever an earlier window left (or a link whose record was lost) is moved
        // aside, never deleted: nothing linked is wiped by a new window.
        (true, Ok(true)) => match factory.sessions.set_aside(id, false).await {
            Ok(to) => {
                tracing::warn!(instance.id = %id, kept_as = %to, "an unlinked session was set aside")
            }
            Err(e) => {
                tracing::error!(instance.id = %id, error = %e, "could not set aside an unlinked session");
                return Err(StartError::Unavailable(Cause::Storage(e.to_string())));
            }
        },
        (true, _) | (false, Ok(true)) => {}
        (false, Ok(false)) => return Err(StartError::SessionMissing),
        (false, Err(e)) => {
            tracing::warn!(instance.id = %id, error = %e, "the session cannot be read");
            return Err(StartError::SessionMissing);
        }
    }
    // Every running client holds open files (its session's database, its socket).
    let slot = ctx.sessions.clone().try_acquire_owned().map_err(|_| {
        tracing::error!(instance.id = %id, most = ctx.max_sessions, "no room for another session under the open-file limit");
        StartError::Unavailable(Cause::TooManySessions(ctx.max_sessions))
    })?;
    factory
        .start(id, generation, session, slot, version, signals)
        .await
        .map_err(|e| {
            tracing::error!(instance.id = %id, error = %format!("{e:#}"), "could not start the WhatsApp client");
            StartError::Unavailable(Cause::Storage(format!("{e:#}")))
        })
}

/// What a child task that starts a client takes from its instance's task.
struct Kit {
    ctx: Arc<Context>,
    id: String,
    lock: Arc<AsyncMutex<()>>,
    signals: mpsc::Sender<Signal>,
    report: mpsc::Sender<Work>,
    current: Arc<AtomicU64>,
}

/// Why an unlink could not tell WhatsApp when the session is gone.
pub(super) const KEYS_MISSING: &str =
    "the session's keys are missing here, so WhatsApp could not be told";

impl Actor {
    fn kit(&self) -> Kit {
        Kit {
            ctx: self.ctx.clone(),
            id: self.record.id.clone(),
            lock: self.session_lock.clone(),
            signals: self.signal_tx.clone(),
            report: self.work_tx.clone(),
            current: self.current.clone(),
        }
    }

    /// Starts a client of a new generation once the session lock is free: on an empty
    /// session for a linking window (`fresh`), else on the stored one, which must be
    /// there (opening a missing one would create an empty session).
    pub(super) fn start_client(&mut self, fresh: bool) {
        let generation = self.next_generation();
        let Kit {
            ctx,
            id,
            lock,
            signals,
            report,
            current,
        } = self.kit();
        self.ctx.tracker.spawn(async move {
            let started = (generation, &*current);
            let result = start(&ctx, &id, started, fresh, lock, signals).await;
            if let Err(mpsc::error::SendError(Work::Started {
                result: Ok(orphan), ..
            })) = report.send(Work::Started { generation, result }).await
            {
                // The instance's task is gone; a window's session goes with it.
                let session = orphan.stop(STOP_TIMEOUT).await;
                if fresh {
                    let _ = ctx.factory.sessions.wipe(&id).await;
                }
                drop(session);
            }
        });
    }

    /// Stops a client we let go of; `wipe` deletes its (unlinked) session afterwards.
    pub(super) fn stop_in_background(&self, running: Running, wipe: bool) {
        let (ctx, id) = (self.ctx.clone(), self.record.id.clone());
        self.ctx.tracker.spawn(async move {
            let session = running.stop(STOP_TIMEOUT).await;
            if wipe {
                if let Err(e) = ctx.factory.sessions.wipe(&id).await {
                    tracing::error!(instance.id = %id, error = %e, "could not delete an unlinked session");
                }
            }
            drop(session);
            tracing::info!(instance.id = %id, "WhatsApp client stopped");
        });
    }

    /// Deletes the session once no client uses it, stopping `running` first.
    pub(super) fn wipe_in_background(&self, running: Option<Running>) {
        let (ctx, id, lock) = (
            self.ctx.clone(),
            self.record.id.clone(),
            self.session_lock.clone(),
        );
        self.ctx.tracker.spawn(async move {
            let session = match running {
                Some(running) => running.stop(STOP_TIMEOUT).await,
                None => lock.lock_owned().await,
            };
            match ctx.factory.sessions.wipe(&id).await {
                Ok(()) => tracing::info!(instance.id = %id, "session deleted"),
                Err(e) => {
                    tracing::error!(instance.id = %id, error = %e, "could not delete the session")
                }
            }
            drop(session);
        });
    }

    /// Removes the device at WhatsApp within the link wait, connecting the stored
    /// session first if it is not online, then stops the client. Reports
    /// [`Work::Unlinked`]; the session is deleted by the task after that.
    pub(super) fn unlink(&mut self) {
        let generation = self.next_generation();
        let running = self.client.take();
        let Kit {
            ctx,
            id,
            lock,
            signals,
            report,
            current,
        } = self.kit();
        // The caller waits for all of it: leave the stop (which may take twice its
        // budget) its share of the link wait.
        let stop = (ctx.link_wait / 5).clamp(Duration::from_millis(500), STOP_TIMEOUT);
        let deadline = Instant::now() + ctx.link_wait - 2 * stop;
        self.ctx.tracker.spawn(async move {
            let shutdown = ctx.shutdown.clone();
            let unlink = async {
                match running {
                    Some(running) if running.client.is_connected() => {
                        let outcome = remove_device(&running, deadline).await;
                        drop(running.stop(stop).await);
                        outcome
                    }
                    other => {
                        if let Some(running) = other {
                            drop(running.stop(stop).await);
                        }
                        // The stored session, connected just to be removed.
                        let started =
                            start(&ctx, &id, (generation, &current), false, lock, signals);
                        match timeout_at(deadline, started).await {
                            Ok(Ok(running)) => {
                                let outcome = remove_device(&running, deadline).await;
                                drop(running.stop(stop).await);
                                outcome
                            }
                            Ok(Err(StartError::SessionMissing)) => {
                                Unlinked::NotTold(KEYS_MISSING.into())
                            }
                            Ok(Err(StartError::Unavailable(cause))) => {
                                Unlinked::NotTold(cause.to_string())
                            }
                            Ok(Err(StartError::Superseded)) => {
                                Unlinked::NotTold("the gateway is stopping".into())
                            }
                            Err(_) => Unlinked::NotTold(Cause::NoAnswer.to_string()),
                        }
                    }
                }
            };
            // A stopping gateway does not wait for WhatsApp: the client is aborted
            // with the future and the session stays as it was (a cancel's marked row
            // is finished at the next start).
            let outcome = tokio::select! {
                outcome = unlink => outcome,
                () = shutdown.cancelled() => return,
            };
            let _ = report
                .send(Work::Unlinked {
                    generation,
                    outcome,
                })
                .await;
        });
    }
}

/// Waits until the client has logged in (WhatsApp answers a device's requests only
/// then), leaving a moment before `deadline` for the request itself; or until it has
/// stopped, or WhatsApp said the device is not linked.
async fn wait_for_login(running: &Running, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let by = deadline - Duration::from_secs(1).min(left);
    let client = &running.client;
    while !client.is_logged_in()
        && !running.diagnosis.removed_at_whatsapp()
        && !running.ended.is_cancelled()
        && Instant::now() < by
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes the device at WhatsApp once its client is logged in, trying again while
/// time is left if the connection turns over meanwhile (a link's first login restarts
/// the stream, for one). A device WhatsApp no longer has (it refused the login with a
/// `401`, or dropped the device meanwhile) is removed already.
pub(super) async fn remove_device(running: &Running, deadline: Instant) -> Unlinked {
    let client = &running.client;
    let removed = || running.diagnosis.removed_at_whatsapp();
    loop {
        wait_for_login(running, deadline).await;
        if removed() {
            return Unlinked::Told;
        }
        let Some(jid) = client.pn().filter(|_| client.is_logged_in()) else {
            let cause = running.diagnosis.cause().unwrap_or(Cause::NoAnswer);
            return Unlinked::NotTold(cause.to_string());
        };
        match timeout_at(
            deadline,
            client.execute(RemoveCompanionDeviceSpec::new(&jid)),
        )
        .await
        {
            Ok(Ok(())) => return Unlinked::Told,
            Ok(Err(_)) if removed() => return Unlinked::Told,
            Ok(Err(_)) if !client.is_logged_in() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => {
                return Unlinked::NotTold(format!("WhatsApp refused to remove the device: {e}"));
            }
            Err(_) => {
                return Unlinked::NotTold("WhatsApp did not confirm the removal in time".into());
            }
        }
    }
}

/// Asks WhatsApp for a pairing code for `phone`, as request number `request` of the
/// window. A code asked for earlier on this client is dropped first (`replaces`).
pub(super) async fn request_pair_code(
    client: Arc<Client>,
    generation: u64,
    request: u64,
    phone: String,
    replaces: bool,
    deadline: Instant,
    report: mpsc::Sender<Work>,
) {
    if replaces {
        client.cancel_pair_code().await;
    }
    let options = PairCodeOptions {
        phone_number: phone,
        ..Default::default()
    };
    let result = match timeout_at(deadline, client.pair_with_code(options)).await {
        Ok(Ok(code)) => Ok(group_code(&code)),
        Ok(Err(e)) => Err(LinkError::Refused(e.to_string())),
        Err(_) => Err(LinkError::Unavailable(Cause::NoAnswer)),
    };
    let _ = report
        .send(Work::PairCode {
            generation,
            request,
            result,
        })
        .await;
}
