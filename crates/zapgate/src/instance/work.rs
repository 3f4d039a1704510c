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

use super::actor::Actor;
use super::linking::group_code;
use super::session::Running;
use super::{Cause, LinkError, Unlinked};

/// How long a client may take to stop before we move on.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a database write may take before it counts as failed.
pub(super) const STORE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) enum Work {
    Started {
        generation: u64,
        result: Result<Running, Cause>,
    },
    PairCode {
        generation: u64,
        phone: String,
        result: Result<String, LinkError>,
    },
    Unlinked {
        generation: u64,
        outcome: Unlinked,
    },
}

impl Actor {
    /// Starts a client of a new generation once the session lock is free: on an empty
    /// session for a linking window (`fresh`), else on the stored one.
    pub(super) fn start_client(&mut self, fresh: bool) {
        self.generation += 1;
        let generation = self.generation;
        let (ctx, id) = (self.ctx.clone(), self.record.id.clone());
        let (lock, signals, report) = (
            self.session_lock.clone(),
            self.signal_tx.clone(),
            self.work_tx.clone(),
        );
        self.ctx.tracker.spawn(async move {
            let factory = &ctx.factory;
            let version = if fresh {
                match factory.link_version(ctx.link_wait).await {
                    Ok(version) => Some(version),
                    Err(cause) => {
                        let result = Err(cause);
                        let _ = report.send(Work::Started { generation, result }).await;
                        return;
                    }
                }
            } else {
                None
            };
            let session = lock.lock_owned().await;
            if fresh {
                // Whatever an earlier window left; nothing linked is ever here.
                if let Err(e) = factory.files.wipe(&id) {
                    tracing::error!(instance.id = %id, error = %e, "could not clear an unlinked session");
                }
            }
            let result = factory
                .start(&id, generation, session, version, signals)
                .await
                .map_err(|e| {
                    tracing::error!(instance.id = %id, error = %format!("{e:#}"), "could not start the WhatsApp client");
                    Cause::Unreachable(format!("the client could not start: {e}"))
                });
            if let Err(mpsc::error::SendError(Work::Started {
                result: Ok(orphan), ..
            })) = report.send(Work::Started { generation, result }).await
            {
                drop(orphan.stop(STOP_TIMEOUT).await); // the instance is gone
            }
        });
    }

    /// Stops a client we let go of; `wipe` deletes its (unlinked) session afterwards.
    pub(super) fn stop_in_background(&self, running: Running, wipe: bool) {
        let (ctx, id) = (self.ctx.clone(), self.record.id.clone());
        self.ctx.tracker.spawn(async move {
            let session = running.stop(STOP_TIMEOUT).await;
            if wipe {
                if let Err(e) = ctx.factory.files.wipe(&id) {
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
            match ctx.factory.files.wipe(&id) {
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
        self.generation += 1;
        let generation = self.generation;
        let current = self.client.take();
        let (ctx, id) = (self.ctx.clone(), self.record.id.clone());
        let (lock, signals, report) = (
            self.session_lock.clone(),
            self.signal_tx.clone(),
            self.work_tx.clone(),
        );
        // The caller waits for all of it: leave the stop its share of the link wait.
        let stop = (ctx.link_wait / 4).clamp(Duration::from_millis(500), STOP_TIMEOUT);
        let deadline = Instant::now() + ctx.link_wait - stop;
        self.ctx.tracker.spawn(async move {
            let running = match current {
                Some(running) if running.client.is_connected() => Ok(running),
                other => {
                    let session = match other {
                        Some(running) => running.stop(stop).await,
                        None => lock.lock_owned().await,
                    };
                    match ctx
                        .factory
                        .start(&id, generation, session, None, signals)
                        .await
                    {
                        Ok(running) => {
                            let wait = deadline.saturating_duration_since(Instant::now());
                            let _ = running.client.wait_for_socket(wait).await;
                            Ok(running)
                        }
                        Err(e) => Err(format!("the session could not be opened: {e:#}")),
                    }
                }
            };
            let outcome = match &running {
                Ok(running) => remove_device(running, deadline).await,
                Err(why) => Unlinked::NotTold(why.clone()),
            };
            if let Ok(running) = running {
                drop(running.stop(stop).await);
            }
            let _ = report
                .send(Work::Unlinked {
                    generation,
                    outcome,
                })
                .await;
        });
    }
}

async fn remove_device(running: &Running, deadline: Instant) -> Unlinked {
    let client = &running.client;
    let Some(jid) = client.pn().filter(|_| client.is_connected()) else {
        let cause = running.diagnosis.cause().unwrap_or(Cause::NoAnswer);
        return Unlinked::NotTold(cause.to_string());
    };
    match timeout_at(
        deadline,
        client.execute(RemoveCompanionDeviceSpec::new(&jid)),
    )
    .await
    {
        Ok(Ok(())) => Unlinked::Told,
        Ok(Err(e)) => Unlinked::NotTold(format!("WhatsApp refused to remove the device: {e}")),
        Err(_) => Unlinked::NotTold("WhatsApp did not confirm the removal in time".into()),
    }
}

/// Asks WhatsApp for a pairing code for `phone`, dropping the code of another phone
/// first when this one replaces it.
pub(super) async fn request_pair_code(
    client: Arc<Client>,
    generation: u64,
    phone: String,
    replaces: bool,
    deadline: Instant,
    report: mpsc::Sender<Work>,
) {
    if replaces {
        client.cancel_pair_code().await;
    }
    let options = PairCodeOptions {
        phone_number: phone.clone(),
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
            phone,
            result,
        })
        .await;
}
