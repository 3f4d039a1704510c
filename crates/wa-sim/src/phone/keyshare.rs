//! The phone as the account's primary device in Signal terms: after a device's first
//! login it shares an app-state sync key with it, encrypted over a real Signal session
//! that the phone opens from the device's registration (a `pkmsg`, as WhatsApp's phone
//! sends). Without that share a freshly linked client waits ~10 s for it.

use std::collections::HashMap;

use buffa::Message as _;
use wacore::libsignal::protocol::{
    DeviceId, Direction, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KeyPair,
    PreKeyBundle, ProtocolAddress, PublicKey, SessionRecord, SessionStore, UsePQRatchet,
    message_encrypt, process_prekey_bundle,
};
use wacore::messages::MessageUtils;
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;
use waproto::whatsapp::{self as wa, message as m};

use crate::registry::Companion;

type SignalResult<T> = Result<T, wacore::libsignal::protocol::SignalProtocolError>;

/// `<message>` from the phone to device `device` of `phone`, carrying a fresh app-state
/// sync key share.
pub(crate) async fn key_share(
    phone: &str,
    account: &KeyPair,
    companion: &Companion,
    device: u32,
) -> Result<Node, String> {
    let key = |bytes: &[u8]| PublicKey::from_djb_public_key_bytes(bytes).map_err(|e| e.to_string());
    let address = ProtocolAddress::new(phone, DeviceId::from(device));
    let bundle = PreKeyBundle::new(
        companion.registration.id,
        DeviceId::from(device),
        None,
        companion.registration.signed_prekey_id.into(),
        key(&companion.registration.signed_prekey)?,
        companion.registration.signature.clone(),
        IdentityKey::new(key(&companion.identity)?),
    )
    .map_err(|e| e.to_string())?;
    let mut sessions = Sessions::default();
    let mut identities = Identities {
        own: IdentityKeyPair::from(account.clone()),
        registration_id: 1 + rand::random::<u32>() % 16380,
        known: HashMap::new(),
    };
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
    let plaintext = MessageUtils::pad_message_v2(share_message(device).encode_to_vec());
    let sealed = message_encrypt(&plaintext, &address, &mut sessions, &mut identities)
        .await
        .map_err(|e| e.to_string())?;
    let (kind, _, ciphertext) =
        wacore::send::extract_ciphertext(sealed).ok_or("not a Signal message")?;
    Ok(NodeBuilder::new("message")
        .attrs([
            ("from", format!("{phone}@s.whatsapp.net")),
            ("id", crate::stanza::fresh_id()),
            ("t", crate::unix_secs().to_string()),
            ("type", "text".to_owned()),
            ("category", "peer".to_owned()),
        ])
        .children([NodeBuilder::new("enc")
            .attrs([("v", "2"), ("type", kind)])
            .bytes(ciphertext.into_vec())
            .build()])
        .build())
}

/// One fresh key for the account's app state, as the phone shares it.
fn share_message(device: u32) -> wa::Message {
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

/// The phone's sessions for one share: opened, used once, dropped.
#[derive(Default)]
struct Sessions(HashMap<String, SessionRecord>);

#[async_trait::async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        Ok(self.0.get(address.as_str()).cloned())
    }

    async fn has_session(&self, address: &ProtocolAddress) -> SignalResult<bool> {
        Ok(self.0.contains_key(address.as_str()))
    }

    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: SessionRecord,
    ) -> SignalResult<()> {
        self.0.insert(address.as_str().to_owned(), record);
        Ok(())
    }
}

/// The phone's identity (the account key) and the device identities it has seen.
struct Identities {
    own: IdentityKeyPair,
    registration_id: u32,
    known: HashMap<String, IdentityKey>,
}

#[async_trait::async_trait]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        Ok(self.own.clone())
    }

    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.registration_id)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SignalResult<IdentityChange> {
        let previous = self.known.insert(address.as_str().to_owned(), *identity);
        Ok(match previous {
            Some(old) if old != *identity => IdentityChange::ReplacedExisting,
            _ => IdentityChange::NewOrUnchanged,
        })
    }

    /// The phone linked this device itself: its identity is the one it registered.
    async fn is_trusted_identity(
        &self,
        _address: &ProtocolAddress,
        _identity: &IdentityKey,
        _direction: Direction,
    ) -> SignalResult<bool> {
        Ok(true)
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.known.get(address.as_str()).copied())
    }
}
