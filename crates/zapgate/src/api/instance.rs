//! Z-API's instance section: linking a number and the instance's state.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::Instance;
use super::doc::{Auth, Routes, op};
use super::{ApiError, partner};
use crate::instance::{LinkError, Problem, Requester, State, Unlinked};

pub(super) fn routes() -> Routes {
    let linking = |summary, what, example| {
        op(summary)
            .ok(what, example)
            .ok(
                "the number is linked already",
                json!({ "connected": true, "error": "You are already connected." }),
            )
            .ok(
                "a stored session is reconnecting, or the instance has a problem",
                json!({ "connected": false, "error": "You need to restore the session." }),
            )
            .fails(409, "linking was stopped (or its codes ran out): ask again")
            .fails(
                429,
                "too many linking windows opened a minute: Retry-After says when",
            )
            .fails(
                503,
                "WhatsApp could not be reached, or the instance is moving",
            )
    };
    let reconnect = |summary| {
        op(summary)
            .ok("reconnecting", json!({ "value": true }))
            .ok(
                "overtaken by a link or an unlink meanwhile, and why",
                json!({ "error": "You need to restore the session." }),
            )
            .fails(
                409,
                "the number is being unlinked, or its session is missing",
            )
            .fails(503, "WhatsApp could not be reached")
    };
    Routes::new("Instance", Auth::Instance)
        .get(
            "/qr-code",
            qr_code,
            linking(
                "The QR code to scan on the phone (WhatsApp replaces it about every 20 s)",
                "the text to draw as a QR code",
                json!({ "value": "2@AbCd...,Ef01...,Gh23...,Ij45...,1" }),
            ),
        )
        .get(
            "/qr-code/image",
            qr_code_image,
            linking(
                "The same QR code as a PNG image",
                "a data URL of the PNG",
                json!({ "value": "data:image/png;base64,iVBORw0KGgo..." }),
            )
            .fails(502, "WhatsApp's code is too long to draw"),
        )
        .get(
            "/phone-code/{phone}",
            phone_code,
            linking(
                "A pairing code to type on the phone, for the number given (with country code)",
                "the code, as the phone shows it",
                json!({ "code": "ABCD-EFGH" }),
            )
            .fails(400, "not a phone number")
            .fails(502, "WhatsApp refused to give a code for this number"),
        )
        .get(
            "/status",
            status,
            op("Whether the number is connected")
                .ok("connected", json!({ "connected": true, "smartphoneConnected": true }))
                .ok(
                    "not connected, and why",
                    json!({ "connected": false, "error": "You are not connected.", "smartphoneConnected": false }),
                ),
        )
        .get(
            "/events",
            super::events::events,
            op("The instance's events as they happen (server-sent events): its state, new codes, messages' news")
                .events("`state`, `qr`, `pairing-code`, `message` and `status` events; each client first gets the state as it stands")
                .fails(429, "too many event streams are open"),
        )
        .get(
            "/disconnect",
            disconnect,
            op("Unlinks the number at WhatsApp and deletes its session")
                .ok("unlinked", json!({ "value": true }))
                .ok(
                    "deleted here, but WhatsApp could not be told",
                    json!({ "value": true, "unlinkedAtWhatsApp": false, "error": "…" }),
                )
                .fails(409, "the instance is being unlinked or cancelled already"),
        )
        .get(
            "/restart",
            restart,
            reconnect("Reconnects with the stored session (no new code)"),
        )
        .get(
            "/restore-session",
            restore_session,
            reconnect("Tries to reconnect from the stored session"),
        )
        .get(
            "/me",
            me,
            op("The instance: its settings and webhooks").ok("the instance", me_example()),
        )
        .get(
            "/device",
            device,
            op("The linked phone")
                .ok(
                    "the phone",
                    json!({
                        "phone": "5511999999999",
                        "imgUrl": null,
                        "about": "",
                        "name": "Store",
                        "device": { "sessionName": "store front", "device_model": "zapgate" },
                        "originalDevice": "android",
                        "sessionId": 12,
                        "isBusiness": false,
                    }),
                )
                .ok(
                    "no phone is linked",
                    json!({ "connected": false, "error": "You are not connected." }),
                ),
        )
        .post(
            "/integrator/on-demand/cancel",
            partner::cancel,
            op("Unlinks the number and deletes the instance with its session (Z-API's partner route)")
                .auth(Auth::AdminAndInstance)
                .empty(201, "cancelled"),
        )
        .merge(super::webhooks::routes())
        .merge(super::messages::routes())
}

/// What `/me` answers.
fn me_example() -> Value {
    let mut body = json!({
        "id": "3C1F0E6A2B9D4C5E8F7A6B5C4D3E2F1A",
        "token": "9A0B1C2D3E4F5A6B7C8D9E0F",
        "name": "store front",
        "due": 1767225600000_i64,
        "created": "2026-12-01T12:00:00.000Z",
        "connected": true,
        "paymentStatus": "PAID",
    });
    body.as_object_mut()
        .expect("an object")
        .extend(super::webhooks::fields(&super::webhooks::example()));
    body
}

const NOT_CONNECTED: &str = "You are not connected.";
const RESTORE: &str = "You need to restore the session.";

/// The answer to a linking route: the code, or why there is none.
fn link_reply(result: Result<Value, LinkError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e @ LinkError::AlreadyConnected) => {
            Json(json!({ "connected": true, "error": e.to_string() })).into_response()
        }
        Err(e @ (LinkError::SessionStored | LinkError::Problem(_))) => {
            Json(json!({ "connected": false, "error": e.to_string() })).into_response()
        }
        Err(e) => ApiError::link(e),
    }
}

async fn qr_code(Instance(instance): Instance) -> Response {
    link_reply(
        instance
            .qr_code(Requester::Operator)
            .await
            .map(|qr| json!({ "value": qr.value })),
    )
}

async fn qr_code_image(Instance(instance): Instance) -> Response {
    match instance.qr_code(Requester::Operator).await {
        Ok(qr) => match qr.image_data_url() {
            Some(image) => Json(json!({ "value": image })).into_response(),
            None => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "WhatsApp's code is too long to draw as a QR code",
            )
            .into_response(),
        },
        Err(e) => link_reply(Err(e)),
    }
}

async fn phone_code(
    Instance(instance): Instance,
    Path(params): Path<Vec<(String, String)>>,
) -> Response {
    let raw = params
        .iter()
        .find(|(k, _)| k == "phone")
        .map_or("", |(_, v)| v.as_str());
    match crate::phone::normalize(raw) {
        Ok(phone) => link_reply(
            instance
                .phone_code(&phone, Requester::Operator)
                .await
                .map(|code| json!({ "code": code })),
        ),
        Err(why) => ApiError::new(StatusCode::BAD_REQUEST, why).into_response(),
    }
}

async fn status(Instance(instance): Instance) -> Json<Value> {
    let snapshot = instance.snapshot();
    Json(status_body(snapshot.state, snapshot.problem.as_ref()))
}

/// `{"connected", "error"?, "smartphoneConnected"}` as Z-API's `/status` answers.
pub(super) fn status_body(state: State, problem: Option<&Problem>) -> Value {
    let error = match state {
        State::Connected => {
            return json!({ "connected": true, "smartphoneConnected": true });
        }
        State::NoSession | State::Linking | State::Unlinking => NOT_CONNECTED,
        State::Reconnecting | State::Stopped | State::SessionMissing => RESTORE,
    };
    let error = match problem {
        Some(problem) => format!("{error} {problem}"),
        None => error.to_owned(),
    };
    json!({ "connected": false, "error": error, "smartphoneConnected": false })
}

/// `{"value": true}`; when WhatsApp could not be told, the body says so (the session is
/// deleted here all the same).
async fn disconnect(Instance(instance): Instance) -> Response {
    match instance.disconnect().await {
        Ok(Unlinked::Told) => Json(json!({ "value": true })).into_response(),
        Ok(Unlinked::NotTold(why)) => Json(json!({
            "value": true,
            "unlinkedAtWhatsApp": false,
            "error": format!("{why}; the session was deleted here, and the phone lists the device until it is removed there"),
        }))
        .into_response(),
        Err(e) => ApiError::link(e),
    }
}

async fn restart(Instance(instance): Instance) -> Response {
    value_true(instance.restart().await)
}

async fn restore_session(Instance(instance): Instance) -> Response {
    value_true(instance.restore().await)
}

fn value_true(result: Result<(), LinkError>) -> Response {
    match result {
        Ok(()) => Json(json!({ "value": true })).into_response(),
        Err(e) => ApiError::link(e),
    }
}

async fn me(
    axum::extract::State(state): axum::extract::State<super::AppState>,
    Instance(instance): Instance,
) -> Result<Json<Value>, ApiError> {
    // As stored now: webhooks change after creation.
    let r = state
        .store
        .instance(&instance.record.id)
        .await?
        .ok_or_else(ApiError::instance_not_found)?;
    let mut body = json!({
        "id": r.id,
        "token": r.token,
        "name": r.name,
        "due": r.due_at,
        "created": crate::iso_time(r.created_at),
        "connected": instance.snapshot().state == State::Connected,
        "paymentStatus": "PAID",
    });
    body.as_object_mut()
        .expect("an object")
        .extend(super::webhooks::fields(&r.webhooks));
    Ok(Json(body))
}

async fn device(Instance(instance): Instance) -> Json<Value> {
    let r = &instance.record;
    let Some(device) = instance.snapshot().device else {
        return Json(json!({ "connected": false, "error": NOT_CONNECTED }));
    };
    Json(json!({
        "phone": device.phone,
        "imgUrl": null,
        "about": "",
        "name": device.name,
        "device": {
            "sessionName": r.session_name.as_deref().unwrap_or(&r.name),
            "device_model": "zapgate",
        },
        "originalDevice": device.platform,
        "sessionId": device.device_id,
        "isBusiness": false,
    }))
}
