//! Nothing a user linked is lost: a start with the sessions missing, a link the
//! database cannot record, a cancel cut short by a kill -9, a gateway killed while a
//! window is open (and `ghosts.rs`: one killed once the phone paired). End to end, against wa-sim.

mod common;

use common::{ADMIN, Gateway, World, connected, not_connected};
use serde_json::json;

const PHONE: &str = "5511988880001";
const MISSING: &str = "You need to restore the session. Its stored WhatsApp session is missing from the gateway's data directory; the operator must check it, then restore the session.";

#[tokio::test]
async fn a_start_without_the_sessions_forgets_nothing() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "kept", PHONE).await;
    gw.stop().await;

    // The right database, but a data directory without the sessions database (a volume
    // that is not mounted).
    let elsewhere = world.dir.path().join("unmounted");
    let database = format!("sqlite://{}", world.data_dir().join("zapgate.db").display());
    let gw = Gateway::start(
        &world.sim.ws_url(),
        &elsewhere,
        &[("ZAPGATE_DATABASE_URL", &database)],
    )
    .await;
    let logins = world.stat("logins").await;
    let status = gw.api.status(&inst).await;
    assert_eq!(
        status,
        json!({ "connected": false, "error": MISSING, "smartphoneConnected": false })
    );
    // The log names the path; the API does not.
    let expected = elsewhere.join("sessions.db");
    assert!(
        gw.log.text().contains(&expected.display().to_string()),
        "the log names {}",
        expected.display()
    );
    assert_eq!(
        gw.api.restore_session(&inst).await,
        (409, json!({ "error": MISSING }))
    );
    assert_eq!(
        gw.api.qr_code(&inst).await,
        (200, json!({ "connected": false, "error": MISSING }))
    );
    assert_eq!(gw.api.device(&inst).await.0, 200);
    gw.stop().await;
    assert_eq!(
        world.stat("logins").await,
        logins,
        "nothing reached WhatsApp"
    );
    assert!(world.has_session(&inst).await);

    // The next start with the files in place reconnects: no new pairing.
    let gw = world.gateway().await;
    gw.api.wait_connected(&inst).await;
    assert_eq!(world.stat("pairings").await, 1);
    assert_eq!(gw.api.device(&inst).await.1["phone"], json!(PHONE));
}

#[tokio::test]
async fn a_link_the_database_cannot_record_is_undone_at_whatsapp() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("unsaved").await;
    let (_, qr) = gw.api.qr_code(&inst).await;

    // From now on the database refuses to record a link.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        world.data_dir().join("zapgate.db").display()
    ))
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER no_links BEFORE UPDATE OF phone ON instances \
         WHEN NEW.phone IS NOT NULL BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .execute(&db)
    .await
    .unwrap();

    world.phone_scans(&qr, PHONE).await;
    gw.log.wait_for("session deleted", 1).await;
    assert_eq!(
        gw.api.status(&inst).await,
        json!({
            "connected": false,
            "error": "You are not connected. The link could not be saved, so the device was unlinked at WhatsApp; link the number again.",
            "smartphoneConnected": false,
        })
    );
    assert!(
        world.wa.devices().await.unwrap().is_empty(),
        "the phone no longer lists the device"
    );
    assert!(!world.has_session(&inst).await);
    assert!(gw.log.text().contains("disk full"));

    // Once the database works again, the number links.
    sqlx::query("DROP TRIGGER no_links")
        .execute(&db)
        .await
        .unwrap();
    world.wa_link(&gw, &inst, PHONE).await;
    assert_eq!(gw.api.status(&inst).await, connected());
}

#[tokio::test]
async fn a_cancel_cut_short_by_a_kill_is_finished_at_the_next_start() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "doomed", PHONE).await;

    // WhatsApp goes away for a moment, so the cancel's unlink waits; the gateway dies
    // while it does. The row is already marked.
    assert_eq!(world.wa.outage(3).await.unwrap().0, 200);
    let cancel = format!(
        "{}/instances/{}/token/{}/integrator/on-demand/cancel",
        gw.api.base, inst.id, inst.token
    );
    let pending = tokio::spawn(
        reqwest::Client::new()
            .post(cancel)
            .bearer_auth(ADMIN)
            .send(),
    );
    gw.log.wait_for("to=Unlinking", 1).await;
    gw.kill().await;
    assert!(pending.await.unwrap().is_err(), "the cancel never answered");
    assert_eq!(world.wa.devices().await.unwrap().len(), 1);

    let gw = world.gateway().await;
    assert_eq!(
        gw.api.instance_get(&inst, "status").await,
        (404, json!({ "error": "Instance not found" }))
    );
    gw.log.wait_for("instance cancelled", 1).await;
    assert!(
        world.wa.devices().await.unwrap().is_empty(),
        "unlinked at WhatsApp"
    );
    assert!(!world.has_session(&inst).await);
    let (_, list) = gw
        .api
        .call(reqwest::Method::GET, "/instances", None, Some(ADMIN))
        .await;
    assert_eq!(list["total"], json!(0));
    gw.stop().await;
    // And the row is gone for good: a further start has nothing to finish.
    let gw = world.gateway().await;
    assert!(!gw.log.text().contains("finishing an interrupted cancel"));
}

#[tokio::test]
async fn a_gateway_killed_while_linking_drops_the_window_that_never_paired_and_links_again() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("midway").await;
    let (_, first) = gw.api.qr_code(&inst).await;
    assert!(world.has_session(&inst).await);
    gw.kill().await;

    let gw = world.gateway().await;
    assert_eq!(gw.api.status(&inst).await, not_connected());
    assert!(!world.has_session(&inst).await);
    // Set aside, then deleted: it never paired, so it held no device.
    assert!(gw.log.text().contains("set aside"));
    gw.log
        .wait_for("a set-aside session that never paired was deleted", 1)
        .await;
    assert_eq!(world.sessions_of(&inst).await, Vec::<String>::new());

    let (status, second) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second, first);
    let (status, body) = world
        .wa
        .scan(second["value"].as_str().unwrap(), Some(PHONE))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    gw.api.wait_connected(&inst).await;
}

#[tokio::test]
async fn a_gateway_stops_promptly_whatever_its_instances_are_doing() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let online = world.linked_instance(&gw, "online", PHONE).await;
    let linking = gw.api.create_instance("linking").await;
    assert_eq!(gw.api.qr_code(&linking).await.0, 200);
    gw.stop().await;

    // WhatsApp is down: the linked session keeps retrying, a disconnect waits on it,
    // a new window waits for a first code. SIGTERM must still end it all in time.
    assert_eq!(world.wa.outage(60).await.unwrap().0, 200);
    let gw = world.gateway().await;
    gw.log.wait_for("instance state", 1).await;
    let waiting = gw.api.create_instance("waiting").await;
    let (base, token) = (
        gw.api.base.clone(),
        (waiting.id.clone(), waiting.token.clone()),
    );
    let pending = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let qr = http
            .get(format!(
                "{base}/instances/{}/token/{}/qr-code",
                token.0, token.1
            ))
            .send();
        let off = http
            .get(format!(
                "{base}/instances/{}/token/{}/disconnect",
                online.id, online.token
            ))
            .send();
        tokio::join!(qr, off)
    });
    gw.log.wait_for("to=Unlinking", 1).await;
    gw.stop().await; // within 20 s, cleanly
    let (qr, off) = pending.await.unwrap();
    // Each caller got a closed connection or an answer that says what happened: no
    // code while WhatsApp is down, and a disconnect that could not tell WhatsApp.
    if let Ok(qr) = qr {
        assert_eq!(qr.status(), 503);
    }
    if let Ok(off) = off {
        let status = off.status().as_u16();
        let body: serde_json::Value = off.json().await.unwrap();
        match status {
            200 => assert_eq!(body["unlinkedAtWhatsApp"], json!(false), "{body}"),
            503 => assert!(body["error"].is_string(), "{body}"),
            other => panic!("disconnect answered {other}: {body}"),
        }
    }
}
