//! Devices WhatsApp and the gateway disagree about: one the phone removed while the
//! gateway was down. End to end, against wa-sim.

mod common;

use std::sync::{Arc, Mutex};

use common::{World, not_connected};
use serde_json::{Value, json};

const PHONE: &str = "5511977770001";

/// A webhook receiver that takes everything and keeps the bodies, by path.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, Value)>>>,
    grew: Arc<tokio::sync::Notify>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(take))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn bodies(&self, path: &str) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    async fn wait_for(&self, path: &str, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + common::CONNECT_WAIT;
        loop {
            let grew = self.grew.notified();
            let bodies = self.bodies(path);
            if bodies.len() >= n {
                return bodies;
            }
            assert!(
                tokio::time::timeout_at(deadline, grew).await.is_ok(),
                "{path}: {} of {n} delivered",
                bodies.len()
            );
        }
    }
}

async fn take(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    axum::extract::Path(path): axum::extract::Path<String>,
    raw: String,
) -> axum::http::StatusCode {
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    receiver.got.lock().unwrap().push((path, body));
    receiver.grew.notify_waiters();
    axum::http::StatusCode::OK
}

#[tokio::test]
async fn a_device_the_phone_removed_while_the_gateway_was_down_is_reported_unlinked() {
    let world = World::new().await;
    let env = [("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true")];
    let gw = world.gateway_with(&env).await;
    let (receiver, url) = Receiver::start().await;
    let inst = gw.api.create_instance("removed").await;
    for route in ["update-webhook-connected", "update-webhook-disconnected"] {
        let path = route.trim_start_matches("update-webhook-");
        let (status, body) = gw
            .api
            .set_webhook(&inst, route, &format!("{url}/{path}"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    world.wa_link(&gw, &inst, PHONE).await;
    receiver.wait_for("connected", 1).await;
    gw.stop().await;

    // The phone removes the device while the gateway is down.
    let (status, body) = world
        .wa
        .post("unlink", json!({ "phone": PHONE }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let gw = world.gateway_with(&env).await;
    gw.api
        .wait_status(&inst, "not connected", |s| *s == not_connected())
        .await;
    assert_eq!(gw.api.status(&inst).await, not_connected());
    assert_eq!(
        gw.api.device(&inst).await,
        (
            200,
            json!({ "connected": false, "error": "You are not connected." })
        )
    );
    assert!(!gw.log.text().contains("certificate was refused"));
    assert!(!world.has_session(&inst).await, "the session is deleted");
    assert_eq!(
        world.stat("loginFailures").await,
        1,
        "tried once, not again"
    );
    let disconnected = receiver.wait_for("disconnected", 1).await;
    assert_eq!(disconnected.len(), 1);
    assert_eq!(
        disconnected[0],
        json!({
            "type": "DisconnectedCallback",
            "disconnected": true,
            "error": "Device has been disconnected",
            "momment": disconnected[0]["momment"],
            "instanceId": inst.id,
        })
    );
}

#[tokio::test]
async fn disconnecting_a_device_whatsapp_already_removed_says_it_is_unlinked() {
    let world = World::new().await;
    // The first gateway holds the session without a client (another took it over);
    // the other stops, and the phone removes the device meanwhile.
    let (first, second, inst) = world.taken_over("removed", PHONE).await;
    second.stop().await;
    let (status, body) = world
        .wa
        .post("unlink", json!({ "phone": PHONE }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // WhatsApp refuses the login with a 401: the device is unlinked there already.
    assert_eq!(
        first.api.disconnect(&inst).await,
        (200, json!({ "value": true }))
    );
    assert_eq!(first.api.status(&inst).await, not_connected());
    assert!(!world.has_session(&inst).await);
    assert_eq!(world.stat("loginFailures").await, 1);
}
