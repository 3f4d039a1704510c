//! The API's OpenAPI document and reference page against the routes themselves: every
//! route is registered with its description (none in the code is added any other way),
//! the document lists each, and a user's walk through the API (create, link, set
//! webhooks, send, queue, link pages, disconnect, cancel) gets from every route of its
//! sections an answer of the shape the document gives for that status.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{ADMIN, Gateway, World};
use reqwest::Method;
use serde_json::{Value, json};

/// The sections a user's program calls (the panel's own routes are the panel's tests').
const PUBLIC: [&str; 7] = [
    "Gateway",
    "Instances (partner)",
    "Instance",
    "Webhooks",
    "Messages",
    "Link pages",
    "Link pages (the number's owner)",
];

#[test]
fn no_route_is_added_without_its_description() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut undescribed = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("doc.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.contains(".route(") || line.contains("routing::") {
                undescribed.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        undescribed.is_empty(),
        "routes added around doc::Routes: {undescribed:#?}"
    );
}

/// The document's operations: `(method, path)` to the operation.
fn operations(document: &Value) -> HashMap<(String, String), Value> {
    let mut found = HashMap::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            found.insert((method.clone(), path.clone()), operation.clone());
        }
    }
    found
}

/// Whether `actual` has the shape of `example` (the same fields, of the same types; a
/// field the answer gives as null may be any type, as one not set yet; an array's first
/// item stands for all).
fn shaped(example: &Value, actual: &Value) -> bool {
    match (example, actual) {
        (_, Value::Null) => true,
        (Value::Object(want), Value::Object(got)) => {
            want.len() == got.len()
                && want
                    .iter()
                    .all(|(k, v)| got.get(k).is_some_and(|g| shaped(v, g)))
        }
        (Value::Array(want), Value::Array(got)) => match (want.first(), got.first()) {
            (Some(w), Some(g)) => shaped(w, g),
            _ => true,
        },
        (Value::Bool(_), Value::Bool(_))
        | (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_)) => true,
        _ => false,
    }
}

/// A walk through the API, each answer checked against the document.
struct Walk {
    gw: Gateway,
    http: reqwest::Client,
    operations: HashMap<(String, String), Value>,
    called: BTreeSet<(String, String)>,
}

impl Walk {
    /// Calls `template` (a documented path) at `path`, and checks the answer: its
    /// status is documented, and a JSON answer has the shape of one of that status's
    /// examples.
    async fn call(
        &mut self,
        method: Method,
        template: &str,
        path: &str,
        body: Option<Value>,
        bearer: bool,
    ) -> (u16, Value) {
        let key = (method.as_str().to_lowercase(), template.to_owned());
        let operation = self
            .operations
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} is not in the document"))
            .clone();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.gw.api.base));
        if bearer {
            request = request.bearer_auth(ADMIN);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let is_json = answer
            .headers()
            .get("content-type")
            .is_some_and(|t| t.to_str().unwrap().starts_with("application/json"));
        let text = answer.text().await.unwrap();
        let documented = &operation["responses"][status.to_string()];
        assert!(
            documented.is_object(),
            "{key:?} answered {status}, which the document does not give: {text}"
        );
        let body = if is_json {
            let body: Value = serde_json::from_str(&text).unwrap();
            let examples = &documented["content"]["application/json"]["examples"];
            if let Some(examples) = examples.as_object() {
                assert!(
                    examples.values().any(|e| shaped(&e["value"], &body)),
                    "{key:?} answered {status} {body}, not shaped as documented: {examples:#?}"
                );
            }
            body
        } else {
            Value::String(text)
        };
        self.called.insert(key);
        (status, body)
    }
}

#[tokio::test]
async fn the_document_lists_every_route_and_each_answers_as_it_says() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true")])
        .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let document: Value = http
        .get(format!("{}/openapi.json", gw.api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let operations = operations(&document);
    let ids: BTreeSet<&str> = operations
        .values()
        .map(|op| op["operationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), operations.len(), "operation ids are not unique");
    // The reference page shows each route.
    let page = http
        .get(format!("{}/docs", gw.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let page = page.text().await.unwrap();
    for (method, path) in operations.keys() {
        let shown = format!(
            "<code>{} {}</code>",
            method.to_uppercase(),
            path.replace('&', "&amp;")
        );
        assert!(
            page.contains(&shown),
            "{shown} is not on the reference page"
        );
    }
    let mut walk = Walk {
        gw,
        http,
        operations,
        called: BTreeSet::new(),
    };
    use Method as M;

    // The gateway's own.
    walk.call(M::GET, "/healthz", "/healthz", None, false).await;
    walk.call(M::GET, "/readyz", "/readyz", None, false).await;
    walk.call(M::GET, "/metrics", "/metrics", None, true).await;
    walk.call(M::GET, "/openapi.json", "/openapi.json", None, false)
        .await;
    walk.call(M::GET, "/docs", "/docs", None, false).await;

    // Instances, as a partner makes them.
    let create = "/instances/integrator/on-demand";
    let body = walk.operations[&("post".into(), create.into())]["requestBody"]["content"]
        ["application/json"]["example"]
        .clone();
    let (status, made) = walk.call(M::POST, create, create, Some(body), true).await;
    assert_eq!(status, 200, "{made}");
    let (id, token) = (
        made["id"].as_str().unwrap().to_owned(),
        made["token"].as_str().unwrap().to_owned(),
    );
    let (status, _) = walk
        .call(M::GET, "/instances", "/instances", None, true)
        .await;
    assert_eq!(status, 200);
    let base = format!("/instances/{id}/token/{token}");
    let inst = |rest: &str| format!("{base}{rest}");
    let template = |rest: &str| format!("/instances/{{id}}/token/{{token}}{rest}");

    // Webhooks first, so that linking has events to deliver.
    let url = json!({ "value": "http://127.0.0.1:9/hook" });
    let webhooks = [
        "/update-webhook-connected",
        "/update-webhook-disconnected",
        "/update-webhook-received",
        "/update-webhook-receive",
        "/update-webhook-received-delivery",
        "/update-webhook-delivery",
        "/update-webhook-message-status",
        "/update-webhook-status",
        "/update-webhook-chat-presence",
        "/update-every-webhooks",
    ];
    for route in webhooks {
        for method in [M::PUT, M::POST] {
            let (status, said) = walk
                .call(
                    method,
                    &template(route),
                    &inst(route),
                    Some(url.clone()),
                    false,
                )
                .await;
            assert_eq!(status, 200, "{route}: {said}");
        }
    }
    // A URL the gateway may not call is refused, as documented.
    let (status, _) = walk
        .call(
            M::PUT,
            &template("/update-webhook-connected"),
            &inst("/update-webhook-connected"),
            Some(json!({ "value": "ftp://example.com" })),
            false,
        )
        .await;
    assert_eq!(status, 400);
    for method in [M::PUT, M::POST] {
        let route = "/update-notify-sent-by-me";
        walk.call(
            method,
            &template(route),
            &inst(route),
            Some(json!({ "notifySentByMe": true })),
            false,
        )
        .await;
    }

    // Not linked yet.
    for route in ["/status", "/me", "/device"] {
        walk.call(M::GET, &template(route), &inst(route), None, false)
            .await;
    }
    for route in ["/qr-code", "/qr-code/image"] {
        let (status, code) = walk
            .call(M::GET, &template(route), &inst(route), None, false)
            .await;
        assert_eq!(status, 200, "{code}");
    }
    let (status, code) = walk
        .call(
            M::GET,
            &template("/phone-code/{phone}"),
            &inst("/phone-code/5511977770001"),
            None,
            false,
        )
        .await;
    assert_eq!(status, 200, "{code}");

    // Linked.
    let linked = common::Instance {
        id: id.clone(),
        token: token.clone(),
    };
    world.wa_link(&walk.gw, &linked, "5511977770002").await;
    for route in ["/status", "/me", "/device", "/qr-code", "/restore-session"] {
        walk.call(M::GET, &template(route), &inst(route), None, false)
            .await;
    }
    walk.gw.api.wait_connected(&linked).await;
    let (status, _) = walk
        .call(
            M::GET,
            &template("/restart"),
            &inst("/restart"),
            None,
            false,
        )
        .await;
    assert_eq!(status, 200);
    walk.gw.api.wait_connected(&linked).await;
    walk.call(
        M::GET,
        &template("/webhook-deliveries"),
        &inst("/webhook-deliveries"),
        None,
        false,
    )
    .await;
    walk.call(
        M::POST,
        &template("/webhook-deliveries/{event}/retry"),
        &inst("/webhook-deliveries/no-such-event/retry"),
        None,
        false,
    )
    .await;

    // Messages, to a contact of the simulated WhatsApp.
    let (status, said) = world
        .wa
        .post(
            "contacts",
            json!({ "phone": "5511977770003", "name": "Contact" }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{said}");
    for method in [M::PUT, M::POST] {
        walk.call(
            method.clone(),
            &template("/update-queue-settings"),
            &inst("/update-queue-settings"),
            Some(json!({ "disableEnqueueWhenDisconnected": false })),
            false,
        )
        .await;
        walk.call(
            method,
            &template("/update-auto-read-message"),
            &inst("/update-auto-read-message"),
            Some(json!({ "value": false })),
            false,
        )
        .await;
    }
    let (status, sent) = walk
        .call(
            M::POST,
            &template("/send-text"),
            &inst("/send-text"),
            Some(json!({ "phone": "5511977770003", "message": "Hello", "delayTyping": 15 })),
            false,
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    walk.call(
        M::POST,
        &template("/send-text"),
        &inst("/send-text"),
        Some(json!({ "phone": "5511977770003" })),
        false,
    )
    .await;
    // The first "types" for 15 s, and a second waits behind it: the queue shows them,
    // and the second can be taken out.
    let (status, waiting) = walk
        .call(
            M::POST,
            &template("/send-text"),
            &inst("/send-text"),
            Some(json!({ "phone": "5511977770003", "message": "Later" })),
            false,
        )
        .await;
    assert_eq!(status, 200, "{waiting}");
    let (_, queue) = walk
        .call(M::GET, &template("/queue"), &inst("/queue"), None, false)
        .await;
    assert!(!queue.as_array().unwrap().is_empty(), "{queue}");
    walk.call(
        M::GET,
        &template("/queue/count"),
        &inst("/queue/count"),
        None,
        false,
    )
    .await;
    walk.call(
        M::POST,
        &template("/queue"),
        &inst("/queue"),
        Some(json!({ "pageSize": 1 })),
        false,
    )
    .await;
    walk.call(
        M::GET,
        &template("/phone-exists/{phone}"),
        &inst("/phone-exists/5511977770003"),
        None,
        false,
    )
    .await;
    walk.call(
        M::POST,
        &template("/read-message"),
        &inst("/read-message"),
        Some(json!({ "phone": "5511977770003", "messageId": "3EB0AAAA" })),
        false,
    )
    .await;
    let zaap = waiting["zaapId"].as_str().unwrap();
    let (status, _) = walk
        .call(
            M::DELETE,
            &template("/queue/{zaap_id}"),
            &inst(&format!("/queue/{zaap}")),
            None,
            false,
        )
        .await;
    assert_eq!(status, 200);
    walk.call(M::DELETE, &template("/queue"), &inst("/queue"), None, false)
        .await;

    // Unlinked again, then a link page for the number's owner.
    let (status, _) = walk
        .call(
            M::GET,
            &template("/disconnect"),
            &inst("/disconnect"),
            None,
            false,
        )
        .await;
    assert_eq!(status, 200);
    let pages = "/instances/{id}/token/{token}/link-page";
    let (status, made) = walk
        .call(
            M::POST,
            pages,
            &inst("/link-page"),
            Some(json!({ "expiresIn": 600 })),
            true,
        )
        .await;
    assert_eq!(status, 200, "{made}");
    let page = made["url"].as_str().unwrap().rsplit('/').next().unwrap();
    let link = |rest: &str| format!("/link/{page}{rest}");
    walk.call(M::GET, "/link/{token}", &link(""), None, false)
        .await;
    walk.call(
        M::POST,
        "/link/{token}/qr-code",
        &link("/qr-code"),
        None,
        false,
    )
    .await;
    walk.call(
        M::POST,
        "/link/{token}/phone-code",
        &link("/phone-code"),
        Some(json!({ "phone": "5511977770004" })),
        false,
    )
    .await;
    walk.call(
        M::POST,
        "/link/{token}/stop-linking",
        &link("/stop-linking"),
        None,
        false,
    )
    .await;
    walk.call(M::DELETE, pages, &inst("/link-page"), None, true)
        .await;
    let (status, _) = walk
        .call(
            M::POST,
            &template("/integrator/on-demand/cancel"),
            &inst("/integrator/on-demand/cancel"),
            None,
            true,
        )
        .await;
    assert_eq!(status, 201);

    // Every route of those sections was called (event streams are the events tests').
    let missed: Vec<&(String, String)> = walk
        .operations
        .iter()
        .filter(|(_, op)| PUBLIC.contains(&op["tags"][0].as_str().unwrap()))
        .filter(|(_, op)| op["responses"]["200"]["content"]["text/event-stream"].is_null())
        .map(|(key, _)| key)
        .filter(|key| !walk.called.contains(*key))
        .collect();
    assert!(
        missed.is_empty(),
        "documented but never called: {missed:#?}"
    );
    walk.gw.stop().await;
}
