//! Contacts' buttons: create one, have it send, read, go offline, and look at its
//! inbox, outbox and the chat states it saw; and the message fault levers.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Body, ControlError, Reply};
use crate::contact::{self, Command};
use crate::phone;
use crate::sim::Sim;

/// The longest an inbox read may wait.
const MAX_WAIT: Duration = Duration::from_secs(120);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    phone: Option<String>,
    name: Option<String>,
}

/// The body is optional: none (or `{}`) makes a contact with a fresh number.
pub(super) async fn create(State(sim): State<Arc<Sim>>, body: axum::body::Bytes) -> Reply {
    let body: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ControlError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?
    };
    let view = contact::create(&sim, body.phone.as_deref(), body.name)?;
    Ok(Json(json!(view)))
}

pub(super) async fn list(State(sim): State<Arc<Sim>>) -> Reply {
    let registry = sim.registry();
    let mut list: Vec<Value> = registry
        .contacts
        .iter()
        .map(|(number, c)| json!(c.view(number)))
        .collect();
    list.sort_by(|a, b| a["phone"].as_str().cmp(&b["phone"].as_str()));
    Ok(Json(Value::Array(list)))
}

fn no_contact(phone: &str) -> ControlError {
    ControlError(StatusCode::NOT_FOUND, format!("no contact {phone}"))
}

/// The contact's number, checked, and that it exists.
fn existing(sim: &Sim, phone: &str) -> Result<String, ControlError> {
    let phone = phone::valid_phone(phone)?;
    if sim.registry().contacts.contains_key(&phone) {
        Ok(phone)
    } else {
        Err(no_contact(&phone))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SendBody {
    to: String,
    text: String,
    id: Option<String>,
}

pub(super) async fn send(
    State(sim): State<Arc<Sim>>,
    Path(phone): Path<String>,
    Body(body): Body<SendBody>,
) -> Reply {
    let phone = existing(&sim, &phone)?;
    let to = phone::valid_phone(&body.to)?;
    if !sim.registry().is_registered(&to) {
        return Err(ControlError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{to} is not on WhatsApp"),
        ));
    }
    let id = body.id.unwrap_or_else(message_id);
    let sent = contact::ask(&sim, &phone, |done| Command::Send {
        to,
        text: body.text,
        id: id.clone(),
        done,
    })
    .await;
    sent.ok_or_else(|| no_contact(&phone))?;
    Ok(Json(json!({ "id": id })))
}

/// A message id shaped like the ones WhatsApp clients mint (`3EB0` and 18 hex digits).
fn message_id() -> String {
    use rand::RngExt as _;
    let bytes: [u8; 9] = rand::rng().random();
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    format!("3EB0{hex}")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InboxQuery {
    wait: Option<f64>,
    count: Option<usize>,
}

pub(super) async fn inbox(
    State(sim): State<Arc<Sim>>,
    Path(phone): Path<String>,
    Query(query): Query<InboxQuery>,
) -> Reply {
    let phone = existing(&sim, &phone)?;
    if let Some(wait) = query.wait {
        let wait = Duration::try_from_secs_f64(wait)
            .ok()
            .filter(|w| *w <= MAX_WAIT)
            .ok_or_else(|| {
                ControlError(
                    StatusCode::BAD_REQUEST,
                    "wait must be between 0 and 120 seconds".into(),
                )
            })?;
        let count = query.count.unwrap_or(1);
        let len = sim
            .registry()
            .contacts
            .get(&phone)
            .map(|c| c.inbox_len.clone());
        if let Some(mut len) = len {
            let _ = tokio::time::timeout(wait, len.wait_for(|n| *n >= count)).await;
        }
    }
    let inbox = contact::ask(&sim, &phone, Command::Inbox)
        .await
        .ok_or_else(|| no_contact(&phone))?;
    Ok(Json(json!(inbox)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadBody {
    ids: Vec<String>,
}

pub(super) async fn read(
    State(sim): State<Arc<Sim>>,
    Path(phone): Path<String>,
    Body(body): Body<ReadBody>,
) -> Reply {
    let phone = existing(&sim, &phone)?;
    let read = contact::ask(&sim, &phone, |done| Command::Read {
        ids: body.ids,
        done,
    })
    .await
    .ok_or_else(|| no_contact(&phone))?;
    Ok(Json(json!({ "read": read })))
}

async fn set_online(sim: &Sim, phone: &str, online: bool) -> Reply {
    let phone = existing(sim, phone)?;
    if !contact::tell(sim, &phone, Command::SetOnline(online)) {
        return Err(no_contact(&phone));
    }
    Ok(Json(json!({ "phone": phone, "online": online })))
}

pub(super) async fn offline(State(sim): State<Arc<Sim>>, Path(phone): Path<String>) -> Reply {
    set_online(&sim, &phone, false).await
}

pub(super) async fn online(State(sim): State<Arc<Sim>>, Path(phone): Path<String>) -> Reply {
    set_online(&sim, &phone, true).await
}

pub(super) async fn outbox(State(sim): State<Arc<Sim>>, Path(phone): Path<String>) -> Reply {
    let phone = existing(&sim, &phone)?;
    let outbox = contact::ask(&sim, &phone, Command::Outbox)
        .await
        .ok_or_else(|| no_contact(&phone))?;
    Ok(Json(json!(outbox)))
}

pub(super) async fn events(State(sim): State<Arc<Sim>>, Path(phone): Path<String>) -> Reply {
    let phone = existing(&sim, &phone)?;
    let events = contact::ask(&sim, &phone, Command::Events)
        .await
        .ok_or_else(|| no_contact(&phone))?;
    Ok(Json(Value::Array(events)))
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum FaultBody {
    /// Refuse the next message addressed to `to` with `code`.
    Nack { to: String, code: u16 },
    /// Corrupt the next message `contact` sends a companion.
    Garble { contact: String },
    /// Corrupt the next message `contact` receives: it asks the sender again.
    #[serde(rename = "garble-incoming")]
    GarbleIncoming { contact: String },
}

pub(super) async fn fault(State(sim): State<Arc<Sim>>, Body(body): Body<FaultBody>) -> Reply {
    match body {
        FaultBody::Nack { to, code } => {
            let to = phone::valid_phone(&to)?;
            if !(400..=599).contains(&code) {
                return Err(ControlError(
                    StatusCode::BAD_REQUEST,
                    "code must be between 400 and 599".into(),
                ));
            }
            sim.registry().nack_faults.insert(to.clone(), code);
            Ok(Json(json!({ "kind": "nack", "to": to, "code": code })))
        }
        FaultBody::Garble { contact: phone } => {
            let phone = existing(&sim, &phone)?;
            contact::tell(&sim, &phone, Command::Garble);
            Ok(Json(json!({ "kind": "garble", "contact": phone })))
        }
        FaultBody::GarbleIncoming { contact: phone } => {
            let phone = existing(&sim, &phone)?;
            contact::tell(&sim, &phone, Command::GarbleIncoming);
            Ok(Json(json!({ "kind": "garble-incoming", "contact": phone })))
        }
    }
}
