//! The service's store of each device's Signal keys: the one-time prekeys it uploads
//! (`encrypt` set with a `<list>`), its signed prekey and that key's rotations; the
//! count (`<count/>`) and digest (`<digest/>`) a device asks for its own keys; and
//! the prekey bundles (`<key>`) a device fetches to open a session with another one.

use std::collections::BTreeMap;

use wacore::libsignal::protocol::PublicKey;
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;

use wacore_binary::Jid;

use crate::conn::{Connection, Session};
use crate::registry::{DeviceRecord, Phone};
use crate::stanza::{attr, child_bytes, iq_error, iq_result};

/// A device's one-time prekeys, by id.
pub(crate) type PreKeys = BTreeMap<u32, [u8; 32]>;

/// At most this many prekeys are kept per device (a client uploads 812); the oldest
/// ids go first, so repeated uploads never grow the service without bound.
const MAX_PREKEYS: usize = 1024;

/// A 3-byte big-endian key id, as WhatsApp writes them.
fn key_id(bytes: &[u8]) -> Option<u32> {
    <[u8; 3]>::try_from(bytes)
        .ok()
        .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
}

/// `<skey><id/><value/><signature/></skey>`, checked against the device's identity:
/// its id, key and signature.
fn signed_prekey(
    skey: &Node,
    identity: &[u8; 32],
) -> Result<(u32, [u8; 32], Vec<u8>), &'static str> {
    let id = child_bytes(skey, "id")
        .and_then(key_id)
        .ok_or("signed prekey id")?;
    let value = child_bytes(skey, "value")
        .and_then(crate::key32)
        .ok_or("signed prekey")?;
    let signature = child_bytes(skey, "signature")
        .filter(|s| s.len() == 64)
        .ok_or("signed prekey signature")?;
    let signer = PublicKey::from_djb_public_key_bytes(identity).map_err(|_| "identity key")?;
    if !signer.verify_signature(&[&[5u8][..], &value].concat(), signature) {
        return Err("the signed prekey's signature does not verify");
    }
    Ok((id, value, signature.to_vec()))
}

/// A device uploads prekeys (and its current signed prekey) or rotates its signed
/// prekey. Only a logged-in device may, for itself, with the identity and registration
/// id it registered. The stanza is read before the registry is locked.
pub(crate) fn upload(conn: &Connection, iq: &Node) -> Node {
    let Session::Device { phone, device } = &conn.session else {
        return iq_error(iq, 401, "not-authorized");
    };
    let refuse = |why: &str| {
        tracing::warn!(phone, device, why, "refused a prekey upload");
        iq_error(iq, 400, "bad-request")
    };
    let mut fresh = PreKeys::new();
    for key in iq
        .get_optional_child("list")
        .into_iter()
        .flat_map(|list| list.get_children_by_tag("key"))
    {
        let id = child_bytes(key, "id").and_then(key_id);
        let value = child_bytes(key, "value").and_then(crate::key32);
        match (id, value) {
            (Some(id), Some(value)) => {
                fresh.insert(id, value);
            }
            _ => return refuse("a prekey without a 3-byte id and a 32-byte key"),
        }
    }
    let uploading = iq.get_optional_child("list").is_some();
    if uploading && child_bytes(iq, "type") != Some(&[5][..]) {
        return refuse("key type is not Curve25519");
    }
    let skey = iq.get_optional_child("skey").or_else(|| {
        iq.get_optional_child("rotate")
            .and_then(|r| r.get_optional_child("skey"))
    });
    let Some((identity, registration_id)) = conn
        .sim
        .registry()
        .phones
        .get(phone)
        .and_then(|p| p.devices.get(device))
        .map(|d| (d.companion.identity, d.companion.registration.id))
    else {
        return iq_error(iq, 401, "not-authorized");
    };
    if uploading {
        if child_bytes(iq, "identity") != Some(&identity[..]) {
            return refuse("not the identity the device registered");
        }
        let registration = child_bytes(iq, "registration")
            .and_then(|r| <[u8; 4]>::try_from(r).ok())
            .map(u32::from_be_bytes);
        if registration != Some(registration_id) {
            return refuse("not the registration id the device registered");
        }
    }
    let signed = match skey.map(|skey| signed_prekey(skey, &identity)).transpose() {
        Ok(signed) => signed,
        Err(why) => return refuse(why),
    };
    let mut registry = conn.sim.registry();
    let Some(record) = registry
        .phones
        .get_mut(phone)
        .and_then(|p| p.devices.get_mut(device))
    else {
        return iq_error(iq, 401, "not-authorized");
    };
    if let Some((id, value, signature)) = signed {
        let registration = &mut record.companion.registration;
        registration.signed_prekey_id = id;
        registration.signed_prekey = value;
        registration.signature = signature;
    }
    record.prekeys.extend(fresh);
    while record.prekeys.len() > MAX_PREKEYS {
        record.prekeys.pop_first();
    }
    iq_result(iq).build()
}

/// How many one-time prekeys the service holds for the asking device.
pub(crate) fn count(conn: &Connection, iq: &Node) -> Node {
    let Session::Device { phone, device } = &conn.session else {
        return iq_error(iq, 401, "not-authorized");
    };
    let held = conn
        .sim
        .registry()
        .phones
        .get(phone)
        .and_then(|p| p.devices.get(device))
        .map_or(0, |d| d.prekeys.len());
    iq_result(iq)
        .children([NodeBuilder::new("count")
            .attr("value", held.to_string())
            .build()])
        .build()
}

/// 3 bytes, big-endian, as WhatsApp writes key ids.
fn id3(id: u32) -> Vec<u8> {
    id.to_be_bytes()[1..].to_vec()
}

fn leaf(tag: &'static str, bytes: Vec<u8>) -> Node {
    NodeBuilder::new(tag).bytes(bytes).build()
}

fn skey_node(id: u32, value: &[u8], signature: &[u8]) -> Node {
    NodeBuilder::new("skey")
        .children([
            leaf("id", id3(id)),
            leaf("value", value.to_vec()),
            leaf("signature", signature.to_vec()),
        ])
        .build()
}

/// SHA-1 over the identity key, the signed prekey and its signature, then each listed
/// one-time prekey in order: the digest a device compares with its own keys.
fn key_digest(record: &DeviceRecord) -> Vec<u8> {
    use sha1::Digest as _;
    let registration = &record.companion.registration;
    let mut hash = sha1::Sha1::new();
    hash.update(record.companion.identity);
    hash.update(registration.signed_prekey);
    hash.update(&registration.signature);
    for key in record.prekeys.values() {
        hash.update(key);
    }
    hash.finalize().to_vec()
}

/// What the service holds of the asking device's keys, and their digest; 404 when it
/// holds no prekeys for it (the device then uploads them again).
pub(crate) fn digest(conn: &Connection, iq: &Node) -> Node {
    let Session::Device { phone, device } = &conn.session else {
        return iq_error(iq, 401, "not-authorized");
    };
    let registry = conn.sim.registry();
    let Some(record) = registry
        .phones
        .get(phone)
        .and_then(|p| p.devices.get(device))
        .filter(|d| !d.prekeys.is_empty())
    else {
        return iq_error(iq, 404, "item-not-found");
    };
    let registration = &record.companion.registration;
    let list = record.prekeys.keys().map(|&id| leaf("id", id3(id)));
    let digest = NodeBuilder::new("digest")
        .children([
            leaf("type", vec![5]),
            leaf("registration", registration.id.to_be_bytes().to_vec()),
            leaf("identity", record.companion.identity.to_vec()),
            skey_node(
                registration.signed_prekey_id,
                &registration.signed_prekey,
                &registration.signature,
            ),
            NodeBuilder::new("list").children(list).build(),
            leaf("hash", key_digest(record)),
        ])
        .build();
    iq_result(iq).children([digest]).build()
}

/// Prekey bundles for the devices asked (`<key><user jid/>...</key>`), each with one
/// of the device's one-time prekeys, which it hands out only once, and, for a companion,
/// the device identity the phone signed. A device the account does not have gets a
/// 406 for that user, as WhatsApp answers.
pub(crate) fn bundles(conn: &Connection, iq: &Node, key: &Node) -> Node {
    if !matches!(conn.session, Session::Device { .. }) {
        return iq_error(iq, 401, "not-authorized");
    }
    let asked: Vec<String> = key
        .get_children_by_tag("user")
        .filter_map(|user| attr(user, "jid"))
        .collect();
    let mut registry = conn.sim.registry();
    let users = asked
        .into_iter()
        .map(|jid| {
            let found = jid.parse::<Jid>().ok().and_then(|parsed| {
                let (number, device) = registry.resolve(&parsed)?;
                if let Some(contact) = registry.contacts.get_mut(&number) {
                    return (device == 0).then(|| contact_bundle(contact));
                }
                bundle(registry.phones.get_mut(&number)?, device)
            });
            let user = NodeBuilder::new("user").attr("jid", jid);
            match found {
                Some(children) => user.children(children).build(),
                None => user
                    .children([NodeBuilder::new("error")
                        .attrs([("code", "406"), ("text", "not-acceptable")])
                        .build()])
                    .build(),
            }
        })
        .collect::<Vec<_>>();
    drop(registry);
    iq_result(iq)
        .children([NodeBuilder::new("list").children(users).build()])
        .build()
}

/// A contact's bundle (device 0), with one of its one-time prekeys while it has any.
fn contact_bundle(contact: &mut crate::contact::ContactEntry) -> Vec<Node> {
    let mut children = vec![
        leaf(
            "registration",
            contact.registration_id.to_be_bytes().to_vec(),
        ),
        leaf("type", vec![5]),
        leaf("identity", contact.identity.to_vec()),
        skey_node(contact.signed.0, &contact.signed.1, &contact.signed.2),
    ];
    if let Some((id, value)) = contact.prekeys.pop_first() {
        children.push(
            NodeBuilder::new("key")
                .children([leaf("id", id3(id)), leaf("value", value.to_vec())])
                .build(),
        );
    }
    children
}

/// One device's bundle: the phone's own (device 0) or a companion's.
fn bundle(account: &mut Phone, device: u32) -> Option<Vec<Node>> {
    if device == 0 {
        let primary = &account.primary;
        return Some(vec![
            leaf(
                "registration",
                primary.registration_id.to_be_bytes().to_vec(),
            ),
            leaf("type", vec![5]),
            leaf(
                "identity",
                account.identity.public_key.public_key_bytes().to_vec(),
            ),
            skey_node(
                primary.signed_prekey_id,
                primary.signed_prekey.public_key.public_key_bytes(),
                &primary.signature,
            ),
        ]);
    }
    let record = account.devices.get_mut(&device)?;
    let registration = &record.companion.registration;
    let mut children = vec![
        leaf("registration", registration.id.to_be_bytes().to_vec()),
        leaf("type", vec![5]),
        leaf("identity", record.companion.identity.to_vec()),
        skey_node(
            registration.signed_prekey_id,
            &registration.signed_prekey,
            &registration.signature,
        ),
    ];
    if let Some((id, value)) = record.prekeys.pop_first() {
        children.push(
            NodeBuilder::new("key")
                .children([leaf("id", id3(id)), leaf("value", value.to_vec())])
                .build(),
        );
    }
    children.push(leaf("device-identity", record.signed_identity.clone()));
    Some(children)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our digest is the one the client computes over the same keys (its own code).
    #[test]
    fn the_digest_matches_the_clients_computation() {
        let mut prekeys = PreKeys::new();
        for id in [3u32, 1, 2] {
            prekeys.insert(id, [id as u8; 32]);
        }
        let record = DeviceRecord {
            companion: crate::registry::Companion {
                noise: [0; 32],
                identity: [1; 32],
                platform: String::new(),
                registration: crate::registry::Registration {
                    id: 7,
                    signed_prekey_id: 1,
                    signed_prekey: [2; 32],
                    signature: vec![3; 64],
                },
            },
            signed_identity: Vec::new(),
            linked_at_ms: 0,
            key_share_id: None,
            key_share_received: false,
            logins: Default::default(),
            prekeys,
            sent: Default::default(),
        };
        let keys = [[1u8; 32], [2; 32], [3; 32]];
        let ordered: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        let theirs =
            wacore::prekeys::compute_key_bundle_digest(&[1; 32], &[2; 32], &[3; 64], &ordered);
        assert_eq!(key_digest(&record), theirs);
    }
}
