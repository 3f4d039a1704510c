//! The JSON control API: the phone's buttons and the operator's levers.
//! JSON in, JSON out; every error is `{"error": "..."}` with a 4xx status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

mod contacts;

use crate::phone::{self, PhoneError};
use crate::registry::{Command, Role};
use crate::sim::{Sim, bump};
use crate::stanza;

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/scan", post(scan))
        .route("/link-code", post(link_code))
        .route("/unlink", post(unlink))
        .route("/drop", post(drop_phone))
        .route("/stream-error", post(stream_error))
        .route("/outage", post(outage))
        .route("/refresh-refs", post(refresh_refs))
        .route("/devices", get(devices))
        .route("/devices/{jid}/logins", get(logins))
        .route("/stats", get(stats))
        .route("/stats/reset-peaks", post(reset_peaks))
        .route("/contacts", post(contacts::create).get(contacts::list))
        .route("/contacts/{phone}/send", post(contacts::send))
        .route("/contacts/{phone}/inbox", get(contacts::inbox))
        .route("/contacts/{phone}/read", post(contacts::read))
        .route("/contacts/{phone}/offline", post(contacts::offline))
        .route("/contacts/{phone}/online", post(contacts::online))
        .route("/contacts/{phone}/outbox", get(contacts::outbox))
        .route("/contacts/{phone}/events", get(contacts::events))
        .route("/faults", post(contacts::fault))
}

pub(crate) struct ControlError(StatusCode, String);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<PhoneError> for ControlError {
    fn from(e: PhoneError) -> Self {
        let status = match &e {
            PhoneError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PhoneError::NotFound(_) => StatusCode::NOT_FOUND,
            PhoneError::Conflict(_) => StatusCode::CONFLICT,
            PhoneError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PhoneError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        Self(status, e.to_string())
    }
}

pub(crate) fn not_found() -> ControlError {
    ControlError(StatusCode::NOT_FOUND, "no such route".into())
}

pub(crate) fn method_not_allowed() -> ControlError {
    ControlError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route".into(),
    )
}

/// `axum::Json` whose rejections use the same JSON error body.
pub(crate) struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ControlError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(ControlError(rejection.status(), body_error(&rejection))),
        }
    }
}

fn body_error(rejection: &JsonRejection) -> String {
    format!("invalid JSON body: {}", rejection.body_text())
}

type Reply = Result<Json<Value>, ControlError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanBody {
    qr: String,
    phone: Option<String>,
}

async fn scan(State(sim): State<Arc<Sim>>, Body(body): Body<ScanBody>) -> Reply {
    let linked = phone::scan(&sim, &body.qr, body.phone.as_deref()).await;
    let linked = refusal_noted(&sim, "scan", linked)?;
    Ok(Json(json!(linked)))
}

/// Every pairing the phone or the device refused is logged with its reason and counted.
fn refusal_noted<T>(sim: &Sim, how: &str, result: Result<T, PhoneError>) -> Result<T, PhoneError> {
    if let Err(PhoneError::Refused(reason)) = &result {
        bump(&sim.stats.pairing_refusals, 1);
        tracing::warn!(how, reason, "pairing refused");
    }
    result
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkCodeBody {
    phone: String,
    code: String,
}

async fn link_code(State(sim): State<Arc<Sim>>, Body(body): Body<LinkCodeBody>) -> Reply {
    let linked = phone::enter_code(&sim, &body.phone, &body.code).await;
    let linked = refusal_noted(&sim, "link-code", linked)?;
    Ok(Json(json!(linked)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneBody {
    phone: String,
}

async fn unlink(State(sim): State<Arc<Sim>>, Body(body): Body<PhoneBody>) -> Reply {
    let phone = phone::valid_phone(&body.phone)?;
    let removed = sim
        .unlink_phone(&phone)
        .ok_or_else(|| ControlError(StatusCode::NOT_FOUND, format!("no phone {phone}")))?;
    Ok(Json(json!({ "phone": phone, "removed": removed })))
}

async fn drop_phone(State(sim): State<Arc<Sim>>, Body(body): Body<PhoneBody>) -> Reply {
    let phone = phone::valid_phone(&body.phone)?;
    let dropped = sim.to_phone_conns(&phone, || Command::Drop);
    Ok(Json(json!({ "phone": phone, "dropped": dropped })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamErrorBody {
    phone: String,
    code: u16,
}

async fn stream_error(State(sim): State<Arc<Sim>>, Body(body): Body<StreamErrorBody>) -> Reply {
    let phone = phone::valid_phone(&body.phone)?;
    let sent = sim.to_phone_conns(&phone, || {
        Command::StreamError(stanza::stream_error_code(body.code))
    });
    Ok(Json(json!({ "phone": phone, "sent": sent })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageBody {
    seconds: f64,
}

async fn outage(State(sim): State<Arc<Sim>>, Body(body): Body<OutageBody>) -> Reply {
    if !(0.0..=3600.0).contains(&body.seconds) {
        return Err(ControlError(
            StatusCode::BAD_REQUEST,
            "seconds must be between 0 and 3600".into(),
        ));
    }
    let dropped = sim.start_outage(Duration::from_secs_f64(body.seconds));
    Ok(Json(json!({ "dropped": dropped, "seconds": body.seconds })))
}

async fn refresh_refs(State(sim): State<Arc<Sim>>) -> Reply {
    Ok(Json(json!({ "refreshed": sim.refresh_refs() })))
}

async fn devices(State(sim): State<Arc<Sim>>) -> Reply {
    let registry = sim.registry();
    let online: std::collections::HashSet<(&str, u32)> = registry
        .conns
        .values()
        .filter_map(|c| match &c.role {
            Role::Device { phone, device } => Some((phone.as_str(), *device)),
            Role::Linking(_) => None,
        })
        .collect();
    let mut list = Vec::new();
    for (number, account) in &registry.phones {
        for (id, record) in &account.devices {
            list.push(json!({
                "jid": format!("{number}:{id}@s.whatsapp.net"),
                "phone": number,
                "connected": online.contains(&(number.as_str(), *id)),
                "platform": record.companion.platform,
                "linkedAt": record.linked_at_ms,
                "appStateKeyShared": record.key_share_received,
                "preKeys": record.prekeys.len(),
            }));
        }
    }
    list.sort_by(|a, b| a["jid"].as_str().cmp(&b["jid"].as_str()));
    Ok(Json(Value::Array(list)))
}

/// A device's logins, oldest first: `[{"at", "replaced"}]`.
async fn logins(State(sim): State<Arc<Sim>>, Path(jid): Path<String>) -> Reply {
    let device = jid
        .strip_suffix("@s.whatsapp.net")
        .and_then(|d| d.split_once(':'))
        .and_then(|(phone, id)| Some((phone, id.parse::<u32>().ok()?)));
    let registry = sim.registry();
    let record = device.and_then(|(phone, id)| registry.phones.get(phone)?.devices.get(&id));
    match record {
        Some(record) => Ok(Json(json!(record.logins))),
        None => Err(ControlError(
            StatusCode::NOT_FOUND,
            format!("no device {jid}"),
        )),
    }
}

async fn stats(State(sim): State<Arc<Sim>>) -> Reply {
    Ok(Json(json!(sim.stats())))
}

async fn reset_peaks(State(sim): State<Arc<Sim>>) -> Reply {
    sim.reset_peaks();
    Ok(Json(json!(sim.stats())))
}
