//! HTTP only: the router, shared state, and the error type that writes Z-API's
//! `{"error": ...}` bodies. One file per Z-API docs section.

mod auth;
mod doc;
mod events;
mod forward;
mod instance;
mod limits;
mod link_page;
mod messages;
mod panel;
mod partner;
mod webhooks;

pub(crate) use events::state_name as events_state_name;
pub use webhooks::WebhookPolicy;

pub use limits::{FailedAuth, StreamSlots};

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::config::{REQUEST_TIMEOUT, Secret};
use crate::instance::{LinkError, Manager};
use crate::store::{Store, StoreError};

/// What every request shares, behind one `Arc`: a request's handlers and middleware
/// clone the state several times, and a clone is then one atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl From<Shared> for AppState {
    fn from(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

/// The gateway's handles and settings, as the API uses them.
pub struct Shared {
    pub manager: Arc<Manager>,
    pub messaging: Arc<crate::messaging::Hub>,
    pub store: Arc<dyn Store>,
    pub admin_token: Secret,
    pub client_token: Option<Secret>,
    /// Cancelled when the gateway shuts down: event streams end then.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The control API of the demo's simulated WhatsApp, whose phone the panel offers.
    pub simulator: Option<String>,
    /// Where users reach the gateway (`--public-url`), for the link pages' URLs and
    /// whether the panel's cookie is `Secure`.
    pub public_url: Option<String>,
    /// The address the gateway listens on, for the link pages' URLs without
    /// `--public-url`.
    pub listen_addr: std::net::SocketAddr,
    /// Which webhook URLs are accepted.
    pub webhook_policy: WebhookPolicy,
    /// Wakes the webhook delivery worker.
    pub webhooks_due: Arc<tokio::sync::Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Failed authentications by source address.
    pub failed_auth: Arc<FailedAuth>,
    /// Event streams open, in all and per instance or link page.
    pub streams: Arc<StreamSlots>,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<crate::config::Network>,
    /// On a shared database: the other nodes, to which calls for their instances go.
    pub cluster: Option<Cluster>,
    /// Every route's description, set as the router is made.
    pub described: std::sync::OnceLock<Vec<doc::Described>>,
}

pub use forward::Cluster;

/// Bodies above this are refused (no route takes more than a few fields).
pub(super) const BODY_LIMIT: usize = 64 * 1024;

/// Every route, each with its description.
fn routes(state: &AppState) -> doc::Routes {
    use doc::{Auth, Routes, op};
    Routes::new("Gateway", Auth::Public)
        .get(
            "/healthz",
            || async { Json(json!({ "status": "ok" })) },
            op("Whether the gateway answers").ok("it does", json!({ "status": "ok" })),
        )
        .get(
            "/readyz",
            readyz,
            op("Whether the gateway is ready: its database answers")
                .ok("ready", json!({ "status": "ready" }))
                .fails(503, "the database does not answer"),
        )
        .get(
            "/metrics",
            metrics,
            op("Prometheus metrics (OpenMetrics text)")
                .auth(Auth::Admin)
                .metrics("instances by state, requests, webhooks, messages, leases"),
        )
        .get(
            "/openapi.json",
            openapi,
            op("This API's OpenAPI 3.1 document").json(200, "the document"),
        )
        .get(
            "/docs",
            reference,
            op("This API's reference page").html("the page"),
        )
        .merge(partner::routes())
        .merge(link_page::partner_routes(state))
        .merge(panel::routes(state))
        .nest(
            "/instances/{id}/token/{token}",
            instance::routes().route_layer(middleware::from_fn_with_state(
                state.clone(),
                forward::to_owner,
            )),
        )
}

async fn openapi(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(doc::openapi(described(&state)))
}

/// Under the panel's Content-Security-Policy, as its pages.
async fn reference(State(state): State<AppState>) -> Response {
    panel::secure_headers(doc::reference(described(&state)).into_response()).await
}

fn described(state: &AppState) -> &[doc::Described] {
    state.described.get().map_or(&[], Vec::as_slice)
}

pub fn router(state: AppState) -> Router {
    let (routes, described) = routes(&state).into_parts();
    let _ = state.described.set(described);
    routes
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "Route not found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed for this route",
            )
        })
        .layer(middleware::from_fn(limit_time))
        .layer(middleware::from_fn_with_state(state.clone(), measure))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                // The matched route, never the URI: the path carries the instance token.
                let route = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("unmatched", |p| p.as_str());
                tracing::info_span!("http", http.method = %request.method(), http.route = route)
            }),
        )
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::HeaderName::from_static("client-token"),
        ]))
        .with_state(state)
}

/// Prometheus' text format, behind the admin token.
async fn metrics(_: auth::Admin, State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.manager, &*state.store).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Counts every request and its latency by matched route (never the URI, which holds
/// tokens).
async fn measure(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .http_requests
        .get_or_create(&crate::metrics::RouteLabel {
            route: route.clone(),
            method: method.clone(),
            status: response.status().as_u16().to_string(),
        })
        .inc();
    metrics
        .http_seconds
        .get_or_create(&crate::metrics::LatencyLabel { route, method })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.ping().await?;
    Ok(Json(json!({ "status": "ready" })))
}

/// The routes that stream server-sent events: they last, and end at shutdown.
const STREAMS: [&str; 4] = [
    "/instances/{id}/token/{token}/events",
    "/panel/api/events",
    "/panel/api/instances/{id}/events",
    "/link/{token}/events",
];

/// Every request ends within [`REQUEST_TIMEOUT`], but an event stream.
async fn limit_time(request: Request, next: Next) -> Response {
    let stream = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| STREAMS.contains(&p.as_str()));
    if stream {
        return next.run(request).await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "The request took too long").into_response()
        }
    }
}

/// An error as Z-API shapes it: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds to send in `Retry-After`.
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the caller when to try again.
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(crate::instance::whole_seconds(wait));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn instance_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Instance not found")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Logged once, here; the client learns nothing of the database.
        tracing::error!(error = %e, "store error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
    }
}

impl From<LinkError> for ApiError {
    fn from(e: LinkError) -> Self {
        let status = match e {
            LinkError::Unavailable(_) | LinkError::Gone => StatusCode::SERVICE_UNAVAILABLE,
            LinkError::WindowClosed
            | LinkError::QrCodesRanOut
            | LinkError::Replaced(_)
            | LinkError::Unlinking
            | LinkError::NotStartedHere
            | LinkError::Problem(_) => StatusCode::CONFLICT,
            LinkError::Refused(_) => StatusCode::BAD_GATEWAY,
            LinkError::RateLimited(_) | LinkError::PageCodesUsedUp => StatusCode::TOO_MANY_REQUESTS,
            LinkError::AlreadyConnected | LinkError::SessionStored => StatusCode::OK,
        };
        Self::new(status, e.to_string())
    }
}

impl ApiError {
    /// The error response, with `Retry-After` when the caller was rate limited.
    pub fn link(e: LinkError) -> Response {
        let retry = match &e {
            LinkError::RateLimited(wait) => Some(*wait),
            _ => None,
        };
        let error = Self::from(e);
        match retry {
            Some(wait) => error.retry_after(wait),
            None => error,
        }
        .into_response()
    }
}

/// `Json<T>` whose rejection is an [`ApiError`].
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| JsonBody(v))
            .map_err(|r: JsonRejection| ApiError::new(r.status(), r.body_text()))
    }
}

/// `Query<T>` whose rejection is an [`ApiError`].
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| QueryParams(v))
            .map_err(|r: QueryRejection| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))
    }
}
