//! Callers at once, windows that end however WhatsApp ends them, and what a user hears
//! when WhatsApp cannot be reached. End to end, against wa-sim.

mod common;

use std::time::Duration;

use common::{Gateway, World, not_connected};
use serde_json::json;

const PHONE: &str = "5511988880001";
const OTHER: &str = "5511977770002";

#[tokio::test]
async fn concurrent_callers_share_one_window_and_one_code_per_phone() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("busy").await;

    let answers = futures_util::future::join_all((0..5).map(|_| gw.api.qr_code(&inst))).await;
    let first = &answers[0];
    assert_eq!(first.0, 200, "{}", first.1);
    assert!(answers.iter().all(|a| a == first), "{answers:?}");
    assert_eq!(world.stat("handshakes").await, 1, "one window");

    let (a, b, c) = tokio::join!(
        gw.api.phone_code(&inst, PHONE),
        gw.api.phone_code(&inst, PHONE),
        gw.api.phone_code(&inst, "+55 (11) 98888-0001"),
    );
    assert_eq!(a.0, 200, "{}", a.1);
    assert_eq!((&a, &a), (&b, &c), "one code for one phone");
    assert_eq!(world.stat("codeRequests").await, 1);
    let code = a.1["code"].as_str().unwrap().to_owned();

    // Another phone replaces the request; the first code is void at the phone.
    let (status, other) = gw.api.phone_code(&inst, OTHER).await;
    assert_eq!(status, 200, "{other}");
    let other = other["code"].as_str().unwrap().to_owned();
    assert_ne!(other, code);
    assert_eq!(world.stat("codeRequests").await, 2);
    assert_eq!(
        gw.api.phone_code(&inst, OTHER).await,
        (200, json!({ "code": other }))
    );
    let (status, _) = world.wa.link_code(PHONE, &code).await.unwrap();
    assert_ne!(status, 200, "a replaced code does not link");
    let (status, body) = world.wa.link_code(OTHER, &other).await.unwrap();
    assert_eq!(status, 200, "{body}");
    gw.api.wait_connected(&inst).await;
    assert_eq!(gw.api.device(&inst).await.1["phone"], json!(OTHER));
}

#[tokio::test]
async fn two_phones_at_once_one_gets_the_code_and_the_other_hears_why_not() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("race").await;
    let (a, b) = tokio::join!(
        gw.api.phone_code(&inst, PHONE),
        gw.api.phone_code(&inst, OTHER)
    );
    let (won, lost, winner) = if a.0 == 200 {
        (a, b, PHONE)
    } else {
        (b, a, OTHER)
    };
    assert_eq!(won.0, 200, "{}", won.1);
    assert_eq!(
        lost,
        (
            409,
            json!({ "error": format!("a pairing code was requested for another number ({winner}), which replaced this request") })
        )
    );
    assert_eq!(world.stat("codeRequests").await, 1);
    assert_eq!(world.stat("handshakes").await, 1);
}

#[tokio::test]
async fn linking_requests_beyond_the_rate_get_429_with_retry_after() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_LINK_RATE_PER_MINUTE", "2")])
        .await;
    let inst = gw.api.create_instance("eager").await;
    assert_eq!(gw.api.phone_code(&inst, PHONE).await.0, 200);
    assert_eq!(gw.api.phone_code(&inst, PHONE).await.0, 200, "coalesced");
    assert_eq!(gw.api.phone_code(&inst, OTHER).await.0, 200);
    let response = gw
        .api
        .http
        .get(format!(
            "{}/instances/{}/token/{}/phone-code/5511966660003",
            gw.api.base, inst.id, inst.token
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "error": format!("too many linking requests for this instance; try again in {retry} s") })
    );
    assert_eq!(world.stat("codeRequests").await, 2, "nothing sent");
    // The code already given is still served.
    assert_eq!(gw.api.phone_code(&inst, OTHER).await.0, 200);
}

#[tokio::test]
async fn restores_and_restarts_in_progress_are_joined_not_repeated() {
    let world = World::new().await;
    // A second gateway on the same data takes the session over (and stays up).
    let (first, _second, inst) = world.taken_over("twice", PHONE).await;

    // Counted in this gateway's own log: wa-sim's login count also sees the other
    // gateway, whose replaced client may still be closing.
    let (restores, connects) = (
        first.log.count("input=Restore"),
        first.log.count("to=Connected"),
    );
    let answers =
        futures_util::future::join_all((0..3).map(|_| first.api.restore_session(&inst))).await;
    for answer in &answers {
        assert_eq!(*answer, (200, json!({ "value": true })));
    }
    first.api.wait_connected(&inst).await;
    first.log.wait_for("to=Connected", connects + 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        first.log.count("input=Restore"),
        restores + 1,
        "one restore for three"
    );
    assert_eq!(
        first.log.count("to=Connected"),
        connects + 1,
        "one login for three"
    );

    let restarts = first.log.count("input=Restart");
    let answers = futures_util::future::join_all((0..3).map(|_| first.api.restart(&inst))).await;
    for answer in &answers {
        assert_eq!(*answer, (200, json!({ "value": true })));
    }
    first.api.wait_connected(&inst).await;
    first.log.wait_for("to=Connected", connects + 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        first.log.count("input=Restart"),
        restarts + 1,
        "one restart for three"
    );
    assert_eq!(
        first.log.count("to=Connected"),
        connects + 2,
        "one login for three"
    );
}

#[tokio::test]
async fn a_disconnect_while_whatsapp_is_down_answers_in_time_and_says_so() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "offline", PHONE).await;
    assert_eq!(world.wa.outage(60).await.unwrap().0, 200);

    let asked = tokio::time::Instant::now();
    let (status, body) = gw.api.disconnect(&inst).await;
    assert!(
        asked.elapsed() < Duration::from_secs(12),
        "answered within the link wait (10 s): {:?}",
        asked.elapsed()
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["value"], json!(true));
    assert_eq!(body["unlinkedAtWhatsApp"], json!(false));
    let error = body["error"].as_str().unwrap();
    assert!(error.starts_with("WhatsApp is unreachable: "), "{error}");
    assert!(error.ends_with("the phone lists the device until it is removed there"));
    gw.log.wait_for("session deleted", 1).await;
    assert_eq!(gw.api.status(&inst).await, not_connected());
    assert!(!world.has_session(&inst).await);
    assert_eq!(
        world.wa.devices().await.unwrap().len(),
        1,
        "WhatsApp was not told"
    );
}

#[tokio::test]
async fn offline_without_a_version_the_error_names_the_flag() {
    let world = World::new().await;
    let gw = Gateway::start_without(
        &world.sim.ws_url(),
        &world.data_dir(),
        &[("ZAPGATE_LINK_WAIT_SECS", "3")],
        &["ZAPGATE_WHATSAPP_VERSION"],
    )
    .await;
    let inst = gw.api.create_instance("no-version").await;
    let (status, body) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap();
    assert_eq!(
        error.lines().next(),
        Some(
            "WhatsApp's web version is unknown: set --whatsapp-version (ZAPGATE_WHATSAPP_VERSION), e.g. 2.3000.1030000000"
        ),
        "{error}"
    );
    assert_eq!(gw.api.status(&inst).await, not_connected());
    assert_eq!(
        world.stat("handshakes").await,
        0,
        "nothing reached WhatsApp"
    );
    assert_eq!(world.stat("refused").await, 0);
}

#[tokio::test]
async fn a_server_that_cannot_prove_it_is_whatsapp_is_named() {
    let world = World::with_sim(wa_sim::Config {
        forged_certificate: true,
        ..Default::default()
    })
    .await;
    let gw = world.gateway_with(&[("ZAPGATE_LINK_WAIT_SECS", "3")]).await;
    let inst = gw.api.create_instance("impostor").await;
    assert_eq!(
        gw.api.qr_code(&inst).await,
        (
            503,
            json!({ "error": "WhatsApp's certificate was refused: the server at the WhatsApp URL could not prove it is WhatsApp" })
        )
    );
    assert_eq!(gw.api.status(&inst).await, not_connected());
    // The window is closed: once its client has stopped, nothing more is tried.
    gw.log.wait_for("input=LinkFailed", 1).await;
    gw.log.wait_for("WhatsApp client stopped", 1).await;
    let connections = world.stat("connections").await;
    assert_eq!(world.wa.stats().await.unwrap()["linking"], json!(0));
    assert_eq!(connections, 0, "no socket left open");
}

#[tokio::test]
async fn sessions_beyond_the_open_file_limit_are_refused_saying_so() {
    let world = World::new().await;
    // 286 open files: 256 kept for the gateway, 16 for HTTP connections, 2 per
    // session, so room for 7.
    let gw = world
        .gateway_with(&[(common::NOFILE, "286"), ("ZAPGATE_MAX_CONNECTIONS", "16")])
        .await;
    gw.log.wait_for("open-file limit", 1).await;
    assert!(gw.log.text().contains("sessions=7"), "{}", gw.log.text());
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut linked = Vec::new();
    for i in 0..7 {
        linked.push(
            world
                .linked_instance(&gw, &format!("room {i}"), &format!("55119444400{i:02}"))
                .await,
        );
    }
    // What the room is computed from: 2 open files per session at most.
    let per_session = (fds() - before) as f64 / 7.0;
    assert!(
        per_session <= 2.0,
        "{per_session:.1} open files per session"
    );
    let last = gw.api.create_instance("no room").await;
    let (status, body) = gw.api.qr_code(&last).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("open-file limit leaves room for 7 sessions"),
        "{body}"
    );
    // Every linked one is still connected.
    for inst in &linked {
        assert_eq!(gw.api.status(inst).await["connected"], json!(true));
    }
}
