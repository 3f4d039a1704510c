//! Linking a number through the Z-API routes, end to end: the gateway binary, the real
//! WhatsApp client inside it, and wa-sim's service and phone.

mod common;

use std::time::Duration;

use common::{World, connected, decode_qr_data_url, not_connected, restore_needed};
use serde_json::json;

const PHONE: &str = "5511988880001";

#[tokio::test]
async fn a_number_linked_by_qr_code_lives_through_restart_and_disconnect() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let api = &gw.api;
    let inst = api.create_instance("shop").await;
    assert_eq!(api.status(&inst).await, not_connected());

    let (status, first) = api.qr_code(&inst).await;
    assert_eq!(status, 200, "{first}");
    let qr = first["value"].as_str().unwrap().to_owned();
    assert_eq!(qr.split(',').count(), 5, "{qr}");
    // Served again with no new traffic to WhatsApp.
    let handshakes = world.wa.stats().await.unwrap()["handshakes"].clone();
    assert_eq!(api.qr_code(&inst).await, (200, json!({ "value": qr })));
    let (status, image) = api.qr_code_image(&inst).await;
    assert_eq!(status, 200);
    assert_eq!(decode_qr_data_url(image["value"].as_str().unwrap()), qr);
    assert_eq!(world.wa.stats().await.unwrap()["handshakes"], handshakes);
    assert_eq!(api.status(&inst).await, not_connected());

    let (status, body) = world.wa.scan(&qr, Some(PHONE)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(api.wait_connected(&inst).await, connected());
    let (status, device) = api.device(&inst).await;
    assert_eq!(status, 200);
    assert_eq!(device["phone"], json!(PHONE));
    assert_eq!(device["sessionId"], json!(1));
    assert_eq!(device["originalDevice"], json!("android"));
    assert_eq!(
        device["name"],
        json!(format!("wa-sim {PHONE}")),
        "the account's push name"
    );
    let already = json!({ "connected": true, "error": "You are already connected." });
    assert_eq!(api.qr_code(&inst).await, (200, already.clone()));
    assert_eq!(api.qr_code_image(&inst).await, (200, already.clone()));
    assert_eq!(api.phone_code(&inst, PHONE).await, (200, already));
    let (_, me) = api.me(&inst).await;
    assert_eq!(
        (me["id"].as_str(), me["connected"].as_bool()),
        (Some(inst.id.as_str()), Some(true))
    );

    // Restart: the stored session logs in again, no QR, no new pairing.
    assert_eq!(api.restart(&inst).await, (200, json!({ "value": true })));
    api.wait_connected(&inst).await;
    let stats = world.wa.stats().await.unwrap();
    assert_eq!(stats["pairings"], json!(1), "no new pairing: {stats}");
    assert!(stats["logins"].as_u64() >= Some(2), "a new login: {stats}");

    // Disconnect: unlinked at WhatsApp, session gone, a new QR on request.
    assert_eq!(api.disconnect(&inst).await, (200, json!({ "value": true })));
    assert_eq!(api.status(&inst).await, not_connected());
    assert!(
        world.wa.devices().await.unwrap().is_empty(),
        "the phone no longer lists the device"
    );
    assert!(!world.has_session(&inst).await);
    let (status, again) = api.qr_code(&inst).await;
    assert_eq!(status, 200);
    assert_ne!(again["value"].as_str().unwrap(), qr);
    gw.stop().await;
}

#[tokio::test]
async fn a_refreshed_code_replaces_the_old_one_for_good() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("refresh").await;
    let (_, first) = gw.api.qr_code(&inst).await;
    let (status, _) = world.wa.post("refresh-refs", json!({})).await.unwrap();
    assert_eq!(status, 200);
    // A user's app polls for the code valid now, as Z-API advises.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let second = loop {
        let (_, now) = gw.api.qr_code(&inst).await;
        if now != first {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "no new code");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for _ in 0..5 {
        assert_eq!(
            gw.api.qr_code(&inst).await,
            (200, second.clone()),
            "never the old code again"
        );
    }
    let old = first["value"].as_str().unwrap();
    assert_eq!(world.wa.scan(old, Some(PHONE)).await.unwrap().0, 404);
    assert_eq!(
        world
            .wa
            .scan(second["value"].as_str().unwrap(), Some(PHONE))
            .await
            .unwrap()
            .0,
        200
    );
    gw.api.wait_connected(&inst).await;
}

#[tokio::test]
async fn a_closed_window_stops_all_traffic_until_asked_again() {
    let world = World::with_sim(wa_sim::Config {
        refs_per_pairing: 1,
        ..Default::default()
    })
    .await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("window").await;
    let (_, first) = gw.api.qr_code(&inst).await;
    assert!(first["value"].is_string(), "{first}");
    // The only ref lives 60 s; then the client gives up and the instance goes quiet.
    gw.log
        .wait_within("WhatsApp client stopped", Duration::from_secs(80))
        .await;
    assert_eq!(gw.api.status(&inst).await, not_connected());
    assert_eq!(world.stat("connections").await, 0);
    let handshakes = world.stat("handshakes").await;

    let (status, second) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200);
    assert_ne!(second, first);
    assert_eq!(world.stat("connections").await, 1);
    assert_eq!(
        world.stat("handshakes").await,
        handshakes + 1,
        "no reconnects while closed: the new window is the only new handshake"
    );
}

#[tokio::test]
async fn a_number_links_by_pairing_code() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("code").await;

    for bad in ["abc", "0551198888000", "123", "5511988880001123456"] {
        let (status, body) = gw.api.phone_code(&inst, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(
        world.wa.stats().await.unwrap()["handshakes"],
        json!(0),
        "bad numbers send nothing"
    );

    let (status, body) = gw.api.phone_code(&inst, "+55 (11) 98888-0001").await;
    assert_eq!(status, 200, "{body}");
    let code = body["code"].as_str().unwrap().to_owned();
    assert!(code.len() == 9 && code.as_bytes()[4] == b'-', "{code}");
    // Asked again: the same code, still valid.
    assert_eq!(
        gw.api.phone_code(&inst, PHONE).await,
        (200, json!({ "code": code }))
    );

    let (status, body) = world
        .wa
        .post("link-code", json!({ "phone": PHONE, "code": code }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    gw.api.wait_connected(&inst).await;
    assert_eq!(gw.api.device(&inst).await.1["phone"], json!(PHONE));
}

#[tokio::test]
async fn a_pairing_code_left_to_expire_closes_the_window() {
    // One QR ref: the QR codes run out after 60 s, the code lives 180 s.
    let world = World::with_sim(wa_sim::Config {
        refs_per_pairing: 1,
        ..Default::default()
    })
    .await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("forgotten").await;
    let (status, first) = gw.api.phone_code(&inst, PHONE).await;
    assert_eq!(status, 200, "{first}");

    // The QR codes run out (after 60 s); the code still valid keeps the window.
    gw.log
        .wait_within(
            "the pairing code keeps the window open",
            Duration::from_secs(75),
        )
        .await;
    assert_eq!(gw.api.phone_code(&inst, PHONE).await, (200, first.clone()));
    assert_eq!(world.stat("connections").await, 1);
    // Then it expires: the window closes, and the socket with it.
    gw.log
        .wait_within("input=WindowEnded", Duration::from_secs(130))
        .await;
    gw.log.wait_for("WhatsApp client stopped", 1).await;
    assert_eq!(world.stat("connections").await, 0);
    assert_eq!(gw.api.status(&inst).await, not_connected());

    let (status, second) = gw.api.phone_code(&inst, PHONE).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second, first);
    assert_eq!(world.stat("codeRequests").await, 2);
    assert_eq!(world.stat("connections").await, 1);
}

#[tokio::test]
async fn a_killed_gateway_comes_back_connected_without_a_qr() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "survivor", PHONE).await;
    gw.kill().await;

    let gw = world.gateway().await;
    gw.api.wait_connected(&inst).await;
    assert_eq!(
        world.wa.stats().await.unwrap()["pairings"],
        json!(1),
        "no new pairing"
    );
    assert_eq!(gw.api.device(&inst).await.1["phone"], json!(PHONE));
    gw.stop().await;

    // A clean stop keeps the session too.
    let gw = world.gateway().await;
    gw.api.wait_connected(&inst).await;
}

#[tokio::test]
async fn the_phone_unlinking_wipes_the_session() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "unlinked", PHONE).await;

    world.phone_unlinks(PHONE).await;
    gw.api
        .wait_status(&inst, "not connected", |s| *s == not_connected())
        .await;
    world.session_wiped(&inst).await;
    assert_eq!(
        gw.api.device(&inst).await,
        (
            200,
            json!({ "connected": false, "error": "You are not connected." })
        )
    );
    assert_eq!(
        world.wa.stats().await.unwrap()["loginFailures"],
        json!(0),
        "dead credentials are not retried"
    );
}

#[tokio::test]
async fn an_outage_needs_restoring_and_then_heals() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "outage", PHONE).await;

    assert_eq!(world.wa.outage(4).await.unwrap().0, 200);
    gw.api
        .wait_status(&inst, "restore needed", |s| *s == restore_needed())
        .await;
    gw.api.wait_connected(&inst).await;
    let refused = world.wa.stats().await.unwrap()["refused"].as_u64().unwrap();
    assert!(
        (1..=6).contains(&refused),
        "reconnect attempts during a 4 s outage: {refused}"
    );
}

#[tokio::test]
async fn a_replaced_stream_does_not_ping_pong() {
    let world = World::new().await;
    // A second gateway on the same data takes the session over.
    let (first, second, inst) = world.taken_over("twice", PHONE).await;
    // The replaced client has stopped: nothing is left to take the session back.
    first.log.wait_for("WhatsApp client stopped", 1).await;
    let logins = world.stat("logins").await;
    assert_eq!(
        world.stat("connections").await,
        1,
        "only the second is online"
    );
    assert_eq!(first.api.status(&inst).await, restore_needed());
    assert_eq!(world.stat("logins").await, logins);
    assert_eq!(first.api.status(&inst).await, restore_needed());
    assert_eq!(second.api.status(&inst).await, connected());
    // wa-sim saw one login replace a live one, and nothing since.
    assert_eq!(world.stat("replacedLogins").await, 1);
    let jid = world.wa.devices().await.unwrap()[0]["jid"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, log) = world
        .wa
        .get(&format!("devices/{jid}/logins"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{log}");
    let replaced: Vec<u64> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["replaced"].as_u64().unwrap())
        .collect();
    assert_eq!(replaced, [0, 1], "linked, then taken over: {log}");
    let (status, _) = world
        .wa
        .get("devices/5511000000000:9@s.whatsapp.net/logins")
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Disconnecting where the session is offline still unlinks it at WhatsApp: the
    // gateway connects the stored session just to log it out.
    assert_eq!(
        first.api.disconnect(&inst).await,
        (200, json!({ "value": true }))
    );
    assert!(world.wa.devices().await.unwrap().is_empty());
    assert_eq!(first.api.status(&inst).await, not_connected());
}

#[tokio::test]
async fn cancelling_a_linked_instance_unlinks_it_and_deletes_its_session() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "cancelled", PHONE).await;
    let cancel = format!(
        "/instances/{}/token/{}/integrator/on-demand/cancel",
        inst.id, inst.token
    );
    let (status, _) = gw
        .api
        .call(reqwest::Method::POST, &cancel, None, Some(common::ADMIN))
        .await;
    assert_eq!(status, 201);
    assert!(
        world.wa.devices().await.unwrap().is_empty(),
        "unlinked at WhatsApp"
    );
    assert!(!world.has_session(&inst).await);
    assert_eq!(
        gw.api.instance_get(&inst, "status").await,
        (404, json!({ "error": "Instance not found" }))
    );
}

#[tokio::test]
async fn the_event_stream_follows_linking_without_polling() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("followed").await;
    let mut events = gw.api.events(&inst, None).await;
    let first = events.next().await;
    assert_eq!(
        (first.name.as_str(), &first.data["state"]),
        ("state", &json!("noSession"))
    );
    assert_eq!(first.data["connected"], json!(false));

    // A code asked for through the API shows up on the stream, image and all.
    let (status, qr) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200, "{qr}");
    let shown = events.until("qr").await;
    assert_eq!(shown.data["value"], qr["value"]);
    let image = shown.data["image"].as_str().unwrap();
    assert_eq!(decode_qr_data_url(image), qr["value"].as_str().unwrap());
    let left = shown.data["expiresIn"].as_u64().unwrap();
    assert!((50..=60).contains(&left), "{left}");

    // WhatsApp replaces it: the new one is pushed.
    let (status, _) = world.wa.post("refresh-refs", json!({})).await.unwrap();
    assert_eq!(status, 200);
    let replaced = events.until("qr").await;
    assert_ne!(replaced.data["value"], shown.data["value"]);
    assert!(replaced.id.parse::<u64>().unwrap() > shown.id.parse::<u64>().unwrap());

    // The phone scans it: connected, with the phone and the device.
    let code = replaced.data["value"].as_str().unwrap();
    let (status, body) = world.wa.scan(code, Some(PHONE)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let connected = loop {
        let event = events.until("state").await;
        if event.data["state"] == json!("connected") {
            break event;
        }
    };
    assert_eq!(connected.data["connected"], json!(true));
    assert_eq!(connected.data["phone"], json!(PHONE));
    assert_eq!(connected.data["device"], body["device"]);

    // A client that comes back (with the last id it saw) gets the state at once.
    let mut again = gw.api.events(&inst, Some(&shown.id)).await;
    let now = again.next_within(Duration::from_secs(2)).await;
    assert_eq!(
        (now.name.as_str(), &now.data["state"]),
        ("state", &json!("connected"))
    );
    assert!(now.id.parse::<u64>().unwrap() >= connected.id.parse::<u64>().unwrap());

    // The stream keeps the instance routes' rules: a wrong token is an unknown instance.
    let wrong = format!("/instances/{}/token/wrong/events", inst.id);
    let (status, body) = gw.api.call(reqwest::Method::GET, &wrong, None, None).await;
    assert_eq!(
        (status, body),
        (404, json!({ "error": "Instance not found" }))
    );

    // A cancelled instance's stream ends; so do all of them when the gateway stops,
    // which an open stream does not hold up.
    let other = gw.api.create_instance("cancelled").await;
    let mut cancelled = gw.api.events(&other, None).await;
    cancelled.next().await;
    let cancel = format!(
        "/instances/{}/token/{}/integrator/on-demand/cancel",
        other.id, other.token
    );
    let (status, _) = gw
        .api
        .call(reqwest::Method::POST, &cancel, None, Some(common::ADMIN))
        .await;
    assert_eq!(status, 201);
    cancelled.ends_within(Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(10), gw.stop())
        .await
        .expect("an open event stream does not hold up shutdown");
    again.ends_within(Duration::from_secs(1)).await;
    events.ends_within(Duration::from_secs(1)).await;
}
