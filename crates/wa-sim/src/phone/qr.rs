//! The phone scans a QR code shown by a linking companion.

use std::sync::Arc;

use crate::registry::{Role, current_ref};
use crate::sim::Sim;

use super::PhoneError::{self, *};
use super::{Linked, complete_pairing, release, valid_phone};

/// The phone scans a QR code: `ref,noise,identity,adv-secret[,client type]`.
pub(crate) async fn scan(
    sim: &Arc<Sim>,
    qr: &str,
    phone: Option<&str>,
) -> Result<Linked, PhoneError> {
    let qr = ScannedQr::parse(qr)?;
    let phone = phone.map(valid_phone).transpose()?;
    let (conn, tx, companion, phone) = {
        let mut registry = sim.registry();
        let (first, next) = (sim.config.first_ref_ttl, sim.config.next_ref_ttl);
        let showing = registry
            .conns
            .iter_mut()
            .find_map(|(id, c)| match &mut c.role {
                Role::Linking(l)
                    if current_ref(&l.refs, l.refs_sent.elapsed(), first, next)
                        == Some(qr.pairing_ref.as_str()) =>
                {
                    Some((*id, c.tx.clone(), l))
                }
                _ => None,
            });
        let Some((conn, tx, linking)) = showing else {
            return Err(NotFound(
                "no device is showing this QR code (unknown or expired)".into(),
            ));
        };
        if linking.companion.noise != qr.noise || linking.companion.identity != qr.identity {
            return Err(BadRequest(
                "the QR code's keys are not those of the device showing it".into(),
            ));
        }
        if linking.pairing {
            return Err(Conflict("this device is already being linked".into()));
        }
        linking.pairing = true;
        let companion = linking.companion.clone();
        let phone = phone.unwrap_or_else(|| registry.fresh_phone_number());
        (conn, tx, companion, phone)
    };
    let linked = complete_pairing(sim, conn, tx, &phone, companion, qr.adv_secret).await;
    if linked.is_err() {
        release(sim, conn);
    }
    linked
}

struct ScannedQr {
    pairing_ref: String,
    noise: [u8; 32],
    identity: [u8; 32],
    adv_secret: [u8; 32],
}

impl ScannedQr {
    fn parse(qr: &str) -> Result<Self, PhoneError> {
        use base64::Engine as _;
        let body = qr
            .strip_prefix("https://wa.me/settings/linked_devices#")
            .unwrap_or(qr);
        let fields: Vec<&str> = body.split(',').collect();
        if fields.len() < 4 || fields.iter().any(|f| f.is_empty()) {
            return Err(BadRequest(
                "malformed QR code: expected ref,noise,identity,secret[,type]".into(),
            ));
        }
        let key = |i: usize, name: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(fields[i])
                .ok()
                .and_then(|b| crate::key32(&b))
                .ok_or_else(|| {
                    BadRequest(format!(
                        "malformed QR code: the {name} is not 32 bytes of base64"
                    ))
                })
        };
        Ok(Self {
            pairing_ref: fields[0].to_owned(),
            noise: key(1, "noise key")?,
            identity: key(2, "identity key")?,
            adv_secret: key(3, "secret")?,
        })
    }
}
