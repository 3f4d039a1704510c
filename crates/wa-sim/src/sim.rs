//! The service object shared by every connection task and the control API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::certs::ServerIdentity;
use crate::registry::{Command, ConnEntry, ConnId, Registry, Role};
use crate::stanza;

pub(crate) struct Sim {
    pub(crate) config: Config,
    pub(crate) identity: ServerIdentity,
    pub(crate) stats: Stats,
    pub(crate) shutdown: CancellationToken,
    registry: Mutex<Registry>,
    outage_until: Mutex<Option<Instant>>,
    /// Peer messages still to garble (from `Config::garble_peer_messages`).
    garbled: AtomicU64,
}

/// Counters since start; `connections` is the only gauge.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) connections: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    /// Handshakes that resumed with IK (a client that cached our static key).
    pub(crate) ik_handshakes: AtomicU64,
    pub(crate) fallback_handshakes: AtomicU64,
    pub(crate) logins: AtomicU64,
    /// Logins of a device that already had a live connection (which they replaced).
    pub(crate) replaced_logins: AtomicU64,
    pub(crate) login_failures: AtomicU64,
    pub(crate) pairings: AtomicU64,
    /// Pairing codes companions asked for (`companion_hello`).
    pub(crate) code_requests: AtomicU64,
    /// Pairings the phone or the device refused (a bad signature, a wrong code...).
    pub(crate) pairing_refusals: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    /// Signal messages the phone sent its devices (key shares, history syncs), resends
    /// included; retry receipts devices sent and the messages sent again for them.
    pub(crate) peer_messages: AtomicU64,
    pub(crate) retry_receipts: AtomicU64,
    pub(crate) resent_messages: AtomicU64,
    /// Receipts devices sent for the phone's messages (`peer_msg`), and for a history
    /// sync they processed (`hist_sync`).
    pub(crate) peer_receipts: AtomicU64,
    pub(crate) history_sync_receipts: AtomicU64,
    /// Message copies routed to a recipient device (or contact), copies queued for a
    /// device that was not connected, sent again after a connection was lost, resends
    /// of an id already routed, receipts routed, retry receipts a contact answered and
    /// messages a contact could not decrypt.
    pub(crate) messages_routed: AtomicU64,
    pub(crate) messages_queued: AtomicU64,
    pub(crate) messages_redelivered: AtomicU64,
    pub(crate) messages_deduped: AtomicU64,
    pub(crate) receipts_routed: AtomicU64,
    pub(crate) retries_answered: AtomicU64,
    pub(crate) undecryptable: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Connections from their websocket upgrade to the end of their admission (the
    /// Noise handshake, then registration or login), and the most seen at once since the
    /// last reset: how hard a crowd of clients hit the service together.
    pub(crate) admitting: AtomicU64,
    pub(crate) peak_admitting: AtomicU64,
}

/// Counts one connection as admitting for as long as it lives.
pub(crate) struct Admitting<'a>(&'a Stats);

impl<'a> Admitting<'a> {
    pub(crate) fn begin(stats: &'a Stats) -> Self {
        let now = stats.admitting.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_admitting.fetch_max(now, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for Admitting<'_> {
    fn drop(&mut self) {
        self.0.admitting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatsView {
    connections: u64,
    linking: u64,
    handshakes: u64,
    ik_handshakes: u64,
    fallback_handshakes: u64,
    logins: u64,
    replaced_logins: u64,
    login_failures: u64,
    pairings: u64,
    code_requests: u64,
    pairing_refusals: u64,
    refused: u64,
    protocol_errors: u64,
    peer_messages: u64,
    retry_receipts: u64,
    resent_messages: u64,
    peer_receipts: u64,
    history_sync_receipts: u64,
    messages_routed: u64,
    messages_queued: u64,
    messages_redelivered: u64,
    messages_deduped: u64,
    receipts_routed: u64,
    retries_answered: u64,
    undecryptable: u64,
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    admitting: u64,
    peak_admitting: u64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Why a stored session may not log in.
pub(crate) enum LoginRefusal {
    /// No such device, or its noise key is not the one it was linked with.
    Unknown,
}

impl Sim {
    pub(crate) fn new(config: Config, shutdown: CancellationToken) -> Self {
        let config_garbled = u64::from(config.garble_peer_messages);
        Self {
            identity: ServerIdentity::generate(config.forged_certificate),
            config,
            stats: Stats::default(),
            shutdown,
            registry: Mutex::new(Registry::default()),
            outage_until: Mutex::new(None),
            garbled: AtomicU64::new(config_garbled),
        }
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the next welcome's first message is to be garbled in transit.
    pub(crate) fn take_garbled(&self) -> bool {
        self.garbled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(crate) fn in_outage(&self) -> bool {
        let until = self.outage_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Refuse every websocket for `duration` and cut the ones that are open.
    pub(crate) fn start_outage(&self, duration: Duration) -> usize {
        *self.outage_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + duration);
        let senders: Vec<_> = self
            .registry()
            .conns
            .values()
            .map(|c| c.tx.clone())
            .collect();
        let count = senders.len();
        for tx in senders {
            let _ = tx.try_send(Command::Drop);
        }
        count
    }

    pub(crate) fn register_linking(
        &self,
        tx: mpsc::Sender<Command>,
        companion: crate::registry::Companion,
        refs: Vec<String>,
    ) -> ConnId {
        self.registry().add_conn(ConnEntry {
            tx,
            role: Role::Linking(crate::registry::Linking {
                companion,
                refs,
                refs_sent: Instant::now(),
                pairing: false,
                code_phone: None,
            }),
        })
    }

    /// Admits a stored session whose noise key matches the device linked under
    /// `phone`/`device`. Any other live connection of that device is replaced.
    /// Returns the connection id and the account's LID.
    pub(crate) fn login(
        &self,
        tx: mpsc::Sender<Command>,
        phone: &str,
        device: u32,
        noise: &[u8; 32],
    ) -> Result<(ConnId, String), LoginRefusal> {
        let mut registry = self.registry();
        let lid = match registry.phones.get(phone) {
            Some(p)
                if p.devices
                    .get(&device)
                    .is_some_and(|d| d.companion.noise == *noise) =>
            {
                p.lid.clone()
            }
            _ => return Err(LoginRefusal::Unknown),
        };
        let replaced = registry.device_conns(phone, Some(device));
        for (_, old) in &replaced {
            let _ = old.try_send(Command::StreamError(stanza::stream_conflict(
                None, "replaced",
            )));
        }
        if !replaced.is_empty() {
            bump(&self.stats.replaced_logins, 1);
        }
        let record = registry
            .phones
            .get_mut(phone)
            .and_then(|p| p.devices.get_mut(&device));
        if let Some(record) = record {
            if record.logins.len() == crate::registry::LOGIN_LOG {
                record.logins.pop_front();
            }
            record.logins.push_back(crate::registry::Login {
                at: crate::unix_millis(),
                replaced: replaced.len(),
            });
        }
        let id = registry.add_conn(ConnEntry {
            tx,
            role: Role::Device {
                phone: phone.to_owned(),
                device,
            },
        });
        Ok((id, lid))
    }

    pub(crate) fn unregister(&self, id: ConnId) {
        let mut registry = self.registry();
        let Some(ConnEntry {
            role: Role::Linking(linking),
            ..
        }) = registry.conns.remove(&id)
        else {
            return;
        };
        // A code request dies with the connection that made it.
        if let Some(phone) = linking.code_phone.and_then(|p| registry.phones.get_mut(&p))
            && phone.code_request.as_ref().is_some_and(|r| r.conn == id)
        {
            phone.code_request = None;
        }
    }

    /// The device removes itself (client logout). Only its own record may go.
    pub(crate) fn remove_own_device(self: &Arc<Self>, phone: &str, device: u32) -> bool {
        let removed = {
            let mut registry = self.registry();
            registry.queues.remove(&(phone.to_owned(), device));
            registry.phones.get_mut(phone).is_some_and(|p| {
                let removed = p.devices.remove(&device).is_some();
                if removed {
                    p.devices_changed();
                }
                removed
            })
        };
        if removed {
            crate::devices::announce(self, phone);
        }
        removed
    }

    /// The phone unlinks every companion: each connected one is told it was removed.
    pub(crate) fn unlink_phone(&self, phone: &str) -> Option<usize> {
        let mut registry = self.registry();
        // What waited for the unlinked devices goes with them.
        registry.queues.retain(|(number, _), _| number != phone);
        let removed = {
            let account = registry.phones.get_mut(phone)?;
            account.code_request = None;
            let removed = std::mem::take(&mut account.devices).len();
            account.devices_changed();
            removed
        };
        for (_, tx) in registry.device_conns(phone, None) {
            let _ = tx.try_send(Command::StreamError(stanza::stream_conflict(
                Some(401),
                "device_removed",
            )));
        }
        Some(removed)
    }

    /// Sends `command` (built per connection) to every live connection of `phone`.
    pub(crate) fn to_phone_conns(&self, phone: &str, command: impl Fn() -> Command) -> usize {
        let conns = self.registry().device_conns(phone, None);
        for (_, tx) in &conns {
            let _ = tx.try_send(command());
        }
        conns.len()
    }

    /// Sends fresh refs to every connection still linking, restarting its QR rotation.
    pub(crate) fn refresh_refs(&self) -> usize {
        let mut registry = self.registry();
        let mut sent = 0;
        for conn in registry.conns.values_mut() {
            if let Role::Linking(linking) = &mut conn.role
                && !linking.pairing
            {
                linking.refs = crate::fresh_refs(self.config.refs_per_pairing);
                linking.refs_sent = Instant::now();
                let iq = stanza::pair_device(&stanza::fresh_id(), &linking.refs);
                if conn.tx.try_send(Command::Send(iq)).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    }

    pub(crate) fn stats(&self) -> StatsView {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        let linking = self
            .registry()
            .conns
            .values()
            .filter(|c| matches!(c.role, Role::Linking(_)))
            .count() as u64;
        StatsView {
            connections: load(&s.connections),
            linking,
            handshakes: load(&s.handshakes),
            ik_handshakes: load(&s.ik_handshakes),
            fallback_handshakes: load(&s.fallback_handshakes),
            logins: load(&s.logins),
            replaced_logins: load(&s.replaced_logins),
            login_failures: load(&s.login_failures),
            pairings: load(&s.pairings),
            code_requests: load(&s.code_requests),
            pairing_refusals: load(&s.pairing_refusals),
            refused: load(&s.refused),
            protocol_errors: load(&s.protocol_errors),
            peer_messages: load(&s.peer_messages),
            retry_receipts: load(&s.retry_receipts),
            resent_messages: load(&s.resent_messages),
            peer_receipts: load(&s.peer_receipts),
            history_sync_receipts: load(&s.history_sync_receipts),
            messages_routed: load(&s.messages_routed),
            messages_queued: load(&s.messages_queued),
            messages_redelivered: load(&s.messages_redelivered),
            messages_deduped: load(&s.messages_deduped),
            receipts_routed: load(&s.receipts_routed),
            retries_answered: load(&s.retries_answered),
            undecryptable: load(&s.undecryptable),
            frames_in: load(&s.frames_in),
            frames_out: load(&s.frames_out),
            bytes_in: load(&s.bytes_in),
            bytes_out: load(&s.bytes_out),
            admitting: load(&s.admitting),
            peak_admitting: load(&s.peak_admitting),
        }
    }

    /// Starts a new peak of admitting connections from those admitting now.
    pub(crate) fn reset_peaks(&self) {
        // Zero first, then raise to now: a connection beginning in between still counts.
        self.stats.peak_admitting.store(0, Ordering::Relaxed);
        let now = self.stats.admitting.load(Ordering::Relaxed);
        self.stats.peak_admitting.fetch_max(now, Ordering::Relaxed);
    }
}
