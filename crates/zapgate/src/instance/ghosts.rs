//! Devices linked at WhatsApp that no instance owns: a gateway that died between a
//! pairing and the write of its link leaves the device linked, and its session is set
//! aside at the next start, marked to unlink (see `manager::set_aside_unclaimed` for
//! which are). Each marked session that paired logs in once more and removes its device
//! at WhatsApp, as `/disconnect` does; only then is it deleted. One WhatsApp cannot be
//! told about is kept, and tried again at the next start. Set-aside sessions not marked
//! are never touched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc};
use tokio::time::Instant;

use super::Unlinked;
use super::actor::Context;
use super::work::{STOP_TIMEOUT, remove_device};
use crate::store::leases::Held as _;
use crate::store::{Pairing, SET_ASIDE, TO_UNLINK, instance_of};

/// Removes, in the background, every device the set-aside sessions paired as, at most
/// as many logging in at once as `slots` allows (shared with the restores). Devices an
/// instance's own session holds, and those that may be a linked instance's missing
/// session (`missing`: instance id to the number it linked), are kept.
/// With `only`, just the set-aside sessions of those instances are looked at.
pub(super) async fn remove_all(
    ctx: Arc<Context>,
    slots: Arc<Semaphore>,
    missing: HashMap<String, String>,
    only: Option<HashSet<String>>,
) {
    let sessions = &ctx.factory.sessions;
    let pairings = match sessions.pairings().await {
        Ok(pairings) => pairings,
        Err(e) => {
            tracing::error!(error = %e, "could not list the set-aside sessions; they are kept");
            return;
        }
    };
    let in_use: HashSet<&str> = pairings
        .iter()
        .filter(|(name, _)| !name.starts_with(SET_ASIDE))
        .filter_map(|(_, pairing)| match pairing {
            Pairing::As(device) => Some(device.as_str()),
            _ => None,
        })
        .collect();
    // Copies of one device are removed one after another: the first removes it, the
    // next hear it is gone.
    let mut ghosts: HashMap<&str, Vec<&str>> = HashMap::new();
    // On a shared database, a node looks only at the sessions of instances it holds:
    // the others' are theirs to log in with.
    let ours = |n: &str| {
        let instance = instance_of(n);
        only.as_ref().is_none_or(|only| only.contains(instance))
            && ctx
                .leases
                .as_ref()
                .is_none_or(|leases| leases.epoch(instance).is_some())
    };
    let marked = |n: &str| n.starts_with(SET_ASIDE) && n.ends_with(TO_UNLINK) && ours(n);
    for (name, pairing) in pairings.iter().filter(|(n, _)| marked(n)) {
        match pairing {
            Pairing::Never => match sessions.wipe(name).await {
                Ok(()) => {
                    tracing::info!(session = %name, "a set-aside session that never paired was deleted: it held no device")
                }
                Err(e) => {
                    tracing::error!(session = %name, error = %e, "could not delete a set-aside session")
                }
            },
            Pairing::Unreadable(why) => {
                tracing::warn!(session = %name, error = %why, "a set-aside session does not read; it is kept")
            }
            Pairing::As(device) if in_use.contains(device.as_str()) => {
                tracing::info!(session = %name, device, "a set-aside session holds a device an instance uses; it is kept")
            }
            Pairing::As(device) if may_be_missing(name, device, &missing) => {
                tracing::warn!(session = %name, device, "a set-aside session may be its linked instance's missing session; it is kept")
            }
            Pairing::As(device) => ghosts.entry(device).or_default().push(name),
        }
    }
    tracing::info!(to_unlink = ghosts.len(), "set-aside sessions checked");
    for (device, names) in ghosts {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = ctx.shutdown.cancelled() => return,
        };
        let (ctx, device) = (ctx.clone(), device.to_owned());
        let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
        ctx.tracker.clone().spawn(async move {
            for name in names {
                remove_one(&ctx, &name, &device).await;
            }
            drop(slot);
        });
    }
}

/// Whether a set-aside session of an instance that has a link but not its session
/// paired with that instance's number: it may be that session, which an operator can
/// bring back.
fn may_be_missing(name: &str, device: &str, missing: &HashMap<String, String>) -> bool {
    let instance = name[SET_ASIDE.len()..]
        .split('/')
        .next()
        .unwrap_or_default();
    let phone = device.split(':').next().unwrap_or_default();
    missing.get(instance).is_some_and(|linked| linked == phone)
}

/// Logs in with the set-aside session `name`, removes its device at WhatsApp and
/// deletes the session; keeps it if WhatsApp could not be told.
async fn remove_one(ctx: &Context, name: &str, device: &str) {
    let removal = async {
        let lock = Arc::new(AsyncMutex::new(())).lock_owned().await;
        let Ok(slot) = ctx.sessions.clone().try_acquire_owned() else {
            return Unlinked::NotTold("the open-file limit leaves no room for it now".into());
        };
        // Nobody listens to this client's events: the diagnosis tells what matters.
        let (signals, _) = mpsc::channel(1);
        // As long as a /disconnect waits for WhatsApp.
        let deadline = Instant::now() + ctx.link_wait;
        match ctx.factory.start(name, 0, lock, slot, None, signals).await {
            Ok(running) => {
                let outcome = remove_device(&running, deadline).await;
                drop(running.stop(STOP_TIMEOUT).await);
                outcome
            }
            Err(e) => Unlinked::NotTold(format!("{e:#}")),
        }
    };
    // A stopping gateway does not wait for WhatsApp: the session stays set aside.
    let outcome = tokio::select! {
        outcome = removal => outcome,
        () = ctx.shutdown.cancelled() => return,
    };
    match outcome {
        Unlinked::Told => match ctx.factory.sessions.wipe(name).await {
            Ok(()) => tracing::info!(
                session = %name, device,
                "a device left linked by a link never recorded is removed at WhatsApp; its set-aside session is deleted"
            ),
            Err(e) => tracing::error!(
                session = %name, device, error = %e,
                "a device left linked is removed at WhatsApp, but its set-aside session could not be deleted"
            ),
        },
        Unlinked::NotTold(why) => tracing::warn!(
            session = %name, device, error = %why,
            "could not remove a device left linked by a link never recorded; its session stays set aside and is tried again at the next start"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    #[test]
    fn a_ghost_of_a_linked_instance_missing_its_session_may_be_that_session() {
        let missing = HashMap::from([("A".to_owned(), "5511".to_owned())]);
        assert!(super::may_be_missing("set-aside/A/17", "5511:3", &missing));
        assert!(!super::may_be_missing("set-aside/A/17", "5522:3", &missing));
        assert!(!super::may_be_missing("set-aside/B/17", "5511:3", &missing));
    }
}
