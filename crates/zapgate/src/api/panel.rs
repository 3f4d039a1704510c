//! The admin panel, served by the gateway itself: plain HTML pages, one stylesheet and
//! one script, all embedded in the binary, under a strict Content-Security-Policy.
//! Signing in with the admin token opens a session (an HttpOnly, SameSite=Strict
//! cookie); every state-changing request also carries the session's CSRF token.

use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State as AxumState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::doc::{Auth, Routes, op};
use super::{ApiError, AppState, JsonBody};
use crate::instance::{InstanceHandle, LinkError, NewInstance, Requester, Unlinked};
use crate::store::InstanceRecord;

const COOKIE: &str = "zapgate_panel";
/// A session lasts this long from sign-in.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// At most this many open sessions; the one closest to expiry makes room.
const MAX_SESSIONS: u64 = 256;
/// A wrong admin token is answered after this delay.
const WRONG_TOKEN_DELAY: Duration = Duration::from_secs(1);

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(super) fn random_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The panel's sessions, in the database: a sign-in outlives a restart, and on a shared
/// database it holds on every node. A session is kept under the hash of its cookie and
/// the admin token, so a changed admin token signs everyone out.
struct Sessions<'a>(&'a AppState);

impl Sessions<'_> {
    fn key(&self, id: &str) -> String {
        super::link_page::hash(&format!("{id}\n{}", self.0.admin_token.expose()))
    }

    /// A new session: its id (the cookie) and its CSRF token.
    async fn open(&self) -> Result<(String, String), ApiError> {
        let (id, csrf) = (random_token(), random_token());
        let now = crate::unix_millis();
        let ttl = i64::try_from(SESSION_TTL.as_millis()).expect("a short TTL");
        self.0
            .store
            .open_panel_session(&self.key(&id), &csrf, now + ttl, now, MAX_SESSIONS)
            .await?;
        Ok((id, csrf))
    }

    /// The CSRF token of the live session the request's cookie names.
    async fn csrf(&self, headers: &HeaderMap) -> Result<Option<(String, String)>, ApiError> {
        let Some(id) = session_cookie(headers) else {
            return Ok(None);
        };
        let found = self
            .0
            .store
            .panel_session(&self.key(&id), crate::unix_millis())
            .await?;
        Ok(found.map(|csrf| (id, csrf)))
    }

    async fn close(&self, id: &str) -> Result<(), ApiError> {
        Ok(self.0.store.close_panel_session(&self.key(id)).await?)
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// A signed-in operator, on a page: without a session, the sign-in page.
struct Page {
    csrf: String,
}

impl FromRequestParts<AppState> for Page {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Sessions(state).csrf(&parts.headers).await {
            Ok(Some((_, csrf))) => Ok(Page { csrf }),
            Ok(None) => Err(Redirect::to("/panel/sign-in").into_response()),
            Err(e) => Err(e.into_response()),
        }
    }
}

/// Whether the call comes from a signed-in operator (with the session's CSRF token, for
/// anything but a GET).
pub(super) async fn signed_in(parts: &mut Parts, state: &AppState) -> Result<(), ApiError> {
    Operator::from_request_parts(parts, state).await.map(|_| ())
}

/// A signed-in operator, on the panel's JSON routes: anything but a GET must carry the
/// session's CSRF token in `X-CSRF-Token`.
struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let signed_out = || ApiError::new(StatusCode::UNAUTHORIZED, "Signed out: sign in again");
        let (_, csrf) = Sessions(state)
            .csrf(&parts.headers)
            .await?
            .ok_or_else(signed_out)?;
        if parts.method != Method::GET {
            let given = parts
                .headers
                .get("x-csrf-token")
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if !super::auth::same(given, csrf.as_bytes()) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "The request did not come from the panel",
                ));
            }
        }
        Ok(Operator)
    }
}

pub(super) fn routes(state: &AppState) -> Routes {
    let tag = "Admin panel (for its own pages)";
    Routes::new(tag, Auth::Panel)
        .get(
            "/",
            || async { Redirect::to("/panel") },
            op("The gateway's address leads to the panel")
                .auth(Auth::Public)
                .redirect("to /panel"),
        )
        .get(
            "/panel",
            instances_page,
            op("The instances page")
                .html("the page")
                .redirect("signed out: to the sign-in page"),
        )
        .get(
            "/panel/sign-in",
            sign_in_page,
            op("The sign-in page").auth(Auth::Public).html("the form"),
        )
        .post(
            "/panel/sign-in",
            sign_in,
            op("Signs in with the admin token (a form: token=...)")
                .auth(Auth::Public)
                .redirect("signed in: the session cookie, and to /panel")
                .html_page(401, "not the admin token: the form again, saying so")
                .html_page(429, "too many failed attempts from this address: the form, saying when to try again"),
        )
        .post(
            "/panel/sign-out",
            sign_out,
            op("Signs out (a form: csrf=...)").redirect("to the sign-in page"),
        )
        .get(
            "/panel/assets/{file}",
            asset,
            op("The panel's stylesheet and script")
                .auth(Auth::Public)
                .asset("the file"),
        )
        .get(
            "/panel/api/instances",
            list,
            op("The instances, with their states (`?query=<name>`)").json(200, "the first 100"),
        )
        .post(
            "/panel/api/instances",
            create,
            op("Creates an instance")
                .body(json!({ "name": "store front" }))
                .json(200, "its id"),
        )
        .get(
            "/panel/api/events",
            every_instance,
            op("Every instance's state changes (server-sent events)")
                .events("`instance` and `resync` events"),
        )
        .merge(super::link_page::public_routes(state))
        // What only the database knows is answered by any node.
        .get(
            "/panel/instances/{id}",
            instance_page,
            op("An instance's page")
                .html("the page")
                .html_page(404, "no such instance")
                .redirect("signed out: to the sign-in page"),
        )
        .post(
            "/panel/api/instances/{id}/link-page/revoke",
            revoke_link_pages,
            op("Revokes the instance's live link pages").json(200, "how many"),
        )
        .get(
            "/panel/api/instances/{id}/webhook-deliveries",
            webhook_deliveries,
            op("The instance's last webhook events").json(200, "newest first"),
        )
        .merge(instance_routes(state, tag))
        .layer(axum::middleware::map_response(secure_headers))
}

/// The panel's routes about one instance: run by the node that runs the instance.
fn instance_routes(state: &AppState, tag: &'static str) -> Routes {
    let base = "/panel/api/instances/{id}";
    Routes::new(tag, Auth::Panel)
        .get(
            &format!("{base}/events"),
            events,
            op("The instance's events (server-sent events)").events("as the API's event stream"),
        )
        .post(
            &format!("{base}/qr-code"),
            qr_code,
            op("Opens linking with a QR code").json(200, "the code"),
        )
        .post(
            &format!("{base}/phone-code"),
            phone_code,
            op("A pairing code for a number")
                .body(json!({ "phone": "5511999999999" }))
                .json(200, "the code"),
        )
        .post(
            &format!("{base}/stop-linking"),
            stop_linking,
            op("Stops linking").json(200, "stopped"),
        )
        .post(
            &format!("{base}/restart"),
            restart,
            op("Reconnects the number").json(200, "reconnecting"),
        )
        .post(
            &format!("{base}/disconnect"),
            disconnect,
            op("Unlinks the number").json(200, "unlinked"),
        )
        .post(
            &format!("{base}/cancel"),
            cancel,
            op("Unlinks the number and deletes the instance").json(200, "cancelled"),
        )
        .post(
            &format!("{base}/link-page"),
            create_link_page,
            op("Makes a link page").json(200, "its URL and expiry"),
        )
        // The node running the instance delivers its webhooks: it is the one to wake.
        .post(
            &format!("{base}/webhook-deliveries/{{event}}/retry"),
            retry_webhook,
            op("Tries a pending webhook event again now").json(200, "due now"),
        )
        .merge(simulated::routes(tag))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::forward::panel_to_owner,
        ))
}

pub(super) async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// `&`, `<`, `>`, `"` and `'` as entities: text from users is never markup.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page: `page` names the script's part for it.
pub(super) fn html(
    title: &str,
    page: &str,
    csrf: Option<&str>,
    data: &str,
    body: &str,
) -> Html<String> {
    let (csrf, signed_in) = match csrf {
        Some(token) => (
            format!(r#"<meta name="csrf" content="{}">"#, escape(token)),
            format!(
                r#"<form method="post" action="/panel/sign-out" class="sign-out"><input type="hidden" name="csrf" value="{}"><button type="submit">Sign out</button></form>"#,
                escape(token)
            ),
        ),
        None => (String::new(), String::new()),
    };
    // Only an operator's pages lead to the panel.
    let brand = if signed_in.is_empty() {
        r#"<span class="brand">zapgate</span>"#
    } else {
        r#"<a href="/panel" class="brand">zapgate</a>"#
    };
    Html(format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{csrf}
<title>{title} · zapgate</title>
<link rel="stylesheet" href="/panel/assets/panel.css">
<script src="/panel/assets/panel.js" defer></script>
</head>
<body data-page="{page}" {data}>
<header>{brand}{signed_in}</header>
<main>
{body}
</main>
</body>
</html>
"#,
        title = escape(title),
    ))
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "panel.js" => (
            include_str!("panel/panel.js"),
            "text/javascript; charset=utf-8",
        ),
        "panel.css" => (include_str!("panel/panel.css"), "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

fn sign_in_form(message: Option<&str>) -> Html<String> {
    let message = message.map_or(String::new(), |m| {
        format!(r#"<p class="error" role="alert">{}</p>"#, escape(m))
    });
    html(
        "Sign in",
        "sign-in",
        None,
        "",
        &format!(
            r#"<h1>Sign in</h1>
{message}
<form method="post" action="/panel/sign-in" class="card">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<p class="hint">It is in <code>data/admin-token</code>, or what <code>--admin-token</code> was given.</p>
<button type="submit">Sign in</button>
</form>"#
        ),
    )
}

async fn sign_in_page(headers: HeaderMap, AxumState(state): AxumState<AppState>) -> Response {
    match Sessions(&state).csrf(&headers).await {
        Ok(Some(_)) => Redirect::to("/panel").into_response(),
        Ok(None) => sign_in_form(None).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct SignInForm {
    token: String,
}

async fn sign_in(
    AxumState(state): AxumState<AppState>,
    super::limits::Peer(peer): super::limits::Peer,
    Form(form): Form<SignInForm>,
) -> Response {
    let given = form.token.trim();
    let admin = state.admin_token.expose().as_bytes();
    let checked = state.failed_auth.verify(peer, || {
        super::auth::same(given.as_bytes(), admin)
            .then_some(())
            .ok_or(())
    });
    match checked {
        Ok(Ok(())) => {}
        Ok(Err(())) => {
            tokio::time::sleep(WRONG_TOKEN_DELAY).await;
            let page = sign_in_form(Some("That is not the admin token."));
            return (StatusCode::UNAUTHORIZED, page).into_response();
        }
        Err(refused) => {
            let page = sign_in_form(Some(&refused.message()));
            let retry = [(header::RETRY_AFTER, refused.secs().to_string())];
            return (StatusCode::TOO_MANY_REQUESTS, retry, page).into_response();
        }
    }
    let id = match Sessions(&state).open().await {
        Ok((id, _)) => id,
        Err(e) => return e.into_response(),
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        secure(&state)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/panel")).into_response()
}

/// The cookie's `Secure` attribute when users reach the gateway over https (it is then
/// never sent over plain http).
fn secure(state: &AppState) -> &'static str {
    let https = state
        .public_url
        .as_deref()
        .and_then(|url| url.get(..8))
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if https { "; Secure" } else { "" }
}

#[derive(Deserialize)]
struct SignOutForm {
    csrf: String,
}

async fn sign_out(
    headers: HeaderMap,
    AxumState(state): AxumState<AppState>,
    Form(form): Form<SignOutForm>,
) -> Response {
    // A session that is gone (expired, or a changed admin token) is signed out
    // already.
    let sessions = Sessions(&state);
    let open = match sessions.csrf(&headers).await {
        Ok(open) => open,
        Err(e) => return e.into_response(),
    };
    if let Some((id, csrf)) = open {
        if !super::auth::same(form.csrf.as_bytes(), csrf.as_bytes()) {
            return (
                StatusCode::FORBIDDEN,
                "The request did not come from the panel",
            )
                .into_response();
        }
        if let Err(e) = sessions.close(&id).await {
            return e.into_response();
        }
    }
    let cookie = format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure(&state)
    );
    (
        [(header::SET_COOKIE, cookie)],
        Redirect::to("/panel/sign-in"),
    )
        .into_response()
}

async fn instances_page(page: Page) -> Html<String> {
    html(
        "Instances",
        "instances",
        Some(&page.csrf),
        "",
        r#"<h1>Instances</h1>
<form id="create" class="card row">
<label for="new-name">New instance</label>
<input id="new-name" name="name" maxlength="120" placeholder="Name" required>
<button type="submit">Create</button>
</form>
<p class="error" role="alert" id="list-error" hidden></p>
<label for="search" class="visually-hidden">Search</label>
<input id="search" type="search" placeholder="Search by name">
<table id="instances">
<thead><tr><th>Name</th><th>Phone</th><th>State</th><th>Created</th><th></th></tr></thead>
<tbody></tbody>
</table>"#,
    )
}

async fn instance_page(
    page: Page,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Response {
    let record = match listed(&state, &id).await {
        Ok(record) => record,
        Err(e) => return e.into_response(),
    };
    let Some(r) = &record else {
        let body = r#"<h1>No such instance</h1><p><a href="/panel">Back to the instances</a></p>"#;
        return (
            StatusCode::NOT_FOUND,
            html("Not found", "missing", Some(&page.csrf), "", body),
        )
            .into_response();
    };
    let data = format!(r#"data-instance="{}""#, escape(&r.id));
    html(
        &r.name,
        "instance",
        Some(&page.csrf),
        &data,
        &format!(
            r##"<p><a href="/panel">← Instances</a></p>
<h1>{name}</h1>
<p>State: <strong id="state" aria-live="polite">…</strong></p>
<p class="error" role="alert" id="error" hidden></p>
{linking}
<section id="linked" hidden>
<dl class="card">
<dt>Phone</dt><dd id="phone"></dd>
<dt>Device</dt><dd id="device"></dd>
<dt>Name</dt><dd id="push-name"></dd>
<dt>Linked since</dt><dd id="since"></dd>
</dl>
<p><button id="restart" type="button">Restart</button>
<button id="disconnect" type="button" class="danger">Disconnect</button></p>
</section>
<section class="card" id="link-page-card">
<h2>Link page</h2>
<p>A page for the number's owner to link it themselves: it shows only this linking, with the instance's name.</p>
<p><button id="make-link" type="button">Create a link page (24 h)</button>
<button id="revoke-links" type="button" class="danger">Revoke link pages</button></p>
<p id="link-made" hidden><a id="link-url" href="#"></a> <button type="button" data-copy="link-url">Copy</button><br><span id="link-expiry" class="hint"></span></p>
</section>
<section class="card">
<h2>Webhook deliveries</h2>
<p><button id="show-deliveries" type="button">Show the last deliveries</button></p>
<table id="deliveries" hidden>
<thead><tr><th>Event</th><th>Status</th><th>Attempts</th><th>Last answer</th><th>Next attempt</th><th></th></tr></thead>
<tbody></tbody>
</table>
</section>
<section class="card">
<h2>API</h2>
<p>Instance id: <code id="instance-id">{id}</code> <button type="button" data-copy="instance-id">Copy</button></p>
<p>Token: <code id="instance-token">{token}</code> <button type="button" data-copy="instance-token">Copy</button></p>
<pre id="curl" data-path="/instances/{id}/token/{token}/status"></pre>
<button type="button" data-copy="curl">Copy</button>
</section>"##,
            name = escape(&r.name),
            linking = if state.simulator.is_some() {
                LINKING
                    .replace("<!--qr-extra-->", SIMULATED_SCAN)
                    .replace("<!--code-extra-->", SIMULATED_CODE)
            } else {
                LINKING.to_owned()
            },
            id = escape(&r.id),
            token = escape(&r.token),
        ),
    )
    .into_response()
}

/// The linking experience: QR code with countdown, or a pairing code.
pub(super) const LINKING: &str = r#"<section id="linking" hidden>
<div id="qr-box" class="card center">
<img id="qr" alt="QR code to scan with WhatsApp" hidden>
<p id="countdown" aria-live="polite"></p>
<p id="qr-help">On the phone: WhatsApp › Settings › Linked devices › Link a device, then scan this code.</p>
<p id="stopped" hidden>Nobody scanned the last codes, so linking stopped.</p>
<button id="start" type="button">Show a QR code</button>
<!--qr-extra-->
</div>
<form id="phone-form" class="card">
<p>Link with a phone number instead</p>
<label for="phone-input">Phone number with country code</label>
<input id="phone-input" name="phone" inputmode="tel" autocomplete="tel" placeholder="5511999999999" required>
<button type="submit">Get a pairing code</button>
</form>
<div id="code-box" class="card center" hidden>
<p>On the phone: WhatsApp › Settings › Linked devices › Link a device › Link with phone number instead, then type:</p>
<p id="pair-code" class="code"></p>
<!--code-extra-->
</div>
</section>"#;

/// The demo's simulated phone, next to the codes (sandbox builds running `demo` only).
const SIMULATED_SCAN: &str =
    r#"<button id="sim-scan" type="button" hidden>Scan with the simulated phone</button>"#;
const SIMULATED_CODE: &str =
    r#"<button id="sim-code" type="button">Type it on the simulated phone</button>"#;

/// The demo's simulated phone acting on the codes the instance shows now.
#[cfg(feature = "sandbox")]
mod simulated {
    use super::*;

    pub(super) fn routes(tag: &'static str) -> Routes {
        Routes::new(tag, Auth::Panel)
            .post(
                "/panel/api/instances/{id}/simulated-scan",
                scan,
                op("The demo's simulated phone scans the QR code showing (sandbox builds)")
                    .json(200, "what the phone said"),
            )
            .post(
                "/panel/api/instances/{id}/simulated-code",
                type_code,
                op("The demo's simulated phone types the pairing code showing (sandbox builds)")
                    .json(200, "what the phone said"),
            )
    }

    fn phone(state: &AppState) -> Result<wa_sim::Control, ApiError> {
        state
            .simulator
            .as_ref()
            .map(|url| wa_sim::Control::new(url.clone()))
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "No simulated phone here"))
    }

    /// What the simulated phone answered.
    fn answered<E: std::fmt::Display>(
        result: Result<(u16, Value), E>,
    ) -> Result<Json<Value>, ApiError> {
        match result {
            Ok((200, body)) => Ok(Json(body)),
            Ok((_, body)) => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the simulated phone refused: {}", body["error"]),
            )),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the simulated phone did not answer: {e}"),
            )),
        }
    }

    async fn scan(
        _: Operator,
        AxumState(state): AxumState<AppState>,
        Path(id): Path<String>,
    ) -> Result<Json<Value>, ApiError> {
        let qr = found(&state, &id)?.snapshot().qr.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "No QR code is showing: show one first",
            )
        })?;
        answered(phone(&state)?.scan(&qr.value, None).await)
    }

    async fn type_code(
        _: Operator,
        AxumState(state): AxumState<AppState>,
        Path(id): Path<String>,
    ) -> Result<Json<Value>, ApiError> {
        let code = found(&state, &id)?.snapshot().pair_code.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "No pairing code is showing: ask for one first",
            )
        })?;
        answered(phone(&state)?.link_code(&code.phone, &code.code).await)
    }
}

#[cfg(not(feature = "sandbox"))]
mod simulated {
    use super::*;

    pub(super) fn routes(tag: &'static str) -> Routes {
        Routes::new(tag, Auth::Panel)
    }
}

/// The instance as the database has it, unless it is being cancelled: for what any
/// node answers.
async fn listed(state: &AppState, id: &str) -> Result<Option<InstanceRecord>, ApiError> {
    Ok(state
        .store
        .instance(id)
        .await?
        .filter(|r| r.cancelled_at.is_none()))
}

/// [`listed`], or the 404 of an instance that is not.
async fn known(state: &AppState, id: &str) -> Result<InstanceRecord, ApiError> {
    listed(state, id)
        .await?
        .ok_or_else(ApiError::instance_not_found)
}

fn found(state: &AppState, id: &str) -> Result<InstanceHandle, ApiError> {
    state
        .manager
        .get(id)
        .ok_or_else(ApiError::instance_not_found)
}

#[derive(Deserialize)]
struct ListQuery {
    query: Option<String>,
}

/// How long the list waits for the other nodes' states of their instances.
const OTHERS_WAIT: Duration = Duration::from_secs(3);

async fn list(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let query = q.query.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let found = state.store.page_instances(1, 100, query).await?;
    let mut items: Vec<Value> = found
        .items
        .iter()
        .map(|r| {
            let snapshot = state.manager.get(&r.id).map(|h| h.snapshot());
            let phone = snapshot
                .as_ref()
                .and_then(|s| s.device.as_ref().map(|d| d.phone.clone()))
                .or_else(|| r.link.as_ref().map(|l| l.phone.clone()));
            json!({
                "id": r.id,
                "name": r.name,
                "phone": phone,
                "state": snapshot.map(|s| super::events::state_name(s.state)),
                "created": crate::iso_time(r.created_at),
            })
        })
        .collect();
    // On a shared database, the states of the instances other nodes run are theirs to
    // say: each is asked the same page.
    let elsewhere = items.iter().any(|item| item["state"].is_null());
    if let Some(cluster) = state.cluster.as_ref().filter(|_| elsewhere) {
        if !super::forward::passed(&headers) {
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            let wait = super::forward::Wait::Answer(OTHERS_WAIT);
            let answers = match super::forward::ask_others(cluster, &headers, path, wait).await {
                Ok((_, answers)) => answers,
                Err(e) => {
                    tracing::warn!(error = %e, "could not look up the other nodes: the list shows this node's states only");
                    Vec::new()
                }
            };
            for (_, answer) in answers {
                let Ok(theirs) = answer.json::<Value>().await else {
                    continue;
                };
                let known = theirs["items"].as_array().into_iter().flatten();
                for their in known.filter(|item| !item["state"].is_null()) {
                    if let Some(item) = items.iter_mut().find(|item| item["id"] == their["id"]) {
                        item["state"] = their["state"].clone();
                        item["phone"] = their["phone"].clone();
                    }
                }
            }
        }
    }
    Ok(Json(json!({ "total": found.total, "items": items })))
}

#[derive(Deserialize)]
struct CreateBody {
    name: String,
}

async fn create(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Json<Value>, ApiError> {
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > super::partner::MAX_NAME {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "name is required, up to {} characters",
                super::partner::MAX_NAME
            ),
        ));
    }
    let handle = state
        .manager
        .create(NewInstance {
            name,
            session_name: None,
            webhooks: Default::default(),
        })
        .await?;
    Ok(Json(json!({ "id": handle.record.id })))
}

/// The state changes of every instance; on a shared database, of those every node runs.
async fn every_instance(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    // The feeds other nodes read for their panels count apart from this node's own.
    let passed = super::forward::passed(&headers);
    let slot = state.streams.take(if passed {
        "panel, for another node"
    } else {
        "panel"
    })?;
    let shutdown = state.shutdown.clone();
    let here = super::events::instance_states(state.manager.events());
    let cluster = state.cluster.as_ref();
    match cluster.filter(|_| !passed) {
        None => Ok(super::events::every_instance(here, shutdown, slot).into_response()),
        Some(cluster) => {
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            let all = super::forward::with_others(cluster, &headers, path, here).await?;
            Ok(super::events::every_instance(all, shutdown, slot).into_response())
        }
    }
}

async fn events(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let instance = found(&state, &id)?;
    let slot = state
        .streams
        .take(&super::events::instance_key(&instance))?;
    Ok(super::events::stream(
        instance,
        state.shutdown.clone(),
        slot,
    ))
}

pub(super) fn linked(result: Result<Value, LinkError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => ApiError::link(e),
    }
}

/// Opens a linking window (or joins the open one): the QR code comes as an event.
pub(super) async fn ask_qr(instance: &InstanceHandle) -> Response {
    linked(
        instance
            .qr_code(Requester::Operator)
            .await
            .map(|qr| json!({ "value": qr.value })),
    )
}

#[derive(Deserialize)]
pub(super) struct PhoneBody {
    pub(super) phone: String,
}

/// A pairing code for `phone`, checked as the API checks it.
pub(super) async fn ask_phone_code(
    instance: &InstanceHandle,
    phone: &str,
) -> Result<Response, ApiError> {
    let phone = crate::phone::normalize(phone)
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    Ok(linked(
        instance
            .phone_code(&phone, Requester::Operator)
            .await
            .map(|code| json!({ "code": code })),
    ))
}

/// Closes the linking window (nobody scanned): WhatsApp is told nothing more.
pub(super) async fn stop(instance: &InstanceHandle) -> Response {
    linked(
        instance
            .stop_linking(Requester::Operator)
            .await
            .map(|()| json!({ "value": true })),
    )
}

async fn qr_code(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(ask_qr(&found(&state, &id)?).await)
}

async fn phone_code(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PhoneBody>,
) -> Result<Response, ApiError> {
    ask_phone_code(&found(&state, &id)?, &body.phone).await
}

async fn stop_linking(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(stop(&found(&state, &id)?).await)
}

async fn create_link_page(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let instance = found(&state, &id)?;
    let life = super::link_page::life_from(&body)?;
    Ok(Json(
        super::link_page::create(&state, &instance, life).await?,
    ))
}

async fn webhook_deliveries(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known(&state, &id).await?;
    super::webhooks::deliveries_of(&state, &id).await
}

async fn retry_webhook(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path((id, event)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    known(&state, &id).await?;
    super::webhooks::retry_of(&state, &id, &event).await
}

async fn revoke_link_pages(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let instance = known(&state, &id).await?;
    let revoked = state
        .store
        .revoke_link_pages(&instance.id, crate::unix_millis())
        .await?;
    Ok(Json(json!({ "revoked": revoked })))
}

async fn restart(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let instance = found(&state, &id)?;
    Ok(linked(
        instance.restart().await.map(|()| json!({ "value": true })),
    ))
}

async fn disconnect(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let instance = found(&state, &id)?;
    Ok(linked(instance.disconnect().await.map(
        |unlinked| match unlinked {
            Unlinked::Told => json!({ "value": true }),
            Unlinked::NotTold(why) => {
                json!({ "value": true, "unlinkedAtWhatsApp": false, "error": why })
            }
        },
    )))
}

async fn cancel(
    _: Operator,
    AxumState(state): AxumState<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    found(&state, &id)?;
    state.manager.cancel(&id).await?;
    Ok(Json(json!({ "value": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_users_is_escaped() {
        assert_eq!(
            escape(r#"<b>"Tom" & 'Jerry'</b>"#),
            "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
    }
}
