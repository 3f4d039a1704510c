//! Connection webhooks, delivered to a real HTTP receiver on loopback: Z-API's bodies,
//! signed; in order per instance; after the receiver comes back, and after a SIGKILL.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::{Gateway, Instance, World};
use serde_json::json;

const SECRET: &str = "webhook-test-secret";
const WAIT: Duration = Duration::from_secs(30);

async fn gateway(world: &World) -> Gateway {
    world
        .gateway_with(&[
            ("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("ZAPGATE_WEBHOOK_SECRET", SECRET),
        ])
        .await
}

async fn set_hooks(gw: &Gateway, inst: &Instance, receiver: &Receiver, prefix: &str) {
    for (route, path) in [
        ("update-webhook-connected", "connected"),
        ("update-webhook-disconnected", "disconnected"),
    ] {
        let url = receiver.url(&format!("{prefix}{path}"));
        let (status, body) = gw.api.set_webhook(inst, route, &url).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn connects_and_disconnects_arrive_once_with_z_api_bodies_signed() {
    const PHONE: &str = "5511955550001";
    let world = World::new().await;
    let gw = gateway(&world).await;
    let receiver = Receiver::start().await;
    let inst = gw.api.create_instance("hooked").await;
    set_hooks(&gw, &inst, &receiver, "").await;

    let before = common::unix_millis();
    world.wa_link(&gw, &inst, PHONE).await;
    let connected = receiver.wait_delivered("connected", 1).await;
    let body = &connected[0].body;
    eprintln!(
        "ConnectedCallback received {} ms after the event",
        connected[0].at_ms - body["momment"].as_i64().unwrap()
    );
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["connected", "instanceId", "momment", "phone", "type"]
    );
    assert_eq!(body["type"], json!("ConnectedCallback"));
    assert_eq!(body["connected"], json!(true));
    assert_eq!(body["instanceId"], json!(inst.id));
    assert_eq!(body["phone"], json!(PHONE));
    let momment = body["momment"].as_i64().unwrap();
    assert!(
        momment >= before && momment <= common::unix_millis(),
        "{momment}"
    );
    // Signed as documented: HMAC-SHA256 of "timestamp.body".
    let got = &connected[0];
    let timestamp: i64 = got.timestamp.parse().unwrap();
    assert!((timestamp - common::unix_millis() / 1000).abs() < 60);
    assert_eq!(
        got.signature.as_deref(),
        Some(
            format!(
                "sha256={}",
                zapgate::webhooks::sign(SECRET.as_bytes(), timestamp, &got.raw)
            )
            .as_str()
        )
    );
    assert_eq!(got.event_id.len(), 32);

    // The phone unlinks it: a disconnect at once.
    world.phone_unlinks(PHONE).await;
    let disconnected = receiver.wait_delivered("disconnected", 1).await;
    let body = &disconnected[0].body;
    eprintln!(
        "DisconnectedCallback received {} ms after the event",
        disconnected[0].at_ms - body["momment"].as_i64().unwrap()
    );
    assert_eq!(
        *body,
        json!({
            "type": "DisconnectedCallback",
            "disconnected": true,
            "error": "Device has been disconnected",
            "momment": body["momment"],
            "instanceId": inst.id,
        })
    );
    assert_ne!(disconnected[0].event_id, got.event_id);

    // One event per transition, and the deliveries are listed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 2, "{:?}", receiver.got());
    let path = format!(
        "/instances/{}/token/{}/webhook-deliveries",
        inst.id, inst.token
    );
    let (status, list) = gw.api.call(reqwest::Method::GET, &path, None, None).await;
    assert_eq!(status, 200, "{list}");
    let list = list["deliveries"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["type"], json!("disconnected"));
    assert_eq!(list[0]["status"], json!("delivered"));
    assert_eq!(list[1]["attempts"], json!(1));
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_every_event_in_order_and_a_kill_loses_none() {
    const PHONE: &str = "5511955550002";
    let world = World::new().await;
    let gw = gateway(&world).await;
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let inst = gw.api.create_instance("patient").await;
    set_hooks(&gw, &inst, &receiver, "").await;
    world.wa_link(&gw, &inst, PHONE).await;
    world.phone_unlinks(PHONE).await;
    // Both wait behind the first, which is retried while the receiver is down.
    let deadline = Instant::now() + WAIT;
    while receiver.got().iter().filter(|r| r.answered == 503).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no retries: {:?}",
            receiver.got()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        receiver.got().iter().all(|r| r.path == "connected"),
        "in order: {:?}",
        receiver.got()
    );
    let pending = receiver.got()[0].event_id.clone();

    // Killed with both pending; the receiver comes back; a new gateway delivers them.
    gw.kill().await;
    receiver.answer(200);
    let gw = gateway(&world).await;
    let connected = receiver.wait_delivered("connected", 1).await;
    let disconnected = receiver.wait_delivered("disconnected", 1).await;
    assert_eq!(
        connected[0].event_id, pending,
        "the same event, not a new one"
    );
    assert!(connected[0].at <= disconnected[0].at, "in order");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["connected", "disconnected"] {
        assert_eq!(
            receiver.delivered(path).len(),
            1,
            "{path} once: {:?}",
            receiver.got()
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_receiver_delays_no_other_instance_and_a_410_stops_retries() {
    let world = World::new().await;
    let gw = gateway(&world).await;
    let receiver = Receiver::start().await;
    receiver.delay_ms.store(8_000, Ordering::SeqCst);
    let slow = gw.api.create_instance("slow").await;
    let fast = gw.api.create_instance("fast").await;
    set_hooks(&gw, &slow, &receiver, "slow-").await;
    set_hooks(&gw, &fast, &receiver, "").await;
    world.wa_link(&gw, &slow, "5511955550003").await;
    world.wa_link(&gw, &fast, "5511955550004").await;
    // The fast instance's event is in while the slow receiver still holds the other
    // (it answers, and records, only after 8 s).
    receiver.wait_delivered("connected", 1).await;
    assert!(
        receiver.delivered("slow-connected").is_empty(),
        "the fast receiver waited for the slow one: {:?}",
        receiver.got()
    );

    // A receiver that answers 410 is not tried again.
    let gone = gw.api.create_instance("gone").await;
    let receiver_gone = Receiver::start().await;
    receiver_gone.answer(410);
    set_hooks(&gw, &gone, &receiver_gone, "").await;
    world.wa_link(&gw, &gone, "5511955550005").await;
    let deadline = Instant::now() + WAIT;
    while receiver_gone.got().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver_gone.got().len(), 1, "{:?}", receiver_gone.got());
    let path = format!(
        "/instances/{}/token/{}/webhook-deliveries",
        gone.id, gone.token
    );
    let (_, list) = gw.api.call(reqwest::Method::GET, &path, None, None).await;
    assert_eq!(list["deliveries"][0]["status"], json!("gone"), "{list}");
    // A 410 stops that URL: the webhook with it is cleared, the others stay.
    let (_, me) = gw.api.me(&gone).await;
    assert_eq!(me["connectedCallbackUrl"], json!(null), "{me}");
    assert_eq!(
        me["disconnectedCallbackUrl"],
        json!(receiver_gone.url("disconnected")),
        "{me}"
    );
}

#[tokio::test]
async fn metrics_move_as_numbers_link_and_webhooks_go_out() {
    const PHONE: &str = "5511955550008";
    let world = World::new().await;
    let gw = gateway(&world).await;
    let (status, _) = gw
        .api
        .call(reqwest::Method::GET, "/metrics", None, None)
        .await;
    assert_eq!(status, 401, "the admin token is needed");
    let receiver = Receiver::start().await;
    let inst = gw.api.create_instance("measured").await;
    set_hooks(&gw, &inst, &receiver, "").await;
    let before = common::scrape(&gw).await;
    assert_eq!(before["zapgate_instances{state=\"noSession\"}"], 1.0);
    assert_eq!(before["zapgate_logins_total"], 0.0);

    world.wa_link(&gw, &inst, PHONE).await;
    receiver.wait_delivered("connected", 1).await;
    gw.api.status(&inst).await;
    let after = common::scrape(&gw).await;
    assert_eq!(after["zapgate_instances{state=\"connected\"}"], 1.0);
    assert_eq!(after["zapgate_instances{state=\"noSession\"}"], 0.0);
    assert_eq!(after["zapgate_linking_windows_open"], 0.0);
    assert!(after["zapgate_qr_codes_total"] >= 1.0);
    assert_eq!(after["zapgate_logins_total"], 1.0);
    assert_eq!(
        after["zapgate_webhook_deliveries_total{result=\"delivered\"}"],
        1.0
    );
    assert_eq!(after["zapgate_webhook_outbox_depth"], 0.0);
    let status_route = "zapgate_http_requests_total{route=\"/instances/{id}/token/{token}/status\",method=\"GET\",status=\"200\"}";
    assert!(
        after[status_route] >= 1.0,
        "{:?}",
        after.keys().collect::<Vec<_>>()
    );
    // Nothing of a token in any label.
    assert!(after.keys().all(|k| !k.contains(&inst.token)));
}

#[tokio::test]
async fn a_drop_that_heals_within_the_grace_is_no_disconnect() {
    const PHONE: &str = "5511955550007";
    let world = World::new().await;
    let gw = gateway(&world).await;
    let receiver = Receiver::start().await;
    let inst = gw.api.create_instance("flaky").await;
    set_hooks(&gw, &inst, &receiver, "").await;
    world.wa_link(&gw, &inst, PHONE).await;
    receiver.wait_delivered("connected", 1).await;
    // The socket drops; the client is back within seconds.
    let (status, body) = world
        .wa
        .post("drop", json!({ "phone": PHONE }))
        .await
        .unwrap();
    assert_eq!((status, &body["dropped"]), (200, &json!(1)), "{body}");
    gw.log.wait_for("to=Reconnecting", 1).await;
    gw.api.wait_connected(&inst).await;
    // Past the 10 s grace: neither a disconnect nor a second connect.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(receiver.got().len(), 1, "{:?}", receiver.got());

    // An outage longer than the grace is a disconnect, then a connect when it heals
    // (the client reconnects by itself once WhatsApp is back).
    let (status, _) = world.wa.outage(14).await.unwrap();
    assert_eq!(status, 200);
    receiver.wait_delivered("disconnected", 1).await;
    let connected = receiver.wait_delivered("connected", 2).await;
    assert!(connected[1].at > receiver.delivered("disconnected")[0].at);
}
