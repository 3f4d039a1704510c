//! The message queue, statuses and received messages, on every backend.

use crate::store::messages::fixtures::{instance, message, pending_kinds, status_event};
use crate::store::{Attempt, Enqueued, Inbound, Status, Store, WebhookEvent, WebhookKind};

super::on_every_backend!(
    the_queue_is_bounded_and_keys_replay_or_refuse,
    the_cap_on_connection_events_leaves_message_events_alone,
    read_ahead_waits_for_a_head_not_due,
    statuses_only_go_forward_and_the_ack_after_a_receipt_sends_no_sent,
    a_message_received_twice_is_recorded_and_announced_once,
);

async fn the_queue_is_bounded_and_keys_replay_or_refuse(store: &dyn Store) {
    store.insert_instance(&instance()).await.unwrap();
    let first = store
        .enqueue_message(&message(1, Some(("k", "h1"))), 2)
        .await
        .unwrap();
    let Enqueued::New(first) = first else {
        panic!("{first:?}")
    };
    // The same key and request: the same message, nothing new queued.
    let again = store
        .enqueue_message(&message(9, Some(("k", "h1"))), 2)
        .await
        .unwrap();
    assert_eq!(again, Enqueued::Replayed(first.clone()));
    let other = store
        .enqueue_message(&message(9, Some(("k", "h2"))), 2)
        .await
        .unwrap();
    assert_eq!(other, Enqueued::KeyReused);
    assert!(matches!(
        store.enqueue_message(&message(2, None), 2).await.unwrap(),
        Enqueued::New(_)
    ));
    assert_eq!(
        store.enqueue_message(&message(3, None), 2).await.unwrap(),
        Enqueued::Full
    );
    assert_eq!(store.queue_head("I").await.unwrap().unwrap().zaap_id, "Z1");
    // One on its way is not deleted; one waiting is.
    store.message_sending(&first).await.unwrap();
    assert_eq!(store.delete_queued("I", None).await.unwrap(), 1);
    assert_eq!(store.queue_page("I", 1, 10).await.unwrap().1, 1);
}

async fn the_cap_on_connection_events_leaves_message_events_alone(store: &dyn Store) {
    store.insert_instance(&instance()).await.unwrap();
    for (kind, url) in [
        (WebhookKind::Received, "http://127.0.0.1:9/r"),
        (WebhookKind::Connected, "http://127.0.0.1:9/c"),
    ] {
        assert!(store.set_webhook("I", kind, Some(url)).await.unwrap());
    }
    let event = |n: usize, kind| WebhookEvent {
        event_id: format!("E{n}"),
        instance_id: "I".into(),
        kind,
        body: format!("{n}"),
        created_at: 20,
    };
    // Three messages received, each with its event, in one transaction.
    let received: Vec<Inbound> = (0..3)
        .map(|n| Inbound {
            instance_id: "I".into(),
            chat: "5511999990002@s.whatsapp.net".into(),
            sender: "5511999990002@s.whatsapp.net".into(),
            message_id: format!("A{n}"),
            waiting: false,
            text: Some("hi".into()),
            from_me: false,
            sent_at: 5,
            event: Some(event(n, WebhookKind::Received)),
        })
        .collect();
    assert_eq!(store.record_inbound(&received).await.unwrap(), [true; 3]);
    for n in 3..6 {
        let connected = event(n, WebhookKind::Connected);
        assert!(store.enqueue_webhook(&connected, 2).await.unwrap());
    }
    let (depth, _, dropped) = store.outbox_stats().await.unwrap();
    assert_eq!((depth, dropped), (5, 1), "the oldest connection event went");
    let pending = store.due_webhooks_of("I", 20, 10).await.unwrap();
    let bodies: Vec<&str> = pending.iter().map(|e| e.body.as_str()).collect();
    assert_eq!(bodies, ["0", "1", "2", "4", "5"]);
}

async fn read_ahead_waits_for_a_head_not_due(store: &dyn Store) {
    store.insert_instance(&instance()).await.unwrap();
    // Three status events: SENT and RECEIVED of a receipt that overtook the ack, READ.
    let Enqueued::New(m) = store.enqueue_message(&message(1, None), 10).await.unwrap() else {
        panic!()
    };
    store.message_sending(&m).await.unwrap();
    let ids = ["M1".to_owned()];
    for status in [Status::Received, Status::Read] {
        let moved = store.message_status("I", &ids, status, 20, &status_event);
        assert!(!moved.await.unwrap().is_empty());
    }
    let all = store.due_webhooks_of("I", 20, 10).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(store.due_webhooks_of("I", 20, 2).await.unwrap().len(), 2);
    assert!(store.due_webhooks_of("I", 19, 10).await.unwrap().is_empty());
    let retry = Attempt::Retry {
        status: Some(500),
        error: "the receiver answered 500".into(),
        next_attempt_at: 1_000,
    };
    store
        .webhook_attempted(all[0].seq, 21, &retry, 0)
        .await
        .unwrap();
    assert!(
        store
            .due_webhooks_of("I", 999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store.due_webhooks_of("I", 1_000, 10).await.unwrap();
    assert_eq!(
        again.iter().map(|e| e.seq).collect::<Vec<_>>(),
        all.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    // A record reads what is due next in the same call: the same answer.
    let delivered = Attempt::Done {
        outcome: "delivered",
        status: Some(200),
        error: None,
    };
    let seqs = |entries: Vec<crate::store::OutboxEntry>| -> Vec<i64> {
        entries.iter().map(|e| e.seq).collect()
    };
    let next = store.webhook_attempted(all[1].seq, 999, &delivered, 10);
    assert_eq!(seqs(next.await.unwrap()), [] as [i64; 0], "its head waits");
    let next = store.webhook_attempted(all[0].seq, 1_000, &delivered, 10);
    assert_eq!(seqs(next.await.unwrap()), [all[2].seq]);
    let next = store.webhook_attempted(all[2].seq, 1_001, &delivered, 0);
    assert!(next.await.unwrap().is_empty());
    assert!(
        store
            .due_webhooks_of("I", 2_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn statuses_only_go_forward_and_the_ack_after_a_receipt_sends_no_sent(store: &dyn Store) {
    store.insert_instance(&instance()).await.unwrap();
    let Enqueued::New(m) = store.enqueue_message(&message(1, None), 10).await.unwrap() else {
        panic!()
    };
    store.message_sending(&m).await.unwrap();
    let ids = vec!["M1".to_owned()];
    // The delivery receipt overtook the server's ack.
    let moved = store
        .message_status("I", &ids, Status::Received, 20, &status_event)
        .await
        .unwrap();
    let told: Vec<(Status, &str)> = moved.iter().map(|(s, e)| (*s, e.body.as_str())).collect();
    assert_eq!(
        told,
        [
            (Status::Sent, "[\"M1\"] 5511999990001"),
            (Status::Received, "[\"M1\"] 5511999990001")
        ]
    );
    let delivery = WebhookEvent {
        kind: WebhookKind::Delivery,
        ..status_event(Status::Sent, &["D".into()], "x")
    };
    let sent = status_event(Status::Sent, &["SENT".into()], "x");
    let written = store.message_sent(m.seq, 21, &delivery, &sent).await;
    assert_eq!(written.unwrap(), 1, "the delivery alone");
    // Acked twice (a resend after a crash): announced once.
    let written = store.message_sent(m.seq, 22, &delivery, &sent).await;
    assert_eq!(written.unwrap(), 0);
    // SENT and RECEIVED at the receipt, the delivery at the ack.
    assert_eq!(
        pending_kinds(store).await,
        ["message-status", "message-status", "delivery"]
    );
    // Read, then a late delivered receipt: nothing goes back.
    store
        .message_status("I", &ids, Status::Read, 23, &status_event)
        .await
        .unwrap();
    let late = store
        .message_status("I", &ids, Status::Received, 24, &status_event)
        .await
        .unwrap();
    assert!(late.is_empty());
    assert_eq!(
        store
            .outbound_by_id("I", "M1")
            .await
            .unwrap()
            .unwrap()
            .state,
        "read"
    );
    // A receipt for an id this instance never sent moves nothing.
    let unknown = ["X".to_owned()];
    assert!(
        store
            .message_status("I", &unknown, Status::Read, 25, &status_event)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        pending_kinds(store).await,
        [
            "message-status",
            "message-status",
            "delivery",
            "message-status"
        ]
    );

    // One receipt for several messages (one of them unknown, one read already).
    let mut more = Vec::new();
    for n in [2, 3] {
        let Enqueued::New(m) = store.enqueue_message(&message(n, None), 10).await.unwrap() else {
            panic!()
        };
        store.message_sending(&m).await.unwrap();
        more.push(m);
    }
    let delivery = WebhookEvent {
        kind: WebhookKind::Delivery,
        ..status_event(Status::Sent, &["D2".into()], "x")
    };
    let sent = status_event(Status::Sent, &["SENT2".into()], "x");
    store
        .message_sent(more[0].seq, 30, &delivery, &sent)
        .await
        .unwrap();
    let ids: Vec<String> = ["M1", "M2", "M3", "X"].map(String::from).to_vec();
    let moved = store
        .message_status("I", &ids, Status::Read, 31, &status_event)
        .await
        .unwrap();
    let told: Vec<(Status, &str)> = moved.iter().map(|(s, e)| (*s, e.body.as_str())).collect();
    assert_eq!(
        told,
        [
            (Status::Sent, "[\"M3\"] 5511999990001"),
            (Status::Read, "[\"M2\", \"M3\"] 5511999990001")
        ]
    );
}

async fn a_message_received_twice_is_recorded_and_announced_once(store: &dyn Store) {
    store.insert_instance(&instance()).await.unwrap();
    let url = Some("http://127.0.0.1:9/r");
    assert!(
        store
            .set_webhook("I", WebhookKind::Received, url)
            .await
            .unwrap()
    );
    let row = Inbound {
        instance_id: "I".into(),
        chat: "5511999990002@s.whatsapp.net".into(),
        sender: "5511999990002@s.whatsapp.net".into(),
        message_id: "A1".into(),
        waiting: false,
        text: Some("hi".into()),
        from_me: false,
        sent_at: 5,
        event: Some(WebhookEvent {
            kind: WebhookKind::Received,
            ..status_event(Status::Received, &["A1".into()], "x")
        }),
    };
    assert_eq!(
        store
            .record_inbound(std::slice::from_ref(&row))
            .await
            .unwrap(),
        [true]
    );
    let replay = Inbound {
        event: Some(WebhookEvent {
            event_id: "another".into(),
            ..row.event.clone().unwrap()
        }),
        ..row.clone()
    };
    assert_eq!(store.record_inbound(&[replay]).await.unwrap(), [false]);
    assert_eq!(pending_kinds(store).await, ["received"]);
    assert_eq!(
        store.inbound_text("I", "A1").await.unwrap(),
        Some(("5511999990002@s.whatsapp.net".into(), "hi".into()))
    );
}
