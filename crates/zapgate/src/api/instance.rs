//! Z-API's instance section: linking a number and the instance's state.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::auth::Instance;
use super::{ApiError, AppState, partner};
use crate::instance::{LinkError, Problem, Requester, State, Unlinked};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/qr-code", get(qr_code))
        .route("/qr-code/image", get(qr_code_image))
        .route("/phone-code/{phone}", get(phone_code))
        .route("/status", get(status))
        .route("/events", get(super::events::events))
        .route("/disconnect", get(disconnect))
        .route("/restart", get(restart))
        .route("/restore-session", get(restore_session))
        .route("/me", get(me))
        .route("/device", get(device))
        .route("/integrator/on-demand/cancel", post(partner::cancel))
        .merge(super::webhooks::routes())
        .merge(super::messages::routes())
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
