//! Z-API's partner section: creating, listing and cancelling instances, behind the
//! operator's bearer token.

use axum::Json;
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Admin, Instance};
use super::doc::{Auth, Routes, op};
use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::instance::{NewInstance, State};
use crate::store::InstanceRecord;

pub(super) fn routes() -> Routes {
    let mut listed = json!({
        "id": "3C1F0E6A2B9D4C5E8F7A6B5C4D3E2F1A",
        "token": "9A0B1C2D3E4F5A6B7C8D9E0F",
        "name": "store front",
        "created": "2026-12-01T12:00:00.000Z",
        "due": 1767225600000_i64,
        "phoneConnected": true,
        "whatsappConnected": true,
        "middleware": "web",
    });
    listed
        .as_object_mut()
        .expect("an object")
        .extend(super::webhooks::fields(&super::webhooks::example()));
    Routes::new("Instances (partner)", Auth::Admin)
        .post(
            "/instances/integrator/on-demand",
            create,
            op("Creates an instance (a number to link), with its webhooks if given")
                .body(json!({
                    "name": "store front",
                    "sessionName": "Store",
                    "connectedCallbackUrl": "https://example.com/webhooks/zapgate",
                }))
                .ok(
                    "the instance's id and token: its routes are /instances/{id}/token/{token}/...",
                    json!({ "id": "3C1F0E6A2B9D4C5E8F7A6B5C4D3E2F1A", "token": "9A0B1C2D3E4F5A6B7C8D9E0F", "due": 1767225600000_i64 }),
                )
                .fails(400, "the name is missing or too long, or a webhook URL cannot be called"),
        )
        .get(
            "/instances",
            list,
            op("The instances, a page at a time (`?page=1&pageSize=20&query=<name>`)")
                .ok(
                    "the page",
                    json!({ "total": 1, "totalPage": 1, "pageSize": 20, "page": 1, "content": [listed] }),
                )
                .fails(400, "page starts at 1 and pageSize is 1 to 100"),
        )
}

pub(super) const MAX_NAME: usize = 120;
const MAX_PAGE_SIZE: u32 = 100;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    name: Option<String>,
    session_name: Option<String>,
    connected_callback_url: Option<String>,
    disconnected_callback_url: Option<String>,
    received_callback_url: Option<String>,
    received_and_delivery_callback_url: Option<String>,
    delivery_callback_url: Option<String>,
    message_status_callback_url: Option<String>,
    presence_chat_callback_url: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

async fn create(
    _: Admin,
    AxumState(state): AxumState<AppState>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Json<Value>, ApiError> {
    let name = body.name.map(|n| n.trim().to_owned()).unwrap_or_default();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(bad(format!(
            "name is required, up to {MAX_NAME} characters"
        )));
    }
    let new = NewInstance {
        name,
        session_name: body
            .session_name
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        webhooks: {
            let url = |field: &str, value: &Option<String>| {
                super::webhooks::checked_url(state.webhook_policy, field, value.as_deref())
            };
            crate::store::Webhooks {
                connected: url("connectedCallbackUrl", &body.connected_callback_url)?,
                disconnected: url("disconnectedCallbackUrl", &body.disconnected_callback_url)?,
                received: url("receivedCallbackUrl", &body.received_callback_url)?,
                received_delivery: url(
                    "receivedAndDeliveryCallbackUrl",
                    &body.received_and_delivery_callback_url,
                )?,
                delivery: url("deliveryCallbackUrl", &body.delivery_callback_url)?,
                message_status: url(
                    "messageStatusCallbackUrl",
                    &body.message_status_callback_url,
                )?,
                chat_presence: url("presenceChatCallbackUrl", &body.presence_chat_callback_url)?,
                notify_sent_by_me: body.received_and_delivery_callback_url.is_some(),
            }
        },
    };
    let handle = state.manager.create(new).await?;
    let r = &handle.record;
    Ok(Json(
        json!({ "id": r.id, "token": r.token, "due": r.due_at }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    page: Option<u32>,
    page_size: Option<u32>,
    query: Option<String>,
}

async fn list(
    _: Admin,
    AxumState(state): AxumState<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = q.page.unwrap_or(1);
    let page_size = q.page_size.unwrap_or(20);
    if page == 0 || page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(bad(format!(
            "page starts at 1 and pageSize is 1 to {MAX_PAGE_SIZE}"
        )));
    }
    let query = q.query.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let found = state.store.page_instances(page, page_size, query).await?;
    let mut content = Vec::with_capacity(found.items.len());
    for record in &found.items {
        content.push(summary(&state, record).await?);
    }
    Ok(Json(json!({
        "total": found.total,
        "totalPage": found.total.div_ceil(u64::from(page_size)),
        "pageSize": page_size,
        "page": page,
        "content": content,
    })))
}

async fn summary(state: &AppState, r: &InstanceRecord) -> Result<Value, ApiError> {
    let connected = match state.manager.get(&r.id) {
        Some(handle) => handle.snapshot().state == State::Connected,
        // Run by another node: what its connection webhooks last said (a disconnect
        // is said once it lasted the grace).
        None if state.cluster.is_some() => {
            state.store.webhook_announced(&r.id).await? == Some(true)
        }
        None => false,
    };
    let mut item = json!({
        "id": r.id,
        "token": r.token,
        "name": r.name,
        "created": crate::iso_time(r.created_at),
        "due": r.due_at,
        "phoneConnected": connected,
        "whatsappConnected": connected,
        "middleware": "web",
    });
    item.as_object_mut()
        .expect("an object")
        .extend(super::webhooks::fields(&r.webhooks));
    Ok(item)
}

/// Unlinks the number and deletes the instance with its session.
pub(super) async fn cancel(
    _: Admin,
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
) -> Result<StatusCode, ApiError> {
    state.manager.cancel(&instance.record.id).await?;
    Ok(StatusCode::CREATED)
}
