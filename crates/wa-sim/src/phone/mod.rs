//! The simulated phone: the primary device that links companions, by scanning a QR code
//! or by the user typing a pairing code, with the same cryptography as WhatsApp's phone.

mod code;
mod peer;
mod qr;

pub(crate) use code::{companion_finish, companion_hello, enter_code};
pub(crate) use peer::{Bundle, Seal, Sent, welcome};
pub(crate) use qr::scan;

use std::sync::Arc;

use buffa::Message as _;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::timeout;
use wacore::libsignal::crypto::hmac_sha256;
use wacore::libsignal::protocol::PublicKey;
use wacore_binary::builder::NodeBuilder;
use wacore_binary::{Jid, Node};
use waproto::whatsapp::{self as wa, ADVEncryptionType};

use crate::conn::ANSWER_TIMEOUT;
use crate::registry::{Command, Companion, ConnId, DeviceRecord, Role};
use crate::sim::{Sim, bump};
use crate::stanza::{self, attr};

/// The name the account's owner chose, as the phone shows it to contacts.
pub(crate) fn push_name(phone: &str) -> String {
    format!("wa-sim {phone}")
}

const ADV_ACCOUNT_SIGNATURE_PREFIX: [u8; 2] = [6, 0];
const ADV_DEVICE_SIGNATURE_PREFIX: [u8; 2] = [6, 1];

#[derive(Debug, thiserror::Error)]
pub(crate) enum PhoneError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The companion or the code said no: nothing was linked.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Timeout(String),
}

use PhoneError::*;

/// A companion the phone just linked.
#[derive(Debug, Serialize)]
pub(crate) struct Linked {
    jid: String,
    phone: String,
    lid: String,
    device: u32,
}

/// Digits only, 7 to 15 of them, no leading zero: a number with its country code.
pub(crate) fn valid_phone(phone: &str) -> Result<String, PhoneError> {
    let ok = (7..=15).contains(&phone.len())
        && phone.bytes().all(|b| b.is_ascii_digit())
        && !phone.starts_with('0');
    if ok {
        Ok(phone.to_owned())
    } else {
        Err(BadRequest(format!(
            "phone must be 7 to 15 digits with the country code and no leading zero, got {phone:?}"
        )))
    }
}

/// Sends `pair-success` signed by the phone's account key and HMAC'd with the shared ADV
/// secret, checks the companion's own signature in its answer, and on success records the
/// device and restarts the stream (515) so the companion logs in.
pub(super) async fn complete_pairing(
    sim: &Arc<Sim>,
    conn: ConnId,
    tx: tokio::sync::mpsc::Sender<Command>,
    phone: &str,
    companion: Companion,
    adv_secret: [u8; 32],
) -> Result<Linked, PhoneError> {
    let (account, device, lid, raw_id) = {
        let mut registry = sim.registry();
        let account = registry.phone_mut(phone);
        (
            account.identity.clone(),
            account.allocate_device(),
            account.lid.clone(),
            account.adv_raw_id,
        )
    };
    let details = wa::ADVDeviceIdentity {
        raw_id: Some(raw_id),
        timestamp: Some(crate::unix_secs()),
        key_index: Some(device),
        account_type: Some(ADVEncryptionType::E2EE),
        device_type: Some(ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    let account_key = account.public_key.public_key_bytes().to_vec();
    let account_signature = account
        .private_key
        .calculate_signature(
            &[
                &ADV_ACCOUNT_SIGNATURE_PREFIX[..],
                &details,
                &companion.identity,
            ]
            .concat(),
            &mut rand::rng(),
        )
        .map_err(|_| Refused("the phone could not sign".into()))?;
    let mut identity = wa::ADVSignedDeviceIdentity {
        details: Some(details.clone()),
        account_signature_key: Some(account_key.clone()),
        account_signature: Some(account_signature.to_vec()),
        device_signature: None,
    };
    let signed = identity.encode_to_vec();
    let container = wa::ADVSignedDeviceIdentityHMAC {
        hmac: Some(hmac_sha256(&adv_secret, &signed).to_vec()),
        details: Some(signed),
        account_type: Some(ADVEncryptionType::E2EE),
    }
    .encode_to_vec();

    let jid: Jid = format!("{phone}:{device}@s.whatsapp.net")
        .parse()
        .map_err(|_| BadRequest("bad phone".into()))?;
    let lid_jid: Jid = format!("{lid}:{device}@lid")
        .parse()
        .map_err(|_| BadRequest("bad lid".into()))?;
    let success = NodeBuilder::new("pair-success")
        .children([
            NodeBuilder::new("device-identity").bytes(container).build(),
            NodeBuilder::new("device")
                .attrs([("jid", jid.clone()), ("lid", lid_jid)])
                .build(),
            NodeBuilder::new("platform").attr("name", "android").build(),
        ])
        .build();
    let (answer_tx, answer_rx) = oneshot::channel();
    let gone = || Conflict("the device disconnected before it answered".into());
    tx.send(Command::Request(
        stanza::server_iq(&stanza::fresh_id(), "md", success),
        answer_tx,
    ))
    .await
    .map_err(|_| gone())?;
    let answer = match timeout(ANSWER_TIMEOUT, answer_rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => return Err(gone()),
        Err(_) => return Err(Timeout("the device did not answer pair-success".into())),
    };
    if attr(&answer, "type").as_deref() != Some("result") {
        let reason = answer
            .get_optional_child("error")
            .and_then(|e| attr(e, "text"))
            .unwrap_or_else(|| "no reason given".into());
        return Err(Refused(format!("the device refused the pairing: {reason}")));
    }
    let device_signature =
        check_device_signature(&answer, &details, &account_key, &companion.identity)
            .map_err(|e| Refused(e.into()))?;
    identity.device_signature = Some(device_signature);

    {
        let mut registry = sim.registry();
        let account = registry.phone_mut(phone);
        account.devices.insert(
            device,
            DeviceRecord {
                companion,
                signed_identity: identity.encode_to_vec(),
                linked_at_ms: crate::unix_millis(),
                key_share_id: None,
                key_share_received: false,
                prekeys: Default::default(),
                sent: Default::default(),
                logins: Default::default(),
            },
        );
        account.devices_changed();
    }
    bump(&sim.stats.pairings, 1);
    crate::devices::announce(sim, phone);
    let _ = tx
        .send(Command::StreamError(stanza::stream_error_code(515)))
        .await;
    tracing::info!(conn.id = conn, phone, device, "device linked");
    Ok(Linked {
        jid: jid.to_string(),
        phone: phone.to_owned(),
        lid,
        device,
    })
}

/// The companion's `pair-device-sign`: our details and account key, plus its own
/// signature over them with the identity key it registered. Returns that signature.
fn check_device_signature(
    answer: &Node,
    details: &[u8],
    account_key: &[u8],
    companion_identity: &[u8; 32],
) -> Result<Vec<u8>, &'static str> {
    let bytes = answer
        .get_optional_child_by_tag(&["pair-device-sign", "device-identity"])
        .and_then(stanza::bytes)
        .ok_or("the device's answer holds no device identity")?;
    let signed = wa::ADVSignedDeviceIdentity::decode_from_slice(bytes)
        .map_err(|_| "the device identity is malformed")?;
    if signed.details.as_deref() != Some(details) {
        return Err("the device signed other details than the phone sent");
    }
    // WhatsApp's own companions (and whatsmeow, Baileys) leave the account key out of
    // their answer; it is the phone's own either way, and one that differs is refused.
    if signed
        .account_signature_key
        .as_deref()
        .is_some_and(|key| key != account_key)
    {
        return Err("the device answered with another account key than the phone's");
    }
    let signature = signed
        .device_signature
        .as_deref()
        .ok_or("the device did not sign")?;
    let message = [
        &ADV_DEVICE_SIGNATURE_PREFIX[..],
        details,
        companion_identity,
        account_key,
    ]
    .concat();
    let key =
        PublicKey::from_djb_public_key_bytes(companion_identity).map_err(|_| "bad identity key")?;
    if key.verify_signature(&message, signature) {
        Ok(signature.to_vec())
    } else {
        Err("the device's signature does not verify")
    }
}

/// A failed pairing leaves the companion free to try again.
pub(super) fn release(sim: &Sim, conn: ConnId) {
    if let Some(Role::Linking(l)) = sim.registry().conns.get_mut(&conn).map(|c| &mut c.role) {
        l.pairing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wacore::libsignal::protocol::KeyPair;

    /// A companion's `pair-device-sign` answer, signed as a real companion signs it.
    fn answer(details: &[u8], account_key: &[u8], sent_key: Option<&[u8]>, me: &KeyPair) -> Node {
        let identity = me.public_key.public_key_bytes();
        let message = [
            &ADV_DEVICE_SIGNATURE_PREFIX[..],
            details,
            identity,
            account_key,
        ]
        .concat();
        let signature = me
            .private_key
            .calculate_signature(&message, &mut rand::rng())
            .unwrap();
        let signed = wa::ADVSignedDeviceIdentity {
            details: Some(details.to_vec()),
            account_signature_key: sent_key.map(<[u8]>::to_vec),
            device_signature: Some(signature.to_vec()),
            ..Default::default()
        }
        .encode_to_vec();
        NodeBuilder::new("iq")
            .children([NodeBuilder::new("pair-device-sign")
                .children([NodeBuilder::new("device-identity").bytes(signed).build()])
                .build()])
            .build()
    }

    #[test]
    fn a_companion_may_leave_the_account_key_out_but_not_change_it() {
        let me = KeyPair::generate(&mut rand::rng());
        let identity = crate::key32(me.public_key.public_key_bytes()).unwrap();
        let (details, account_key) = (b"details".as_slice(), [7u8; 32]);
        let check = |sent: Option<&[u8]>| {
            check_device_signature(
                &answer(details, &account_key, sent, &me),
                details,
                &account_key,
                &identity,
            )
        };
        assert!(check(Some(&account_key)).is_ok());
        assert!(check(None).is_ok(), "as WhatsApp's own companions answer");
        assert_eq!(
            check(Some(&[8u8; 32])),
            Err("the device answered with another account key than the phone's")
        );
        // A signature over other bytes is still refused.
        let forged = answer(details, &[9u8; 32], None, &me);
        assert_eq!(
            check_device_signature(&forged, details, &account_key, &identity),
            Err("the device's signature does not verify")
        );
    }
}
