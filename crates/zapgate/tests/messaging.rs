//! Text messages both ways between a gateway instance and wa-sim contacts (real Signal
//! peers), through Z-API's routes and webhooks: what the contact's inbox holds, and
//! what the webhook receiver got, exactly.

#[allow(dead_code, unreachable_pub)]
#[path = "../../wa-sim/tests/common/baileys.rs"]
mod baileys;
mod common;

use std::time::Duration;

use common::receiver::{Received, Receiver};
use common::{Gateway, Instance, World};
use reqwest::Method;
use serde_json::{Value, json};

/// The webhooks a messaging app sets, and the paths the receiver files them under.
const HOOKS: [(&str, &str); 3] = [
    ("update-webhook-received", "received"),
    ("update-webhook-delivery", "delivery"),
    ("update-webhook-message-status", "status"),
];

async fn gateway(world: &World) -> Gateway {
    world
        .gateway_with(&[
            ("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true"),
            // No pacing: the tests send as fast as WhatsApp acknowledges.
            ("ZAPGATE_SEND_INTERVAL_MS", "0"),
        ])
        .await
}

/// A gateway with an instance linked to `phone` and its message webhooks set.
async fn linked(world: &World, phone: &str) -> (Gateway, Instance, Receiver) {
    let gw = gateway(world).await;
    let inst = world.linked_instance(&gw, "messages", phone).await;
    let receiver = Receiver::start().await;
    for (route, path) in HOOKS {
        let (status, body) = gw.api.set_webhook(&inst, route, &receiver.url(path)).await;
        assert_eq!(status, 200, "{body}");
    }
    (gw, inst, receiver)
}

async fn contact(world: &World, phone: &str) -> Value {
    let (status, body) = world
        .wa
        .post(
            "contacts",
            json!({ "phone": phone, "name": format!("Contact {phone}") }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

async fn instance_call(
    gw: &Gateway,
    inst: &Instance,
    method: Method,
    route: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let path = format!("/instances/{}/token/{}/{route}", inst.id, inst.token);
    gw.api.call(method, &path, body, None).await
}

async fn send_text(gw: &Gateway, inst: &Instance, body: Value) -> (u16, Value) {
    instance_call(gw, inst, Method::POST, "send-text", Some(body)).await
}

/// Sends `text` to `phone`; the ids the gateway answered with.
async fn sent(gw: &Gateway, inst: &Instance, phone: &str, text: &str) -> (String, String) {
    let (status, body) = send_text(gw, inst, json!({ "phone": phone, "message": text })).await;
    assert_eq!(status, 200, "{body}");
    let message_id = body["messageId"].as_str().unwrap().to_owned();
    assert_eq!(body["id"], body["messageId"]);
    (body["zaapId"].as_str().unwrap().to_owned(), message_id)
}

/// The contact's inbox once it holds at least `count` messages (or after the wait).
async fn inbox(world: &World, contact: &str, count: usize) -> Vec<Value> {
    let (status, body) = world
        .wa
        .get(&format!("contacts/{contact}/inbox?wait=30&count={count}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

/// The contact sends `text` to `to`; its WhatsApp id.
async fn contact_sends(world: &World, contact: &str, to: &str, text: &str) -> String {
    let (status, body) = world
        .wa
        .post(
            &format!("contacts/{contact}/send"),
            json!({ "to": to, "text": text }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

fn bodies(got: &[Received]) -> Vec<Value> {
    got.iter().map(|r| r.body.clone()).collect()
}

/// The status callbacks for `id`, in the order they came.
fn statuses_of(receiver: &Receiver, id: &str) -> Vec<String> {
    receiver
        .delivered("status")
        .iter()
        .filter(|r| {
            r.body["ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i == id))
        })
        .map(|r| r.body["status"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_statuses(receiver: &Receiver, id: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = statuses_of(receiver, id);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline && got.len() <= want.len(),
            "statuses of {id}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_text_reaches_the_contact_once_and_its_statuses_come_back_as_z_api_tells_them() {
    const PHONE: &str = "5511966660001";
    const FRIEND: &str = "5511966660101";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    let mut events = gw.api.events(&inst, None).await;

    let (zaap_id, message_id) = sent(&gw, &inst, FRIEND, "Olá, tudo bem?").await;
    assert_eq!(zaap_id.len(), 32);

    let got = inbox(&world, FRIEND, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], message_id);
    assert_eq!(got[0]["from"], PHONE);
    assert_eq!(got[0]["text"], "Olá, tudo bem?");

    let delivery = receiver.wait_delivered("delivery", 1).await;
    let body = &delivery[0].body;
    assert_eq!(body["type"], "DeliveryCallback");
    assert_eq!(body["phone"], FRIEND);
    assert_eq!(body["zaapId"], zaap_id);
    assert_eq!(body["messageId"], message_id);
    assert_eq!(body["instanceId"], inst.id);
    assert!(body["momment"].as_i64().unwrap() > 1_700_000_000_000);
    assert!(body.get("error").is_none(), "{body}");

    wait_statuses(&receiver, &message_id, &["SENT", "RECEIVED"]).await;
    let (status, body) = world
        .wa
        .post(
            &format!("contacts/{FRIEND}/read"),
            json!({ "ids": [message_id] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_statuses(&receiver, &message_id, &["SENT", "RECEIVED", "READ"]).await;
    let read = receiver
        .delivered("status")
        .into_iter()
        .find(|r| r.body["status"] == "READ")
        .unwrap()
        .body;
    assert_eq!(
        read,
        json!({
            "instanceId": inst.id, "status": "READ", "ids": [message_id],
            "momment": read["momment"], "phoneDevice": 0, "phone": FRIEND,
            "type": "MessageStatusCallback", "isGroup": false,
        })
    );
    // Nothing went twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(inbox(&world, FRIEND, 1).await.len(), 1);
    assert_eq!(receiver.delivered("delivery").len(), 1);

    // The event stream told the same, with the webhooks' bodies (a receipt may
    // overtake WhatsApp's ack, so the DeliveryCallback's place may vary).
    let mut told = Vec::new();
    while told.len() < 4 {
        told.push(events.until("status").await.data.to_string());
    }
    let mut webhooks: Vec<String> = bodies(&receiver.delivered("delivery"))
        .into_iter()
        .chain(bodies(&receiver.delivered("status")))
        .map(|b| b.to_string())
        .collect();
    told.sort();
    webhooks.sort();
    assert_eq!(told, webhooks);

    let metrics = common::scrape(&gw).await;
    for (name, want) in [
        ("zapgate_messages_sent_total", 1.0),
        ("zapgate_messages_not_sent_total", 0.0),
        ("zapgate_messages_received_total", 0.0),
        ("zapgate_message_statuses_total{status=\"SENT\"}", 1.0),
        ("zapgate_message_statuses_total{status=\"RECEIVED\"}", 1.0),
        ("zapgate_message_statuses_total{status=\"READ\"}", 1.0),
        ("zapgate_message_send_seconds_count", 1.0),
        ("zapgate_message_queue_depth", 0.0),
    ] {
        assert_eq!(metrics.get(name), Some(&want), "{name}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_contacts_text_arrives_as_a_received_callback_with_every_field() {
    const PHONE: &str = "5511966660002";
    const FRIEND: &str = "5511966660102";
    let world = World::new().await;
    let friend = contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    let mut events = gw.api.events(&inst, None).await;

    let id = contact_sends(&world, FRIEND, PHONE, "Oi! Quero um orçamento").await;
    let got = receiver.wait_delivered("received", 1).await;
    let body = got[0].body.clone();
    // The event stream tells the same, as a `message` event.
    assert_eq!(events.until("message").await.data, body);
    let lid = friend["lid"].as_str().map(|l| match l.ends_with("@lid") {
        true => l.to_owned(),
        false => format!("{l}@lid"),
    });
    assert_eq!(
        body,
        json!({
            "isStatusReply": false,
            "senderLid": lid,
            "chatLid": lid,
            "connectedPhone": PHONE,
            "waitingMessage": false,
            "isEdit": false,
            "isGroup": false,
            "isNewsletter": false,
            "instanceId": inst.id,
            "messageId": id,
            "phone": FRIEND,
            "fromMe": false,
            "fromApi": false,
            "momment": body["momment"],
            "status": "RECEIVED",
            "chatName": format!("Contact {FRIEND}"),
            "senderPhoto": null,
            "senderName": format!("Contact {FRIEND}"),
            "participantPhone": null,
            "participantLid": null,
            "photo": null,
            "broadcast": false,
            "forwarded": false,
            "type": "ReceivedCallback",
            "text": { "message": "Oi! Quero um orçamento" },
        })
    );
    let sent_at = body["momment"].as_i64().unwrap();
    assert!(
        (common::unix_millis() - sent_at).abs() < 60_000,
        "{sent_at}"
    );

    // The app marks it read: the contact's message shows read.
    let (status, answer) = instance_call(
        &gw,
        &inst,
        Method::POST,
        "read-message",
        Some(json!({ "phone": FRIEND, "messageId": id })),
    )
    .await;
    assert_eq!(status, 204, "{answer}");
    world.wait_read(FRIEND, &id).await;
    // A reply quotes it.
    let (status, reply) = send_text(
        &gw,
        &inst,
        json!({ "phone": FRIEND, "message": "Claro!", "messageId": id }),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let got = inbox(&world, FRIEND, 1).await;
    assert_eq!(got[0]["text"], "Claro!");
    assert_eq!(got[0]["replyTo"], id, "{got:?}");
    assert_eq!(receiver.delivered("received").len(), 1);
    assert_eq!(
        common::scrape(&gw).await["zapgate_messages_received_total"],
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_hundred_texts_arrive_in_order_each_once() {
    const PHONE: &str = "5511966660003";
    const FRIEND: &str = "5511966660103";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    let mut ids = Vec::new();
    for n in 0..100 {
        ids.push(sent(&gw, &inst, FRIEND, &format!("message {n}")).await.1);
    }
    let got = inbox(&world, FRIEND, 100).await;
    let texts: Vec<String> = got
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (0..100).map(|n| format!("message {n}")).collect();
    assert_eq!(texts, want);
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids);
    let delivered = receiver.wait_delivered("delivery", 100).await;
    let order: Vec<&str> = delivered
        .iter()
        .map(|r| r.body["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(order, ids, "DeliveryCallbacks in the order sent");
    gw.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_an_unknown_number_gets_z_apis_error() {
    const PHONE: &str = "5511966660004";
    const NOBODY: &str = "5511966669999";
    let world = World::new().await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    for (body, says) in [
        (json!({ "message": "hi" }), "phone is required"),
        (json!({ "phone": "55 11 abc", "message": "hi" }), "digits"),
        (
            json!({ "phone": NOBODY, "message": "" }),
            "message is empty",
        ),
        (
            json!({ "phone": NOBODY, "message": "hi", "delayMessage": 99 }),
            "delayMessage",
        ),
        (
            json!({ "phone": "120363019502650977-group", "message": "hi" }),
            "groups",
        ),
    ] {
        let (status, answer) = send_text(&gw, &inst, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
    }
    let (status, answer) = instance_call(&gw, &inst, Method::GET, "queue/count", None).await;
    assert_eq!(
        (status, answer),
        (200, json!({ "count": 0 })),
        "bad input queued nothing"
    );

    let (zaap_id, message_id) = sent(&gw, &inst, NOBODY, "hello?").await;
    let got = receiver.wait_delivered("delivery", 1).await;
    assert_eq!(
        got[0].body,
        json!({
            "phone": NOBODY, "zaapId": zaap_id, "messageId": message_id, "instanceId": inst.id,
            "momment": got[0].body["momment"], "type": "DeliveryCallback",
            "error": "Phone number does not exist",
        })
    );
    let (status, exists) = instance_call(
        &gw,
        &inst,
        Method::GET,
        &format!("phone-exists/{NOBODY}"),
        None,
    )
    .await;
    assert_eq!((status, exists), (200, json!({ "exists": false })));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.delivered("status").is_empty(),
        "no status for a message never sent"
    );
    let metrics = common::scrape(&gw).await;
    assert_eq!(metrics["zapgate_messages_not_sent_total"], 1.0);
    assert_eq!(metrics["zapgate_messages_sent_total"], 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn an_instance_with_no_number_refuses_and_idempotency_keys_replay() {
    const PHONE: &str = "5511966660005";
    const FRIEND: &str = "5511966660105";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let gw = gateway(&world).await;
    let unlinked = gw.api.create_instance("nobody").await;
    let (status, answer) =
        send_text(&gw, &unlinked, json!({ "phone": FRIEND, "message": "hi" })).await;
    assert_eq!(
        (status, answer),
        (409, json!({ "error": "You are not connected." }))
    );

    let inst = world.linked_instance(&gw, "keys", PHONE).await;
    let send = |key: &'static str, text: &'static str| {
        let request = gw
            .api
            .http
            .post(format!(
                "{}/instances/{}/token/{}/send-text",
                gw.api.base, inst.id, inst.token
            ))
            .header("Idempotency-Key", key)
            .json(&json!({ "phone": FRIEND, "message": text }));
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (first, again) = tokio::join!(send("order-1", "one"), send("order-1", "one"));
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(first, again, "the same request twice is one message");
    let (status, other) = send("order-1", "two").await;
    assert_eq!(status, 422, "{other}");
    let got = inbox(&world, FRIEND, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(inbox(&world, FRIEND, 1).await.len(), 1, "{got:?}");

    // A client that lost the answer asks again after the number was unlinked: the
    // message was taken (and sent), and the answer says so, not "not connected".
    world.phone_unlinks(PHONE).await;
    gw.api
        .wait_status(&inst, "disconnected", |s| s["connected"] == json!(false))
        .await;
    let (status, late) = send("order-1", "one").await;
    assert_eq!((status, &late), (200, &first.1));
    let (status, new) = send("order-2", "three").await;
    assert_eq!(
        (status, new),
        (409, json!({ "error": "You are not connected." }))
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_text_deleted_from_the_queue_while_typing_is_not_sent() {
    const PHONE: &str = "5511966660010";
    const FRIEND: &str = "5511966660110";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    // The sender shows "typing..." for 3 s before the text leaves; it is deleted then.
    let (status, body) = send_text(
        &gw,
        &inst,
        json!({ "phone": FRIEND, "message": "never mind", "delayTyping": 3 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let zaap_id = body["zaapId"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let route = format!("queue/{zaap_id}");
    let (status, answer) = instance_call(&gw, &inst, Method::DELETE, &route, None).await;
    assert_eq!(status, 200, "{answer}");

    let (_, after) = sent(&gw, &inst, FRIEND, "this one").await;
    let got = inbox(&world, FRIEND, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_ids: Vec<&Value> = got.iter().map(|m| &m["id"]).collect();
    assert_eq!(
        got_ids,
        [&json!(after)],
        "only the text not deleted: {got:?}"
    );
    let delivery = receiver.wait_delivered("delivery", 1).await;
    assert_eq!(delivery.len(), 1);
    assert_eq!(delivery[0].body["messageId"], after);
    gw.stop().await;
}

#[tokio::test]
async fn a_queue_survives_kill_9_and_drains_in_order_with_each_text_once() {
    const PHONE: &str = "5511966660006";
    const FRIEND: &str = "5511966660106";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let gw = world
        .gateway_with(&[
            ("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true"),
            // Slow enough that the kill lands with most of the queue waiting.
            ("ZAPGATE_SEND_INTERVAL_MS", "300"),
        ])
        .await;
    let inst = world.linked_instance(&gw, "crash", PHONE).await;
    let receiver = Receiver::start().await;
    let (status, _) = gw
        .api
        .set_webhook(&inst, "update-webhook-delivery", &receiver.url("delivery"))
        .await;
    assert_eq!(status, 200);
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(sent(&gw, &inst, FRIEND, &format!("queued {n}")).await.1);
    }
    let (_, queue) = instance_call(&gw, &inst, Method::GET, "queue", None).await;
    assert!(!queue.as_array().unwrap().is_empty(), "{queue}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    gw.kill().await;

    let gw = gateway(&world).await;
    gw.api.wait_connected(&inst).await;
    let got = inbox(&world, FRIEND, 10).await;
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids, "every text once, in order");
    let delivered = receiver.wait_delivered("delivery", 10).await;
    let mut announced: Vec<&str> = delivered
        .iter()
        .map(|r| r.body["messageId"].as_str().unwrap())
        .collect();
    announced.dedup();
    assert_eq!(announced, ids);
    let (_, count) = instance_call(&gw, &inst, Method::GET, "queue/count", None).await;
    assert_eq!(count, json!({ "count": 0 }));
    gw.stop().await;
}

#[tokio::test]
async fn texts_sent_while_the_gateway_was_down_arrive_after_its_restart_in_order() {
    const PHONE: &str = "5511966660007";
    const FRIEND: &str = "5511966660107";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    gw.stop().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(contact_sends(&world, FRIEND, PHONE, &format!("while you were away {n}")).await);
    }
    let gw = gateway(&world).await;
    let got = receiver.wait_delivered("received", 3).await;
    let got_ids: Vec<&str> = got
        .iter()
        .map(|r| r.body["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(got_ids, ids);
    for (n, body) in bodies(&got).iter().enumerate() {
        assert_eq!(body["text"]["message"], format!("while you were away {n}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.delivered("received").len(), 3, "each once");
    let _ = inst;
    gw.stop().await;
}

#[tokio::test]
async fn a_contact_offline_gets_the_text_when_back_and_received_follows() {
    const PHONE: &str = "5511966660008";
    const FRIEND: &str = "5511966660108";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    let (status, body) = world
        .wa
        .post(&format!("contacts/{FRIEND}/offline"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, id) = sent(&gw, &inst, FRIEND, "are you there?").await;
    wait_statuses(&receiver, &id, &["SENT"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        statuses_of(&receiver, &id),
        ["SENT"],
        "not received while offline"
    );
    let (status, body) = world
        .wa
        .post(&format!("contacts/{FRIEND}/online"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let got = inbox(&world, FRIEND, 1).await;
    assert_eq!(got[0]["id"], id);
    wait_statuses(&receiver, &id, &["SENT", "RECEIVED"]).await;
    gw.stop().await;
}

#[tokio::test]
async fn texts_arriving_across_a_kill_9_are_each_announced_once() {
    const PHONE: &str = "5511966660009";
    const FRIEND: &str = "5511966660109";
    const BURST: usize = 40;
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    // The contact sends a burst; the gateway is killed while it records them, some
    // committed and acknowledged, some committed and not, some not yet.
    let sends = (0..BURST).map(|n| {
        let world = &world;
        async move { contact_sends(world, FRIEND, PHONE, &format!("burst {n}")).await }
    });
    let sending = futures_util::future::join_all(sends);
    let killed = async {
        receiver.wait_delivered("received", 1).await;
        gw.kill().await;
    };
    let (ids, ()) = tokio::join!(sending, killed);
    let gw = gateway(&world).await;
    let got = receiver.wait_delivered("received", BURST).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A delivery cut by the kill goes again with its event id (receivers deduplicate
    // by it): one event per message, however many deliveries.
    let mut events: Vec<(String, String)> = receiver
        .delivered("received")
        .iter()
        .map(|r| {
            (
                r.body["messageId"].as_str().unwrap().to_owned(),
                r.event_id.clone(),
            )
        })
        .collect();
    events.sort();
    events.dedup();
    let mut announced: Vec<String> = events.into_iter().map(|(id, _)| id).collect();
    assert_eq!(announced.len(), BURST, "each once: {:?}", bodies(&got));
    announced.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(announced, want);
    let _ = inst;
    gw.stop().await;
}

#[tokio::test]
async fn a_text_typing_when_its_number_is_unlinked_never_leaves_from_the_next_one() {
    const PHONE: &str = "5511966660012";
    const NEXT: &str = "5511966660013";
    const FRIEND: &str = "5511966660112";
    let world = World::new().await;
    contact(&world, FRIEND).await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    // "typing..." for 5 s; meanwhile the number is unlinked and another one linked.
    let (status, body) = send_text(
        &gw,
        &inst,
        json!({ "phone": FRIEND, "message": "from the first number", "delayTyping": 5 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    world.phone_unlinks(PHONE).await;
    gw.api
        .wait_status(&inst, "unlinked", |s| s["connected"] == json!(false))
        .await;
    world.wa_link(&gw, &inst, NEXT).await;

    let delivery = receiver.wait_delivered("delivery", 1).await;
    assert_eq!(delivery[0].body["messageId"], body["messageId"]);
    assert_eq!(
        delivery[0].body["error"],
        "Message has not been sent because the instance was disconnected"
    );
    // Past the typing: nothing reached the contact, from either number.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, got) = world
        .wa
        .get(&format!("contacts/{FRIEND}/inbox"))
        .await
        .unwrap();
    assert_eq!((status, got), (200, json!([])));
    gw.stop().await;
}

#[tokio::test]
async fn a_baileys_device_and_a_gateway_instance_exchange_texts() {
    const PHONE: &str = "5511966660011";
    const BAILEYS: &str = "5511966660111";
    const WAIT: Duration = Duration::from_secs(60);
    let world = World::new().await;
    let (gw, inst, receiver) = linked(&world, PHONE).await;
    // Baileys, another client altogether, linked to its own number on the same wa-sim.
    let mut node = baileys::Baileys::start(&world.sim.ws_url(), &world.dir.path().join("baileys"));
    let qr = node.wait_for("qr", WAIT).await["qr"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = world.wa.scan(&qr, Some(BAILEYS)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    node.wait_for("open", WAIT).await;
    node.wait_for("history", WAIT).await;

    let (_, id) = sent(&gw, &inst, BAILEYS, "Olá, Baileys").await;
    let got = node.wait_for("message", WAIT).await;
    assert_eq!(got["id"], id, "{got}");
    assert_eq!(got["text"], "Olá, Baileys");
    // Baileys' delivery receipt comes back as RECEIVED.
    wait_statuses(&receiver, &id, &["SENT", "RECEIVED"]).await;

    node.command(&format!("send {PHONE}@s.whatsapp.net Oi, gateway"));
    let went = node.wait_for("sent", WAIT).await;
    let got = receiver.wait_delivered("received", 1).await;
    let body = &got[0].body;
    assert_eq!(body["type"], "ReceivedCallback");
    assert_eq!(body["messageId"], went["id"]);
    assert_eq!(body["phone"], BAILEYS);
    assert_eq!(body["fromMe"], false);
    assert_eq!(body["text"], json!({ "message": "Oi, gateway" }));
    node.quit().await;
    let errors = node.errors();
    assert!(errors.is_empty(), "Baileys logged errors: {errors:#?}");
    gw.stop().await;
}
