//! The API's description, made by the same calls that register its routes: a route is
//! added with what it does, who may call it and what it answers, so none is served
//! without its description. From these, the OpenAPI 3.1 document (`/openapi.json`)
//! and the reference page (`/docs`).

use axum::Router;
use axum::handler::Handler;
use axum::routing::MethodRouter;
use serde_json::{Map, Value, json};

use super::AppState;

/// Who may call a route, and how they say so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Auth {
    /// Anyone.
    Public,
    /// The instance's id and token in the path (and `Client-Token` when the gateway
    /// has one).
    Instance,
    /// `Authorization: Bearer <admin token>`.
    Admin,
    /// The admin token, about an instance named by its id and token in the path.
    AdminAndInstance,
    /// The admin panel's session cookie (and its CSRF token on changes).
    Panel,
    /// A link page's token in the path.
    LinkPage,
}

/// What a route answers, for one status.
#[derive(Clone, Debug)]
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) what: &'static str,
    pub(super) kind: Kind,
    /// A body the route gives, for `Kind::Json`.
    pub(super) example: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Json,
    Html,
    EventStream,
    OpenMetrics,
    /// No body (a redirect, a 204).
    NoBody,
    Asset,
}

impl Kind {
    fn media(self) -> Option<&'static str> {
        match self {
            Kind::Json => Some("application/json"),
            Kind::Html => Some("text/html"),
            Kind::EventStream => Some("text/event-stream"),
            Kind::OpenMetrics => Some("application/openmetrics-text"),
            Kind::Asset => Some("*/*"),
            Kind::NoBody => None,
        }
    }
}

/// One route's description.
#[derive(Clone, Debug)]
pub(super) struct Op {
    pub(super) summary: &'static str,
    /// Whether the body may be left out.
    pub(super) body_optional: bool,
    /// Who may call it, when not who may call its section's routes.
    pub(super) auth: Option<Auth>,
    pub(super) body: Option<Value>,
    pub(super) answers: Vec<Answer>,
}

/// A route's description, starting with its summary.
pub(super) fn op(summary: &'static str) -> Op {
    Op {
        summary,
        body_optional: false,
        auth: None,
        body: None,
        answers: Vec::new(),
    }
}

impl Op {
    /// Called with `auth`, not as its section's routes are.
    pub(super) fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// A JSON body the route takes (an example).
    pub(super) fn body(mut self, example: Value) -> Self {
        self.body = Some(example);
        self
    }

    /// A JSON body the route may take (an example); without one, its defaults.
    pub(super) fn optional_body(mut self, example: Value) -> Self {
        self.body = Some(example);
        self.body_optional = true;
        self
    }

    fn answer(
        mut self,
        status: u16,
        what: &'static str,
        kind: Kind,
        example: Option<Value>,
    ) -> Self {
        self.answers.push(Answer {
            status,
            what,
            kind,
            example,
        });
        self
    }

    /// 200 with a JSON body like `example`.
    pub(super) fn ok(self, what: &'static str, example: Value) -> Self {
        self.answer(200, what, Kind::Json, Some(example))
    }

    /// A status with the gateway's error body (`{"error": "..."}`).
    pub(super) fn fails(self, status: u16, what: &'static str) -> Self {
        self.answer(status, what, Kind::Json, Some(json!({ "error": "…" })))
    }

    /// A JSON answer described in words only (the panel's own routes).
    pub(super) fn json(self, status: u16, what: &'static str) -> Self {
        self.answer(status, what, Kind::Json, None)
    }

    pub(super) fn html(self, what: &'static str) -> Self {
        self.answer(200, what, Kind::Html, None)
    }

    pub(super) fn events(self, what: &'static str) -> Self {
        self.answer(200, what, Kind::EventStream, None)
    }

    pub(super) fn metrics(self, what: &'static str) -> Self {
        self.answer(200, what, Kind::OpenMetrics, None)
    }

    /// A page in HTML for another status.
    pub(super) fn html_page(self, status: u16, what: &'static str) -> Self {
        self.answer(status, what, Kind::Html, None)
    }

    pub(super) fn asset(self, what: &'static str) -> Self {
        self.answer(200, what, Kind::Asset, None)
    }

    pub(super) fn redirect(self, what: &'static str) -> Self {
        self.answer(303, what, Kind::NoBody, None)
    }

    pub(super) fn empty(self, status: u16, what: &'static str) -> Self {
        self.answer(status, what, Kind::NoBody, None)
    }
}

/// A described route as the document lists it.
#[derive(Clone, Debug)]
pub struct Described {
    pub(super) method: &'static str,
    pub(super) path: String,
    pub(super) tag: &'static str,
    pub(super) auth: Auth,
    pub(super) op: Op,
}

/// A router whose routes are each added with their description.
pub(super) struct Routes {
    router: Router<AppState>,
    described: Vec<Described>,
    tag: &'static str,
    auth: Auth,
}

macro_rules! method {
    ($name:ident, $verb:literal, $routing:path) => {
        pub(super) fn $name<H, T>(self, path: &str, handler: H, op: Op) -> Self
        where
            H: Handler<T, AppState>,
            T: 'static,
        {
            self.add($verb, path, $routing(handler), op)
        }
    };
}

impl Routes {
    /// Routes of one section (`tag`), each called with `auth` unless said otherwise.
    pub(super) fn new(tag: &'static str, auth: Auth) -> Self {
        Self {
            router: Router::new(),
            described: Vec::new(),
            tag,
            auth,
        }
    }

    fn add(
        mut self,
        method: &'static str,
        path: &str,
        route: MethodRouter<AppState>,
        op: Op,
    ) -> Self {
        self.router = self.router.route(path, route);
        self.described.push(Described {
            method,
            path: path.to_owned(),
            tag: self.tag,
            auth: op.auth.unwrap_or(self.auth),
            op,
        });
        self
    }

    method!(get, "get", axum::routing::get);
    method!(post, "post", axum::routing::post);
    method!(put, "put", axum::routing::put);
    method!(delete, "delete", axum::routing::delete);

    /// Z-API's settings routes take `PUT` and `POST` alike.
    pub(super) fn put_post<H, T>(self, path: &str, handler: H, op: Op) -> Self
    where
        H: Handler<T, AppState> + Clone,
        T: 'static,
    {
        self.put(path, handler.clone(), op.clone())
            .post(path, handler, op)
    }

    /// Another section's routes beside these.
    pub(super) fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.described.extend(other.described);
        self
    }

    /// Another section's routes under `prefix`.
    pub(super) fn nest(mut self, prefix: &str, other: Routes) -> Self {
        self.router = self.router.nest(prefix, other.router);
        self.described
            .extend(other.described.into_iter().map(|mut d| {
                d.path = format!("{prefix}{}", d.path);
                d
            }));
        self
    }

    /// A layer over the routes added so far (their answers, not-found ones included).
    pub(super) fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: tower::Service<axum::extract::Request> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Response:
            axum::response::IntoResponse + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Error:
            Into<std::convert::Infallible> + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Future: Send + 'static,
    {
        self.router = self.router.layer(layer);
        self
    }

    /// A layer over the routes added so far, run only when one of them matched.
    pub(super) fn route_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: tower::Service<axum::extract::Request> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Response:
            axum::response::IntoResponse + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Error:
            Into<std::convert::Infallible> + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Future: Send + 'static,
    {
        self.router = self.router.route_layer(layer);
        self
    }

    pub(super) fn into_parts(self) -> (Router<AppState>, Vec<Described>) {
        (self.router, self.described)
    }
}

/// The OpenAPI 3.1 document of `described`.
pub(super) fn openapi(described: &[Described]) -> Value {
    let mut paths = Map::new();
    for d in described {
        let path = paths
            .entry(d.path.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object");
        path.insert(d.method.to_owned(), operation(d));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "zapgate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A self-hosted WhatsApp gateway with a Z-API compatible HTTP API. \
                Instance routes live under /instances/{id}/token/{token}: the id and token \
                of the instance are its credentials.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token (`--admin-token`, or the one in <data-dir>/admin-token).",
                },
                "clientToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Client-Token",
                    "description": "The account security token, when the gateway has one (`--client-token`).",
                },
                "panel": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "zapgate_panel",
                    "description": "The admin panel's session; changes also carry its CSRF token in `X-CSRF-Token`.",
                },
            },
        },
    })
}

fn operation(d: &Described) -> Value {
    let mut op = json!({
        "tags": [d.tag],
        "summary": d.op.summary,
        "operationId": slug(&format!("{} {}", d.method, d.path), '_'),
    });
    let parameters: Vec<Value> = d
        .path
        .split('/')
        .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": !d.op.body_optional,
                "schema": { "type": "string" },
            })
        })
        .collect();
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    op["security"] = match d.auth {
        Auth::Admin => json!([{ "admin": [] }]),
        Auth::AdminAndInstance => json!([{ "admin": [] }, { "admin": [], "clientToken": [] }]),
        Auth::Panel => json!([{ "panel": [] }]),
        // The path's token, and Client-Token only when the gateway has one.
        Auth::Instance => json!([{}, { "clientToken": [] }]),
        Auth::Public | Auth::LinkPage => json!([]),
    };
    if let Some(body) = &d.op.body {
        op["requestBody"] = json!({
            "required": true,
            "content": { "application/json": { "schema": schema_of(body), "example": body } },
        });
    }
    let mut responses = Map::new();
    for answer in &d.op.answers {
        let entry = responses
            .entry(answer.status.to_string())
            .or_insert_with(|| json!({ "description": "" }));
        let description = entry["description"].as_str().unwrap_or_default();
        entry["description"] = Value::from(if description.is_empty() {
            answer.what.to_owned()
        } else {
            format!("{description}; or: {}", answer.what)
        });
        let Some(media) = answer.kind.media() else {
            continue;
        };
        let content = &mut entry["content"][media];
        if let Some(example) = &answer.example {
            let n = content["examples"].as_object().map_or(0, Map::len) + 1;
            content["examples"][format!("example {n}")] =
                json!({ "summary": answer.what, "value": example });
            // Each shape the answer may have, once.
            let shape = schema_of(example);
            content["schema"] = match content.get("schema") {
                None => shape,
                Some(earlier) => {
                    let mut any = match earlier.get("anyOf").and_then(Value::as_array) {
                        Some(any) => any.clone(),
                        None => vec![earlier.clone()],
                    };
                    if !any.contains(&shape) {
                        any.push(shape);
                    }
                    match any.as_slice() {
                        [one] => one.clone(),
                        _ => json!({ "anyOf": any }),
                    }
                }
            };
        } else if answer.kind == Kind::Json {
            content["schema"] = json!({});
        } else {
            content["schema"] = json!({ "type": "string" });
        }
    }
    // What every route of its kind may answer besides.
    const INSTANCE: [(u16, &str); 4] = [
        (401, "Client-Token missing or wrong"),
        (404, "no instance with this id and token"),
        (
            429,
            "too many failed authentications from this address: Retry-After says when",
        ),
        (
            503,
            "the instance is moving to another gateway node: Retry-After says when to ask again",
        ),
    ];
    const ADMIN: [(u16, &str); 2] = [
        (401, "the admin token is missing or wrong"),
        (
            429,
            "too many failed authentications from this address: Retry-After says when",
        ),
    ];
    let mut common: Vec<(u16, &str)> = match d.auth {
        Auth::Instance => INSTANCE.to_vec(),
        Auth::Admin => ADMIN.to_vec(),
        Auth::AdminAndInstance => ADMIN.iter().chain(&INSTANCE).copied().collect(),
        Auth::Panel => vec![
            (401, "signed out"),
            (403, "a change without the session's CSRF token"),
        ],
        Auth::Public | Auth::LinkPage => Vec::new(),
    };
    if d.op.body.is_some() {
        common.push((400, "the body is not JSON"));
        if !d.op.body_optional {
            common.push((415, "the body is not sent as application/json"));
            common.push((422, "a field of the body is missing or of the wrong type"));
        }
    }
    for (status, what) in common {
        let entry = responses
            .entry(status.to_string())
            .or_insert_with(|| json!({ "description": "" }));
        let said = entry["description"].as_str().unwrap_or_default();
        if !said.contains(what) {
            entry["description"] = Value::from(if said.is_empty() {
                what.to_owned()
            } else {
                format!("{said}; or: {what}")
            });
        }
        let content = &mut entry["content"]["application/json"];
        if content.get("schema").is_none() {
            content["schema"] = schema_of(&json!({ "error": "…" }));
            content["examples"]["example 1"] =
                json!({ "summary": what, "value": { "error": "…" } });
        }
    }
    op["responses"] = Value::Object(responses);
    op
}

/// `text` in lower-case letters and digits, each run of anything else one `joint`.
fn slug(text: &str, joint: char) -> String {
    let mut slug = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with(joint) {
            slug.push(joint);
        }
    }
    slug.trim_end_matches(joint).to_owned()
}

/// The JSON Schema an example has: its types, and its objects' fields.
pub(super) fn schema_of(example: &Value) -> Value {
    match example {
        // Null in an example: a field that is null until set (its type is not said).
        Value::Null => json!({}),
        Value::Bool(_) => json!({ "type": "boolean" }),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({ "type": "integer" }),
        Value::Number(_) => json!({ "type": "number" }),
        Value::String(_) => json!({ "type": "string" }),
        Value::Array(items) => match items.first() {
            Some(item) => json!({ "type": "array", "items": schema_of(item) }),
            None => json!({ "type": "array" }),
        },
        Value::Object(fields) => {
            let properties: Map<String, Value> = fields
                .iter()
                .map(|(name, value)| (name.clone(), schema_of(value)))
                .collect();
            let required: Vec<&String> = fields.keys().collect();
            json!({ "type": "object", "properties": properties, "required": required })
        }
    }
}

impl Auth {
    fn said(self) -> &'static str {
        match self {
            Auth::Public => "Anyone may call it.",
            Auth::Instance => {
                "The instance's id and token in the path; `Client-Token` too when the gateway has one."
            }
            Auth::Admin => "`Authorization: Bearer <admin token>`.",
            Auth::AdminAndInstance => {
                "`Authorization: Bearer <admin token>`, and the instance's id and token in the path (`Client-Token` too when the gateway has one)."
            }
            Auth::Panel => "The panel's session cookie; a change also carries `X-CSRF-Token`.",
            Auth::LinkPage => "The link page's token in the path.",
        }
    }
}

/// The reference page: every route, section by section, with its examples.
pub(super) fn reference(described: &[Described]) -> axum::response::Html<String> {
    use super::panel::escape;
    use std::fmt::Write as _;
    let mut tags: Vec<&str> = Vec::new();
    for d in described {
        if !tags.contains(&d.tag) {
            tags.push(d.tag);
        }
    }
    let pretty = |value: &Value| escape(&serde_json::to_string_pretty(value).unwrap_or_default());
    let mut body = String::from(
        "<h1>API reference</h1>\n<p>Every route this gateway serves, as its code registers \
         it. The same as an OpenAPI 3.1 document: <a href=\"/openapi.json\">/openapi.json</a>. \
         Instance routes are under <code>/instances/{id}/token/{token}</code>.</p>\n<nav><ul>",
    );
    for tag in &tags {
        let _ = write!(
            body,
            "<li><a href=\"#{}\">{}</a></li>",
            slug(tag, '-'),
            escape(tag)
        );
    }
    body.push_str("</ul></nav>\n");
    for tag in &tags {
        let _ = writeln!(body, "<h2 id=\"{}\">{}</h2>", slug(tag, '-'), escape(tag));
        for d in described.iter().filter(|d| d.tag == *tag) {
            let _ = write!(
                body,
                "<section class=\"card\"><h3><code>{} {}</code></h3>\n<p>{}</p>\n<p class=\"hint\">{}</p>\n",
                d.method.to_uppercase(),
                escape(&d.path),
                escape(d.op.summary),
                escape(d.auth.said()),
            );
            if let Some(example) = &d.op.body {
                let _ = writeln!(body, "<p>Body:</p><pre>{}</pre>", pretty(example));
            }
            body.push_str("<dl>");
            for answer in &d.op.answers {
                let _ = write!(
                    body,
                    "<dt>{} · {}</dt><dd>",
                    answer.status,
                    escape(answer.what)
                );
                if let Some(example) = &answer.example {
                    let _ = write!(body, "<pre>{}</pre>", pretty(example));
                }
                body.push_str("</dd>");
            }
            body.push_str("</dl></section>\n");
        }
    }
    super::panel::html("API reference", "docs", None, "", &body)
}
