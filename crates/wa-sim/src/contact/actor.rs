//! A contact's task: it alone holds the contact's Signal stores, decrypts what devices
//! send it into its inbox, seals what it sends (and seals it again for a device that
//! asks with a retry receipt), and records receipts and chat states.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use buffa::Message as _;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use wacore::libsignal::protocol::{
    CiphertextMessage, DeviceId, IdentityKeyPair, KeyPair, PreKeySignalMessage, ProtocolAddress,
    SessionStore as _, SignalMessage, UsePQRatchet, message_decrypt, message_encrypt,
    process_prekey_bundle,
};
use wacore::messages::MessageUtils;
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;
use waproto::whatsapp as wa;

use super::{Command, Incoming};
use crate::phone::Bundle;
use crate::routing::{self, Queued};
use crate::signal::{Identities, PreKeys, Sessions, SignedPreKeys, Trust};
use crate::sim::{Sim, bump};
use crate::stanza::attr;

/// A device asks again at most this many times for one message.
const MAX_RETRIES: u32 = 5;

/// The contact's Signal stores.
pub(crate) struct Keys {
    sessions: Sessions,
    identities: Identities,
    pub(super) prekeys: PreKeys,
    pub(super) signed: SignedPreKeys,
}

impl Keys {
    pub(super) fn new(identity: KeyPair, registration_id: u32) -> Self {
        Self {
            sessions: Sessions::default(),
            identities: Identities::new(
                IdentityKeyPair::from(identity),
                registration_id,
                Trust::FirstUse,
            ),
            prekeys: PreKeys::default(),
            signed: SignedPreKeys::default(),
        }
    }
}

pub(crate) struct Who {
    pub(crate) number: String,
    pub(crate) lid: String,
    pub(crate) name: String,
}

#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct InboxItem {
    id: String,
    from: String,
    text: String,
    timestamp: u64,
    /// When the contact decrypted it (unix ms): latency figures read it.
    received_at: u64,
    from_device: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    edit_of: Option<String>,
}

#[derive(Clone, Serialize)]
pub(crate) struct OutboxItem {
    id: String,
    to: String,
    text: String,
    acked: bool,
    delivered: Vec<String>,
    read: Vec<String>,
    #[serde(skip)]
    plaintext: Vec<u8>,
    #[serde(skip)]
    retries: BTreeMap<(String, u32), u32>,
}

struct Contact {
    sim: Arc<Sim>,
    who: Who,
    keys: Keys,
    online: bool,
    /// Messages that came while it was offline, in arrival order.
    pending: Vec<Incoming>,
    inbox: Vec<(InboxItem, String)>,
    seen: HashSet<(String, String)>,
    inbox_len: watch::Sender<usize>,
    outbox: Vec<OutboxItem>,
    events: Vec<Value>,
    garble_next: bool,
    /// Corrupt the next message it receives (fault injection).
    garble_incoming: bool,
    /// Retry receipts it sent, by (sender, message id).
    asked: BTreeMap<(String, String), u32>,
}

pub(super) async fn run(
    sim: Arc<Sim>,
    who: Who,
    keys: Keys,
    inbox_len: watch::Sender<usize>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let shutdown = sim.shutdown.clone();
    let mut contact = Contact {
        sim,
        who,
        keys,
        online: true,
        pending: Vec::new(),
        inbox: Vec::new(),
        seen: HashSet::new(),
        inbox_len,
        outbox: Vec::new(),
        events: Vec::new(),
        garble_next: false,
        garble_incoming: false,
        asked: BTreeMap::new(),
    };
    loop {
        tokio::select! {
            command = rx.recv() => match command {
                Some(command) => contact.on_command(command).await,
                None => return,
            },
            () = shutdown.cancelled() => return,
        }
    }
}

impl Contact {
    fn jid(&self) -> String {
        format!("{}@s.whatsapp.net", self.who.number)
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Incoming(incoming) if !self.online => self.pending.push(incoming),
            Command::Incoming(incoming) => self.receive(incoming).await,
            Command::Receipt { from, ids, kind } => self.note_receipt(&from, &ids, kind),
            Command::Retry {
                sender,
                device,
                receipt,
            } => self.answer_retry(&sender, device, &receipt).await,
            Command::Chatstate { from, state } => self.events.push(json!({
                "from": from, "state": state, "at": crate::unix_secs(),
            })),
            Command::Send { to, text, id, done } => {
                self.send(&to, text, id).await;
                let _ = done.send(());
            }
            Command::Read { ids, done } => {
                let _ = done.send(self.read(&ids));
            }
            Command::SetOnline(online) => {
                self.online = online;
                if online {
                    for incoming in std::mem::take(&mut self.pending) {
                        self.receive(incoming).await;
                    }
                }
            }
            Command::Garble => self.garble_next = true,
            Command::GarbleIncoming => self.garble_incoming = true,
            Command::Inbox(done) => {
                let _ = done.send(self.inbox.iter().map(|(i, _)| i.clone()).collect());
            }
            Command::Outbox(done) => {
                let _ = done.send(self.outbox.clone());
            }
            Command::Events(done) => {
                let _ = done.send(self.events.clone());
            }
        }
    }

    /// Decrypts a message into the inbox (once per sender and id) and tells the
    /// sending device it was delivered.
    async fn receive(&mut self, incoming: Incoming) {
        let address = ProtocolAddress::new(&incoming.sender, DeviceId::from(incoming.device));
        let garbled = std::mem::take(&mut self.garble_incoming);
        let message = match self.decrypt(&address, &incoming.enc, garbled).await {
            Ok(message) => message,
            Err(e) => {
                bump(&self.sim.stats.undecryptable, 1);
                tracing::warn!(
                    contact = self.who.number,
                    from = %address,
                    id = incoming.id,
                    error = e,
                    "a contact could not decrypt a message; it asks again"
                );
                self.ask_again(&incoming);
                return;
            }
        };
        let fresh = self
            .seen
            .insert((incoming.sender.clone(), incoming.id.clone()));
        if fresh && let Some(item) = inbox_item(&incoming, &message) {
            self.inbox.push((item, incoming.sender.clone()));
            self.inbox_len.send_replace(self.inbox.len());
        }
        let receipt = self.receipt(&[incoming.id], None);
        routing::deliver_from_contact(&self.sim, &incoming.sender, incoming.device, receipt);
    }

    async fn decrypt(
        &mut self,
        address: &ProtocolAddress,
        enc: &Node,
        garbled: bool,
    ) -> Result<wa::Message, String> {
        let mut bytes = crate::stanza::bytes(enc)
            .ok_or("an <enc> without ciphertext")?
            .to_vec();
        if garbled && let Some(last) = bytes.last_mut() {
            *last ^= 0x01;
        }
        let bytes = &bytes[..];
        let ciphertext = match attr(enc, "type").as_deref() {
            Some("pkmsg") => CiphertextMessage::PreKeySignalMessage(
                PreKeySignalMessage::try_from(bytes).map_err(|e| e.to_string())?,
            ),
            Some("msg") => CiphertextMessage::SignalMessage(
                SignalMessage::try_from(bytes).map_err(|e| e.to_string())?,
            ),
            other => return Err(format!("an <enc> of type {other:?}")),
        };
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
        let keys = &mut self.keys;
        let result = message_decrypt(
            &ciphertext,
            address,
            &mut keys.sessions,
            &mut keys.identities,
            &mut keys.prekeys,
            &keys.signed,
            &mut rng,
            UsePQRatchet::No,
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Some(id) = result.consumed_prekey_id {
            use wacore::libsignal::protocol::PreKeyStore as _;
            let _ = keys.prekeys.remove_pre_key(id).await;
        }
        wacore::messages::decode_plaintext(&result.plaintext, 2).map_err(|e| e.to_string())
    }

    /// A retry receipt for a message it could not decrypt (at most 5 per message), so
    /// the device seals it again over a new session.
    fn ask_again(&mut self, incoming: &Incoming) {
        let asked = self
            .asked
            .entry((incoming.sender.clone(), incoming.id.clone()))
            .or_default();
        *asked += 1;
        let asked = *asked;
        if asked > MAX_RETRIES {
            return;
        }
        let t = crate::unix_secs().to_string();
        let node = NodeBuilder::new("receipt")
            .attrs([
                ("from", self.jid()),
                ("id", incoming.id.clone()),
                ("t", t.clone()),
                ("type", "retry".to_owned()),
            ])
            .children([
                NodeBuilder::new("retry")
                    .attrs([
                        ("count", asked.to_string()),
                        ("id", incoming.id.clone()),
                        ("t", t),
                        ("v", "1".to_owned()),
                    ])
                    .build(),
                NodeBuilder::new("registration")
                    .bytes(self.keys.identities.registration_id.to_be_bytes().to_vec())
                    .build(),
            ])
            .build();
        let queued = Queued::receipt(incoming.id.clone(), Some("retry".to_owned()), node);
        routing::deliver_from_contact(&self.sim, &incoming.sender, incoming.device, queued);
    }

    /// `<receipt from=contact id t [type]>`, with a `<list>` when it covers several.
    fn receipt(&self, ids: &[String], kind: Option<&str>) -> Queued {
        let mut node = NodeBuilder::new("receipt").attrs([
            ("from", self.jid()),
            ("id", ids[0].clone()),
            ("t", crate::unix_secs().to_string()),
        ]);
        if let Some(kind) = kind {
            node = node.attr("type", kind.to_owned());
        }
        if ids.len() > 1 {
            let items = ids[1..]
                .iter()
                .map(|id| NodeBuilder::new("item").attr("id", id.clone()).build());
            node = node.children([NodeBuilder::new("list").children(items).build()]);
        }
        Queued::receipt(ids[0].clone(), kind.map(str::to_owned), node.build())
    }

    fn note_receipt(&mut self, from: &str, ids: &[String], kind: Option<String>) {
        for item in self.outbox.iter_mut().filter(|m| ids.contains(&m.id)) {
            let list = match kind.as_deref() {
                None | Some("inactive" | "delivery") => &mut item.delivered,
                Some("read" | "read-self" | "played") => &mut item.read,
                Some(_) => continue,
            };
            if !list.iter().any(|j| j == from) {
                list.push(from.to_owned());
            }
        }
    }

    /// Read receipts for these inbox messages, one per sending device.
    fn read(&mut self, ids: &[String]) -> usize {
        let mut by_device: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        for (item, sender) in self.inbox.iter().filter(|(i, _)| ids.contains(&i.id)) {
            by_device
                .entry((sender.clone(), item.from_device))
                .or_default()
                .push(item.id.clone());
        }
        let mut read = 0;
        for ((sender, device), ids) in by_device {
            read += ids.len();
            let receipt = self.receipt(&ids, Some("read"));
            routing::deliver_from_contact(&self.sim, &sender, device, receipt);
        }
        read
    }

    /// Seals `text` to every device of `to`'s account and hands each copy to the
    /// service.
    async fn send(&mut self, to: &str, text: String, id: String) {
        let message = wa::Message {
            conversation: Some(text.clone()),
            ..Default::default()
        };
        let plaintext = MessageUtils::pad_message_v2(message.encode_to_vec());
        let devices = routing::devices_of(&self.sim, to);
        for device in devices {
            let garble = self.garble_next && device != 0;
            match self.seal(to, device, &id, &plaintext, None, garble).await {
                Ok(()) => self.garble_next &= !garble,
                Err(e) => tracing::warn!(
                    contact = self.who.number,
                    to,
                    device,
                    error = e,
                    "a contact could not seal a message"
                ),
            }
        }
        self.outbox.push(OutboxItem {
            id,
            to: to.to_owned(),
            text,
            acked: true,
            delivered: Vec::new(),
            read: Vec::new(),
            plaintext,
            retries: BTreeMap::new(),
        });
    }

    /// Encrypts `plaintext` to one device (opening a session from its bundle if there
    /// is none, or from the retry's bundle when answering one) and routes it.
    async fn seal(
        &mut self,
        to: &str,
        device: u32,
        id: &str,
        plaintext: &[u8],
        retry: Option<(u32, Bundle)>,
        garble: bool,
    ) -> Result<(), String> {
        let address = ProtocolAddress::new(to, DeviceId::from(device));
        let keys = &mut self.keys;
        let has_session = keys
            .sessions
            .load_session(&address)
            .await
            .map_err(|e| e.to_string())?
            .is_some();
        let (count, bundle) = match retry {
            Some((count, bundle)) => (Some(count), Some(bundle)),
            None if has_session => (None, None),
            None => (
                None,
                Some(routing::bundle_of(&self.sim, to, device).ok_or("no bundle for the device")?),
            ),
        };
        if let Some(bundle) = bundle {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
            if count.is_some() {
                // The device may have reinstalled: the identity in its receipt is now it.
                keys.identities.forget(&address);
            }
            process_prekey_bundle(
                &address,
                &mut keys.sessions,
                &mut keys.identities,
                &bundle.to_signal(device)?,
                &mut rng,
                UsePQRatchet::No,
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        let sealed = message_encrypt(
            plaintext,
            &address,
            &mut keys.sessions,
            &mut keys.identities,
        )
        .await
        .map_err(|e| e.to_string())?;
        let (kind, _, ciphertext) =
            wacore::send::extract_ciphertext(sealed).ok_or("not a Signal message")?;
        let mut ciphertext = ciphertext.into_vec();
        if garble && let Some(last) = ciphertext.last_mut() {
            *last ^= 0x01;
        }
        let mut enc = NodeBuilder::new("enc").attrs([("v", "2"), ("type", kind)]);
        if let Some(count) = count {
            enc = enc.attr("count", count.to_string());
        }
        let enc = enc.bytes(ciphertext).build();
        let stanza = NodeBuilder::new("message")
            .attrs([
                ("from", self.jid()),
                ("id", id.to_owned()),
                ("t", crate::unix_secs().to_string()),
                ("type", "text".to_owned()),
                ("notify", self.who.name.clone()),
                ("sender_lid", format!("{}@lid", self.who.lid)),
            ])
            .children([enc.clone()])
            .build();
        routing::message_from_contact(&self.sim, &self.who.number, to, device, id, enc, stanza);
        Ok(())
    }

    /// Seals a message again, over a new session, for a device that could not decrypt
    /// it (from the keys in its receipt, else from what the service holds for it).
    async fn answer_retry(&mut self, sender: &str, device: u32, receipt: &Node) {
        let refuse = |why: &str| {
            tracing::warn!(
                sender,
                device,
                why,
                "a contact did not answer a retry receipt"
            );
        };
        let id = attr(receipt, "id").unwrap_or_default();
        let count = receipt
            .get_optional_child("retry")
            .and_then(|r| attr(r, "count"))
            .and_then(|c| c.parse::<u32>().ok())
            .unwrap_or(1);
        let Some(item) = self.outbox.iter_mut().find(|m| m.id == id) else {
            return refuse("the contact sent no such message");
        };
        let asked = item.retries.entry((sender.to_owned(), device)).or_default();
        *asked += 1;
        if count > MAX_RETRIES || *asked > MAX_RETRIES {
            return refuse("asked more than 5 times");
        }
        let plaintext = item.plaintext.clone();
        let bundle = match Bundle::from_retry(receipt) {
            Ok(Some(bundle)) => bundle,
            Ok(None) => match routing::bundle_of(&self.sim, sender, device) {
                Some(bundle) => bundle,
                None => return refuse("no such device"),
            },
            Err(why) => return refuse(why),
        };
        match self
            .seal(
                sender,
                device,
                &id,
                &plaintext,
                Some((count, bundle)),
                false,
            )
            .await
        {
            Ok(()) => bump(&self.sim.stats.retries_answered, 1),
            Err(e) => refuse(&e),
        }
    }
}

/// The inbox entry for a text (or an edit of one); None for anything else.
fn inbox_item(incoming: &Incoming, message: &wa::Message) -> Option<InboxItem> {
    let text = super::text::Text::of(message)?;
    Some(InboxItem {
        id: incoming.id.clone(),
        from: incoming.sender.clone(),
        text: text.text,
        timestamp: incoming.t,
        received_at: crate::unix_millis(),
        from_device: incoming.device,
        reply_to: text.reply_to,
        edit_of: text.edit_of,
    })
}
