//! In-memory Signal stores for the service's own peers (the phone, contacts): sessions,
//! the identities seen, one-time and signed prekeys with their private halves.

use std::collections::HashMap;

use wacore::libsignal::protocol::{
    Direction, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, PreKeyId,
    PreKeyRecord, PreKeyStore, ProtocolAddress, SessionRecord, SessionStore, SignalProtocolError,
    SignedPreKeyId, SignedPreKeyRecord, SignedPreKeyStore,
};

pub(crate) type SignalResult<T> = Result<T, SignalProtocolError>;

/// Sessions by remote address.
#[derive(Default)]
pub(crate) struct Sessions(HashMap<String, SessionRecord>);

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

/// Whom a peer trusts.
#[derive(Clone, Copy)]
pub(crate) enum Trust {
    /// Everyone: the phone linked its devices itself and knows their identities.
    Linked,
    /// The first identity seen for an address, and only that one.
    FirstUse,
}

/// The peer's own identity and the identities it has seen.
pub(crate) struct Identities {
    pub(crate) own: IdentityKeyPair,
    pub(crate) registration_id: u32,
    pub(crate) trust: Trust,
    known: HashMap<String, IdentityKey>,
}

impl Identities {
    pub(crate) fn new(own: IdentityKeyPair, registration_id: u32, trust: Trust) -> Self {
        Self {
            own,
            registration_id,
            trust,
            known: HashMap::new(),
        }
    }

    /// Forgets what `address` used to be (a device that reinstalled or re-registered
    /// and said so in a retry receipt).
    pub(crate) fn forget(&mut self, address: &ProtocolAddress) {
        self.known.remove(address.as_str());
    }
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

    async fn is_trusted_identity(
        &self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
        _direction: Direction,
    ) -> SignalResult<bool> {
        Ok(match self.trust {
            Trust::Linked => true,
            Trust::FirstUse => self
                .known
                .get(address.as_str())
                .is_none_or(|known| known == identity),
        })
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.known.get(address.as_str()).copied())
    }
}

/// One-time prekeys with their private halves, by id.
#[derive(Default)]
pub(crate) struct PreKeys(HashMap<u32, PreKeyRecord>);

impl PreKeys {
    pub(crate) fn insert(&mut self, id: u32, record: PreKeyRecord) {
        self.0.insert(id, record);
    }
}

#[async_trait::async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        self.0
            .get(&u32::from(id))
            .cloned()
            .ok_or(SignalProtocolError::InvalidPreKeyId)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.0.insert(id.into(), record.clone());
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        self.0.remove(&u32::from(id));
        Ok(())
    }
}

/// Signed prekeys with their private halves, by id.
#[derive(Default)]
pub(crate) struct SignedPreKeys(HashMap<u32, SignedPreKeyRecord>);

impl SignedPreKeys {
    pub(crate) fn insert(&mut self, id: u32, record: SignedPreKeyRecord) {
        self.0.insert(id, record);
    }
}

#[async_trait::async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        self.0
            .get(&u32::from(id))
            .cloned()
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }

    async fn save_signed_pre_key(
        &mut self,
        id: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> SignalResult<()> {
        self.0.insert(id.into(), record.clone());
        Ok(())
    }
}
