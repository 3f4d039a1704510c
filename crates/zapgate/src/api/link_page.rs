//! Link pages: a URL a business sends the number's owner instead of building the linking
//! flow. It carries its own single-purpose, expiring, revocable token (only its SHA-256
//! is stored) and shows one instance's linking experience, with the instance's name and
//! neither its id nor its token. The partner routes make and revoke them; `/link/{token}`
//! is public.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State as AxumState};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Admin, Instance};
use super::doc::{Auth, Routes, op};
use super::events::View;
use super::panel::{LINKING, html};
use super::{ApiError, AppState};
use crate::instance::{InstanceHandle, Requester};
use crate::store::{LinkPage, LinkPageMade};

/// A link page lives a day unless asked otherwise, and 30 days at most.
const DEFAULT_LIFE_SECS: u64 = 24 * 3600;
const MAX_LIFE_SECS: u64 = 30 * 24 * 3600;
/// Live link pages one instance may have at once.
const MAX_LIVE: u64 = 20;
/// Expired and revoked pages are forgotten this long after (they answer "expired" or
/// "revoked" until then, and "not valid" after).
const KEEP_DEAD_MS: i64 = 7 * 24 * 3600 * 1000;

pub(super) fn partner_routes(state: &AppState) -> Routes {
    let path = "/instances/{id}/token/{token}/link-page";
    Routes::new("Link pages", Auth::AdminAndInstance)
        .post(
            path,
            create_route,
            op("Makes a link page: a URL to send the number's owner, who links it there")
                .optional_body(json!({ "expiresIn": 86400 }))
                .ok(
                    "the page's URL (its token is shown only here) and when it expires",
                    json!({ "url": "https://wa.example.com/link/Hq3...", "expiresAt": "2026-12-02T12:00:00.000Z" }),
                )
                .fails(400, "expiresIn is not 1 to 2592000 seconds")
                .fails(409, "the number is linked, or the instance has 20 live pages"),
        )
        .delete(
            path,
            revoke_route,
            op("Revokes every live link page of the instance")
                .ok("how many", json!({ "revoked": 1 })),
        )
        .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::forward::to_owner,
            ))
}

pub(super) fn public_routes(state: &AppState) -> Routes {
    // A page that is not live, and linking that cannot go on, as its holder hears them.
    let dead = |op: super::doc::Op| {
        op.fails(404, "no such page")
            .fails(410, "the page expired, was revoked, or was used")
            .fails(409, "linking was stopped, or not started by this page")
            .fails(
                429,
                "too many requests from this page: Retry-After says when",
            )
            .fails(503, "WhatsApp cannot be reached, or the instance is moving")
    };
    Routes::new("Link pages (the number's owner)", Auth::LinkPage)
        .get(
            "/link/{token}",
            page,
            op("The link page")
                .html("the page")
                .html_page(404, "no such page")
                .html_page(410, "the page expired, was revoked, or was used"),
        )
        .get(
            "/link/{token}/events",
            events,
            op("The page's linking events (server-sent events)")
                .events("its state and codes")
                .fails(404, "no such page")
                .fails(410, "the page expired, was revoked, or was used"),
        )
        .post(
            "/link/{token}/qr-code",
            qr_code,
            dead(op("A QR code to scan")
                .ok(
                    "the code, its image, and the seconds it lives",
                    json!({ "value": "2@AbCd...,1", "image": "data:image/png;base64,...", "expiresIn": 19 }),
                )
                .ok("the number is linked", json!({ "connected": true }))),
        )
        .post(
            "/link/{token}/phone-code",
            phone_code,
            dead(op("A pairing code to type on the phone")
                .body(json!({ "phone": "5511999999999" }))
                .ok("the code", json!({ "code": "ABCD-EFGH" }))
                .ok("the number is linked", json!({ "connected": true }))
                .fails(400, "not a phone number")
                .fails(502, "WhatsApp refused to give a code for this number")),
        )
        .post(
            "/link/{token}/stop-linking",
            stop_linking,
            dead(op("Stops the linking this page started").ok("stopped", json!({ "value": true }))),
        )
        .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::forward::page_to_owner,
            ))
}

pub(super) fn hash(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where link pages are reached: `--public-url` when set, else the address the gateway
/// listens on; never what a request says (its Host could name anyone's server).
fn base_url(state: &AppState) -> String {
    if let Some(url) = &state.public_url {
        return url.clone();
    }
    if state.listen_addr.ip().is_unspecified() {
        tracing::warn!(
            listen = %state.listen_addr,
            "a link page's URL names the listen address, which names no host: set --public-url (ZAPGATE_PUBLIC_URL)"
        );
    }
    format!("http://{}", state.listen_addr)
}

/// Makes a link page for `instance` living `life_secs`: `{"url", "expiresAt"}`. None
/// is made while the number is linked: it would link another number after a disconnect.
pub(super) async fn create(
    state: &AppState,
    instance: &InstanceHandle,
    life_secs: u64,
) -> Result<Value, ApiError> {
    if !(1..=MAX_LIFE_SECS).contains(&life_secs) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expiresIn is in seconds, 1 to {MAX_LIFE_SECS} (30 days)"),
        ));
    }
    let token = super::panel::random_token();
    let now = crate::unix_millis();
    let page = LinkPage {
        token_hash: hash(&token),
        instance_id: instance.record.id.clone(),
        created_at: now,
        expires_at: now + (life_secs * 1000) as i64,
        revoked_at: None,
        used_at: None,
        pair_codes: 0,
    };
    let made = state
        .store
        .insert_link_page(&page, now - KEEP_DEAD_MS, MAX_LIVE)
        .await?;
    let refused = match made {
        LinkPageMade::Made => None,
        LinkPageMade::TooMany => Some(format!(
            "this instance already has {MAX_LIVE} live link pages: revoke them first"
        )),
        LinkPageMade::Linked => Some(
            "This instance's number is linked: disconnect it before making a link page.".into(),
        ),
    };
    if let Some(why) = refused {
        return Err(ApiError::new(StatusCode::CONFLICT, why));
    }
    Ok(json!({
        "url": format!("{}/link/{token}", base_url(state)),
        "expiresAt": crate::iso_time(page.expires_at),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    expires_in: Option<u64>,
}

/// The body is optional: `{"expiresIn": seconds}`.
pub(super) fn life_from(body: &Bytes) -> Result<u64, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_LIFE_SECS);
    }
    let body: CreateBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))?;
    Ok(body.expires_in.unwrap_or(DEFAULT_LIFE_SECS))
}

async fn create_route(
    _: Admin,
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let life = life_from(&body)?;
    Ok(Json(create(&state, &instance, life).await?))
}

async fn revoke_route(
    _: Admin,
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
) -> Result<Json<Value>, ApiError> {
    let revoked = state
        .store
        .revoke_link_pages(&instance.record.id, crate::unix_millis())
        .await?;
    Ok(Json(json!({ "revoked": revoked })))
}

/// Why a link page cannot be used.
enum Dead {
    Unknown,
    Expired,
    Revoked,
    Used,
}

impl Dead {
    fn message(&self) -> &'static str {
        match self {
            Dead::Unknown => {
                "This link is not valid. Check that it was copied whole, or ask whoever sent it for a new one."
            }
            Dead::Expired => "This link has expired. Ask whoever sent it for a new one.",
            Dead::Revoked => "This link was withdrawn by whoever sent it. Ask them for a new one.",
            Dead::Used => {
                "This link was used: the number is linked. If it must be linked again, ask whoever sent the link for a new one."
            }
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Dead::Unknown => StatusCode::NOT_FOUND,
            Dead::Expired | Dead::Revoked | Dead::Used => StatusCode::GONE,
        }
    }
}

/// The instance a live link page links, and the page.
async fn live(
    state: &AppState,
    token: &str,
) -> Result<Result<(InstanceHandle, LinkPage), Dead>, ApiError> {
    let Some(page) = state.store.link_page(&hash(token)).await? else {
        return Ok(Err(Dead::Unknown));
    };
    if page.revoked_at.is_some() {
        return Ok(Err(Dead::Revoked));
    }
    if page.used_at.is_some() {
        return Ok(Err(Dead::Used));
    }
    if page.expires_at <= crate::unix_millis() {
        return Ok(Err(Dead::Expired));
    }
    Ok(match state.manager.get(&page.instance_id) {
        Some(instance) => Ok((instance, page)),
        None => Err(Dead::Unknown),
    })
}

/// The instance of the link page in the path, for its JSON and event routes, with the
/// page's token and the page as a requester.
struct Linkable(InstanceHandle, String, Requester);

impl FromRequestParts<AppState> for Linkable {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Path(token) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, Dead::Unknown.message()))?;
        match live(state, &token).await? {
            Ok((instance, page)) => {
                let by = Requester::Page {
                    id: page.token_hash.into(),
                    pair_codes: page.pair_codes,
                };
                Ok(Linkable(instance, token, by))
            }
            Err(dead) => Err(ApiError::new(dead.status(), dead.message())),
        }
    }
}

async fn page(AxumState(state): AxumState<AppState>, Path(token): Path<String>) -> Response {
    let instance = match live(&state, &token).await {
        Ok(Ok((instance, _))) => instance,
        Ok(Err(dead)) => {
            let body = format!(
                r#"<h1>Link WhatsApp</h1><p class="error" role="alert">{}</p>"#,
                dead.message()
            );
            return (
                dead.status(),
                html("Link WhatsApp", "link-dead", None, "", &body),
            )
                .into_response();
        }
        Err(e) => return e.into_response(),
    };
    let name = super::panel::escape(&instance.record.name);
    let data = format!(r#"data-base="/link/{}""#, super::panel::escape(&token));
    let body = format!(
        r#"<h1>Link your WhatsApp to {name}</h1>
<p>State: <strong id="state" aria-live="polite">…</strong></p>
<p class="error" role="alert" id="error" hidden></p>
{LINKING}
<section id="linked" hidden class="card center">
<p class="done">Linked<span id="phone-said" hidden>: <strong id="phone"></strong></span>. You can close this page.</p>
</section>"#
    );
    html(
        &format!("Link WhatsApp to {}", instance.record.name),
        "link",
        None,
        &data,
        &body,
    )
    .into_response()
}

/// The link page's events, in the page's view; the stream ends when the page dies
/// (expired, revoked, used), checked at least every 10 s.
async fn events(
    AxumState(state): AxumState<AppState>,
    Linkable(instance, token, _): Linkable,
) -> Result<Response, ApiError> {
    let page: std::sync::Arc<str> = hash(&token).into();
    let slot = state.streams.take(&format!("link/{page}"))?;
    let view = View::Page(page);
    let body = super::events::body(instance, state.shutdown.clone(), view);
    let dies = async move {
        loop {
            tokio::time::sleep(RECHECK).await;
            if !matches!(live(&state, &token).await, Ok(Ok(_))) {
                return;
            }
        }
    };
    let body = super::events::holding(slot, body.take_until(Box::pin(dies)));
    Ok(super::events::respond(body))
}

/// How often an open link page's stream checks that its page still lives.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// What a link page's holder hears when linking cannot go on: the status the API
/// gives, in words meant for them (no operator's detail, nobody else's number).
fn public_reply(result: Result<Value, crate::instance::LinkError>) -> Response {
    use crate::instance::LinkError as E;
    let error = match result {
        Ok(body) => return Json(body).into_response(),
        Err(error) => error,
    };
    let message = match &error {
        E::AlreadyConnected => return Json(json!({ "connected": true })).into_response(),
        E::Unavailable(_) | E::Gone => {
            "WhatsApp cannot be reached right now: try again in a moment."
        }
        E::Replaced(_) => "Another linking request replaced this one: try again.",
        E::Refused(_) => "WhatsApp refused to give a pairing code: check the number and try again.",
        E::SessionStored | E::Problem(_) | E::Unlinking => {
            "This number cannot be linked from here right now: ask whoever sent the link."
        }
        E::RateLimited(wait) => {
            // The page's own budget: the operator's is never spent by pages.
            let secs = crate::instance::whole_seconds(*wait);
            let message = format!("Too many requests from this link: try again in {secs} s.");
            let mut response =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return response;
        }
        E::WindowClosed | E::QrCodesRanOut | E::PageCodesUsedUp | E::NotStartedHere => {
            return super::ApiError::link(error);
        }
    };
    let status = super::ApiError::from(error).status();
    super::ApiError::new(status, message).into_response()
}

/// The QR code as its event gives it: a page that joins a window someone else opened
/// missed that event (its stream shows a window's codes only once it asked).
async fn qr_code(Linkable(instance, _, by): Linkable) -> Response {
    public_reply(instance.qr_code(by).await.map(|qr| {
        let left = qr
            .expires
            .saturating_duration_since(tokio::time::Instant::now());
        json!({
            "value": qr.value,
            "image": qr.image_data_url(),
            "expiresIn": left.as_secs(),
        })
    }))
}

async fn phone_code(
    Linkable(instance, _, by): Linkable,
    super::JsonBody(body): super::JsonBody<super::panel::PhoneBody>,
) -> Result<Response, ApiError> {
    let phone = crate::phone::normalize(&body.phone)
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    Ok(public_reply(
        instance
            .phone_code(&phone, by)
            .await
            .map(|code| json!({ "code": code })),
    ))
}

async fn stop_linking(Linkable(instance, _, by): Linkable) -> Response {
    public_reply(
        instance
            .stop_linking(by)
            .await
            .map(|()| json!({ "value": true })),
    )
}
