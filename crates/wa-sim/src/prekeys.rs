//! The service's store of each device's Signal keys: the one-time prekeys it uploads
//! (`encrypt` set with a `<list>`), its signed prekey and that key's rotations, and
//! the count a device asks for (`<count/>`).

use std::collections::BTreeMap;

use wacore::libsignal::protocol::PublicKey;
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;

use crate::conn::{Connection, Session};
use crate::stanza::{child_bytes, iq_error, iq_result};

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
