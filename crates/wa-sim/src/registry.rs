//! What the simulated service knows: phones (accounts) with their linked devices, and
//! the live connections, each either still linking or logged in as one device.
//! One mutex guards it all; it is never held across an await.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use wacore::libsignal::protocol::KeyPair;
use wacore_binary::Node;

pub(crate) type ConnId = u64;

/// Orders the service gives to a connection's task.
pub(crate) enum Command {
    Send(Node),
    /// Send an iq and hand its answer (result or error) to the waiter.
    Request(Node, oneshot::Sender<Node>),
    /// Send this stream error, then close the connection.
    StreamError(Node),
    /// Close the socket without a word, like a network failure.
    Drop,
}

pub(crate) struct ConnEntry {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) role: Role,
}

pub(crate) enum Role {
    Linking(Linking),
    Device { phone: String, device: u32 },
}

/// A client that registered (no stored session) and is showing QR codes.
pub(crate) struct Linking {
    pub(crate) companion: Companion,
    pub(crate) refs: Vec<String>,
    pub(crate) refs_sent: Instant,
    /// A pairing is being completed on this connection; no second one may start.
    pub(crate) pairing: bool,
    /// The phone this companion asked a pairing code for, if any.
    pub(crate) code_phone: Option<String>,
}

#[derive(Clone)]
pub(crate) struct Companion {
    pub(crate) noise: [u8; 32],
    pub(crate) identity: [u8; 32],
    pub(crate) platform: String,
    pub(crate) registration: Registration,
}

/// What a companion registered for Signal: enough for the phone to open a session.
#[derive(Clone)]
pub(crate) struct Registration {
    pub(crate) id: u32,
    pub(crate) signed_prekey_id: u32,
    pub(crate) signed_prekey: [u8; 32],
    pub(crate) signature: Vec<u8>,
}

pub(crate) struct Phone {
    pub(crate) identity: KeyPair,
    /// The phone's own Signal registration, as the account's primary device (device 0).
    pub(crate) primary: Primary,
    /// The account's ADV id: the same in every device identity the phone signs and in
    /// its signed key-index list, for as long as the account exists.
    pub(crate) adv_raw_id: u32,
    /// When the device list last changed (unix seconds), and the signed key-index list
    /// as it stands since then.
    pub(crate) devices_changed: u64,
    pub(crate) signed_key_index: Vec<u8>,
    pub(crate) lid: String,
    next_device: u32,
    pub(crate) devices: BTreeMap<u32, DeviceRecord>,
    pub(crate) code_request: Option<CodeRequest>,
}

/// What the phone publishes for Signal as device 0 of its account.
pub(crate) struct Primary {
    pub(crate) registration_id: u32,
    pub(crate) signed_prekey_id: u32,
    pub(crate) signed_prekey: KeyPair,
    /// The account key's signature over the signed prekey (`0x05 || key`).
    pub(crate) signature: Vec<u8>,
}

impl Primary {
    fn generate(identity: &KeyPair) -> Self {
        use rand::RngExt as _;
        let mut rng = rand::rng();
        let signed_prekey = KeyPair::generate(&mut rng);
        let signature = identity
            .private_key
            .calculate_signature(&signed_prekey.public_key.serialize(), &mut rng)
            .expect("a fresh key signs")
            .to_vec();
        Self {
            registration_id: rng.random_range(1..16381),
            signed_prekey_id: 1,
            signed_prekey,
            signature,
        }
    }
}

pub(crate) struct DeviceRecord {
    pub(crate) companion: Companion,
    /// The `ADVSignedDeviceIdentity` both sides signed at pairing, with the account key:
    /// what the service hands out with the device's prekey bundle.
    pub(crate) signed_identity: Vec<u8>,
    pub(crate) linked_at_ms: u64,
    /// The id of the last app-state key share the phone sent it, and whether the device
    /// acknowledged it (a `peer_msg` receipt): until then every login sends the phone's
    /// welcome again, as WhatsApp keeps a message until the device has it.
    pub(crate) key_share_id: Option<String>,
    pub(crate) key_share_received: bool,
    /// The one-time prekeys it uploaded.
    pub(crate) prekeys: crate::prekeys::PreKeys,
    /// The phone's last peer messages to it, for a retry receipt to ask again.
    pub(crate) sent: crate::phone::Sent,
    /// Its last [`LOGIN_LOG`] logins, oldest first.
    pub(crate) logins: std::collections::VecDeque<Login>,
}

/// Logins kept per device.
pub(crate) const LOGIN_LOG: usize = 1000;

/// A device's login: when (unix ms), and how many live connections of that same device
/// it replaced (each told `conflict type="replaced"` and closed, as WhatsApp does).
#[derive(Clone, Copy, serde::Serialize)]
pub(crate) struct Login {
    pub(crate) at: u64,
    pub(crate) replaced: usize,
}

/// A companion asked to link by phone-number code (stage 1 done).
pub(crate) struct CodeRequest {
    pub(crate) conn: ConnId,
    pub(crate) pairing_ref: Vec<u8>,
    pub(crate) wrapped_companion_ephemeral: Vec<u8>,
    pub(crate) created: Instant,
    pub(crate) attempt: Option<CodeAttempt>,
}

/// The phone answered with its own ephemeral (stage 2) and waits for the bundle.
pub(crate) struct CodeAttempt {
    pub(crate) finish: oneshot::Sender<CompanionFinish>,
}

pub(crate) struct CompanionFinish {
    pub(crate) wrapped_key_bundle: Vec<u8>,
    pub(crate) companion_identity: Vec<u8>,
}

#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) phones: HashMap<String, Phone>,
    /// Accounts no gateway links: simulated people to talk to, by number.
    pub(crate) contacts: HashMap<String, crate::contact::ContactEntry>,
    /// Each account's number (a phone's or a contact's), by its LID.
    lids: HashMap<String, String>,
    /// What waits for each companion device (number, device) until it says it has it.
    pub(crate) queues: HashMap<(String, u32), VecDeque<crate::routing::Queued>>,
    /// Message ids already routed, by the sending device (`number:device`).
    pub(crate) seen: Seen,
    /// The next message to this number is refused with this code (fault injection).
    pub(crate) nack_faults: HashMap<String, u16>,
    pub(crate) conns: HashMap<ConnId, ConnEntry>,
    next_conn: ConnId,
    next_fresh_phone: u64,
}

/// The last [`Seen::KEPT`] (sending device, message id) pairs routed, to drop resends.
#[derive(Default)]
pub(crate) struct Seen {
    set: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

impl Seen {
    const KEPT: usize = 100_000;

    /// Whether this pair is new (and remember it).
    pub(crate) fn insert(&mut self, key: (String, String)) -> bool {
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > Self::KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        true
    }
}

/// The ref a client shows at `elapsed` after receiving `refs`: the first lives 60 s,
/// each next one 20 s (whatsapp-rust pair.rs), none once they ran out.
pub(crate) fn current_ref(
    refs: &[String],
    elapsed: Duration,
    first: Duration,
    next: Duration,
) -> Option<&str> {
    let index = if elapsed < first {
        0
    } else {
        1 + ((elapsed - first).as_millis() / next.as_millis().max(1)) as usize
    };
    refs.get(index).map(String::as_str)
}

impl Registry {
    pub(crate) fn add_conn(&mut self, entry: ConnEntry) -> ConnId {
        self.next_conn += 1;
        self.conns.insert(self.next_conn, entry);
        self.next_conn
    }

    /// A LID nobody has, now `number`'s.
    pub(crate) fn assign_lid(&mut self, number: &str) -> String {
        assign_lid(&mut self.lids, number)
    }

    /// The number of the account (phone or contact) with this LID.
    pub(crate) fn number_by_lid(&self, lid: &str) -> Option<&str> {
        self.lids.get(lid).map(String::as_str)
    }

    /// Whether `number` is on WhatsApp: a phone's account or a contact.
    pub(crate) fn is_registered(&self, number: &str) -> bool {
        self.phones.contains_key(number) || self.contacts.contains_key(number)
    }

    /// The account number and device a user jid names (by number or LID), if the
    /// account exists.
    pub(crate) fn resolve(&self, jid: &wacore_binary::Jid) -> Option<(String, u32)> {
        let number = match jid.server.as_str() {
            "s.whatsapp.net" | "c.us" => jid.user.to_string(),
            "lid" => self.number_by_lid(jid.user.as_str())?.to_owned(),
            _ => return None,
        };
        self.is_registered(&number)
            .then_some((number, u32::from(jid.device)))
    }

    /// The LID of the account `number`, phone or contact.
    pub(crate) fn lid_of(&self, number: &str) -> Option<&str> {
        self.phones
            .get(number)
            .map(|p| p.lid.as_str())
            .or_else(|| self.contacts.get(number).map(|c| c.lid.as_str()))
    }

    pub(crate) fn phone_mut(&mut self, number: &str) -> &mut Phone {
        let lids = &mut self.lids;
        self.phones.entry(number.to_owned()).or_insert_with(|| {
            let identity = KeyPair::generate(&mut rand::rng());
            let lid = assign_lid(lids, number);
            let mut phone = Phone {
                primary: Primary::generate(&identity),
                identity,
                adv_raw_id: rand::random::<u32>() | 1,
                devices_changed: 0,
                signed_key_index: Vec::new(),
                lid,
                next_device: 1,
                devices: BTreeMap::new(),
                code_request: None,
            };
            phone.devices_changed();
            phone
        })
    }

    /// A Brazilian mobile number nobody uses yet, for scans that name no phone.
    pub(crate) fn fresh_phone_number(&mut self) -> String {
        loop {
            self.next_fresh_phone += 1;
            let number = format!("55119{:08}", self.next_fresh_phone);
            if !self.is_registered(&number) {
                return number;
            }
        }
    }

    /// Live connections logged in as one of `phone`'s devices (`device` narrows it).
    pub(crate) fn device_conns(
        &self,
        phone: &str,
        device: Option<u32>,
    ) -> Vec<(ConnId, mpsc::Sender<Command>)> {
        self.conns
            .iter()
            .filter(|(_, c)| {
                matches!(&c.role, Role::Device { phone: p, device: d } if p == phone && device.is_none_or(|x| x == *d))
            })
            .map(|(id, c)| (*id, c.tx.clone()))
            .collect()
    }
}

impl Phone {
    pub(crate) fn allocate_device(&mut self) -> u32 {
        let id = self.next_device;
        self.next_device += 1;
        id
    }

    /// The highest key index the phone ever gave a device (0 before the first).
    pub(crate) fn highest_index(&self) -> u32 {
        self.next_device - 1
    }

    /// The device list changed: note when, and sign the new key-index list.
    pub(crate) fn devices_changed(&mut self) {
        self.devices_changed = crate::unix_secs();
        self.signed_key_index = crate::devices::key_index_list(self);
    }
}

fn assign_lid(lids: &mut HashMap<String, String>, number: &str) -> String {
    loop {
        let lid = fresh_lid();
        if !lids.contains_key(&lid) {
            lids.insert(lid.clone(), number.to_owned());
            return lid;
        }
    }
}

fn fresh_lid() -> String {
    use rand::RngExt as _;
    // LIDs are opaque 14-15 digit user ids on the `lid` server.
    format!(
        "{}",
        rand::rng().random_range(100_000_000_000_000u64..999_999_999_999_999)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ref{i}")).collect()
    }

    #[test]
    fn the_current_ref_follows_the_clients_rotation() {
        let r = refs(3);
        let (first, next) = (Duration::from_secs(60), Duration::from_secs(20));
        let at = |s| current_ref(&r, Duration::from_secs(s), first, next);
        assert_eq!(at(0), Some("ref0"));
        assert_eq!(at(59), Some("ref0"));
        assert_eq!(at(60), Some("ref1"));
        assert_eq!(at(79), Some("ref1"));
        assert_eq!(at(80), Some("ref2"));
        assert_eq!(at(100), None);
    }

    #[test]
    fn a_resend_is_seen_and_the_oldest_ids_are_forgotten() {
        let mut seen = Seen::default();
        let key = |i: usize| ("5511:1".to_owned(), format!("id{i}"));
        assert!(seen.insert(key(0)));
        assert!(!seen.insert(key(0)));
        for i in 1..=Seen::KEPT {
            assert!(seen.insert(key(i)));
        }
        assert!(seen.insert(key(0)), "the oldest was forgotten");
        assert!(!seen.insert(key(Seen::KEPT)));
    }
}
