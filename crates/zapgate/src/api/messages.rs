//! Z-API's message and queue sections: sending text, marking messages read, asking
//! whether a number is on WhatsApp, and the queue of messages waiting to be sent.
//! A message is committed to the instance's queue before the 200 that gives its ids.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;

use super::auth::Instance;
use super::doc::{Auth, Routes, op};
use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::messaging::{MAX_QUEUE, Outgoing, SendError};
use crate::store::Outbound;

/// Longest text taken (WhatsApp's own limit is about this).
const MAX_TEXT: usize = 65_536;
/// `delayMessage` and `delayTyping`, in seconds, as Z-API takes them.
const DELAY_SECS: std::ops::RangeInclusive<f64> = 1.0..=15.0;
const MAX_KEY: usize = 255;

pub(super) fn routes() -> Routes {
    let queued = json!([queue_example()]);
    Routes::new("Messages", Auth::Instance)
        .post(
            "/send-text",
            send_text,
            op("Sends a text: queued at once, sent in order at a human pace")
                .body(json!({
                    "phone": "5511999999999",
                    "message": "Hello",
                    "delayMessage": 2,
                    "delayTyping": 3,
                }))
                .ok(
                    "queued; its status comes to the webhooks and the event stream",
                    json!({ "zaapId": "0193A7C2B3D4...", "messageId": "3EB0C4D5E6F7...", "id": "3EB0C4D5E6F7..." }),
                )
                .fails(400, "a field is missing or wrong, and which")
                .fails(409, "the number is not linked (or not connected, with the queue off while disconnected)")
                .fails(422, "the Idempotency-Key was used for another request")
                .fails(429, "the queue is full"),
        )
        .post(
            "/read-message",
            read_message,
            op("Marks a message received read: the contact sees the blue ticks")
                .body(json!({ "phone": "5511999999999", "messageId": "3EB0C4D5E6F7..." }))
                .empty(204, "told to WhatsApp")
                .fails(400, "phone or messageId missing or wrong")
                .fails(409, "not connected")
                .fails(502, "WhatsApp could not be told"),
        )
        .get(
            "/phone-exists/{phone}",
            phone_exists,
            op("Whether a number is on WhatsApp, as WhatsApp answers now")
                .ok("the answer", json!({ "exists": true }))
                .fails(400, "not a phone number")
                .fails(409, "not connected")
                .fails(502, "WhatsApp could not be asked")
                .fails(504, "WhatsApp did not answer in time"),
        )
        .get(
            "/queue",
            queue,
            op("The messages waiting to be sent, oldest first (`?page=1&pageSize=100`)")
                .ok("the page", queued),
        )
        .post(
            "/queue",
            queue_paged,
            op("The queue a page at a time, as Z-API pages it")
                .optional_body(json!({ "pageSize": 20, "pagingState": "2" }))
                .ok(
                    "a page, and where the next one starts",
                    json!({ "messages": [queue_example()], "pagingState": "3", "hasMore": true }),
                )
                .fails(400, "pagingState is not one this gateway gave"),
        )
        .delete(
            "/queue",
            clear_queue,
            op("Removes every message still waiting (not one already on its way)")
                .ok("how many were removed", json!({ "value": true, "deleted": 3 })),
        )
        .get(
            "/queue/count",
            queue_count,
            op("How many messages are waiting").ok("the count", json!({ "count": 3 })),
        )
        .delete(
            "/queue/{zaap_id}",
            delete_one,
            op("Removes one waiting message")
                .ok("removed", json!({ "value": true }))
                .fails(404, "not waiting (it may be on its way already)"),
        )
        .put_post(
            "/update-queue-settings",
            queue_settings,
            op("Whether messages sent while the number is disconnected are refused rather than queued")
                .body(json!({ "disableEnqueueWhenDisconnected": true }))
                .ok("set", json!({ "success": true })),
        )
        .put_post(
            "/update-auto-read-message",
            auto_read,
            op("Whether messages received are marked read at once")
                .body(json!({ "value": true }))
                .ok("set", json!({ "value": true })),
        )
}

/// A queued message as the queue routes list it.
fn queue_example() -> Value {
    json!({
        "_id": "0193A7C2B3D4...",
        "ZaapId": "0193A7C2B3D4...",
        "MessageId": "3EB0C4D5E6F7...",
        "Phone": "5511999999999",
        "Message": "Hello",
        "DelayMessage": -1,
        "DelayTyping": 0,
        "Created": 1764590400000_i64,
        "CreatedAt": "2026-12-01T12:00:00.000Z",
        "IsTrial": false,
        "Beta": false,
        "Status": "queued",
        "Attempts": 0,
    })
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// Z-API's send-text body. Numbers may come as numbers or strings, optional fields as
/// `null`, as real clients send them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendText {
    phone: Option<Value>,
    message: Option<Value>,
    delay_message: Option<Value>,
    delay_typing: Option<Value>,
    message_id: Option<Value>,
    edit_message_id: Option<Value>,
}

/// A number of seconds in Z-API's 1 to 15, from a number or a numeric string.
fn seconds(field: &str, value: Option<&Value>) -> Result<Option<Duration>, ApiError> {
    let secs = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match secs {
        Some(secs) if DELAY_SECS.contains(&secs) => Ok(Some(Duration::from_secs_f64(secs))),
        _ => Err(bad(format!(
            "{field} must be a number of seconds from 1 to 15"
        ))),
    }
}

/// An optional id: a non-empty string, or nothing.
fn optional_id(field: &str, value: Option<&Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()) => {
            Ok(Some(s.trim().to_owned()))
        }
        Some(_) => Err(bad(format!("{field} must be a message id"))),
    }
}

/// The number to send to: digits with the country code, or a `...@lid` id.
pub(super) fn recipient(value: Option<&Value>) -> Result<String, ApiError> {
    let raw = match value {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        None | Some(Value::Null) => return Err(bad("phone is required")),
        Some(_) => return Err(bad("phone must be a string of digits")),
    };
    if raw.ends_with("-group") || raw.ends_with("@g.us") {
        return Err(bad(
            "groups are not supported yet: phone must be a contact's number",
        ));
    }
    if let Some(lid) = raw.strip_suffix("@lid") {
        if !lid.is_empty() && lid.len() <= 20 && lid.chars().all(|c| c.is_ascii_digit()) {
            return Ok(raw);
        }
        return Err(bad("phone: a LID must be digits followed by @lid"));
    }
    let raw = raw.strip_suffix("@s.whatsapp.net").unwrap_or(&raw);
    crate::phone::normalize(raw).map_err(bad)
}

impl SendText {
    fn checked(self, key: Option<String>) -> Result<Outgoing, ApiError> {
        let phone = recipient(self.phone.as_ref())?;
        let text = match self.message {
            Some(Value::String(text)) => text,
            None | Some(Value::Null) => return Err(bad("message is required")),
            Some(_) => return Err(bad("message must be a string")),
        };
        if text.trim().is_empty() {
            return Err(bad("message is empty"));
        }
        if text.len() > MAX_TEXT {
            return Err(bad(format!("message is longer than {MAX_TEXT} bytes")));
        }
        // Z-API's clients may send line breaks URL-encoded.
        let text = text.replace("%0a", "\n").replace("%0A", "\n");
        let delay = seconds("delayMessage", self.delay_message.as_ref())?;
        let typing = seconds("delayTyping", self.delay_typing.as_ref())?.unwrap_or_default();
        let reply_to = optional_id("messageId", self.message_id.as_ref())?;
        let edit_of = optional_id("editMessageId", self.edit_message_id.as_ref())?;
        if reply_to.is_some() && edit_of.is_some() {
            return Err(bad(
                "a message is either a reply (messageId) or an edit (editMessageId), not both",
            ));
        }
        let request = json!([
            phone,
            text,
            reply_to,
            edit_of,
            delay.map(|d| d.as_millis() as u64),
            typing.as_millis() as u64
        ]);
        let hash = sha2::Sha256::digest(request.to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Ok(Outgoing {
            phone,
            text,
            reply_to,
            edit_of,
            delay,
            typing,
            idempotency: key.map(|k| (k, hash)),
        })
    }
}

/// The optional `Idempotency-Key` header.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY => Ok(Some(key.to_owned())),
        _ => Err(bad(format!(
            "Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters"
        ))),
    }
}

async fn send_text(
    State(state): State<AppState>,
    Instance(instance): Instance,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SendText>,
) -> Result<Json<Value>, ApiError> {
    let message = body.checked(idempotency_key(&headers)?)?;
    let queued = state
        .messaging
        .send(&instance.record.id, message)
        .await
        .map_err(send_error)?;
    Ok(Json(json!({
        "zaapId": queued.zaap_id,
        "messageId": queued.message_id,
        "id": queued.message_id,
    })))
}

fn send_error(e: SendError) -> ApiError {
    let status = match &e {
        SendError::NotLinked | SendError::NotQueuedWhileDown => StatusCode::CONFLICT,
        SendError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        SendError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        SendError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    match e {
        SendError::Store(e) => ApiError::from(e),
        e => ApiError::new(status, e.to_string()),
    }
}

fn not_connected() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "You are not connected.")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadMessage {
    phone: Option<Value>,
    message_id: Option<Value>,
}

/// Marks a message received from `phone` read: the contact sees the blue ticks.
async fn read_message(
    State(state): State<AppState>,
    Instance(instance): Instance,
    JsonBody(body): JsonBody<ReadMessage>,
) -> Result<Response, ApiError> {
    let phone = recipient(body.phone.as_ref())?;
    let id = optional_id("messageId", body.message_id.as_ref())?
        .ok_or_else(|| bad("messageId is required"))?;
    let client = state
        .messaging
        .connected(&instance.record.id)
        .ok_or_else(not_connected)?;
    let chat = match phone.strip_suffix("@lid") {
        Some(lid) => whatsapp_rust::Jid::lid(lid),
        None => whatsapp_rust::Jid::pn(&phone),
    };
    client
        .mark_as_read(&chat, None, &[id.as_str()])
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("WhatsApp could not be told: {e}"),
            )
        })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `{"exists": bool}`: whether the number is on WhatsApp, as WhatsApp answers now.
async fn phone_exists(
    State(state): State<AppState>,
    Instance(instance): Instance,
    Path(params): Path<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let raw = params
        .iter()
        .find(|(k, _)| k == "phone")
        .map_or("", |(_, v)| v.as_str());
    let phone = crate::phone::normalize(raw).map_err(bad)?;
    let client = state
        .messaging
        .connected(&instance.record.id)
        .ok_or_else(not_connected)?;
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        client
            .contacts()
            .is_on_whatsapp(&[whatsapp_rust::Jid::pn(&phone)]),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "WhatsApp did not answer in time",
        )
    })?
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("WhatsApp could not be asked: {e}"),
        )
    })?;
    let exists = answer.iter().any(|r| r.is_registered);
    Ok(Json(json!({ "exists": exists })))
}

/// A queued message as Z-API's queue lists it.
fn queue_item(m: &Outbound) -> Value {
    json!({
        "_id": m.zaap_id,
        "ZaapId": m.zaap_id,
        "MessageId": m.message_id,
        "Phone": m.phone,
        "Message": m.text,
        "DelayMessage": m.delay_ms.map_or(-1, |ms| ms / 1000),
        "DelayTyping": m.typing_ms / 1000,
        "Created": m.created_at,
        "CreatedAt": crate::iso_time(m.created_at),
        "IsTrial": false,
        "Beta": false,
        "Status": m.state,
        "Attempts": m.attempts,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueueQuery {
    page: Option<u32>,
    page_size: Option<u32>,
}

/// The queue, oldest first: `?page=1&pageSize=100`.
async fn queue(
    State(state): State<AppState>,
    Instance(instance): Instance,
    QueryParams(query): QueryParams<QueueQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = query.page.unwrap_or(1).max(1);
    let size = query.page_size.unwrap_or(100).clamp(1, MAX_QUEUE as u32);
    let (items, _) = state
        .store
        .queue_page(&instance.record.id, page, size)
        .await?;
    Ok(Json(Value::Array(items.iter().map(queue_item).collect())))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct QueuePaging {
    page_size: Option<u32>,
    paging_state: Option<String>,
}

/// Z-API's paged queue: `{pageSize (at most 30), pagingState}` →
/// `{messages, pagingState, hasMore}`.
async fn queue_paged(
    State(state): State<AppState>,
    Instance(instance): Instance,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // The body is optional: none asks for the first page.
    let paging: QueuePaging = match body.iter().all(u8::is_ascii_whitespace) {
        true => QueuePaging::default(),
        false => {
            serde_json::from_slice(&body).map_err(|e| bad(format!("invalid JSON body: {e}")))?
        }
    };
    let size = paging.page_size.unwrap_or(20).clamp(1, 30);
    let page = match paging.paging_state.as_deref().filter(|s| !s.is_empty()) {
        None => 1,
        Some(state) => state
            .parse::<u32>()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| bad("pagingState is not one this gateway gave"))?,
    };
    let (items, total) = state
        .store
        .queue_page(&instance.record.id, page, size)
        .await?;
    let more = u64::from(page) * u64::from(size) < total;
    Ok(Json(json!({
        "messages": items.iter().map(queue_item).collect::<Vec<_>>(),
        "pagingState": more.then(|| (page + 1).to_string()),
        "hasMore": more,
    })))
}

async fn queue_count(
    State(state): State<AppState>,
    Instance(instance): Instance,
) -> Result<Json<Value>, ApiError> {
    let (_, total) = state.store.queue_page(&instance.record.id, 1, 1).await?;
    Ok(Json(json!({ "count": total })))
}

/// Removes every message still waiting (not one already on its way).
async fn clear_queue(
    State(state): State<AppState>,
    Instance(instance): Instance,
) -> Result<Json<Value>, ApiError> {
    let removed = state.store.delete_queued(&instance.record.id, None).await?;
    state.messaging.poke(&instance.record.id);
    Ok(Json(json!({ "value": true, "deleted": removed })))
}

async fn delete_one(
    State(state): State<AppState>,
    Instance(instance): Instance,
    Path(params): Path<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let zaap_id = params
        .iter()
        .find(|(k, _)| k == "zaap_id")
        .map_or("", |(_, v)| v.as_str());
    let removed = state
        .store
        .delete_queued(&instance.record.id, Some(zaap_id))
        .await?;
    if removed == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "No message with this zaapId is waiting in the queue (it may be on its way already)",
        ));
    }
    state.messaging.poke(&instance.record.id);
    Ok(Json(json!({ "value": true })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueueSettings {
    disable_enqueue_when_disconnected: bool,
}

async fn queue_settings(
    State(state): State<AppState>,
    Instance(instance): Instance,
    JsonBody(body): JsonBody<QueueSettings>,
) -> Result<Json<Value>, ApiError> {
    state
        .store
        .set_enqueue_when_disconnected(&instance.record.id, body.disable_enqueue_when_disconnected)
        .await?;
    Ok(Json(json!({ "success": true })))
}

#[derive(Deserialize)]
struct ValueBody {
    value: bool,
}

async fn auto_read(
    State(state): State<AppState>,
    Instance(instance): Instance,
    JsonBody(body): JsonBody<ValueBody>,
) -> Result<Json<Value>, ApiError> {
    state
        .store
        .set_auto_read(&instance.record.id, body.value)
        .await?;
    Ok(Json(json!({ "value": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(body: Value) -> Result<Outgoing, String> {
        let parsed: SendText = serde_json::from_value(body).unwrap();
        parsed.checked(None).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn bodies_are_taken_as_real_clients_send_them() {
        let m = send(
            json!({"phone": "+55 11 99999-0001", "message": "hi%0athere",
            "delayMessage": 2.5, "delayTyping": null, "messageId": "", "editMessageId": null}),
        )
        .unwrap();
        assert_eq!(m.phone, "5511999990001");
        assert_eq!(m.text, "hi\nthere");
        assert_eq!(m.delay, Some(Duration::from_millis(2500)));
        assert_eq!(
            (m.typing, m.reply_to, m.edit_of),
            (Duration::ZERO, None, None)
        );
        assert!(
            send(json!({"phone": "5511999990001", "message": "x", "delayTyping": "3"})).is_ok()
        );
        assert_eq!(
            send(json!({"phone": "100000001@lid", "message": "x"}))
                .unwrap()
                .phone,
            "100000001@lid"
        );
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        for (body, says) in [
            (json!({"message": "x"}), "phone is required"),
            (json!({"phone": "5511999990001"}), "message is required"),
            (
                json!({"phone": "5511999990001", "message": "  "}),
                "message is empty",
            ),
            (json!({"phone": "12ab", "message": "x"}), "digits"),
            (
                json!({"phone": "120363019502650977-group", "message": "x"}),
                "groups",
            ),
            (
                json!({"phone": "5511999990001", "message": "x", "delayMessage": 16}),
                "delayMessage",
            ),
            (
                json!({"phone": "5511999990001", "message": "x", "delayTyping": 0}),
                "delayTyping",
            ),
            (
                json!({"phone": "5511999990001", "message": 7}),
                "message must be a string",
            ),
            (
                json!({"phone": "5511999990001", "message": "x", "messageId": "A", "editMessageId": "B"}),
                "not both",
            ),
        ] {
            let error = send(body.clone()).unwrap_err();
            assert!(error.contains(says), "{body}: {error}");
        }
    }
}
