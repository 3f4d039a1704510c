//! Pairing by phone-number code: the companion asks for a code (stage 1), the user types
//! it on the phone (stage 2), the companion sends its key bundle (stage 3).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::timeout;
use wacore::libsignal::crypto::aes_256_gcm_decrypt;
use wacore::libsignal::protocol::{KeyPair, PublicKey};
use wacore::pair_code::PairCodeUtils;
use wacore_binary::builder::NodeBuilder;
use wacore_binary::{Jid, Node, SERVER_JID};

use crate::conn::ANSWER_TIMEOUT;
use crate::registry::{
    CodeAttempt, CodeRequest, Command, Companion, CompanionFinish, ConnId, Role,
};
use crate::sim::Sim;
use crate::stanza::{self, attr, child_bytes};

use super::PhoneError::{self, *};
use super::{Linked, complete_pairing, release, valid_phone};

/// WhatsApp's limit on how long a pairing code stays usable.
const CODE_VALIDITY: Duration = Duration::from_secs(180);

/// Stage 1 of pairing by code, on the companion's connection: remember its wrapped
/// ephemeral key until the user types the code on `phone`. Returns the pairing ref.
pub(crate) fn companion_hello(
    sim: &Sim,
    conn: ConnId,
    request: &Node,
) -> Result<Vec<u8>, (u16, &'static str)> {
    const BAD: (u16, &str) = (400, "bad-request");
    let phone = attr(request, "jid")
        .and_then(|j| j.parse::<Jid>().ok())
        .and_then(|j| valid_phone(&j.user).ok())
        .ok_or(BAD)?;
    let wrapped = child_bytes(request, "link_code_pairing_wrapped_companion_ephemeral_pub")
        .filter(|w| w.len() == 80)
        .ok_or(BAD)?;
    let auth_key = child_bytes(request, "companion_server_auth_key_pub").ok_or(BAD)?;
    let mut registry = sim.registry();
    match registry.conns.get_mut(&conn).map(|c| &mut c.role) {
        Some(Role::Linking(l)) if l.companion.noise[..] == *auth_key => {
            l.code_phone = Some(phone.clone());
        }
        _ => return Err((401, "not-authorized")),
    }
    let pairing_ref = crate::fresh_refs(1).remove(0).into_bytes();
    registry.phone_mut(&phone).code_request = Some(CodeRequest {
        conn,
        pairing_ref: pairing_ref.clone(),
        wrapped_companion_ephemeral: wrapped.to_vec(),
        created: std::time::Instant::now(),
        attempt: None,
    });
    Ok(pairing_ref)
}

/// Stage 3: the companion's key bundle, handed to the phone that is waiting for it.
pub(crate) fn companion_finish(
    sim: &Sim,
    conn: ConnId,
    request: &Node,
) -> Result<(), (u16, &'static str)> {
    const BAD: (u16, &str) = (400, "bad-request");
    let bundle = child_bytes(request, "link_code_pairing_wrapped_key_bundle").ok_or(BAD)?;
    let identity = child_bytes(request, "companion_identity_public").ok_or(BAD)?;
    let pairing_ref = child_bytes(request, "link_code_pairing_ref").ok_or(BAD)?;
    let mut registry = sim.registry();
    let waiting = registry
        .phones
        .values_mut()
        .filter_map(|p| p.code_request.as_mut())
        .find(|r| r.conn == conn && r.pairing_ref == pairing_ref)
        .ok_or((404, "item-not-found"))?;
    let attempt = waiting.attempt.take().ok_or(BAD)?;
    let _ = attempt.finish.send(CompanionFinish {
        wrapped_key_bundle: bundle.to_vec(),
        companion_identity: identity.to_vec(),
    });
    Ok(())
}

/// The user types `code` on `phone` (stage 2), and the phone completes the link once the
/// companion's key bundle opens with it.
pub(crate) async fn enter_code(
    sim: &Arc<Sim>,
    phone: &str,
    code: &str,
) -> Result<Linked, PhoneError> {
    let phone = valid_phone(phone)?;
    let code: String = code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if !PairCodeUtils::validate_code(&code) {
        return Err(BadRequest(
            "a pairing code is 8 letters and digits, like ABCD-EFGH".into(),
        ));
    }
    let (conn, tx, companion, wrapped, pairing_ref, phone_identity) = {
        let mut registry = sim.registry();
        let Some(account) = registry.phones.get(&phone) else {
            return Err(NotFound(
                "no device is waiting for a code for this phone".into(),
            ));
        };
        let phone_identity = account.identity.clone();
        let request = account
            .code_request
            .as_ref()
            .filter(|r| r.created.elapsed() <= CODE_VALIDITY)
            .ok_or_else(|| NotFound("no device is waiting for a code for this phone".into()))?;
        if request.attempt.is_some() {
            return Err(Conflict(
                "a code is already being checked for this phone".into(),
            ));
        }
        let (conn, wrapped, pairing_ref) = (
            request.conn,
            request.wrapped_companion_ephemeral.clone(),
            request.pairing_ref.clone(),
        );
        let entry = registry
            .conns
            .get_mut(&conn)
            .ok_or_else(|| NotFound("the device that asked for a code is gone".into()))?;
        let Role::Linking(linking) = &mut entry.role else {
            return Err(NotFound("the device that asked for a code is gone".into()));
        };
        if linking.pairing {
            return Err(Conflict("this device is already being linked".into()));
        }
        (
            conn,
            entry.tx.clone(),
            linking.companion.clone(),
            wrapped,
            pairing_ref,
            phone_identity,
        )
    };

    // Both directions run PBKDF2 with 131,072 rounds: keep it off the async workers.
    let typed = code.clone();
    let (companion_ephemeral, primary_ephemeral, wrapped_primary) =
        tokio::task::spawn_blocking(move || {
            // The wrapping is symmetric: the phone unwraps the companion's key as the
            // companion later unwraps the phone's. A mistyped code yields a wrong key here.
            let companion_ephemeral =
                PairCodeUtils::decrypt_primary_ephemeral_pub(&wrapped, &typed).ok()?;
            let primary = KeyPair::generate(&mut rand::rng());
            let wrapped_primary = PairCodeUtils::encrypt_ephemeral_pub(
                &crate::key32(primary.public_key.public_key_bytes())?,
                &typed,
            );
            Some((companion_ephemeral, primary, wrapped_primary))
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BadRequest("the device's wrapped key is malformed".into()))?;

    let (finish_tx, finish_rx) = oneshot::channel();
    arm_attempt(sim, &phone, &pairing_ref, finish_tx)?;
    let hello = primary_hello(
        &pairing_ref,
        &wrapped_primary,
        phone_identity.public_key.public_key_bytes(),
    );
    if tx.send(Command::Send(hello)).await.is_err() {
        return Err(NotFound("the device that asked for a code is gone".into()));
    }
    let finish = match timeout(2 * ANSWER_TIMEOUT, finish_rx).await {
        Ok(Ok(finish)) => finish,
        _ => {
            disarm_attempt(sim, &phone);
            return Err(Timeout(
                "the device did not answer the phone's hello".into(),
            ));
        }
    };
    let adv_secret = open_key_bundle(
        &finish,
        &companion,
        &companion_ephemeral,
        &primary_ephemeral,
        &phone_identity,
    )
    .map_err(|e| Refused(e.into()))?;
    {
        let mut registry = sim.registry();
        match registry.conns.get_mut(&conn).map(|c| &mut c.role) {
            Some(Role::Linking(l)) if !l.pairing => l.pairing = true,
            _ => {
                return Err(Conflict(
                    "the device is gone or already being linked".into(),
                ));
            }
        }
    }
    let linked = complete_pairing(sim, conn, tx, &phone, companion, adv_secret).await;
    match &linked {
        Ok(_) => {
            if let Some(account) = sim.registry().phones.get_mut(&phone) {
                account.code_request = None;
            }
        }
        Err(_) => release(sim, conn),
    }
    linked
}

fn arm_attempt(
    sim: &Sim,
    phone: &str,
    pairing_ref: &[u8],
    finish: oneshot::Sender<CompanionFinish>,
) -> Result<(), PhoneError> {
    let mut registry = sim.registry();
    let request = registry
        .phones
        .get_mut(phone)
        .and_then(|p| p.code_request.as_mut())
        .filter(|r| r.pairing_ref == pairing_ref && r.attempt.is_none())
        .ok_or_else(|| Conflict("the code request changed while the code was checked".into()))?;
    request.attempt = Some(CodeAttempt { finish });
    Ok(())
}

fn disarm_attempt(sim: &Sim, phone: &str) {
    if let Some(request) = sim
        .registry()
        .phones
        .get_mut(phone)
        .and_then(|p| p.code_request.as_mut())
    {
        request.attempt = None;
    }
}

fn primary_hello(pairing_ref: &[u8], wrapped_primary: &[u8; 80], primary_identity: &[u8]) -> Node {
    let stage = NodeBuilder::new("link_code_companion_reg")
        .attr("stage", "primary_hello")
        .children([
            NodeBuilder::new("link_code_pairing_wrapped_primary_ephemeral_pub")
                .bytes(wrapped_primary.to_vec())
                .build(),
            NodeBuilder::new("primary_identity_pub")
                .bytes(primary_identity.to_vec())
                .build(),
            NodeBuilder::new("link_code_pairing_ref")
                .bytes(pairing_ref.to_vec())
                .build(),
        ])
        .build();
    NodeBuilder::new("notification")
        .attrs([
            ("from", SERVER_JID.to_owned()),
            ("type", "link_code_companion_reg".to_owned()),
            ("id", stanza::fresh_id()),
            ("t", crate::unix_secs().to_string()),
        ])
        .children([stage])
        .build()
}

/// Opens the companion's key bundle and derives the ADV secret both sides now share.
/// Fails when the code typed on the phone was not the companion's.
fn open_key_bundle(
    finish: &CompanionFinish,
    companion: &Companion,
    companion_ephemeral: &[u8; 32],
    primary_ephemeral: &KeyPair,
    phone_identity: &KeyPair,
) -> Result<[u8; 32], &'static str> {
    const MISMATCH: &str = "the code typed on the phone is not the code the device shows";
    let bundle = &finish.wrapped_key_bundle;
    if bundle.len() != 32 + 12 + 96 + 16 {
        return Err("the device's key bundle is malformed");
    }
    let companion_ephemeral =
        PublicKey::from_djb_public_key_bytes(companion_ephemeral).map_err(|_| MISMATCH)?;
    let ephemeral_shared = primary_ephemeral
        .private_key
        .calculate_agreement(&companion_ephemeral)
        .map_err(|_| MISMATCH)?;
    let mut key = [0u8; 32];
    wacore::crypto::hkdf_sha256_into(
        &ephemeral_shared,
        Some(&bundle[..32]),
        b"link_code_pairing_key_bundle_encryption_key",
        &mut key,
    )
    .map_err(|_| MISMATCH)?;
    let iv: [u8; 12] = bundle[32..44].try_into().expect("length checked above");
    let mut plain = Vec::with_capacity(96);
    aes_256_gcm_decrypt(&key, &iv, b"", &bundle[44..], &mut plain).map_err(|_| MISMATCH)?;
    let (companion_identity, rest) = plain.split_at(32);
    let (primary_identity, random) = rest.split_at(32);
    if companion_identity != companion.identity
        || finish.companion_identity != companion.identity
        || primary_identity != phone_identity.public_key.public_key_bytes()
    {
        return Err("the device's key bundle names other keys than the pairing's");
    }
    let companion_identity =
        PublicKey::from_djb_public_key_bytes(companion_identity).map_err(|_| MISMATCH)?;
    let identity_shared = phone_identity
        .private_key
        .calculate_agreement(&companion_identity)
        .map_err(|_| MISMATCH)?;
    let mut secret_input = Vec::with_capacity(96);
    secret_input.extend_from_slice(&ephemeral_shared);
    secret_input.extend_from_slice(&identity_shared);
    secret_input.extend_from_slice(random);
    let mut adv_secret = [0u8; 32];
    wacore::crypto::hkdf_sha256_into(&secret_input, None, b"adv_secret", &mut adv_secret)
        .map_err(|_| MISMATCH)?;
    Ok(adv_secret)
}
