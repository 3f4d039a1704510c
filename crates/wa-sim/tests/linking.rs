//! The unmodified whatsapp-rust client links, logs in and recovers against wa-sim.

mod common;

use common::Harness;
use serde_json::json;
use wa_sim::Config;
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::types::events::Event;
use whatsapp_rust::wacore::iq::privacy::{PrivacyCategory, PrivacyValue};

const PHONE: &str = "5511999990001";

#[tokio::test]
async fn a_scanned_qr_links_the_device_and_the_stored_session_logs_in_again_with_ik() {
    let h = Harness::start().await;
    let store = h.store("a");
    let mut companion = h.companion(&store).await;
    let qr = companion.next_qr().await;
    assert_eq!(
        qr.split(',').count(),
        5,
        "QR carries ref, noise, identity, secret, type: {qr}"
    );

    let (status, body) = h.control.scan(&qr, Some(PHONE)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["jid"], json!(format!("{PHONE}:1@s.whatsapp.net")));
    let paired = companion
        .wait_for("PairSuccess", |e| match e {
            Event::PairSuccess(p) => Some(p.id.to_string()),
            _ => None,
        })
        .await;
    assert_eq!(paired, format!("{PHONE}:1@s.whatsapp.net"));
    companion.wait_connected().await;
    assert_eq!(
        companion.client.pn().map(|j| j.user.to_string()),
        Some(PHONE.to_owned())
    );

    let devices = h.control.devices().await.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(
        devices[0]["jid"],
        json!(format!("{PHONE}:1@s.whatsapp.net"))
    );
    assert_eq!(devices[0]["phone"], json!(PHONE));
    assert_eq!(devices[0]["connected"], json!(true));
    assert!(devices[0]["linkedAt"].as_u64().unwrap() > 1_700_000_000_000);
    // Registration (XX), then the login after the 515 restart (XX, which caches our chain).
    assert_eq!(h.control.stats().await.unwrap()["ikHandshakes"], json!(0));

    // The device uploads its one-time prekeys after its first login; the service keeps
    // them and counts them as the device's signed key was checked.
    let jid = format!("{PHONE}:1@s.whatsapp.net");
    h.device_until(&jid, |d| d["preKeys"] != json!(0)).await;
    assert_eq!(
        h.control.devices().await.unwrap()[0]["preKeys"],
        json!(812),
        "whatsapp-rust uploads 812 in one go"
    );
    assert_eq!(companion.client.push_name(), format!("wa-sim {PHONE}"));
    // Both messages of the phone's welcome were decrypted and acknowledged.
    let stats = h
        .stats_until(|s| s["peerReceipts"] == json!(2) && s["historySyncReceipts"] == json!(1))
        .await;
    assert_eq!(stats["peerMessages"], json!(2), "{stats}");
    assert_eq!(
        h.control.devices().await.unwrap()[0]["appStateKeyShared"],
        json!(true)
    );
    assert_eq!(stats["peerReceipts"], json!(2), "{stats}");
    assert_eq!(stats["historySyncReceipts"], json!(1), "{stats}");

    companion.stop().await;
    // The phone's key share, over its Signal session, was decrypted and kept.
    assert_eq!(
        common::kept_sync_key_len(&store).await,
        Some(6),
        "the shared key is stored"
    );
    let mut again = h.companion(&store).await;
    again.wait_connected().await;
    let seen = again.drain();
    assert!(
        !seen.iter().any(|e| e == "PairingQrCode"),
        "no QR for a stored session: {seen:?}"
    );
    let stats = h.control.stats().await.unwrap();
    assert_eq!(stats["ikHandshakes"], json!(1), "{stats}");
    assert_eq!(stats["pairings"], json!(1), "{stats}");
    assert_eq!(stats["logins"], json!(2), "{stats}");
    // Nobody is between hello and login any more; one was at a time, at most.
    let stats = h.stats_until(|s| s["admitting"] == json!(0)).await;
    assert_eq!(stats["peakAdmitting"], json!(1), "{stats}");
    let reset = h.control.reset_peaks().await.unwrap();
    assert_eq!(reset["peakAdmitting"], json!(0), "{reset}");

    // Account queries are answered as WhatsApp answers a new account.
    let privacy = again
        .client
        .fetch_privacy_settings()
        .await
        .expect("privacy settings");
    assert_eq!(privacy.settings.len(), 7);
    assert_eq!(
        privacy.get_value(&PrivacyCategory::ReadReceipts),
        Some(&PrivacyValue::All)
    );
    again.client.fetch_props().await.expect("A/B props");
    again.stop().await;
}

#[tokio::test]
async fn a_typed_pairing_code_links_the_device_and_a_wrong_one_does_not() {
    let h = Harness::start().await;
    let mut companion = h.companion(&h.store("code")).await;
    companion.next_qr().await; // registered and waiting

    let code = companion
        .client
        .pair_with_code(PairCodeOptions {
            phone_number: PHONE.to_owned(),
            ..Default::default()
        })
        .await
        .expect("the service accepts the code request");
    assert_eq!(code.len(), 8);

    let wrong = if code.starts_with('A') {
        "BBBBBBBB"
    } else {
        "AAAAAAAA"
    };
    let (status, body) = h.control.link_code(PHONE, wrong).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("code"), "{body}");
    assert!(h.control.devices().await.unwrap().is_empty());
    assert_eq!(
        h.control.stats().await.unwrap()["pairingRefusals"],
        json!(1),
        "the refusal is counted"
    );

    let grouped = format!("{}-{}", &code[..4], &code[4..]);
    let (status, body) = h.control.link_code(PHONE, &grouped).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["jid"], json!(format!("{PHONE}:1@s.whatsapp.net")));
    companion.wait_connected().await;
    assert_eq!(
        h.control.devices().await.unwrap()[0]["connected"],
        json!(true)
    );
    companion.stop().await;
}

#[tokio::test]
async fn codes_for_nobody_and_malformed_input_are_refused() {
    let h = Harness::start().await;
    let (status, body) = h.control.link_code(PHONE, "ABCD-EFGH").await.unwrap();
    assert_eq!((status, body["error"].is_string()), (404, true), "{body}");
    let (status, _) = h.control.link_code(PHONE, "ABC").await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = h.control.link_code("0123", "ABCDEFGH").await.unwrap();
    assert_eq!(status, 400);
    let (status, body) = h.control.post("scan", json!({ "qr": 5 })).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{body}"
    );
    let (status, _) = h.control.scan("not,a,qr", None).await.unwrap();
    assert_eq!(status, 400);
    let (status, body) = h.control.post("nowhere", json!({})).await.unwrap();
    assert_eq!((status, body["error"].is_string()), (404, true));
}

#[tokio::test]
async fn a_tampered_qr_links_nothing() {
    let h = Harness::start().await;
    let mut companion = h.companion(&h.store("t")).await;
    let qr = companion.next_qr().await;
    let fields: Vec<&str> = qr.split(',').collect();

    // Another ref: nobody shows it.
    let other_ref = [&["2@forged"], &fields[1..]].concat().join(",");
    assert_eq!(h.control.scan(&other_ref, None).await.unwrap().0, 404);
    // Another noise key: not the device showing this ref.
    let other_key = [fields[0], fields[2], fields[2], fields[3], fields[4]].join(",");
    assert_eq!(h.control.scan(&other_key, None).await.unwrap().0, 400);
    // Another secret: the service cannot tell, but the device rejects the HMAC.
    let other_secret = [fields[0], fields[1], fields[2], fields[1], fields[4]].join(",");
    let (status, body) = h.control.scan(&other_secret, Some(PHONE)).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("hmac-mismatch"),
        "{body}"
    );
    assert_eq!(
        h.control.stats().await.unwrap()["pairingRefusals"],
        json!(1)
    );
    companion
        .wait_for("PairError", |e| {
            matches!(e, Event::PairError(_)).then_some(())
        })
        .await;
    assert!(h.control.devices().await.unwrap().is_empty());

    // The genuine code still links.
    let (status, body) = h.control.scan(&qr, Some(PHONE)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    companion.wait_connected().await;
    companion.stop().await;
}

#[tokio::test]
async fn the_phone_unlinking_logs_the_device_out_for_good() {
    let h = Harness::start().await;
    let store = h.store("u");
    let mut companion = h.linked_companion(&store, PHONE).await;
    let (status, body) = h
        .control
        .post("unlink", json!({ "phone": PHONE }))
        .await
        .unwrap();
    assert_eq!((status, body["removed"].as_u64()), (200, Some(1)), "{body}");
    companion.wait_logged_out().await;
    assert!(h.control.devices().await.unwrap().is_empty());
    companion.stop().await;

    // The old credentials are refused at login.
    let mut again = h.companion(&store).await;
    again
        .wait_for("LoggedOut on connect", |e| match e {
            Event::LoggedOut(l) => Some(l.on_connect),
            _ => None,
        })
        .await
        .then_some(())
        .expect("refused at connect");
    assert_eq!(h.control.stats().await.unwrap()["loginFailures"], json!(1));
    // A refused login is no longer admitting either.
    h.stats_until(|s| s["admitting"] == json!(0)).await;
    again.stop().await;
}

#[tokio::test]
async fn the_client_logging_out_removes_its_device() {
    let h = Harness::start().await;
    let companion = h.linked_companion(&h.store("l"), PHONE).await;
    companion.client.logout().await;
    assert!(h.control.devices().await.unwrap().is_empty());
    companion.stop().await;
}

#[tokio::test]
async fn stream_errors_and_drops_are_survived() {
    let h = Harness::start().await;
    let mut companion = h.linked_companion(&h.store("r"), PHONE).await;
    for (route, body) in [
        ("stream-error", json!({ "phone": PHONE, "code": 515 })),
        ("stream-error", json!({ "phone": PHONE, "code": 503 })),
        ("drop", json!({ "phone": PHONE })),
    ] {
        let (status, reply) = h.control.post(route, body.clone()).await.unwrap();
        assert_eq!(status, 200, "{route} {reply}");
        companion.wait_connected().await;
        assert_eq!(
            h.control.devices().await.unwrap()[0]["connected"],
            json!(true),
            "after {body}"
        );
    }
    assert_eq!(h.control.stats().await.unwrap()["logins"], json!(4));
    companion.stop().await;
}

#[tokio::test]
async fn refreshed_refs_show_a_new_qr_and_the_old_one_expires() {
    let h = Harness::start().await;
    let mut companion = h.companion(&h.store("q")).await;
    let first = companion.next_qr().await;
    let (status, body) = h.control.post("refresh-refs", json!({})).await.unwrap();
    assert_eq!((status, body["refreshed"].as_u64()), (200, Some(1)));
    let second = companion.next_qr().await;
    assert_ne!(first.split(',').next(), second.split(',').next());
    assert_eq!(
        h.control.scan(&first, None).await.unwrap().0,
        404,
        "the old code no longer links"
    );
    assert_eq!(h.control.scan(&second, None).await.unwrap().0, 200);
    companion.wait_connected().await;
    companion.stop().await;
}

#[tokio::test]
async fn a_client_that_runs_out_of_refs_stops_linking() {
    let h = Harness::with_config(Config {
        refs_per_pairing: 1,
        ..Config::default()
    })
    .await;
    let mut companion = h.companion(&h.store("x")).await;
    companion.next_qr().await;
    let disconnected = companion
        .wait_for_within(
            std::time::Duration::from_secs(75),
            "PairingQrCodesExhausted",
            |e| match e {
                Event::PairingQrCodesExhausted(x) => Some(x.disconnected),
                _ => None,
            },
        )
        .await;
    assert!(disconnected);
    // The client closes its socket: the service sees no one linking any more.
    for _ in 0..50 {
        if h.control.stats().await.unwrap()["connections"] == json!(0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(h.control.stats().await.unwrap()["connections"], json!(0));
    let seen = companion.drain();
    assert!(!seen.iter().any(|e| e == "PairingQrCode"), "{seen:?}");
    companion.stop().await;
}
