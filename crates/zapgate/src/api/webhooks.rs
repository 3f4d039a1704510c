//! Z-API's webhook routes: each of an instance's callback URLs, set (`PUT`, or `POST`)
//! with `{"value": "https://..."}` and cleared with an empty value. A URL that cannot be
//! delivered to is refused with the reason, and nothing changes.

use axum::Json;
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Instance;
use super::doc::{Auth, Routes, op};
use super::{ApiError, AppState, JsonBody};
use crate::store::{WebhookKind, Webhooks};

/// Longest URL stored.
const MAX_URL: usize = 2048;

pub(super) fn routes() -> Routes {
    let url = json!({ "value": "https://example.com/webhooks/zapgate" });
    let set = |summary| {
        op(summary)
            .body(url.clone())
            .ok("set (an empty value clears it)", json!({ "value": true }))
            .fails(400, "not a URL the gateway may call, and why")
    };
    let mut routes = Routes::new("Webhooks", Auth::Instance);
    for (path, kind, summary) in [
        (
            "/update-webhook-connected",
            WebhookKind::Connected,
            "The URL told when the number connects",
        ),
        (
            "/update-webhook-disconnected",
            WebhookKind::Disconnected,
            "The URL told when the number disconnects",
        ),
        (
            "/update-webhook-received",
            WebhookKind::Received,
            "The URL told of each message received",
        ),
        // The older spelling some of Z-API's pages use.
        (
            "/update-webhook-receive",
            WebhookKind::Received,
            "The URL told of each message received (Z-API's older name)",
        ),
        (
            "/update-webhook-received-delivery",
            WebhookKind::ReceivedDelivery,
            "The URL told of messages received and of those sent (turns on notifySentByMe)",
        ),
        (
            "/update-webhook-delivery",
            WebhookKind::Delivery,
            "The URL told when a message sent is on its way",
        ),
        (
            "/update-webhook-message-status",
            WebhookKind::MessageStatus,
            "The URL told of messages' status (sent, received, read)",
        ),
        (
            "/update-webhook-status",
            WebhookKind::MessageStatus,
            "The URL told of messages' status (Z-API's other name)",
        ),
        (
            "/update-webhook-chat-presence",
            WebhookKind::ChatPresence,
            "The URL told of contacts' presence",
        ),
    ] {
        let handler = move |state, instance, body| set_one(kind, state, instance, body);
        routes = routes.put_post(path, handler, set(summary));
    }
    routes
        .put_post(
            "/update-every-webhooks",
            set_every,
            set("Every webhook URL at once").body(
                json!({ "value": "https://example.com/webhooks/zapgate", "notifySentByMe": true }),
            ),
        )
        .put_post(
            "/update-notify-sent-by-me",
            set_notify,
            op("Whether messages sent from the phone are told to the received webhook too")
                .body(json!({ "notifySentByMe": true }))
                .ok("set", json!({ "value": true }))
                .fails(400, "no received webhook is set"),
        )
        .get(
            "/webhook-deliveries",
            deliveries,
            op("The instance's last 50 webhook events: where each went, and how").ok(
                "newest first",
                json!({ "deliveries": [{
                    "eventId": "0193A7C2-...",
                    "type": "connected",
                    "url": "https://example.com/webhooks/zapgate",
                    "status": "delivered",
                    "attempts": 1,
                    "lastStatus": 200,
                    "lastError": "connection refused",
                    "createdAt": "2026-12-01T12:00:00.000Z",
                    "nextAttemptAt": "2026-12-01T12:00:05.000Z",
                    "doneAt": "2026-12-01T12:00:00.120Z",
                }] }),
            ),
        )
        .post(
            "/webhook-deliveries/{event}/retry",
            retry_now,
            op("Tries a pending event again now (after the instance's earlier ones)")
                .ok("due now", json!({ "value": true }))
                .fails(404, "no pending event with that id"),
        )
}

/// The instance's last 50 webhook events: what was sent where, and how it went.
async fn deliveries(
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
) -> Result<Json<Value>, ApiError> {
    deliveries_of(&state, &instance.record.id).await
}

/// `{"deliveries": [...]}` for an instance, newest first.
pub(super) async fn deliveries_of(state: &AppState, id: &str) -> Result<Json<Value>, ApiError> {
    let entries = state.store.recent_webhooks(id, 50).await?;
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "eventId": e.event_id,
                "type": e.kind,
                "url": e.url,
                "status": e.outcome.as_deref().unwrap_or("pending"),
                "attempts": e.attempts,
                "lastStatus": e.last_status,
                "lastError": e.last_error,
                "createdAt": crate::iso_time(e.created_at),
                "nextAttemptAt": e.done_at.is_none().then(|| crate::iso_time(e.next_attempt_at)),
                "doneAt": e.done_at.map(crate::iso_time),
            })
        })
        .collect();
    Ok(Json(json!({ "deliveries": list })))
}

/// Tries a pending event again now (it still waits for the instance's earlier ones).
async fn retry_now(
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
    axum::extract::Path(params): axum::extract::Path<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let event = params.get("event").map(String::as_str).unwrap_or_default();
    retry_of(&state, &instance.record.id, event).await
}

/// Makes an instance's pending event due now and wakes the worker.
pub(super) async fn retry_of(
    state: &AppState,
    id: &str,
    event: &str,
) -> Result<Json<Value>, ApiError> {
    if !state
        .store
        .retry_webhook_now(id, event, crate::unix_millis())
        .await?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "No pending delivery with that event id",
        ));
    }
    state.webhooks_due.notify_one();
    Ok(Json(json!({ "value": true })))
}

/// How far the gateway may call out: by default only `https://` to public addresses,
/// as Z-API does; `--webhook-allow-private` also allows `http://` and private networks.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebhookPolicy {
    pub allow_private: bool,
}

/// A URL as given, checked: `Ok(None)` clears the webhook.
pub(super) fn checked_url(
    policy: WebhookPolicy,
    field: &str,
    value: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let Some(url) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let refuse = |why: String| {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{field}: {why}"),
        ))
    };
    if url.len() > MAX_URL {
        return refuse(format!("the URL is longer than {MAX_URL} bytes"));
    }
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return refuse(format!("{url:?} is not a URL"));
    };
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if policy.allow_private => {}
        Some("http") => {
            return refuse(
                "must be an https:// URL (http:// needs --webhook-allow-private)".into(),
            );
        }
        _ => return refuse("must be an https:// URL".into()),
    }
    let Some(authority) = uri.authority() else {
        return refuse("the URL has no host".into());
    };
    if authority.as_str().contains('@') {
        return refuse("the URL must not carry credentials (user:password@)".into());
    }
    let host = authority.host();
    if host.is_empty() {
        return refuse("the URL has no host".into());
    }
    if let Some(zone) = host
        .strip_prefix('[')
        .and_then(|h| h.find('%').map(|at| h[at..].trim_end_matches(']')))
    {
        return refuse(format!(
            "the host has an IPv6 zone id ({zone}), which names a network interface of this machine; a webhook URL cannot carry one"
        ));
    }
    // What the delivery's client cannot parse could never be delivered.
    if reqwest::Url::parse(url).is_err() {
        return refuse(format!("{url:?} is not a URL"));
    }
    Ok(Some(url.to_owned()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ValueBody {
    value: Option<String>,
    notify_sent_by_me: Option<bool>,
}

fn gone() -> ApiError {
    ApiError::instance_not_found()
}

async fn set_one(
    kind: WebhookKind,
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
    JsonBody(body): JsonBody<ValueBody>,
) -> Result<Json<Value>, ApiError> {
    let url = checked_url(state.webhook_policy, "value", body.value.as_deref())?;
    if !state
        .store
        .set_webhook(&instance.record.id, kind, url.as_deref())
        .await?
    {
        return Err(gone());
    }
    if kind == WebhookKind::ReceivedDelivery && url.is_some() {
        state
            .store
            .set_notify_sent_by_me(&instance.record.id, true)
            .await?;
    }
    Ok(Json(json!({ "value": true })))
}

async fn set_every(
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
    JsonBody(body): JsonBody<ValueBody>,
) -> Result<Json<Value>, ApiError> {
    let url = checked_url(state.webhook_policy, "value", body.value.as_deref())?;
    if !state
        .store
        .set_every_webhook(&instance.record.id, url.as_deref(), body.notify_sent_by_me)
        .await?
    {
        return Err(gone());
    }
    Ok(Json(json!({ "value": true })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotifyBody {
    notify_sent_by_me: bool,
}

async fn set_notify(
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
    JsonBody(body): JsonBody<NotifyBody>,
) -> Result<Json<Value>, ApiError> {
    let current = state
        .store
        .instance(&instance.record.id)
        .await?
        .ok_or_else(gone)?;
    if body.notify_sent_by_me && current.webhooks.received.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "set a received webhook (update-webhook-received) first",
        ));
    }
    state
        .store
        .set_notify_sent_by_me(&instance.record.id, body.notify_sent_by_me)
        .await?;
    Ok(Json(json!({ "value": true })))
}

/// Webhooks with every URL set, for the examples of the routes that show them.
pub(super) fn example() -> Webhooks {
    let url = || Some("https://example.com/webhooks/zapgate".to_owned());
    Webhooks {
        connected: url(),
        disconnected: url(),
        received: url(),
        received_delivery: url(),
        delivery: url(),
        message_status: url(),
        chat_presence: url(),
        notify_sent_by_me: true,
    }
}

/// The webhook fields of `/me` and the partner list, by Z-API's names.
pub(super) fn fields(w: &Webhooks) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    for (name, value) in [
        ("connectedCallbackUrl", &w.connected),
        ("disconnectedCallbackUrl", &w.disconnected),
        ("receivedCallbackUrl", &w.received),
        ("receivedAndDeliveryCallbackUrl", &w.received_delivery),
        ("deliveryCallbackUrl", &w.delivery),
        ("messageStatusCallbackUrl", &w.message_status),
        ("presenceChatCallbackUrl", &w.chat_presence),
    ] {
        map.insert(name.to_owned(), json!(value));
    }
    map.insert(
        "receiveCallbackSentByMe".to_owned(),
        json!(w.notify_sent_by_me),
    );
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        let public = WebhookPolicy::default();
        let open = WebhookPolicy {
            allow_private: true,
        };
        let check = |p, v: &str| checked_url(p, "value", Some(v)).map_err(|e| e.status());
        assert_eq!(
            check(public, "https://hooks.example.com/x"),
            Ok(Some("https://hooks.example.com/x".into()))
        );
        assert_eq!(check(public, "  "), Ok(None));
        assert!(check(public, "http://hooks.example.com").is_err());
        assert!(check(open, "http://127.0.0.1:9/x").is_ok());
        assert!(check(public, "ftp://hooks.example.com").is_err());
        assert!(check(public, "https://user:pw@hooks.example.com").is_err());
        assert!(check(public, "https:///path").is_err());
        assert!(check(public, "not a url").is_err());
        for zoned in [
            "https://[fe80::1%25eth0]/x",
            "https://[fe80::1%eth0]:8443/x",
            "https://[fe80::1%251]",
        ] {
            assert_eq!(
                check(public, zoned),
                Err(StatusCode::BAD_REQUEST),
                "{zoned}"
            );
            assert_eq!(check(open, zoned), Err(StatusCode::BAD_REQUEST), "{zoned}");
        }
        assert!(check(public, "https://[2606:4700::1111]/x").is_ok());
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL));
        assert!(check(public, &long).is_err());
    }
}
