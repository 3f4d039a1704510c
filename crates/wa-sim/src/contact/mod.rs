//! Contacts: WhatsApp accounts no gateway links, the people a linked number talks to.
//! Each is a real Signal peer with one device (0), owned by a task of its own (see
//! `actor`); the registry keeps what the service publishes for it (its LID, name,
//! signed prekey and the one-time prekeys it has not handed out yet) and the handle to
//! its task.

mod actor;
mod text;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use wacore::libsignal::protocol::{
    GenericSignedPreKey as _, KeyPair, PreKeyRecord, SignedPreKeyRecord, Timestamp,
};
use wacore_binary::Node;

pub(crate) use actor::{InboxItem, OutboxItem};

use crate::phone::PhoneError;
use crate::sim::Sim;

/// One-time prekeys a contact starts with.
const PREKEYS: u32 = 50;

pub(crate) struct ContactEntry {
    pub(crate) lid: String,
    pub(crate) name: String,
    pub(crate) tx: mpsc::UnboundedSender<Command>,
    /// How many messages its inbox holds, for waiting on it without asking the task.
    pub(crate) inbox_len: watch::Receiver<usize>,
    pub(crate) registration_id: u32,
    pub(crate) identity: [u8; 32],
    /// Signed prekey id, key and signature.
    pub(crate) signed: (u32, [u8; 32], Vec<u8>),
    /// Public halves of the one-time prekeys not handed out yet.
    pub(crate) prekeys: BTreeMap<u32, [u8; 32]>,
}

impl ContactEntry {
    pub(crate) fn view(&self, number: &str) -> ContactView {
        ContactView {
            phone: number.to_owned(),
            jid: format!("{number}@s.whatsapp.net"),
            lid: format!("{}@lid", self.lid),
            name: self.name.clone(),
        }
    }

    /// Its bundle as device 0, handing out one of its one-time prekeys.
    pub(crate) fn bundle(&mut self) -> crate::phone::Bundle {
        let prekey = self.prekeys.pop_first();
        crate::phone::Bundle::primary(
            self.registration_id,
            self.identity,
            self.signed.clone(),
            prekey,
        )
    }
}

#[derive(Serialize)]
pub(crate) struct ContactView {
    phone: String,
    jid: String,
    lid: String,
    name: String,
}

/// A message for the contact, as the service received it from a device.
pub(crate) struct Incoming {
    pub(crate) sender: String,
    pub(crate) device: u32,
    pub(crate) id: String,
    pub(crate) t: u64,
    /// The `<enc>` element addressed to the contact.
    pub(crate) enc: Node,
}

/// What a contact's task is asked to do.
pub(crate) enum Command {
    Incoming(Incoming),
    /// Receipts a device sent for the contact's messages.
    Receipt {
        from: String,
        ids: Vec<String>,
        kind: Option<String>,
    },
    /// A device could not decrypt one of the contact's messages.
    Retry {
        sender: String,
        device: u32,
        receipt: Node,
    },
    Chatstate {
        from: String,
        state: String,
    },
    Send {
        to: String,
        text: String,
        id: String,
        done: oneshot::Sender<()>,
    },
    Read {
        ids: Vec<String>,
        done: oneshot::Sender<usize>,
    },
    SetOnline(bool),
    Garble,
    GarbleIncoming,
    Inbox(oneshot::Sender<Vec<InboxItem>>),
    Outbox(oneshot::Sender<Vec<OutboxItem>>),
    Events(oneshot::Sender<Vec<serde_json::Value>>),
}

/// Creates a contact with fresh keys; a fresh number unless one is given.
pub(crate) fn create(
    sim: &Arc<Sim>,
    phone: Option<&str>,
    name: Option<String>,
) -> Result<ContactView, PhoneError> {
    use rand::RngExt as _;
    let phone = phone.map(crate::phone::valid_phone).transpose()?;
    let mut rng = rand::rng();
    let identity = KeyPair::generate(&mut rng);
    let registration_id = rng.random_range(1..16381);
    let signed = KeyPair::generate(&mut rng);
    let signature = identity
        .private_key
        .calculate_signature(&signed.public_key.serialize(), &mut rng)
        .expect("a fresh key signs")
        .to_vec();
    let mut stores = actor::Keys::new(identity.clone(), registration_id);
    stores.signed.insert(
        1,
        SignedPreKeyRecord::new(
            1.into(),
            Timestamp::from_epoch_millis(crate::unix_millis()),
            &signed,
            &signature,
        ),
    );
    let mut public = BTreeMap::new();
    for id in 1..=PREKEYS {
        let pair = KeyPair::generate(&mut rng);
        public.insert(
            id,
            *pair
                .public_key
                .public_key_bytes()
                .first_chunk()
                .expect("32 bytes"),
        );
        stores
            .prekeys
            .insert(id, PreKeyRecord::new(id.into(), &pair));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (inbox_tx, inbox_len) = watch::channel(0);
    let (number, entry_view) = {
        let mut registry = sim.registry();
        let number = match phone {
            Some(number) if registry.is_registered(&number) => {
                return Err(PhoneError::Conflict(format!(
                    "{number} is already on WhatsApp"
                )));
            }
            Some(number) => number,
            None => registry.fresh_phone_number(),
        };
        let lid = registry.assign_lid(&number);
        let entry = ContactEntry {
            lid: lid.clone(),
            name: name.unwrap_or_else(|| format!("Contact {number}")),
            tx,
            inbox_len,
            registration_id,
            identity: *identity
                .public_key
                .public_key_bytes()
                .first_chunk()
                .expect("32 bytes"),
            signed: (
                1,
                *signed
                    .public_key
                    .public_key_bytes()
                    .first_chunk()
                    .expect("32 bytes"),
                signature,
            ),
            prekeys: public,
        };
        let view = entry.view(&number);
        let name = entry.name.clone();
        registry.contacts.insert(number.clone(), entry);
        (number, (view, lid, name))
    };
    let (view, lid, name) = entry_view;
    tokio::spawn(actor::run(
        sim.clone(),
        actor::Who { number, lid, name },
        stores,
        inbox_tx,
        rx,
    ));
    Ok(view)
}

/// Hands `command` to the contact `number`'s task; false if there is no such contact.
pub(crate) fn tell(sim: &Sim, number: &str, command: Command) -> bool {
    let tx = sim.registry().contacts.get(number).map(|c| c.tx.clone());
    tx.is_some_and(|tx| tx.send(command).is_ok())
}

/// Asks the contact `number`'s task something and waits for the answer.
pub(crate) async fn ask<T>(
    sim: &Sim,
    number: &str,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (done, answer) = oneshot::channel();
    if !tell(sim, number, command(done)) {
        return None;
    }
    answer.await.ok()
}
