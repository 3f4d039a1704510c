//! Where webhooks may go without `--webhook-allow-private`: an address that is private,
//! or a name that resolves only to private addresses, is refused at the first attempt
//! and settled (not retried), and the deliveries list says why; a URL with an IPv6
//! zone id is refused when it is set.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Instance, World};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// `GET .../webhook-deliveries` once the newest event has settled.
async fn settled_webhook_deliveries(gw: &Gateway, inst: &Instance) -> Value {
    let path = format!(
        "/instances/{}/token/{}/webhook-deliveries",
        inst.id, inst.token
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, list) = gw.api.call(reqwest::Method::GET, &path, None, None).await;
        assert_eq!(status, 200, "{list}");
        if list["deliveries"][0]["doneAt"].is_string() {
            return list;
        }
        assert!(Instant::now() < deadline, "not settled: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The addresses `host` resolves to on this machine, as the gateway lists them.
async fn resolved(host: &str) -> String {
    let mut ips: Vec<String> = Vec::new();
    for addr in tokio::net::lookup_host((host, 0)).await.unwrap() {
        let ip = addr.ip().to_string();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.join(", ")
}

#[tokio::test]
async fn private_addresses_and_names_resolving_only_to_them_are_refused_once_and_settled() {
    let world = World::new().await;
    let gw = world.gateway().await;
    // Nothing may connect here: a connection would wait in the backlog unaccepted.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let literal = "refused: 127.0.0.1 is a private address (--webhook-allow-private allows it)";
    let name = format!(
        "refused: localhost resolves only to private addresses ({}); --webhook-allow-private allows them",
        resolved("localhost").await
    );
    let site_local = "refused: fec0::1 is a private address (--webhook-allow-private allows it)";
    // https:// passes the URL check; the address is refused at delivery: a literal one,
    // one written as a number, an old IPv6 site-local one, and a name that resolves
    // only to loopback.
    for (i, (host, why)) in [
        ("127.0.0.1", literal),
        ("2130706433", literal),
        ("[fec0::1]", site_local),
        ("localhost", name.as_str()),
    ]
    .into_iter()
    .enumerate()
    {
        let inst = gw.api.create_instance(&format!("private {i}")).await;
        let url = format!("https://{host}:{port}/connected");
        let (status, body) = gw
            .api
            .set_webhook(&inst, "update-webhook-connected", &url)
            .await;
        assert_eq!(status, 200, "{body}");
        world
            .wa_link(&gw, &inst, &format!("55119555502{i:02}"))
            .await;
        let list = settled_webhook_deliveries(&gw, &inst).await;
        let entry = &list["deliveries"][0];
        assert_eq!(
            json!({
                "url": entry["url"],
                "status": entry["status"],
                "attempts": entry["attempts"],
                "lastStatus": entry["lastStatus"],
                "lastError": entry["lastError"],
                "nextAttemptAt": entry["nextAttemptAt"],
            }),
            json!({
                "url": url,
                "status": "refused",
                "attempts": 1,
                "lastStatus": null,
                "lastError": why,
                "nextAttemptAt": null,
            }),
            "{host}"
        );
    }
    let err = listener.accept().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
    let metrics = common::scrape(&gw).await;
    assert_eq!(
        metrics["zapgate_webhook_deliveries_total{result=\"refused\"}"],
        4.0
    );
    assert_eq!(
        metrics.get("zapgate_webhook_deliveries_total{result=\"retry\"}"),
        None,
        "nothing retried"
    );
}

#[tokio::test]
async fn a_url_with_an_ipv6_zone_id_is_refused_and_changes_nothing() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("zoned").await;
    let kept = "https://hooks.example.com/connected";
    let (status, body) = gw
        .api
        .set_webhook(&inst, "update-webhook-connected", kept)
        .await;
    assert_eq!(status, 200, "{body}");
    for (route, url, zone) in [
        (
            "update-webhook-connected",
            "https://[fe80::1%25eth0]/x",
            "%25eth0",
        ),
        (
            "update-webhook-connected",
            "https://[fe80::1%eth0]:8443/x",
            "%eth0",
        ),
        ("update-every-webhooks", "https://[fe80::1%251]/x", "%251"),
    ] {
        let (status, body) = gw.api.set_webhook(&inst, route, url).await;
        assert_eq!(
            (status, body),
            (
                400,
                json!({
                    "error": format!(
                        "value: the host has an IPv6 zone id ({zone}), which names a network interface of this machine; a webhook URL cannot carry one"
                    )
                })
            ),
            "{url}"
        );
    }
    let (_, me) = gw.api.me(&inst).await;
    assert_eq!(me["connectedCallbackUrl"], json!(kept), "{me}");
    assert_eq!(me["disconnectedCallbackUrl"], json!(null), "{me}");
}
