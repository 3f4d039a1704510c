//! The service's Noise static key and the certificate chain that vouches for it.
//!
//! Real WhatsApp signs its intermediate certificate with a root key whose public half is
//! compiled into every client. wa-sim cannot own that key, so it mints its own root and
//! signs a real chain with it: root -> intermediate (issuer serial 0) -> leaf (the static
//! key). Everything the client checks besides the root signature holds, which is why a
//! client only needs the root check skipped to accept wa-sim.

use buffa::Message as _;
use wacore::libsignal::protocol::KeyPair;
use waproto::whatsapp::{self as wa, cert_chain::noise_certificate};

/// One year: long enough for any test or benchmark, short enough to look like a real leaf.
const LEAF_LIFETIME_SECS: u64 = 365 * 24 * 3600;

pub(crate) struct ServerIdentity {
    pub(crate) static_key: KeyPair,
    pub(crate) cert_chain: Vec<u8>,
}

impl ServerIdentity {
    /// `forged`: the leaf vouches for another static key than the one the service
    /// uses, which even a client that skips the signature checks refuses.
    pub(crate) fn generate(forged: bool) -> Self {
        let mut rng = rand::rng();
        let root = KeyPair::generate(&mut rng);
        let intermediate = KeyPair::generate(&mut rng);
        let static_key = KeyPair::generate(&mut rng);

        let now = crate::unix_secs();
        // Backdated a day so a client whose clock runs a little behind still accepts it.
        let not_before = now.saturating_sub(24 * 3600);
        let not_after = now + LEAF_LIFETIME_SECS;

        let intermediate_details = noise_certificate::Details {
            serial: Some(1),
            issuer_serial: Some(0),
            key: Some(intermediate.public_key.public_key_bytes().to_vec()),
            not_before: Some(not_before),
            not_after: Some(not_after + 24 * 3600),
        }
        .encode_to_vec();
        let vouched = if forged {
            KeyPair::generate(&mut rng).public_key
        } else {
            static_key.public_key
        };
        let leaf_details = noise_certificate::Details {
            serial: Some(2),
            issuer_serial: Some(1),
            key: Some(vouched.public_key_bytes().to_vec()),
            not_before: Some(not_before),
            not_after: Some(not_after),
        }
        .encode_to_vec();

        let sign = |signer: &KeyPair, details: &[u8]| {
            signer
                .private_key
                .calculate_signature(details, &mut rand::rng())
                .expect("signing with a freshly generated key cannot fail")
                .to_vec()
        };
        let cert_chain = wa::CertChain {
            intermediate: buffa::MessageField::some(wa::cert_chain::NoiseCertificate {
                signature: Some(sign(&root, &intermediate_details)),
                details: Some(intermediate_details),
            }),
            leaf: buffa::MessageField::some(wa::cert_chain::NoiseCertificate {
                signature: Some(sign(&intermediate, &leaf_details)),
                details: Some(leaf_details),
            }),
        }
        .encode_to_vec();

        Self {
            static_key,
            cert_chain,
        }
    }

    pub(crate) fn static_public(&self) -> [u8; 32] {
        crate::key32(self.static_key.public_key.public_key_bytes())
            .expect("X25519 public keys are 32 bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wacore::libsignal::protocol::PublicKey;

    #[test]
    fn the_chain_is_signed_link_by_link_and_ends_at_the_static_key() {
        let identity = ServerIdentity::generate(false);
        let chain = wa::CertChain::decode_from_slice(&identity.cert_chain).unwrap();
        let intermediate = chain.intermediate.into_option().unwrap();
        let leaf = chain.leaf.into_option().unwrap();
        let inter_details =
            noise_certificate::Details::decode_from_slice(intermediate.details.as_deref().unwrap())
                .unwrap();
        let leaf_details =
            noise_certificate::Details::decode_from_slice(leaf.details.as_deref().unwrap())
                .unwrap();

        assert_eq!(inter_details.issuer_serial, Some(0));
        assert_eq!(leaf_details.issuer_serial, inter_details.serial);
        assert_eq!(
            leaf_details.key.as_deref(),
            Some(&identity.static_public()[..])
        );
        let inter_key = PublicKey::from_djb_public_key_bytes(&inter_details.key.unwrap()).unwrap();
        assert!(inter_key.verify_signature(
            leaf.details.as_deref().unwrap(),
            leaf.signature.as_deref().unwrap()
        ));
        let now = crate::unix_secs();
        assert!(leaf_details.not_before.unwrap() < now && now < leaf_details.not_after.unwrap());
    }
}
