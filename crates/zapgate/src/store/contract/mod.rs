//! The store's contract: one suite of tests that every backend passes, run on a SQLite
//! file and on a database of the throwaway PostgreSQL. A test here takes `&dyn Store`
//! and sees only what the trait shows.

mod messages;
pub(super) mod sessions;

use super::{
    Attempt, InstanceRecord, Link, LinkPage, LinkPageMade, OutboxEntry, Store, WebhookEvent,
    WebhookKind, Webhooks,
};

/// A store on each backend, kept alive with what it needs (the SQLite file's directory).
pub(super) struct Backend {
    pub store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

pub(super) async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("z.db").display());
    Backend {
        store: Box::new(super::SqliteStore::connect(&url).await.unwrap()),
        _dir: Some(dir),
    }
}

pub(super) async fn postgres() -> Backend {
    let url = super::test_pg::database().await;
    Backend {
        store: Box::new(super::PgStore::connect(&url).await.unwrap()),
        _dir: None,
    }
}

/// Runs each named test (an `async fn(&dyn Store)`) on both backends.
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = $crate::store::contract::sqlite().await;
                    super::$test(&*backend.store).await
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = $crate::store::contract::postgres().await;
                    super::$test(&*backend.store).await
                }
            )*
        }
    };
}
pub(super) use on_every_backend;

pub(super) fn instance(id: &str, name: &str, created_at: i64) -> InstanceRecord {
    InstanceRecord {
        id: id.into(),
        token: format!("T{id}"),
        name: name.into(),
        session_name: None,
        webhooks: Webhooks::default(),
        created_at,
        due_at: created_at + 1,
        link: None,
        cancelled_at: None,
    }
}

on_every_backend!(
    instances_round_trip_page_and_filter,
    instances_are_found_by_a_fragment_ignoring_the_case_of_ascii_letters,
    link_pages_live_until_they_expire_or_are_revoked_and_go_with_their_instance,
    spent_and_revoked_link_pages_are_not_live_and_are_forgotten_once_old,
    webhooks_are_set_one_at_a_time_or_all_at_once,
    connection_events_are_written_with_a_url_and_what_they_said_is_kept_either_way,
    past_the_cap_an_instance_s_oldest_connection_events_are_dropped,
    each_instance_s_oldest_pending_event_is_due_in_turn,
    an_attempt_is_recorded_once_and_reads_what_is_due_next,
    a_gone_url_is_cleared_and_the_events_waiting_for_it_settle,
    settled_events_are_forgotten_once_old_a_thousand_at_a_time,
    a_deleted_instance_s_events_are_still_delivered,
    panel_sessions_live_until_they_expire_or_close_and_the_oldest_makes_room,
);

fn event(id: &str, instance: &str, kind: WebhookKind, created_at: i64) -> WebhookEvent {
    WebhookEvent {
        event_id: id.into(),
        instance_id: instance.into(),
        kind,
        body: format!("{{\"event\":\"{id}\"}}"),
        created_at,
    }
}

/// An instance with URLs for its connection webhooks.
fn announcing(id: &str, connected: &str, disconnected: &str) -> InstanceRecord {
    InstanceRecord {
        webhooks: Webhooks {
            connected: Some(connected.into()),
            disconnected: Some(disconnected.into()),
            ..Webhooks::default()
        },
        ..instance(id, id, 1)
    }
}

/// No event, as the outbox answers it.
const NOTHING: [OutboxEntry; 0] = [];

fn event_ids(entries: &[OutboxEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.event_id.as_str()).collect()
}

fn delivered() -> Attempt {
    Attempt::Done {
        outcome: "delivered",
        status: Some(200),
        error: None,
    }
}

/// An instance's event as `/webhook-deliveries` shows it.
async fn entry(store: &dyn Store, instance_id: &str, event_id: &str) -> OutboxEntry {
    let recent = store.recent_webhooks(instance_id, 1000).await.unwrap();
    recent
        .into_iter()
        .find(|e| e.event_id == event_id)
        .unwrap_or_else(|| panic!("{event_id} is in the outbox"))
}

async fn instances_round_trip_page_and_filter(store: &dyn Store) {
    for (i, name) in ["alpha", "beta", "gamma_x"].iter().enumerate() {
        store
            .insert_instance(&instance(&format!("ID{i}"), name, i as i64))
            .await
            .unwrap();
    }
    // Same millisecond, smaller id, inserted last: listed last.
    store
        .insert_instance(&instance("AAA", "delta", 2))
        .await
        .unwrap();
    let link = Link {
        phone: "5511999990001".into(),
        linked_at: 42,
        platform: Some("android".into()),
    };
    store.set_link("ID1", Some(&link)).await.unwrap();

    let all = store.all_instances().await.unwrap();
    assert_eq!(
        all.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "beta", "gamma_x", "delta"]
    );
    assert_eq!(all[1].link, Some(link));

    let page = store.page_instances(2, 2, None).await.unwrap();
    assert_eq!(
        (page.total, page.items.len(), page.items[1].id.as_str()),
        (4, 2, "AAA")
    );
    // `_` is a literal underscore, not a wildcard.
    let found = store.page_instances(1, 10, Some("a_x")).await.unwrap();
    assert_eq!((found.total, found.items[0].name.as_str()), (1, "gamma_x"));
    assert_eq!(
        store.page_instances(1, 10, Some("e_")).await.unwrap().total,
        0
    );

    // A cancel in progress hides the row from listings, not from the start-up load.
    store.mark_cancelled("ID2", 7).await.unwrap();
    let page = store.page_instances(1, 10, None).await.unwrap();
    assert_eq!(page.total, 3);
    assert!(page.items.iter().all(|i| i.id != "ID2"));
    assert_eq!(
        store
            .page_instances(1, 10, Some("gamma"))
            .await
            .unwrap()
            .total,
        0
    );
    let all = store.all_instances().await.unwrap();
    assert_eq!(all[2].cancelled_at, Some(7));

    store.delete_instance("ID0").await.unwrap();
    assert_eq!(store.all_instances().await.unwrap().len(), 3);
}

async fn instances_are_found_by_a_fragment_ignoring_the_case_of_ascii_letters(store: &dyn Store) {
    for (i, (id, name)) in [
        ("I1", "Alpha"),
        ("I2", "100% sure"),
        ("I3", "back\\slash"),
        ("I4", "Élan"),
        ("ab_CD", "x"),
    ]
    .into_iter()
    .enumerate()
    {
        store
            .insert_instance(&instance(id, name, i as i64))
            .await
            .unwrap();
    }
    let names = async |query: &str| -> Vec<String> {
        let page = store.page_instances(1, 10, Some(query)).await.unwrap();
        assert_eq!(page.total as usize, page.items.len());
        page.items.into_iter().map(|i| i.name).collect()
    };
    assert_eq!(names("ALPHA").await, ["Alpha"]);
    assert_eq!(names("lPh").await, ["Alpha"]);
    // `%` and `\` stand for themselves.
    assert_eq!(names("0%").await, ["100% sure"]);
    assert_eq!(names("%").await, ["100% sure"]);
    assert_eq!(names("\\").await, ["back\\slash"]);
    // By id too, whatever the case.
    assert_eq!(names("B_c").await, ["x"]);
    assert_eq!(names("i4").await, ["Élan"]);
    // Letters beyond ASCII keep their case.
    assert_eq!(names("élan").await, [] as [&str; 0]);
    assert_eq!(names("Élan").await, ["Élan"]);

    // Page 0 is the first page; past the last, none, but the total still.
    let first = store.page_instances(0, 2, None).await.unwrap();
    let ids: Vec<&str> = first.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!((first.total, ids), (5, vec!["I1", "I2"]));
    let past = store.page_instances(9, 2, None).await.unwrap();
    assert_eq!((past.total, past.items.len()), (5, 0));
}

async fn link_pages_live_until_they_expire_or_are_revoked_and_go_with_their_instance(
    store: &dyn Store,
) {
    store.insert_instance(&instance("A", "a", 0)).await.unwrap();
    let page = |hash: &str, created_at: i64, expires_at: i64| LinkPage {
        token_hash: hash.into(),
        instance_id: "A".into(),
        created_at,
        expires_at,
        revoked_at: None,
        used_at: None,
        pair_codes: 0,
    };
    let insert = async |p: LinkPage, forget_before: i64| {
        store.insert_link_page(&p, forget_before, 2).await.unwrap()
    };
    assert_eq!(insert(page("h1", 100, 200), 0).await, LinkPageMade::Made);
    assert_eq!(insert(page("h2", 150, 300), 0).await, LinkPageMade::Made);
    // Two live already: a third is refused.
    assert_eq!(insert(page("hx", 160, 300), 0).await, LinkPageMade::TooMany);
    assert_eq!(store.link_page("hx").await.unwrap(), None);
    assert_eq!(
        store.link_page("h1").await.unwrap(),
        Some(page("h1", 100, 200))
    );
    assert_eq!(store.link_page("nope").await.unwrap(), None);
    // Expired pages are forgotten once they are old enough; live ones stay.
    assert_eq!(insert(page("h3", 250, 400), 201).await, LinkPageMade::Made);
    assert_eq!(store.link_page("h1").await.unwrap(), None);
    // The codes a page was given only ever grow.
    store.count_link_page_codes("h3", 2).await.unwrap();
    store.count_link_page_codes("h3", 1).await.unwrap();
    assert_eq!(store.link_page("h3").await.unwrap().unwrap().pair_codes, 2);
    // Linking the number spends its pages, and none is made while it is linked.
    let link = Link {
        phone: "5511".into(),
        linked_at: 255,
        platform: None,
    };
    store.set_link("A", Some(&link)).await.unwrap();
    assert_eq!(
        store.link_page("h3").await.unwrap().unwrap().used_at,
        Some(255)
    );
    assert_eq!(insert(page("h4", 256, 500), 0).await, LinkPageMade::Linked);
    assert_eq!(store.link_page("h4").await.unwrap(), None);
    // Unlinked again: a new page; revoking counts only live ones.
    store.set_link("A", None).await.unwrap();
    assert_eq!(insert(page("h4", 256, 500), 0).await, LinkPageMade::Made);
    assert_eq!(store.revoke_link_pages("A", 260).await.unwrap(), 1);
    assert_eq!(
        store.link_page("h4").await.unwrap().unwrap().revoked_at,
        Some(260)
    );
    assert_eq!(
        store.link_page("h2").await.unwrap().unwrap().revoked_at,
        None
    );
    assert_eq!(store.revoke_link_pages("A", 270).await.unwrap(), 0);
    store.delete_instance("A").await.unwrap();
    assert_eq!(store.link_page("h3").await.unwrap(), None);
}

async fn panel_sessions_live_until_they_expire_or_close_and_the_oldest_makes_room(
    store: &dyn Store,
) {
    let open = async |key: &str, expires_at: i64, now: i64| {
        let csrf = format!("csrf-{key}");
        store
            .open_panel_session(key, &csrf, expires_at, now, 2)
            .await
            .unwrap();
    };
    open("a", 100, 0).await;
    open("b", 200, 10).await;
    assert_eq!(
        store.panel_session("a", 50).await.unwrap(),
        Some("csrf-a".into())
    );
    assert_eq!(
        store.panel_session("b", 50).await.unwrap(),
        Some("csrf-b".into())
    );
    assert_eq!(store.panel_session("nope", 50).await.unwrap(), None);
    // Expired: not open any more, though still kept.
    assert_eq!(store.panel_session("a", 100).await.unwrap(), None);
    // Two open: the third takes the place of the one closest to expiry.
    open("c", 300, 20).await;
    assert_eq!(store.panel_session("a", 50).await.unwrap(), None);
    assert_eq!(
        store.panel_session("b", 50).await.unwrap(),
        Some("csrf-b".into())
    );
    assert_eq!(
        store.panel_session("c", 50).await.unwrap(),
        Some("csrf-c".into())
    );
    // An expired one goes first, and makes the room.
    open("d", 400, 250).await;
    assert_eq!(
        store.panel_session("c", 260).await.unwrap(),
        Some("csrf-c".into())
    );
    assert_eq!(
        store.panel_session("d", 260).await.unwrap(),
        Some("csrf-d".into())
    );
    store.close_panel_session("c").await.unwrap();
    store.close_panel_session("c").await.unwrap();
    assert_eq!(store.panel_session("c", 260).await.unwrap(), None);
    assert_eq!(
        store.panel_session("d", 260).await.unwrap(),
        Some("csrf-d".into())
    );
}

async fn spent_and_revoked_link_pages_are_not_live_and_are_forgotten_once_old(store: &dyn Store) {
    for id in ["A", "B"] {
        store.insert_instance(&instance(id, id, 0)).await.unwrap();
    }
    let page = |hash: &str, instance_id: &str, created_at: i64| LinkPage {
        token_hash: hash.into(),
        instance_id: instance_id.into(),
        created_at,
        expires_at: 1_000,
        revoked_at: None,
        used_at: None,
        pair_codes: 0,
    };
    let insert = async |p: LinkPage, forget_before: i64| {
        store.insert_link_page(&p, forget_before, 1).await.unwrap()
    };
    assert_eq!(insert(page("p1", "A", 100), 0).await, LinkPageMade::Made);
    assert_eq!(store.revoke_link_pages("A", 110).await.unwrap(), 1);
    // A revoked page is not live: another may be made.
    assert_eq!(insert(page("p2", "A", 120), 0).await, LinkPageMade::Made);
    let link = Link {
        phone: "5511".into(),
        linked_at: 130,
        platform: None,
    };
    store.set_link("A", Some(&link)).await.unwrap();
    store.set_link("A", None).await.unwrap();
    // A spent page is not live either.
    assert_eq!(insert(page("p3", "A", 140), 0).await, LinkPageMade::Made);
    assert_eq!(insert(page("p4", "A", 150), 0).await, LinkPageMade::TooMany);
    // Another instance's new page forgets them once old: revoked at 110, used at 130.
    assert_eq!(insert(page("q1", "B", 200), 111).await, LinkPageMade::Made);
    assert_eq!(store.link_page("p1").await.unwrap(), None);
    let p2 = store.link_page("p2").await.unwrap().unwrap();
    assert_eq!((p2.revoked_at, p2.used_at), (None, Some(130)));
    assert_eq!(
        insert(page("q2", "B", 210), 131).await,
        LinkPageMade::TooMany
    );
    assert_eq!(store.link_page("p2").await.unwrap(), None);
    assert_eq!(
        store.link_page("p3").await.unwrap(),
        Some(page("p3", "A", 140))
    );
    // Revoking one instance's pages leaves the other's.
    assert_eq!(store.revoke_link_pages("B", 220).await.unwrap(), 1);
    assert_eq!(
        store.link_page("p3").await.unwrap().unwrap().revoked_at,
        None
    );
}

async fn webhooks_are_set_one_at_a_time_or_all_at_once(store: &dyn Store) {
    store.insert_instance(&instance("A", "a", 0)).await.unwrap();
    let url = |s: &str| Some(s.to_owned());
    for (kind, to) in [
        (WebhookKind::Connected, "http://h/c"),
        (WebhookKind::Disconnected, "http://h/d"),
        (WebhookKind::Received, "http://h/r"),
        (WebhookKind::ReceivedDelivery, "http://h/rd"),
        (WebhookKind::Delivery, "http://h/dl"),
        (WebhookKind::MessageStatus, "http://h/s"),
        (WebhookKind::ChatPresence, "http://h/p"),
    ] {
        assert!(store.set_webhook("A", kind, Some(to)).await.unwrap());
    }
    assert!(
        store
            .set_webhook("A", WebhookKind::Received, None)
            .await
            .unwrap()
    );
    let webhooks = async || store.instance("A").await.unwrap().unwrap().webhooks;
    assert_eq!(
        webhooks().await,
        Webhooks {
            connected: url("http://h/c"),
            disconnected: url("http://h/d"),
            received: None,
            received_delivery: url("http://h/rd"),
            delivery: url("http://h/dl"),
            message_status: url("http://h/s"),
            chat_presence: url("http://h/p"),
            notify_sent_by_me: false,
        }
    );
    assert!(store.set_notify_sent_by_me("A", true).await.unwrap());
    // Every one at once; "notify sent by me" stays unless given.
    assert!(
        store
            .set_every_webhook("A", Some("http://h/all"), None)
            .await
            .unwrap()
    );
    let all = url("http://h/all");
    assert_eq!(
        webhooks().await,
        Webhooks {
            connected: all.clone(),
            disconnected: all.clone(),
            received: all.clone(),
            received_delivery: all.clone(),
            delivery: all.clone(),
            message_status: all.clone(),
            chat_presence: all,
            notify_sent_by_me: true,
        }
    );
    assert!(
        store
            .set_every_webhook("A", None, Some(false))
            .await
            .unwrap()
    );
    assert_eq!(webhooks().await, Webhooks::default());
    // Nothing changes, and the instance is there all the same.
    assert!(
        store
            .set_every_webhook("A", None, Some(false))
            .await
            .unwrap()
    );
    assert!(store.set_notify_sent_by_me("A", false).await.unwrap());
    // No such instance.
    assert!(
        !store
            .set_webhook("B", WebhookKind::Connected, Some("http://h/c"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_every_webhook("B", Some("http://h/all"), Some(true))
            .await
            .unwrap()
    );
    assert!(!store.set_notify_sent_by_me("B", true).await.unwrap());
    assert_eq!(store.instance("B").await.unwrap(), None);
    store.ping().await.unwrap();
}

async fn connection_events_are_written_with_a_url_and_what_they_said_is_kept_either_way(
    store: &dyn Store,
) {
    store.insert_instance(&instance("A", "a", 0)).await.unwrap();
    assert_eq!(store.webhook_announced("A").await.unwrap(), None);
    // No URL: nothing to write, but what was said is kept.
    let connected = event("E1", "A", WebhookKind::Connected, 10);
    assert!(!store.enqueue_webhook(&connected, 10).await.unwrap());
    assert_eq!(store.webhook_announced("A").await.unwrap(), Some(true));
    assert_eq!(store.recent_webhooks("A", 10).await.unwrap(), NOTHING);

    let url = "http://h/d";
    store
        .set_webhook("A", WebhookKind::Disconnected, Some(url))
        .await
        .unwrap();
    let disconnected = event("E2", "A", WebhookKind::Disconnected, 20);
    assert!(store.enqueue_webhook(&disconnected, 10).await.unwrap());
    assert_eq!(store.webhook_announced("A").await.unwrap(), Some(false));
    let written = store.recent_webhooks("A", 10).await.unwrap();
    assert_eq!(
        written,
        [OutboxEntry {
            seq: written[0].seq,
            event_id: "E2".into(),
            instance_id: "A".into(),
            kind: "disconnected".into(),
            url: url.into(),
            body: disconnected.body.clone(),
            created_at: 20,
            attempts: 0,
            next_attempt_at: 20,
            last_status: None,
            last_error: None,
            done_at: None,
            outcome: None,
        }]
    );
    let connected = event("E3", "A", WebhookKind::Connected, 30);
    assert!(!store.enqueue_webhook(&connected, 10).await.unwrap());
    assert_eq!(store.webhook_announced("A").await.unwrap(), Some(true));
    // Other kinds come with messaging: nothing written, nothing said.
    store
        .set_webhook("A", WebhookKind::Delivery, Some("http://h/dl"))
        .await
        .unwrap();
    let delivery = event("E4", "A", WebhookKind::Delivery, 40);
    assert!(!store.enqueue_webhook(&delivery, 10).await.unwrap());
    assert_eq!(store.webhook_announced("A").await.unwrap(), Some(true));
    assert_eq!(
        event_ids(&store.recent_webhooks("A", 10).await.unwrap()),
        ["E2"]
    );
    // No such instance.
    let elsewhere = event("E5", "B", WebhookKind::Connected, 50);
    assert!(!store.enqueue_webhook(&elsewhere, 10).await.unwrap());
    assert_eq!(store.webhook_announced("B").await.unwrap(), None);
    assert_eq!(store.outbox_stats().await.unwrap(), (1, Some(20), 0));
}

async fn past_the_cap_an_instance_s_oldest_connection_events_are_dropped(store: &dyn Store) {
    for id in ["A", "B"] {
        let record = announcing(id, "http://h/c", "http://h/d");
        store.insert_instance(&record).await.unwrap();
    }
    let other = event("EB", "B", WebhookKind::Connected, 5);
    assert!(store.enqueue_webhook(&other, 2).await.unwrap());
    for (n, kind) in [
        WebhookKind::Connected,
        WebhookKind::Disconnected,
        WebhookKind::Connected,
        WebhookKind::Disconnected,
    ]
    .into_iter()
    .enumerate()
    {
        let event = event(&format!("E{}", n + 1), "A", kind, 10 + n as i64);
        assert!(store.enqueue_webhook(&event, 2).await.unwrap());
    }
    let seen: Vec<(String, Option<i64>, Option<String>)> = store
        .recent_webhooks("A", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_id, e.done_at, e.outcome))
        .collect();
    let dropped = Some("dropped".to_owned());
    assert_eq!(
        seen,
        [
            ("E4".into(), None, None),
            ("E3".into(), None, None),
            ("E2".into(), Some(13), dropped.clone()),
            ("E1".into(), Some(12), dropped),
        ]
    );
    assert_eq!(
        event_ids(&store.recent_webhooks("A", 2).await.unwrap()),
        ["E4", "E3"]
    );
    // Another instance's events count for it alone.
    let b = store.recent_webhooks("B", 10).await.unwrap();
    assert_eq!((event_ids(&b), b[0].done_at), (vec!["EB"], None));
    assert_eq!(store.outbox_stats().await.unwrap(), (3, Some(5), 2));
}

async fn each_instance_s_oldest_pending_event_is_due_in_turn(store: &dyn Store) {
    for id in ["A", "B", "C"] {
        let record = announcing(id, "http://h/c", "http://h/d");
        store.insert_instance(&record).await.unwrap();
    }
    for (id, instance, kind, at) in [
        ("A1", "A", WebhookKind::Connected, 10),
        ("B1", "B", WebhookKind::Connected, 5),
        // Due before A1, but behind it.
        ("A2", "A", WebhookKind::Disconnected, 1),
        ("C1", "C", WebhookKind::Connected, 30),
    ] {
        let event = event(id, instance, kind, at);
        assert!(store.enqueue_webhook(&event, 10).await.unwrap());
    }
    let busy = |ids: &[&str]| -> Vec<String> { ids.iter().map(|&id| id.to_owned()).collect() };
    let due = async |now: i64, not: &[&str], limit: u32| -> Vec<String> {
        let due = store.due_webhooks(now, &busy(not), limit).await.unwrap();
        due.into_iter().map(|e| e.event_id).collect()
    };
    assert_eq!(due(20, &[], 10).await, ["B1", "A1"]);
    assert_eq!(due(20, &["B"], 10).await, ["A1"]);
    assert_eq!(due(20, &[], 1).await, ["B1"]);
    assert_eq!(due(4, &[], 10).await, [] as [&str; 0]);
    let next = async |not: &[&str]| store.next_webhook_due(&busy(not)).await.unwrap();
    assert_eq!(next(&[]).await, Some(5));
    assert_eq!(next(&["B"]).await, Some(10));
    assert_eq!(next(&["A", "B"]).await, Some(30));
    assert_eq!(next(&["A", "B", "C"]).await, None);

    // One instance's queue: all of it, in order, once its head is due.
    let of = async |instance: &str, now: i64, limit: u32| {
        store.due_webhooks_of(instance, now, limit).await.unwrap()
    };
    assert_eq!(event_ids(&of("A", 10, 10).await), ["A1", "A2"]);
    assert_eq!(event_ids(&of("A", 10, 1).await), ["A1"]);
    assert_eq!(event_ids(&of("A", 9, 10).await), [] as [&str; 0]);
    assert_eq!(event_ids(&of("C", 29, 10).await), [] as [&str; 0]);
    assert_eq!(event_ids(&of("D", 100, 10).await), [] as [&str; 0]);

    // Delivered: the next in line heads its queue.
    let a1 = entry(store, "A", "A1").await;
    let read = store.webhook_attempted(a1.seq, 21, &delivered(), 0).await;
    assert_eq!(read.unwrap(), NOTHING);
    assert_eq!(due(21, &[], 10).await, ["A2", "B1"]);
    assert_eq!(next(&["B"]).await, Some(1));
    // Made due now by hand.
    assert!(store.retry_webhook_now("C", "C1", 21).await.unwrap());
    assert_eq!(due(21, &[], 10).await, ["A2", "B1", "C1"]);
    // Only an instance's own pending events.
    assert!(!store.retry_webhook_now("C", "A2", 21).await.unwrap());
    assert!(!store.retry_webhook_now("A", "A1", 21).await.unwrap());
    assert!(!store.retry_webhook_now("A", "nope", 21).await.unwrap());
    assert_eq!(entry(store, "A", "A2").await.next_attempt_at, 1);
}

async fn an_attempt_is_recorded_once_and_reads_what_is_due_next(store: &dyn Store) {
    let record = announcing("A", "http://h/c", "http://h/d");
    store.insert_instance(&record).await.unwrap();
    for n in 1..=4 {
        let kind = if n % 2 == 1 {
            WebhookKind::Connected
        } else {
            WebhookKind::Disconnected
        };
        let event = event(&format!("E{n}"), "A", kind, 9 + n);
        assert!(store.enqueue_webhook(&event, 10).await.unwrap());
    }
    let all = store.due_webhooks_of("A", 13, 10).await.unwrap();
    assert_eq!(event_ids(&all), ["E1", "E2", "E3", "E4"]);
    let seq = |n: usize| all[n - 1].seq;
    let retry = |next_attempt_at: i64| Attempt::Retry {
        status: Some(500),
        error: "the receiver answered 500".into(),
        next_attempt_at,
    };
    let attempted = async |n: usize, at: i64, attempt: &Attempt, ahead: u32| -> Vec<OutboxEntry> {
        store
            .webhook_attempted(seq(n), at, attempt, ahead)
            .await
            .unwrap()
    };

    // Retried later: nothing of the instance is due before then, read ahead or not.
    assert_eq!(attempted(1, 15, &retry(40), 0).await, NOTHING);
    assert_eq!(attempted(1, 50, &retry(200), 10).await, NOTHING);
    let e1 = entry(store, "A", "E1").await;
    assert_eq!(
        (e1.attempts, e1.last_status, e1.last_error.as_deref()),
        (2, Some(500), Some("the receiver answered 500"))
    );
    assert_eq!(
        (e1.next_attempt_at, e1.done_at, e1.outcome),
        (200, None, None)
    );
    // A record behind a head not due reads nothing either.
    assert_eq!(attempted(2, 60, &delivered(), 10).await, NOTHING);
    // Made due now: the queue, without the one delivered.
    assert!(store.retry_webhook_now("A", "E1", 70).await.unwrap());
    let due = store.due_webhooks_of("A", 70, 10).await.unwrap();
    assert_eq!(event_ids(&due), ["E1", "E3", "E4"]);
    // Delivered: the record reads what follows, as many as asked.
    assert_eq!(event_ids(&attempted(1, 71, &delivered(), 1).await), ["E3"]);
    // Settled once: a late record changes nothing.
    assert_eq!(attempted(1, 72, &retry(300), 0).await, NOTHING);
    assert_eq!(
        entry(store, "A", "E1").await,
        OutboxEntry {
            attempts: 3,
            last_status: Some(200),
            last_error: None,
            next_attempt_at: 70,
            done_at: Some(71),
            outcome: Some("delivered".into()),
            ..e1
        }
    );
    // Retried at once: the record reads it again, as it now is.
    let again = attempted(3, 90, &retry(90), 10).await;
    assert_eq!(event_ids(&again), ["E3", "E4"]);
    assert_eq!((again[0].attempts, again[0].next_attempt_at), (1, 90));
    let refused = Attempt::Done {
        outcome: "refused",
        status: None,
        error: Some("the address is private".into()),
    };
    assert_eq!(event_ids(&attempted(3, 91, &refused, 10).await), ["E4"]);
    let e3 = entry(store, "A", "E3").await;
    assert_eq!(
        (e3.attempts, e3.last_status, e3.last_error.as_deref()),
        (2, None, Some("the address is private"))
    );
    assert_eq!(
        (e3.next_attempt_at, e3.done_at, e3.outcome.as_deref()),
        (90, Some(91), Some("refused"))
    );
    assert_eq!(attempted(4, 92, &delivered(), 10).await, NOTHING);
    assert_eq!(store.outbox_stats().await.unwrap(), (0, None, 0));
}

async fn a_gone_url_is_cleared_and_the_events_waiting_for_it_settle(store: &dyn Store) {
    let (gone, kept) = ("http://h/gone", "http://h/kept");
    let record = InstanceRecord {
        webhooks: Webhooks {
            connected: Some(gone.into()),
            disconnected: Some(kept.into()),
            received: Some(gone.into()),
            received_delivery: Some(gone.into()),
            delivery: Some(kept.into()),
            message_status: Some(gone.into()),
            chat_presence: Some("http://h/presence".into()),
            notify_sent_by_me: true,
        },
        ..instance("A", "a", 0)
    };
    store.insert_instance(&record).await.unwrap();
    store
        .insert_instance(&announcing("B", gone, kept))
        .await
        .unwrap();
    for (id, instance, kind, at) in [
        ("E1", "A", WebhookKind::Connected, 10),
        ("E2", "A", WebhookKind::Disconnected, 11),
        ("E3", "A", WebhookKind::Connected, 12),
        ("EB", "B", WebhookKind::Connected, 13),
    ] {
        let event = event(id, instance, kind, at);
        assert!(store.enqueue_webhook(&event, 10).await.unwrap());
    }
    let e1 = entry(store, "A", "E1").await;
    store
        .webhook_attempted(e1.seq, 14, &delivered(), 0)
        .await
        .unwrap();

    store.stop_webhook_url("A", gone, 50).await.unwrap();
    assert_eq!(
        store.instance("A").await.unwrap().unwrap().webhooks,
        Webhooks {
            connected: None,
            disconnected: Some(kept.into()),
            received: None,
            received_delivery: None,
            delivery: Some(kept.into()),
            message_status: None,
            ..record.webhooks
        }
    );
    type Settled = (String, Option<i64>, Option<String>, Option<String>);
    let seen: Vec<Settled> = store
        .recent_webhooks("A", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_id, e.done_at, e.outcome, e.last_error))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "E3".into(),
                Some(50),
                Some("gone".into()),
                Some("the receiver answered 410 Gone for this URL".into())
            ),
            ("E2".into(), None, None, None),
            ("E1".into(), Some(14), Some("delivered".into()), None),
        ]
    );
    // Another instance with the same URL keeps it, and its event.
    let b = store.instance("B").await.unwrap().unwrap();
    assert_eq!(b.webhooks.connected.as_deref(), Some(gone));
    assert_eq!(entry(store, "B", "EB").await.done_at, None);
    store.stop_webhook_url("nope", gone, 60).await.unwrap();
}

async fn settled_events_are_forgotten_once_old_a_thousand_at_a_time(store: &dyn Store) {
    let (gone, kept) = ("http://h/gone", "http://h/kept");
    store
        .insert_instance(&announcing("A", gone, kept))
        .await
        .unwrap();
    let waiting = event("W", "A", WebhookKind::Disconnected, 5);
    assert!(store.enqueue_webhook(&waiting, 2_000).await.unwrap());
    let first = event("D", "A", WebhookKind::Connected, 6);
    assert!(store.enqueue_webhook(&first, 2_000).await.unwrap());
    let d = entry(store, "A", "D").await;
    store
        .webhook_attempted(d.seq, 20, &delivered(), 0)
        .await
        .unwrap();
    for n in 0..1_001 {
        let event = event(&format!("G{n}"), "A", WebhookKind::Connected, 7);
        assert!(store.enqueue_webhook(&event, 2_000).await.unwrap());
    }
    store.stop_webhook_url("A", gone, 30).await.unwrap();
    assert_eq!(store.outbox_stats().await.unwrap(), (1, Some(5), 0));

    assert_eq!(store.forget_settled_webhooks(20).await.unwrap(), 0);
    assert_eq!(store.forget_settled_webhooks(21).await.unwrap(), 1);
    assert_eq!(store.forget_settled_webhooks(31).await.unwrap(), 1_001);
    assert_eq!(store.forget_settled_webhooks(31).await.unwrap(), 0);
    let left = store.recent_webhooks("A", 10).await.unwrap();
    assert_eq!((event_ids(&left), left[0].done_at), (vec!["W"], None));
}

async fn a_deleted_instance_s_events_are_still_delivered(store: &dyn Store) {
    store
        .insert_instance(&announcing("A", "http://h/c", "http://h/d"))
        .await
        .unwrap();
    let connected = event("E1", "A", WebhookKind::Connected, 10);
    assert!(store.enqueue_webhook(&connected, 10).await.unwrap());
    // A cancel keeps the time it began.
    store.mark_cancelled("A", 7).await.unwrap();
    store.mark_cancelled("A", 9).await.unwrap();
    assert_eq!(
        store.instance("A").await.unwrap().unwrap().cancelled_at,
        Some(7)
    );
    store.delete_instance("A").await.unwrap();
    assert_eq!(store.instance("A").await.unwrap(), None);
    assert_eq!(store.webhook_announced("A").await.unwrap(), None);
    assert_eq!(
        store.all_instances().await.unwrap(),
        Vec::<InstanceRecord>::new()
    );
    let due = store.due_webhooks(10, &[], 10).await.unwrap();
    assert_eq!(event_ids(&due), ["E1"]);
    assert_eq!(due[0].url, "http://h/c");
    // Gone: no page can be made for it, and deleting or cancelling it again does nothing.
    let page = LinkPage {
        token_hash: "h".into(),
        instance_id: "A".into(),
        created_at: 20,
        expires_at: 30,
        revoked_at: None,
        used_at: None,
        pair_codes: 0,
    };
    assert!(store.insert_link_page(&page, 0, 2).await.is_err());
    assert_eq!(store.link_page("h").await.unwrap(), None);
    store.delete_instance("A").await.unwrap();
    store.mark_cancelled("A", 11).await.unwrap();
    assert_eq!(store.instance("A").await.unwrap(), None);
}
