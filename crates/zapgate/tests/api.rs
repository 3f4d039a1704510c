//! Authentication, bad input and the partner routes, as a client sees them.

mod common;

use common::{ADMIN, Instance, World, not_connected};
use reqwest::Method;
use serde_json::json;

const INSTANCE_NOT_FOUND: (u16, &str) = (404, "Instance not found");

fn error(status: u16, message: &str) -> (u16, serde_json::Value) {
    (status, json!({ "error": message }))
}

#[tokio::test]
async fn unknown_ids_and_wrong_tokens_look_the_same() {
    let world = World::new().await;
    // 18 wrong guesses from one address: more than the limit on failed authentications
    // allows, which has its own test.
    let gw = world
        .gateway_with(&[("ZAPGATE_AUTH_FAILURES_PER_MINUTE", "100")])
        .await;
    let inst = gw.api.create_instance("a").await;
    let wrong_token = Instance {
        id: inst.id.clone(),
        token: "0".repeat(24),
    };
    let unknown = Instance {
        id: "F".repeat(32),
        token: inst.token.clone(),
    };
    let expected = error(INSTANCE_NOT_FOUND.0, INSTANCE_NOT_FOUND.1);
    for who in [&wrong_token, &unknown] {
        for route in [
            "status",
            "qr-code",
            "qr-code/image",
            "phone-code/5511988880001",
            "disconnect",
            "restart",
            "restore-session",
            "me",
            "device",
        ] {
            assert_eq!(gw.api.instance_get(who, route).await, expected, "{route}");
        }
    }
    assert_eq!(world.wa.stats().await.unwrap()["handshakes"], json!(0));
    assert_eq!(gw.api.status(&inst).await, not_connected());
}

#[tokio::test]
async fn the_client_token_guards_every_instance_route() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_CLIENT_TOKEN", "account-secret")])
        .await;
    let inst = gw.api.create_instance("guarded").await;
    assert_eq!(gw.api.status(&inst).await, not_connected());

    let path = format!(
        "{}/instances/{}/token/{}/status",
        gw.api.base, inst.id, inst.token
    );
    let http = reqwest::Client::new();
    let missing = http.get(&path).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.json::<serde_json::Value>().await.unwrap(),
        json!({ "error": "null not allowed" })
    );
    let wrong = http
        .get(&path)
        .header("Client-Token", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.json::<serde_json::Value>().await.unwrap(),
        json!({ "error": "Client-Token not allowed" })
    );
}

#[tokio::test]
async fn partner_routes_need_the_admin_token_and_valid_input() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let api = &gw.api;
    let create = "/instances/integrator/on-demand";
    let unauthorized = error(401, "Unauthorized");
    assert_eq!(
        api.call(Method::POST, create, Some(json!({ "name": "x" })), None)
            .await,
        unauthorized
    );
    assert_eq!(
        api.call(
            Method::POST,
            create,
            Some(json!({ "name": "x" })),
            Some("wrong")
        )
        .await,
        unauthorized
    );
    assert_eq!(
        api.call(Method::GET, "/instances", None, None).await,
        unauthorized
    );

    let name_required = "name is required, up to 120 characters";
    for (body, expected) in [
        (json!({}), error(400, name_required)),
        (json!({ "name": "   " }), error(400, name_required)),
        (
            json!({ "name": "x", "connectedCallbackUrl": "http://plain" }),
            error(
                400,
                "connectedCallbackUrl: must be an https:// URL (http:// needs --webhook-allow-private)",
            ),
        ),
        (
            json!({ "name": "x", "disconnectedCallbackUrl": "ftp://x" }),
            error(400, "disconnectedCallbackUrl: must be an https:// URL"),
        ),
    ] {
        let answer = api
            .call(Method::POST, create, Some(body.clone()), Some(ADMIN))
            .await;
        assert_eq!(answer, expected, "{body}");
    }
    let (status, body) = api
        .call(
            Method::POST,
            create,
            Some(json!({ "name": 5 })),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("name: invalid type"),
        "{body}"
    );
    let raw = reqwest::Client::new()
        .post(format!("{}{create}", api.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    assert!(raw.json::<serde_json::Value>().await.unwrap()["error"].is_string());
    assert_eq!(
        api.call(Method::GET, "/instances", None, Some(ADMIN))
            .await
            .1["total"],
        json!(0),
        "bad input created nothing"
    );

    let a = api.create_instance("alpha").await;
    let b = api.create_instance("beta").await;
    assert_eq!((a.id.len(), a.token.len()), (32, 24));
    let (status, page) = api
        .call(
            Method::GET,
            "/instances?page=1&pageSize=1",
            None,
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            page["total"].clone(),
            page["totalPage"].clone(),
            page["pageSize"].clone()
        ),
        (json!(2), json!(2), json!(1))
    );
    assert_eq!(page["content"][0]["id"], json!(a.id));
    assert_eq!(page["content"][0]["middleware"], json!("web"));
    assert_eq!(page["content"][0]["whatsappConnected"], json!(false));
    let (_, found) = api
        .call(Method::GET, "/instances?query=bet", None, Some(ADMIN))
        .await;
    assert_eq!(found["content"][0]["id"], json!(b.id));
    let (status, _) = api
        .call(Method::GET, "/instances?pageSize=0", None, Some(ADMIN))
        .await;
    assert_eq!(status, 400);
    let (status, body) = api
        .call(Method::GET, "/instances?page=abc", None, Some(ADMIN))
        .await;
    assert_eq!((status, body["error"].is_string()), (400, true));

    let cancel = format!(
        "/instances/{}/token/{}/integrator/on-demand/cancel",
        a.id, a.token
    );
    assert_eq!(
        api.call(Method::POST, &cancel, None, None).await,
        unauthorized
    );
    assert_eq!(
        api.call(Method::POST, &cancel, None, Some(ADMIN)).await.0,
        201
    );
    assert_eq!(
        api.instance_get(&a, "status").await,
        error(404, "Instance not found")
    );
    assert_eq!(
        api.call(Method::GET, "/instances", None, Some(ADMIN))
            .await
            .1["total"],
        json!(1)
    );
}

#[tokio::test]
async fn wrong_methods_and_unknown_routes_answer_json() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("m").await;
    let status = format!("/instances/{}/token/{}/status", inst.id, inst.token);
    let (code, body) = gw.api.call(Method::POST, &status, None, None).await;
    assert_eq!((code, body["error"].is_string()), (405, true), "{body}");
    let (code, body) = gw.api.call(Method::GET, "/nowhere", None, None).await;
    assert_eq!((code, body["error"].is_string()), (404, true), "{body}");
    assert_eq!(
        gw.api.call(Method::GET, "/healthz", None, None).await,
        (200, json!({ "status": "ok" }))
    );
    assert_eq!(
        gw.api.call(Method::GET, "/readyz", None, None).await,
        (200, json!({ "status": "ready" }))
    );
}

#[tokio::test]
async fn a_sandbox_build_refuses_a_whatsapp_that_is_not_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_zapgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--whatsapp-url",
            "wss://web.whatsapp.com/ws/chat",
        ])
        .env("ZAPGATE_DATA_DIR", dir.path())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only connects to loopback"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_whatsapp_gets_a_clear_error_and_no_retries() {
    let world = World::new().await;
    let gw = world.gateway_with(&[("ZAPGATE_LINK_WAIT_SECS", "2")]).await;
    let inst = gw.api.create_instance("offline").await;
    assert_eq!(world.wa.outage(60).await.unwrap().0, 200);
    assert_eq!(
        gw.api.qr_code(&inst).await,
        error(
            503,
            "WhatsApp is unreachable: WebSocket connect failed: expected HTTP 101 Switching Protocols, got status code 503"
        )
    );
    assert_eq!(gw.api.status(&inst).await, not_connected());
    // Once the window's client has stopped, every attempt it made is counted at both
    // ends, and no client is left to make another.
    gw.log.wait_for("WhatsApp client stopped", 1).await;
    let refused = world.stat("refused").await;
    assert!(refused >= 1, "it did try");
    assert_eq!(
        gw.log.count("Failed to connect") as u64,
        refused,
        "every attempt was one WhatsApp refused"
    );
    assert_eq!(world.stat("connections").await, 0);
    // Counted for the operator, by cause.
    let metrics = common::scrape(&gw).await;
    assert_eq!(
        metrics["zapgate_whatsapp_connection_errors_total{cause=\"unreachable\"}"],
        1.0
    );
}

#[tokio::test]
async fn undecodable_path_segments_are_bad_requests() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("utf8").await;
    let (status, body) = gw.api.instance_get(&inst, "phone-code/%FF%FE").await;
    assert_eq!((status, body), error(400, "The path is not valid UTF-8"));
    assert_eq!(world.wa.stats().await.unwrap()["handshakes"], json!(0));
}

#[tokio::test]
async fn misconfigured_starts_are_refused_saying_how_to_fix_them() {
    let world = World::new().await;
    let out = world
        .refused_gateway(&[("ZAPGATE_LINK_WAIT_SECS", "120")], &[])
        .await;
    assert!(
        out.contains(
            "--link-wait-secs (ZAPGATE_LINK_WAIT_SECS) must be 1 to 50: requests end after 60 s"
        ),
        "{out}"
    );

    // An admin token file that other users may read.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(world.data_dir()).unwrap();
    let file = world.data_dir().join("admin-token");
    std::fs::write(&file, "token-from-the-file\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = world.refused_gateway(&[], &["ZAPGATE_ADMIN_TOKEN"]).await;
    assert!(
        out.contains(&format!("fix it with `chmod 600 {}`", file.display())),
        "{out}"
    );
    assert!(!out.contains("token-from-the-file"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let gw = common::Gateway::start_without(
        &world.sim.ws_url(),
        &world.data_dir(),
        &[],
        &["ZAPGATE_ADMIN_TOKEN"],
    )
    .await;
    let (status, _) = gw
        .api
        .call(Method::GET, "/instances", None, Some("token-from-the-file"))
        .await;
    assert_eq!(status, 200, "the file's token is the admin token");
    // The next refusals are of starts on the same data directory: this one goes first.
    gw.stop().await;

    // A password in the database URL shows neither in the refusal nor in --help.
    let secret_url = "postgres://zapgate:hunter2@db.internal/zapgate";
    let out = world
        .refused_gateway(&[("ZAPGATE_DATABASE_URL", secret_url)], &[])
        .await;
    assert!(out.contains("opening the PostgreSQL database"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let out = world
        .refused_gateway(
            &[("ZAPGATE_DATABASE_URL", "mysql://zapgate:hunter2@db/z")],
            &[],
        )
        .await;
    assert!(out.contains("use sqlite: or postgres:"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_zapgate"))
        .args(["serve", "--help"])
        .env("ZAPGATE_DATABASE_URL", secret_url)
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--database-url"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

#[tokio::test]
async fn no_token_or_secret_ever_reaches_the_log() {
    let world = World::new().await;
    let client_token = "account-secret-c7e1";
    let gw = world
        .gateway_with(&[("ZAPGATE_CLIENT_TOKEN", client_token)])
        .await;
    let inst = gw.api.create_instance("secretive").await;
    let stranger = Instance {
        id: inst.id.clone(),
        token: "D00D".repeat(6),
    };
    for route in [
        "status",
        "qr-code/image",
        "phone-code/5511988880001",
        "me",
        "device",
    ] {
        gw.api.instance_get(&inst, route).await;
        gw.api.instance_get(&stranger, route).await;
    }
    let (_, code) = gw.api.phone_code(&inst, "5511988880001").await;
    let code = code["code"].as_str().expect("a pairing code").to_owned();
    let (status, _) = world.wa.link_code("5511988880001", &code).await.unwrap();
    assert_eq!(status, 200);
    gw.api.wait_connected(&inst).await;
    gw.api.restart(&inst).await;
    gw.api.wait_connected(&inst).await;
    gw.api
        .call(Method::GET, "/instances", None, Some("not-the-admin-token"))
        .await;
    gw.api
        .call(Method::GET, "/instances", None, Some(&ADMIN.to_lowercase()))
        .await;
    let cancel = format!(
        "/instances/{}/token/{}/integrator/on-demand/cancel",
        inst.id, inst.token
    );
    assert_eq!(
        gw.api
            .call(Method::POST, &cancel, None, Some(ADMIN))
            .await
            .0,
        201
    );
    let log = gw.log.clone();
    gw.stop().await;

    let text = log.text();
    assert!(text.contains(&inst.id), "the log does follow the instance");
    assert!(text.contains("instance cancelled"));
    for secret in [
        ADMIN,
        client_token,
        inst.token.as_str(),
        stranger.token.as_str(),
        "not-the-admin-token",
        code.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret:?} is in the log");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let world = World::new().await;
    let gw = world.gateway().await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = gw
            .api
            .http
            .get(format!("{}/instances", gw.api.base))
            .header("authorization", format!("{scheme} {ADMIN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
}

#[tokio::test]
async fn every_webhook_is_stored_shown_and_checked() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("hooks").await;
    let route = |name: &str| format!("/instances/{}/token/{}/{name}", inst.id, inst.token);
    let set = |name: &'static str, method: reqwest::Method, value: serde_json::Value| {
        let path = route(name);
        let api = &gw.api;
        async move { api.call(method, &path, Some(value), None).await }
    };
    let fields = [
        ("update-webhook-connected", "connectedCallbackUrl"),
        ("update-webhook-disconnected", "disconnectedCallbackUrl"),
        ("update-webhook-received", "receivedCallbackUrl"),
        (
            "update-webhook-received-delivery",
            "receivedAndDeliveryCallbackUrl",
        ),
        ("update-webhook-delivery", "deliveryCallbackUrl"),
        ("update-webhook-message-status", "messageStatusCallbackUrl"),
        ("update-webhook-chat-presence", "presenceChatCallbackUrl"),
    ];
    for (i, (name, field)) in fields.iter().enumerate() {
        // PUT as Z-API documents it, POST as some of its examples do.
        let method = if i % 2 == 0 {
            reqwest::Method::PUT
        } else {
            reqwest::Method::POST
        };
        let url = format!("https://hooks.example.com/{field}");
        assert_eq!(
            set(name, method, json!({ "value": url })).await,
            (200, json!({ "value": true }))
        );
        let (_, me) = gw.api.me(&inst).await;
        assert_eq!(me[*field], json!(url), "{me}");
    }
    let (_, me) = gw.api.me(&inst).await;
    assert_eq!(me["receiveCallbackSentByMe"], json!(true), "{me}");
    let (_, list) = gw
        .api
        .call(reqwest::Method::GET, "/instances", None, Some(ADMIN))
        .await;
    assert_eq!(
        list["content"][0]["deliveryCallbackUrl"],
        json!("https://hooks.example.com/deliveryCallbackUrl")
    );

    // Bad URLs: a 400 that says why, and nothing changes.
    let long = format!("https://hooks.example.com/{}", "a".repeat(2100));
    for (bad, says) in [
        ("http://hooks.example.com/x", "https://"),
        ("https://user:secret@hooks.example.com/x", "credentials"),
        ("https:///x", "not a URL"),
        ("ftp://hooks.example.com", "https://"),
        (long.as_str(), "longer than"),
    ] {
        let (status, body) = set(
            "update-webhook-connected",
            reqwest::Method::PUT,
            json!({ "value": bad }),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{bad}: {body}"
        );
    }
    let (_, me) = gw.api.me(&inst).await;
    assert_eq!(
        me["connectedCallbackUrl"],
        json!("https://hooks.example.com/connectedCallbackUrl")
    );

    // An empty value clears it; one URL for every webhook; "sent by me" needs a received.
    assert_eq!(
        set(
            "update-webhook-connected",
            reqwest::Method::PUT,
            json!({ "value": "" })
        )
        .await,
        (200, json!({ "value": true }))
    );
    let (_, me) = gw.api.me(&inst).await;
    assert_eq!(me["connectedCallbackUrl"], json!(null));
    let every = json!({ "value": "https://all.example.com/", "notifySentByMe": false });
    assert_eq!(
        set("update-every-webhooks", reqwest::Method::PUT, every).await,
        (200, json!({ "value": true }))
    );
    let (_, me) = gw.api.me(&inst).await;
    for (_, field) in fields {
        assert_eq!(me[field], json!("https://all.example.com/"), "{field}");
    }
    assert_eq!(me["receiveCallbackSentByMe"], json!(false));
    set(
        "update-webhook-received",
        reqwest::Method::PUT,
        json!({ "value": "" }),
    )
    .await;
    let (status, body) = set(
        "update-notify-sent-by-me",
        reqwest::Method::PUT,
        json!({ "notifySentByMe": true }),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}
