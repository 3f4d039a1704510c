//! Devices WhatsApp and the gateway disagree about: one the phone removed while the
//! gateway was down, and one a crash left linked at WhatsApp with no link recorded.
//! End to end, against wa-sim.

mod common;

use std::sync::{Arc, Mutex};

use common::{Instance, World, not_connected};
use serde_json::{Value, json};

const PHONE: &str = "5511977770001";
const REMOVED: &str = "is removed at WhatsApp; its set-aside session is deleted";

/// A webhook receiver that takes everything and keeps the bodies, by path.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, Value)>>>,
    grew: Arc<tokio::sync::Notify>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(take))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn bodies(&self, path: &str) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    async fn wait_for(&self, path: &str, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + common::CONNECT_WAIT;
        loop {
            let grew = self.grew.notified();
            let bodies = self.bodies(path);
            if bodies.len() >= n {
                return bodies;
            }
            assert!(
                tokio::time::timeout_at(deadline, grew).await.is_ok(),
                "{path}: {} of {n} delivered",
                bodies.len()
            );
        }
    }
}

async fn take(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    axum::extract::Path(path): axum::extract::Path<String>,
    raw: String,
) -> axum::http::StatusCode {
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    receiver.got.lock().unwrap().push((path, body));
    receiver.grew.notify_waiters();
    axum::http::StatusCode::OK
}

#[tokio::test]
async fn a_device_the_phone_removed_while_the_gateway_was_down_is_reported_unlinked() {
    let world = World::new().await;
    let env = [("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true")];
    let gw = world.gateway_with(&env).await;
    let (receiver, url) = Receiver::start().await;
    let inst = gw.api.create_instance("removed").await;
    for route in ["update-webhook-connected", "update-webhook-disconnected"] {
        let path = route.trim_start_matches("update-webhook-");
        let (status, body) = gw
            .api
            .set_webhook(&inst, route, &format!("{url}/{path}"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    world.wa_link(&gw, &inst, PHONE).await;
    receiver.wait_for("connected", 1).await;
    gw.stop().await;

    // The phone removes the device while the gateway is down.
    world.phone_unlinks(PHONE).await;

    let gw = world.gateway_with(&env).await;
    gw.api
        .wait_status(&inst, "not connected", |s| *s == not_connected())
        .await;
    assert_eq!(gw.api.status(&inst).await, not_connected());
    assert_eq!(
        gw.api.device(&inst).await,
        (
            200,
            json!({ "connected": false, "error": "You are not connected." })
        )
    );
    assert!(!gw.log.text().contains("certificate was refused"));
    world.session_wiped(&inst).await;
    assert_eq!(
        world.stat("loginFailures").await,
        1,
        "tried once, not again"
    );
    let disconnected = receiver.wait_for("disconnected", 1).await;
    assert_eq!(disconnected.len(), 1);
    assert_eq!(
        disconnected[0],
        json!({
            "type": "DisconnectedCallback",
            "disconnected": true,
            "error": "Device has been disconnected",
            "momment": disconnected[0]["momment"],
            "instanceId": inst.id,
        })
    );
}

#[tokio::test]
async fn disconnecting_a_device_whatsapp_already_removed_says_it_is_unlinked() {
    let world = World::new().await;
    // The first gateway holds the session without a client (another took it over);
    // the other stops, and the phone removes the device meanwhile.
    let (first, second, inst) = world.taken_over("removed", PHONE).await;
    second.stop().await;
    world.phone_unlinks(PHONE).await;

    // WhatsApp refuses the login with a 401: the device is unlinked there already.
    assert_eq!(
        first.api.disconnect(&inst).await,
        (200, json!({ "value": true }))
    );
    assert_eq!(first.api.status(&inst).await, not_connected());
    assert!(!world.has_session(&inst).await);
    assert_eq!(world.stat("loginFailures").await, 1);
}

/// Reads the device a session paired as (`phone:device`), if it has one yet.
async fn paired_as(world: &World, name: &str) -> Option<String> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(world.data_dir().join("sessions.db"))
        .read_only(true);
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    let device: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT device FROM session WHERE instance = ?")
            .bind(name)
            .fetch_optional(&mut db)
            .await
            .unwrap();
    let device: Value = serde_json::from_slice(&device.flatten()?).unwrap();
    let pn = device.get("pn").filter(|pn| !pn.is_null())?;
    Some(format!("{}:{}", pn["user"].as_str().unwrap(), pn["device"]))
}

/// A gateway killed after the phone paired and before the link was written: the
/// device stays linked at WhatsApp, and the instance has no link. Returns the instance
/// and the device (`phone:device`).
async fn ghost(world: &World) -> (Instance, String) {
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("ghost").await;
    let (status, qr) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200, "{qr}");
    // The database is kept busy: the link cannot be written.
    let options =
        sqlx::sqlite::SqliteConnectOptions::new().filename(world.data_dir().join("zapgate.db"));
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut db)
        .await
        .unwrap();
    world.phone_scans(&qr, PHONE).await;
    // Once the session holds the paired device, the gateway dies.
    let deadline = tokio::time::Instant::now() + common::CONNECT_WAIT;
    let device = loop {
        if let Some(device) = paired_as(world, &inst.id).await {
            break device;
        }
        assert!(tokio::time::Instant::now() < deadline, "never paired");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    gw.kill().await;
    sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
    let jids: Vec<Value> = world.wa.devices().await.unwrap();
    assert_eq!(jids.len(), 1);
    assert_eq!(jids[0]["jid"], json!(format!("{device}@s.whatsapp.net")));
    (inst, device)
}

#[tokio::test]
async fn a_device_a_crash_left_linked_is_removed_at_whatsapp_at_the_next_start() {
    let world = World::new().await;
    let (inst, device) = ghost(&world).await;

    let gw = world.gateway().await;
    assert_eq!(gw.api.status(&inst).await, not_connected());
    // The phone stops listing it.
    let deadline = tokio::time::Instant::now() + common::CONNECT_WAIT;
    while !world.wa.devices().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device} is still linked at WhatsApp"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    gw.log.wait_for(REMOVED, 1).await;
    assert!(gw.log.text().contains(&device), "the log names the device");
    assert_eq!(world.sessions_of(&inst).await, Vec::<String>::new());

    // The number links again as usual.
    world.wa_link(&gw, &inst, PHONE).await;
    assert_eq!(world.wa.devices().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_device_left_linked_is_kept_while_whatsapp_is_unreachable_and_removed_later() {
    let world = World::new().await;
    let (inst, _) = ghost(&world).await;

    assert_eq!(world.wa.outage(600).await.unwrap().0, 200);
    let gw = world.gateway_with(&[("ZAPGATE_LINK_WAIT_SECS", "2")]).await;
    gw.log.wait_for("tried again at the next start", 1).await;
    gw.stop().await;
    let kept = world.sessions_of(&inst).await;
    assert!(
        kept.len() == 1 && kept[0].starts_with(&format!("set-aside/{}/", inst.id)),
        "kept: {kept:?}"
    );
    assert_eq!(world.wa.devices().await.unwrap().len(), 1);

    // WhatsApp is back: the next start removes it.
    assert_eq!(world.wa.outage(0).await.unwrap().0, 200);
    let gw = world.gateway().await;
    gw.log.wait_for(REMOVED, 1).await;
    assert_eq!(world.wa.devices().await.unwrap(), Vec::<Value>::new());
    assert_eq!(world.sessions_of(&inst).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_gateway_started_on_the_wrong_instance_database_removes_no_device() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "kept", PHONE).await;
    gw.stop().await;

    // An operator's slip: a database URL naming a new, empty instance database. Its
    // session has no link there, but nothing says a crash left it: it is set aside,
    // the device stays linked, and nothing is deleted.
    let wrong = world.dir.path().join("elsewhere.db");
    let url = format!("sqlite://{}?mode=rwc", wrong.display());
    let slip = world
        .gateway_with(&[("ZAPGATE_DATABASE_URL", url.as_str())])
        .await;
    slip.log
        .wait_for("a session without a recorded link was set aside", 1)
        .await;
    slip.log.wait_for("set-aside sessions checked", 1).await;
    assert!(
        slip.log.text().contains("to_unlink=0"),
        "{}",
        slip.log.text()
    );
    slip.stop().await;
    assert_eq!(world.wa.devices().await.unwrap().len(), 1, "still linked");
    let kept = world.sessions_of(&inst).await;
    assert!(
        kept.len() == 1 && kept[0].starts_with(&format!("set-aside/{}/", inst.id)),
        "{kept:?}"
    );
    assert!(!kept[0].ends_with("/unlink"), "{kept:?}");
    assert_eq!(world.stat("loginFailures").await, 0);
}
