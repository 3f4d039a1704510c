//! The phone as the account's primary device in Signal terms. After a device's first
//! login it sends the device, over a real Signal session opened from the device's
//! registration (a `pkmsg`, as WhatsApp's phone sends), a fresh app-state sync key and
//! an empty initial history sync. Without the key share a freshly linked client waits
//! ~10 s for it; without the history sync Baileys waits 20 s. A device that could not
//! decrypt one asks again with a retry receipt, and gets it again over a new session.

use std::collections::VecDeque;
use std::io::Write as _;

use buffa::Message as _;
use wacore::libsignal::protocol::{
    DeviceId, IdentityKey, IdentityKeyPair, KeyPair, PreKeyBundle, ProtocolAddress, PublicKey,
    UsePQRatchet, message_encrypt, process_prekey_bundle,
};
use wacore::messages::MessageUtils;
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;
use waproto::whatsapp::{self as wa, message as m};

use crate::registry::Companion;
use crate::signal::{Identities, Sessions, Trust};
use crate::stanza::child_bytes;

/// A message the phone sent a device: its id and padded plaintext, kept to send again.
#[derive(Clone)]
pub(crate) struct PeerMessage {
    pub(crate) id: String,
    plaintext: Vec<u8>,
}

impl PeerMessage {
    fn new(message: &wa::Message) -> Self {
        Self {
            id: crate::stanza::fresh_id(),
            plaintext: MessageUtils::pad_message_v2(message.encode_to_vec()),
        }
    }
}

/// The phone's last few messages to one device (a retry names one by id), each with
/// how many times the device asked for it again.
#[derive(Default)]
pub(crate) struct Sent(VecDeque<(PeerMessage, u32)>);

const SENT_KEPT: usize = 8;

impl Sent {
    pub(crate) fn push(&mut self, message: PeerMessage) {
        if self.0.len() == SENT_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((message, 0));
    }

    /// The message `id`, and how many times it was asked for, this time included.
    pub(crate) fn retried(&mut self, id: &str) -> Option<(PeerMessage, u32)> {
        let (message, asked) = self.0.iter_mut().find(|(m, _)| m.id == id)?;
        *asked += 1;
        Some((message.clone(), *asked))
    }
}

/// What the phone sends a device after its first login: a fresh app-state key, then
/// an empty initial history sync.
pub(crate) fn welcome(device: u32) -> Vec<PeerMessage> {
    vec![
        PeerMessage::new(&key_share(device)),
        PeerMessage::new(&initial_history_sync()),
    ]
}

/// The device keys a session is opened from.
pub(crate) struct Bundle {
    registration_id: u32,
    identity: [u8; 32],
    signed_prekey_id: u32,
    signed_prekey: [u8; 32],
    signature: Vec<u8>,
    prekey: Option<(u32, [u8; 32])>,
}

impl Bundle {
    /// From what the device registered (and one of its uploaded prekeys, if any).
    pub(crate) fn registered(companion: &Companion, prekey: Option<(u32, [u8; 32])>) -> Self {
        let r = &companion.registration;
        Self {
            registration_id: r.id,
            identity: companion.identity,
            signed_prekey_id: r.signed_prekey_id,
            signed_prekey: r.signed_prekey,
            signature: r.signature.clone(),
            prekey,
        }
    }

    /// From the `<registration>` and `<keys>` of a retry receipt.
    pub(crate) fn from_retry(receipt: &Node) -> Result<Option<Self>, &'static str> {
        let Some(keys) = receipt.get_optional_child("keys") else {
            return Ok(None);
        };
        let id3 = |bytes: &[u8]| {
            <[u8; 3]>::try_from(bytes)
                .ok()
                .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
        };
        let registration_id = child_bytes(receipt, "registration")
            .and_then(|r| <[u8; 4]>::try_from(r).ok())
            .map(u32::from_be_bytes)
            .ok_or("a retry receipt's registration id")?;
        let identity = child_bytes(keys, "identity")
            .and_then(crate::key32)
            .ok_or("a retry receipt's identity key")?;
        let skey = keys
            .get_optional_child("skey")
            .ok_or("a retry receipt without a signed prekey")?;
        let prekey = match keys.get_optional_child("key") {
            Some(key) => Some((
                child_bytes(key, "id")
                    .and_then(id3)
                    .ok_or("a retry receipt's prekey id")?,
                child_bytes(key, "value")
                    .and_then(crate::key32)
                    .ok_or("a retry receipt's prekey")?,
            )),
            None => None,
        };
        Ok(Some(Self {
            registration_id,
            identity,
            signed_prekey_id: child_bytes(skey, "id")
                .and_then(id3)
                .ok_or("a retry receipt's signed prekey id")?,
            signed_prekey: child_bytes(skey, "value")
                .and_then(crate::key32)
                .ok_or("a retry receipt's signed prekey")?,
            signature: child_bytes(skey, "signature")
                .filter(|s| s.len() == 64)
                .ok_or("a retry receipt's prekey signature")?
                .to_vec(),
            prekey,
        }))
    }

    /// A device 0 bundle (a contact's, or the phone's own) from its parts.
    pub(crate) fn primary(
        registration_id: u32,
        identity: [u8; 32],
        signed: (u32, [u8; 32], Vec<u8>),
        prekey: Option<(u32, [u8; 32])>,
    ) -> Self {
        Self {
            registration_id,
            identity,
            signed_prekey_id: signed.0,
            signed_prekey: signed.1,
            signature: signed.2,
            prekey,
        }
    }

    pub(crate) fn identity(&self) -> &[u8; 32] {
        &self.identity
    }

    /// The library's bundle for `device`.
    pub(crate) fn to_signal(&self, device: u32) -> Result<PreKeyBundle, String> {
        let key =
            |bytes: &[u8]| PublicKey::from_djb_public_key_bytes(bytes).map_err(|e| e.to_string());
        let prekey = match self.prekey {
            Some((id, value)) => Some((id.into(), key(&value)?)),
            None => None,
        };
        PreKeyBundle::new(
            self.registration_id,
            DeviceId::from(device),
            prekey,
            self.signed_prekey_id.into(),
            key(&self.signed_prekey)?,
            self.signature.clone(),
            IdentityKey::new(key(&self.identity)?),
        )
        .map_err(|e| e.to_string())
    }
}

/// How the phone seals its messages to one device.
pub(crate) struct Seal<'a> {
    pub(crate) phone: &'a str,
    /// The account's identity key, which is the phone's.
    pub(crate) account: &'a KeyPair,
    pub(crate) registration_id: u32,
    pub(crate) device: u32,
    /// The retry count this resend answers, if it is one.
    pub(crate) retry: Option<u32>,
    /// Flip the last ciphertext byte of the first message (fault injection).
    pub(crate) garble_first: bool,
}

impl Seal<'_> {
    /// `<message>` stanzas from the phone, one per message, all over one new session
    /// opened from `bundle`.
    pub(crate) async fn seal(
        &self,
        bundle: &Bundle,
        messages: &[PeerMessage],
    ) -> Result<Vec<Node>, String> {
        let address = ProtocolAddress::new(self.phone, DeviceId::from(self.device));
        let bundle = bundle.to_signal(self.device)?;
        let mut sessions = Sessions::default();
        let mut identities = Identities::new(
            IdentityKeyPair::from(self.account.clone()),
            self.registration_id,
            Trust::Linked,
        );
        // A generator that may cross the awaits (the thread's own may not).
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
        process_prekey_bundle(
            &address,
            &mut sessions,
            &mut identities,
            &bundle,
            &mut rng,
            UsePQRatchet::No,
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut stanzas = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let sealed =
                message_encrypt(&message.plaintext, &address, &mut sessions, &mut identities)
                    .await
                    .map_err(|e| e.to_string())?;
            let (kind, _, ciphertext) =
                wacore::send::extract_ciphertext(sealed).ok_or("not a Signal message")?;
            let mut ciphertext = ciphertext.into_vec();
            if self.garble_first && i == 0 {
                if let Some(last) = ciphertext.last_mut() {
                    *last ^= 0x01;
                }
            }
            let mut enc = NodeBuilder::new("enc").attrs([("v", "2"), ("type", kind)]);
            if let Some(count) = self.retry {
                enc = enc.attr("count", count.to_string());
            }
            stanzas.push(
                NodeBuilder::new("message")
                    .attrs([
                        ("from", format!("{}@s.whatsapp.net", self.phone)),
                        ("id", message.id.clone()),
                        ("t", crate::unix_secs().to_string()),
                        ("type", "text".to_owned()),
                        ("category", "peer".to_owned()),
                    ])
                    .children([enc.bytes(ciphertext).build()])
                    .build(),
            );
        }
        Ok(stanzas)
    }
}

/// One fresh key for the account's app state, as the phone shares it.
fn key_share(device: u32) -> wa::Message {
    let key = m::AppStateSyncKey {
        key_id: buffa::MessageField::some(m::AppStateSyncKeyId {
            key_id: Some(rand::random::<[u8; 6]>().to_vec()),
        }),
        key_data: buffa::MessageField::some(m::AppStateSyncKeyData {
            key_data: Some(rand::random::<[u8; 32]>().to_vec()),
            fingerprint: buffa::MessageField::some(m::AppStateSyncKeyFingerprint {
                raw_id: Some(rand::random::<u32>() | 1),
                current_index: Some(device),
                device_indexes: vec![0, device],
            }),
            timestamp: Some(crate::unix_secs() as i64 * 1000),
        }),
    };
    wa::Message {
        protocol_message: buffa::MessageField::some(m::ProtocolMessage {
            r#type: Some(m::protocol_message::Type::APP_STATE_SYNC_KEY_SHARE),
            app_state_sync_key_share: buffa::MessageField::some(m::AppStateSyncKeyShare {
                keys: vec![key],
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An initial history sync with nothing in it, inline (no media download), as the
/// phone sends a freshly linked device: the client's cue that the initial sync is done.
fn initial_history_sync() -> wa::Message {
    let history = wa::HistorySync {
        sync_type: wa::history_sync::HistorySyncType::INITIAL_BOOTSTRAP,
        progress: Some(100),
        chunk_order: Some(0),
        ..Default::default()
    };
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zlib.write_all(&history.encode_to_vec())
        .expect("writing to memory");
    let inline = zlib.finish().expect("writing to memory");
    wa::Message {
        protocol_message: buffa::MessageField::some(m::ProtocolMessage {
            r#type: Some(m::protocol_message::Type::HISTORY_SYNC_NOTIFICATION),
            history_sync_notification: buffa::MessageField::some(m::HistorySyncNotification {
                sync_type: Some(m::HistorySyncType::INITIAL_BOOTSTRAP),
                chunk_order: Some(0),
                progress: Some(100),
                initial_hist_bootstrap_inline_payload: Some(inline),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
