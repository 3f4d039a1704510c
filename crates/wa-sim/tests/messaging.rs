//! Text messages between the unmodified whatsapp-rust client and wa-sim's contacts,
//! real Signal peers: sending, receiving, receipts both ways, the offline backlog at
//! login, existence checks, server dedupe, nacks and a message asked for again.

mod common;

use std::time::{Duration, Instant};

use common::{Companion, Harness, WAIT};
use serde_json::{Value, json};
use whatsapp_rust::SendOptions;
use whatsapp_rust::types::events::Event;
use whatsapp_rust::types::presence::ReceiptType;
use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt as _;
use whatsapp_rust::wacore_binary::Jid;
use whatsapp_rust::waproto::whatsapp as wa;

const PHONE: &str = "5511966660001";
const CONTACT: &str = "5511955550001";

fn user(number: &str) -> Jid {
    format!("{number}@s.whatsapp.net").parse().unwrap()
}

/// wa-sim with a contact, and a companion linked to PHONE.
async fn start() -> (Harness, Companion) {
    let h = Harness::start().await;
    let (status, body) = h
        .control
        .create_contact(Some(CONTACT), Some("Carla"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let companion = h.linked_companion(&h.store("gateway"), PHONE).await;
    (h, companion)
}

async fn server_ack(companion: &mut Companion, id: &str) -> Option<String> {
    companion
        .wait_for("the server's ack", |e| match e {
            Event::ServerAck(ack) if ack.id == id => Some(ack.error.clone()),
            _ => None,
        })
        .await
}

async fn receipt(companion: &mut Companion, id: &str, kinds: &[ReceiptType]) {
    companion
        .wait_for("a receipt", |e| match e {
            Event::Receipt(r)
                if r.message_ids.iter().any(|m| m == id) && kinds.contains(&r.r#type) =>
            {
                Some(())
            }
            _ => None,
        })
        .await
}

/// The next `n` incoming texts (a batch may hold several), each with the sender's push
/// name and whether it came from the offline backlog.
async fn texts(companion: &mut Companion, n: usize) -> Vec<(String, String, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = companion
            .wait_for("a message", |e| match e {
                Event::Messages(batch) => Some(
                    batch
                        .messages
                        .iter()
                        .filter_map(|m| {
                            let text = m.message.conversation.clone()?;
                            Some((text, m.info.push_name.clone(), m.info.is_offline))
                        })
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .await;
        got.extend(batch);
    }
    assert_eq!(got.len(), n, "{got:?}");
    got
}

async fn text(companion: &mut Companion) -> (String, String, bool) {
    texts(companion, 1).await.remove(0)
}

async fn inbox(h: &Harness, count: usize) -> Vec<Value> {
    let (status, body) = h
        .control
        .inbox(CONTACT, Some(WAIT.as_secs()), Some(count))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap()
}

#[tokio::test]
async fn a_text_to_a_contact_is_acked_delivered_once_and_read() {
    let (h, mut companion) = start().await;
    let sent = companion
        .client
        .send_text(user(CONTACT), "hello Carla")
        .await
        .expect("sent");
    assert_eq!(server_ack(&mut companion, &sent.message_id).await, None);
    let inbox_now = inbox(&h, 1).await;
    assert_eq!(inbox_now.len(), 1, "{inbox_now:?}");
    assert_eq!(inbox_now[0]["id"], json!(sent.message_id));
    assert_eq!(inbox_now[0]["from"], json!(PHONE));
    assert_eq!(inbox_now[0]["text"], json!("hello Carla"));
    assert_eq!(inbox_now[0]["fromDevice"], json!(1));
    receipt(&mut companion, &sent.message_id, &[ReceiptType::Delivered]).await;

    let (status, body) = h.control.read(CONTACT, &[&sent.message_id]).await.unwrap();
    assert_eq!((status, body), (200, json!({ "read": 1 })));
    receipt(&mut companion, &sent.message_id, &[ReceiptType::Read]).await;

    // The same id again (a resend after a crash): acked, routed no second time.
    let again = companion
        .client
        .send_message_with_options(
            user(CONTACT),
            wa::Message::text("hello Carla"),
            SendOptions::default().with_message_id(sent.message_id.clone()),
        )
        .await
        .expect("sent again");
    assert_eq!(again.message_id, sent.message_id);
    assert_eq!(server_ack(&mut companion, &sent.message_id).await, None);
    let stats = h.stats_until(|s| s["messagesDeduped"] == json!(1)).await;
    assert!(stats["receiptsRouted"].as_u64().unwrap() >= 2, "{stats}");
    assert_eq!(inbox(&h, 1).await.len(), 1);
    companion.stop().await;
}

#[tokio::test]
async fn a_contacts_text_reaches_the_client_with_its_name_and_receipts_come_back() {
    let (h, mut companion) = start().await;
    let (status, body) = h
        .control
        .contact_send(CONTACT, PHONE, "hi from Carla", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let (text, name, offline) = text(&mut companion).await;
    assert_eq!(
        (text.as_str(), name.as_str(), offline),
        ("hi from Carla", "Carla", false)
    );

    companion
        .client
        .mark_as_read(&user(CONTACT), None, &[&id])
        .await
        .expect("read receipt sent");
    let device = format!("{PHONE}:1@s.whatsapp.net");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, outbox) = h.control.contact_outbox(CONTACT).await.unwrap();
        let item = &outbox[0];
        assert_eq!(item["id"], json!(id));
        assert_eq!(item["to"], json!(PHONE));
        if item["delivered"] == json!([device]) && item["read"] == json!([device]) {
            assert_eq!(item["acked"], json!(true));
            break;
        }
        assert!(Instant::now() < deadline, "receipts never came: {outbox}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Typing is noted by the contact.
    companion
        .client
        .chatstate()
        .send_composing(&user(CONTACT))
        .await
        .expect("chat state sent");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, events) = h.control.contact_events(CONTACT).await.unwrap();
        if events[0]["state"] == json!("composing") {
            assert_eq!(events[0]["from"], json!(PHONE));
            break;
        }
        assert!(Instant::now() < deadline, "no chat state: {events}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    companion.stop().await;
}

#[tokio::test]
async fn texts_sent_while_the_client_was_away_arrive_in_order_at_its_next_login() {
    let (h, companion) = start().await;
    let store = h.store("gateway");
    companion.stop().await;
    for n in 1..=3 {
        let (status, body) = h
            .control
            .contact_send(CONTACT, PHONE, &format!("away {n}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let stats = h.control.stats().await.unwrap();
    assert_eq!(stats["messagesQueued"], json!(3), "{stats}");

    let started = Instant::now();
    // The backlog may come before the client reports itself connected.
    let mut companion = h.companion(&store).await;
    let got = texts(&mut companion, 3).await;
    let expected: Vec<(String, bool)> = (1..=3).map(|n| (format!("away {n}"), true)).collect();
    let got: Vec<(String, bool)> = got.into_iter().map(|(t, _, o)| (t, o)).collect();
    assert_eq!(got, expected);
    // The backlog ended with <ib><offline>: a send does not wait for it.
    let sent = companion
        .client
        .send_text(user(CONTACT), "back")
        .await
        .expect("sent");
    let got = inbox(&h, 1).await;
    assert_eq!(got[0]["id"], json!(sent.message_id));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    companion.stop().await;
}

#[tokio::test]
async fn a_contact_is_on_whatsapp_and_an_unknown_number_is_not() {
    let (_h, companion) = start().await;
    let unknown = "5511944440009";
    let found = companion
        .client
        .contacts()
        .is_on_whatsapp(&[user(CONTACT), user(unknown)])
        .await
        .expect("usync answers");
    let registered = |n: &str| {
        found
            .iter()
            .find(|r| r.jid.user == n)
            .map(|r| r.is_registered)
    };
    assert_eq!(registered(CONTACT), Some(true), "{found:?}");
    assert_eq!(registered(unknown), Some(false), "{found:?}");
    let lid = found.iter().find(|r| r.jid.user == CONTACT).unwrap();
    assert!(lid.lid.is_some(), "{found:?}");
    companion.stop().await;
}

#[tokio::test]
async fn a_nacked_message_surfaces_as_a_server_ack_with_its_error() {
    let (h, mut companion) = start().await;
    let (status, body) = h
        .control
        .fault(json!({ "kind": "nack", "to": CONTACT, "code": 463 }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let sent = companion
        .client
        .send_text(user(CONTACT), "refused")
        .await
        .expect("sent");
    assert_eq!(
        server_ack(&mut companion, &sent.message_id).await,
        Some("463".to_owned())
    );
    let (_, body) = h.control.inbox(CONTACT, None, None).await.unwrap();
    assert_eq!(body, json!([]));
    companion.stop().await;
}

#[tokio::test]
async fn a_garbled_text_is_asked_for_again_and_still_arrives() {
    let (h, mut companion) = start().await;
    let (status, body) = h
        .control
        .fault(json!({ "kind": "garble", "contact": CONTACT }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = h
        .control
        .contact_send(CONTACT, PHONE, "through the noise", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (text, _, _) = text(&mut companion).await;
    assert_eq!(text, "through the noise");
    let stats = h.stats_until(|s| s["retriesAnswered"] == json!(1)).await;
    assert_eq!(stats["undecryptable"], json!(0), "{stats}");
    companion.stop().await;
}

#[tokio::test]
async fn the_control_api_refuses_what_it_cannot_do() {
    let h = Harness::start().await;
    let (status, body) = h.control.create_contact(None, None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let fresh = body["phone"].as_str().unwrap().to_owned();
    assert_eq!(body["jid"], json!(format!("{fresh}@s.whatsapp.net")));
    assert!(body["lid"].as_str().unwrap().ends_with("@lid"), "{body}");
    let (status, _) = h.control.create_contact(Some(&fresh), None).await.unwrap();
    assert_eq!(status, 409);
    let (status, _) = h.control.create_contact(Some("12ab"), None).await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = h
        .control
        .contact_send("5511900000000", &fresh, "x", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, body) = h
        .control
        .contact_send(&fresh, "5511900000000", "x", None)
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (422, json!({ "error": "5511900000000 is not on WhatsApp" }))
    );
    let (_, list) = h.control.contacts().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test]
async fn a_contact_that_is_offline_gets_its_messages_when_it_comes_back() {
    let (h, mut companion) = start().await;
    let (status, _) = h.control.set_online(CONTACT, false).await.unwrap();
    assert_eq!(status, 200);
    let sent = companion
        .client
        .send_text(user(CONTACT), "are you there?")
        .await
        .expect("sent");
    assert_eq!(server_ack(&mut companion, &sent.message_id).await, None);
    let (_, body) = h.control.inbox(CONTACT, Some(1), None).await.unwrap();
    assert_eq!(body, json!([]), "an offline contact receives nothing");

    let (status, _) = h.control.set_online(CONTACT, true).await.unwrap();
    assert_eq!(status, 200);
    let got = inbox(&h, 1).await;
    assert_eq!(got[0]["text"], json!("are you there?"));
    receipt(&mut companion, &sent.message_id, &[ReceiptType::Delivered]).await;
    companion.stop().await;
}

#[tokio::test]
async fn linked_numbers_text_each_other_and_own_devices_get_a_copy() {
    const OTHER: &str = "5511966660002";
    let (h, mut companion) = start().await;
    let mut second = h.linked_companion(&h.store("second"), PHONE).await;
    let mut other = h.linked_companion(&h.store("other"), OTHER).await;

    let sent = companion
        .client
        .send_text(user(OTHER), "between gateways")
        .await
        .expect("sent");
    assert_eq!(server_ack(&mut companion, &sent.message_id).await, None);
    let (text, name, _) = text(&mut other).await;
    assert_eq!(text, "between gateways");
    assert_eq!(name, format!("wa-sim {PHONE}"));
    receipt(
        &mut companion,
        &sent.message_id,
        &[ReceiptType::Delivered, ReceiptType::Inactive],
    )
    .await;
    // The account's other device sees what its sibling sent.
    let copy = second
        .wait_for("the sibling's copy", |e| match e {
            Event::Messages(batch) => batch
                .messages
                .iter()
                .find_map(|m| (m.info.id == sent.message_id).then(|| m.info.source.is_from_me)),
            _ => None,
        })
        .await;
    assert!(copy);
    for c in [companion, second, other] {
        c.stop().await;
    }
}

#[tokio::test]
async fn a_text_sent_as_the_connection_drops_arrives_after_the_client_reconnects() {
    let (h, mut companion) = start().await;
    let (status, body) = h
        .control
        .post("drop", json!({ "phone": PHONE }))
        .await
        .unwrap();
    assert_eq!((status, &body["dropped"]), (200, &json!(1)), "{body}");
    let (status, body) = h
        .control
        .contact_send(CONTACT, PHONE, "mind the gap", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // Live, queued or sent again after the drop: it arrives exactly once.
    let (text, _, _) = text(&mut companion).await;
    assert_eq!(text, "mind the gap");
    let device = format!("{PHONE}:1@s.whatsapp.net");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, outbox) = h.control.contact_outbox(CONTACT).await.unwrap();
        if outbox[0]["delivered"] == json!([device]) {
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {outbox}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let more = companion.drain();
    assert!(!more.iter().any(|e| e == "Messages"), "{more:?}");
    let stats = h.control.stats().await.unwrap();
    eprintln!(
        "queued {}, redelivered {}",
        stats["messagesQueued"], stats["messagesRedelivered"]
    );
    companion.stop().await;
}

#[tokio::test]
async fn a_text_the_contact_cannot_decrypt_is_asked_for_again_and_arrives_once() {
    let (h, mut companion) = start().await;
    let (status, body) = h
        .control
        .fault(json!({ "kind": "garble-incoming", "contact": CONTACT }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let sent = companion
        .client
        .send_text(user(CONTACT), "say again?")
        .await
        .expect("sent");
    let got = inbox(&h, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], json!(sent.message_id));
    assert_eq!(got[0]["text"], json!("say again?"));
    receipt(&mut companion, &sent.message_id, &[ReceiptType::Delivered]).await;
    let stats = h.control.stats().await.unwrap();
    assert_eq!(stats["undecryptable"], json!(1), "{stats}");
    assert_eq!(stats["messagesDeduped"], json!(0), "{stats}");
    companion.stop().await;
}
