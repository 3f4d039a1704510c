//! A Z-API app no one here wrote: `z-api-sdk` (npm, pinned in `tests/zapi-sdk`), run
//! unmodified against the gateway with only its base URL swapped. It sets its webhooks,
//! sends, replies, marks a contact's message read, asks whether numbers exist and lists
//! the queue; the contact (wa-sim) and the webhook receiver see what a Z-API user
//! would.

mod common;

use std::path::PathBuf;

use common::receiver::Receiver;
use common::{Gateway, Instance, World};
use serde_json::{Value, json};

fn app_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/zapi-sdk")
}

/// Runs the app's `command`: `{"ok": true, "result"}` or `{"ok": false, "status", "error"}`.
async fn app(gw: &Gateway, inst: &Instance, command: &[&str]) -> Value {
    assert!(
        app_dir().join("node_modules/z-api-sdk").exists(),
        "z-api-sdk is not installed: scripts/test installs it (npm ci in tests/zapi-sdk)"
    );
    let output = tokio::process::Command::new("node")
        .arg("app.mjs")
        .args(command)
        .current_dir(app_dir())
        .env("ZAPI_BASE_URL", &gw.api.base)
        .env("ZAPI_INSTANCE_ID", &inst.id)
        .env("ZAPI_TOKEN", &inst.token)
        // A test's failure is its answer, not three of them.
        .env("ZAPI_MAX_RETRIES", "0")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("node runs");
    let out = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|_| {
        panic!(
            "the app printed {out:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

async fn ok(gw: &Gateway, inst: &Instance, command: &[&str]) -> Value {
    let answer = app(gw, inst, command).await;
    assert_eq!(answer["ok"], true, "{command:?}: {answer}");
    answer["result"].clone()
}

#[tokio::test]
async fn a_z_api_sdk_app_sends_replies_reads_and_gets_its_webhooks_unmodified() {
    const PHONE: &str = "5511977770001";
    const FRIEND: &str = "5511977770101";
    const NOBODY: &str = "5511977779999";
    let world = World::new().await;
    let (status, body) = world
        .wa
        .post("contacts", json!({ "phone": FRIEND, "name": "Friend" }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let gw = world
        .gateway_with(&[
            ("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("ZAPGATE_SEND_INTERVAL_MS", "0"),
        ])
        .await;
    let inst = world.linked_instance(&gw, "sdk", PHONE).await;
    let receiver = Receiver::start().await;

    let status = ok(&gw, &inst, &["status"]).await;
    assert_eq!(status["connected"], true, "{status}");
    ok(&gw, &inst, &["webhooks", &receiver.url("")]).await;

    // Send: the ids come back, the contact gets the text, the webhooks say so.
    let sent = ok(&gw, &inst, &["send", FRIEND, "Pedido #42 confirmado"]).await;
    let message_id = sent["messageId"].as_str().unwrap().to_owned();
    assert_eq!(sent["id"], sent["messageId"]);
    assert_eq!(sent["zaapId"].as_str().unwrap().len(), 32);
    let (_, inbox) = world
        .wa
        .get(&format!("contacts/{FRIEND}/inbox?wait=30&count=1"))
        .await
        .unwrap();
    assert_eq!(inbox[0]["id"], message_id.as_str());
    assert_eq!(inbox[0]["text"], "Pedido #42 confirmado");
    let delivery = receiver.wait_delivered("delivery", 1).await;
    assert_eq!(delivery[0].body["messageId"], message_id.as_str());
    assert_eq!(delivery[0].body["type"], "DeliveryCallback");

    // The contact answers; the app reads it and replies to it.
    let (_, said) = world
        .wa
        .post(
            &format!("contacts/{FRIEND}/send"),
            json!({ "to": PHONE, "text": "Obrigado!" }),
        )
        .await
        .unwrap();
    let theirs = said["id"].as_str().unwrap().to_owned();
    let received = receiver.wait_delivered("received", 1).await;
    assert_eq!(received[0].body["messageId"], theirs.as_str());
    assert_eq!(received[0].body["phone"], FRIEND);
    assert_eq!(received[0].body["text"]["message"], "Obrigado!");
    assert_eq!(ok(&gw, &inst, &["read", FRIEND, &theirs]).await, "");
    let reply = ok(&gw, &inst, &["reply", FRIEND, &theirs, "Por nada"]).await;
    let (_, inbox) = world
        .wa
        .get(&format!("contacts/{FRIEND}/inbox?wait=30&count=2"))
        .await
        .unwrap();
    assert_eq!(inbox[1]["id"], reply["messageId"]);
    assert_eq!(inbox[1]["replyTo"], theirs.as_str());
    world.wait_read(FRIEND, &theirs).await;

    assert_eq!(
        ok(&gw, &inst, &["exists", FRIEND]).await,
        json!({ "exists": true })
    );
    assert_eq!(
        ok(&gw, &inst, &["exists", NOBODY]).await,
        json!({ "exists": false })
    );
    assert_eq!(ok(&gw, &inst, &["queue"]).await, json!([]));

    // An error reaches the app as Z-API's: status and message.
    let refused = app(&gw, &inst, &["send", "12ab", "x"]).await;
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["status"], 400);
    assert!(
        refused["error"].as_str().unwrap().contains("digits"),
        "{refused}"
    );
    gw.stop().await;
}
