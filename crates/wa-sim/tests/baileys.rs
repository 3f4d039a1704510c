//! Conformance with a second client: Baileys, written independently of whatsapp-rust
//! (its own binary codec, Noise and Signal code), links, logs in again, is logged out
//! and exchanges texts with a contact against wa-sim unmodified, with nothing in its
//! log at error level.

mod common;

use std::time::{Duration, Instant};

use common::Harness;
use common::baileys::Baileys;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn assert_no_errors(baileys: &Baileys) {
    for warning in baileys.warnings() {
        eprintln!("Baileys warned: {warning}");
    }
    let errors = baileys.errors();
    assert!(
        errors.is_empty(),
        "Baileys logged errors:\n{}",
        errors.join("\n")
    );
}

#[tokio::test]
async fn baileys_links_by_qr_logs_in_again_from_its_creds_and_is_logged_out_by_the_phone() {
    const PHONE: &str = "5511988880001";
    let h = Harness::start().await;
    let auth = h.dir.path().join("baileys-qr");
    let mut baileys = Baileys::start(&h.sim.ws_url(), &auth);
    let qr = baileys.wait_for("qr", WAIT).await["qr"]
        .as_str()
        .unwrap()
        .to_owned();
    let scanned = Instant::now();
    let (status, body) = h.control.scan(&qr, Some(PHONE)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let jid = body["jid"].as_str().unwrap().to_owned();
    let open = baileys.wait_for("open", WAIT).await;
    let linked_in = scanned.elapsed();
    assert_eq!(open["jid"], json!(jid));
    // The phone's empty initial history sync (INITIAL_BOOTSTRAP, 0) reached it, so it
    // did not wait 20 s for one.
    let history = baileys.wait_for("history", Duration::from_secs(5)).await;
    assert_eq!(history["syncType"], json!(0), "{history}");
    // What a device does after its first login: it uploads prekeys (after asking how
    // many the service holds) and receives the phone's app-state key share.
    let device = h
        .device_until(&jid, |d| {
            d["preKeys"].as_u64() > Some(0) && d["appStateKeyShared"] == json!(true)
        })
        .await;
    assert_eq!(device["connected"], json!(true));
    assert_eq!(device["platform"], json!("Ubuntu"));
    baileys.quit().await;
    assert_no_errors(&baileys);
    eprintln!("Baileys linked by QR in {linked_in:?}");

    // Its stored creds log in again: the first thing it says is that it is open.
    let started = Instant::now();
    let mut again = Baileys::start(&h.sim.ws_url(), &auth);
    let first = again.next_event(WAIT).await;
    assert_eq!(first["event"], json!("open"), "{first}");
    assert_eq!(first["jid"], json!(jid));
    eprintln!("Baileys logged in again in {:?}", started.elapsed());
    // It decrypted both messages of the phone's welcome and processed the history sync
    // (its receipts were sent before it quit; the key share's is what marks it shared).
    let stats = h.control.stats().await.unwrap();
    assert_eq!(stats["peerMessages"], json!(2), "{stats}");
    assert_eq!(stats["peerReceipts"], json!(2), "{stats}");
    assert_eq!(stats["historySyncReceipts"], json!(1), "{stats}");
    assert_eq!(stats["pairings"], json!(1), "{stats}");
    assert_eq!(stats["pairingRefusals"], json!(0), "{stats}");
    assert_eq!(stats["loginFailures"], json!(0), "{stats}");

    // The phone unlinks it: Baileys hears it is logged out (401).
    let (status, body) = h
        .control
        .post("unlink", json!({ "phone": PHONE }))
        .await
        .unwrap();
    assert_eq!((status, body["removed"].as_u64()), (200, Some(1)), "{body}");
    let closed = again.wait_for("close", WAIT).await;
    assert_eq!(closed["status"], json!(401), "{closed}");
    again.exited().await;
    assert_no_errors(&again);
    assert!(h.control.devices().await.unwrap().is_empty());
}

#[tokio::test]
async fn baileys_links_by_pairing_code() {
    const PHONE: &str = "5511988880002";
    let h = Harness::start().await;
    let mut baileys = Baileys::start(&h.sim.ws_url(), &h.dir.path().join("baileys-code"));
    baileys.wait_for("qr", WAIT).await;
    let asked = Instant::now();
    baileys.command(&format!("pair {PHONE}"));
    let code = baileys.wait_for("pairing-code", WAIT).await["code"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(code.len(), 8, "{code}");
    let (status, body) = h.control.link_code(PHONE, &code).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let open = baileys.wait_for("open", WAIT).await;
    assert_eq!(open["jid"], body["jid"]);
    eprintln!("Baileys linked by pairing code in {:?}", asked.elapsed());
    h.device_until(body["jid"].as_str().unwrap(), |d| {
        d["appStateKeyShared"] == json!(true)
    })
    .await;
    baileys.quit().await;
    assert_no_errors(&baileys);
}

#[tokio::test]
async fn baileys_and_a_contact_exchange_texts() {
    const PHONE: &str = "5511988880003";
    const CONTACT: &str = "5511977770003";
    let h = Harness::start().await;
    let (status, body) = h
        .control
        .create_contact(Some(CONTACT), Some("Dora"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut baileys = Baileys::start(&h.sim.ws_url(), &h.dir.path().join("baileys-texts"));
    let qr = baileys.wait_for("qr", WAIT).await["qr"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(h.control.scan(&qr, Some(PHONE)).await.unwrap().0, 200);
    baileys.wait_for("open", WAIT).await;
    // The phone's welcome first: it opens the phone's session with the device, which a
    // send racing it would open too (Baileys then logs that it replaced one).
    baileys.wait_for("history", WAIT).await;

    baileys.command(&format!("send {CONTACT}@s.whatsapp.net hello from Baileys"));
    let sent = baileys.wait_for("sent", WAIT).await;
    let (status, inbox) = h
        .control
        .inbox(CONTACT, Some(WAIT.as_secs()), Some(1))
        .await
        .unwrap();
    assert_eq!(status, 200, "{inbox}");
    assert_eq!(inbox[0]["id"], sent["id"], "{inbox}");
    assert_eq!(inbox[0]["from"], json!(PHONE));
    assert_eq!(inbox[0]["text"], json!("hello from Baileys"));

    let (status, body) = h
        .control
        .contact_send(CONTACT, PHONE, "hello Baileys", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let message = baileys.wait_for("message", WAIT).await;
    assert_eq!(message["id"], body["id"], "{message}");
    assert_eq!(message["text"], json!("hello Baileys"));
    assert_eq!(message["pushName"], json!("Dora"));
    // Baileys' delivery receipt reached the contact.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, outbox) = h.control.contact_outbox(CONTACT).await.unwrap();
        if outbox[0]["delivered"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "no delivery receipt: {outbox}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    baileys.quit().await;
    assert_no_errors(&baileys);
}
