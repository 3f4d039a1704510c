//! What a hostile client or a careless operator does to the gateway: floods of
//! connections, clients too slow to send their headers, event streams left open, token
//! guessing, and a second gateway on the same data directory.

mod common;

use std::time::Duration;

use common::{ADMIN, World};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A client on loopback address 127.0.0.`last` (loopback is all of 127/8), opening a
/// new connection per request: another address than the test's own (127.0.0.1).
fn client_from(last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, last]))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn address(gw: &common::Gateway) -> String {
    gw.api.base.trim_start_matches("http://").to_owned()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Keeps `n` connections open to `addr`, opening a new one for each the gateway closes:
/// half never send a byte, half send headers that never end, a byte at a time.
fn flood(addr: String, n: usize) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = addr.clone();
        tasks.spawn(async move {
            loop {
                let Ok(mut stream) = TcpStream::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if i % 2 == 1 {
                    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await;
                    while stream.write_all(b"a").await.is_ok() {
                        let mut byte = [0u8; 1];
                        let read = tokio::time::timeout(
                            Duration::from_millis(500),
                            stream.read(&mut byte),
                        );
                        if matches!(read.await, Ok(Ok(0) | Err(_))) {
                            break;
                        }
                    }
                } else {
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                }
            }
        });
    }
    tasks
}

#[tokio::test]
async fn a_flood_of_idle_and_slow_connections_neither_blocks_the_api_nor_takes_whatsapps_files() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_MAX_CONNECTIONS", "32")])
        .await;
    let inst = world.linked_instance(&gw, "flooded", "5511900000001").await;
    let before = open_files(gw.pid());

    let mut attack = flood(address(&gw), 300);
    let status_url = format!(
        "{}/instances/{}/token/{}/status",
        gw.api.base, inst.id, inst.token
    );
    let http = client_from(2);
    // The API answers a client from elsewhere at once, not after the flood's headers
    // time out: the flooding address makes room from its own connections.
    for _ in 0..20 {
        let response = http.get(&status_url).send().await.expect("answered");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["connected"], json!(true));
    }
    // However many connections are thrown at it, the gateway holds its cap.
    let during = open_files(gw.pid());
    println!("open files: {before} before the flood, {during} during it");
    assert!(
        during <= before + 32 + 4,
        "{during} open files during the flood, {before} before"
    );

    // A number whose connection drops meanwhile reconnects: its socket's file is its own.
    let (code, dropped) = world
        .wa
        .post("drop", json!({ "phone": "5511900000001" }))
        .await
        .unwrap();
    assert_eq!(
        (code, dropped["dropped"].clone()),
        (200, json!(1)),
        "{dropped}"
    );
    let reconnected = async {
        loop {
            let logins = world.wa.stats().await.unwrap()["logins"].as_u64();
            let body: serde_json::Value = match http.get(&status_url).send().await {
                Ok(response) => response.json().await.unwrap(),
                Err(e) => panic!("the API did not answer during the flood: {e}"),
            };
            if body["connected"] == json!(true) && logins >= Some(2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(common::CONNECT_WAIT, reconnected)
        .await
        .expect("the dropped number reconnected during the flood");
    attack.abort_all();
    gw.stop().await;
}

#[tokio::test]
async fn one_address_keeping_requests_busy_cannot_take_every_connection() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_MAX_CONNECTIONS", "32")])
        .await;
    let inst = gw.api.create_instance("busy").await;
    // Whole headers, then a body that never comes: each of these requests is in flight
    // until the request time runs out. Past the address's share, they are refused.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match busy_from(&gw, [127, 0, 0, 1]).await {
            Some(stream) => held.push(stream),
            None => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (8, 32));
    // The address holds a quarter of the connections at most: another gets in.
    let status_url = format!(
        "{}/instances/{}/token/{}/status",
        gw.api.base, inst.id, inst.token
    );
    let response = client_from(2)
        .get(&status_url)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);

    // Every connection busy, from four addresses: a newcomer hears so, and is closed.
    for last in [3, 4, 5] {
        for _ in 0..8 {
            held.push(busy_from(&gw, [127, 0, 0, last]).await.expect("in flight"));
        }
    }
    let from_six = client_from(6);
    let response = from_six.get(&status_url).send().await.expect("answered");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({ "error": "The gateway is at its limit of HTTP connections; try again in a moment" })
    );
    drop(held);
    gw.stop().await;
}

/// A connection from `ip` whose request is in flight: whole headers, then a body that
/// never comes. Returned once the gateway has asked for the body (`100 Continue`), so
/// its request is in flight for sure; `None` when the gateway answered 503 instead.
async fn busy_from(gw: &common::Gateway, ip: [u8; 4]) -> Option<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
    let mut stream = socket.connect(address(gw).parse().unwrap()).await.unwrap();
    stream.write_all(SLOW_BODY_EXPECTING).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "closed before the body was asked for"
        );
        answer.push(byte[0]);
    }
    if answer.starts_with(b"HTTP/1.1 503 ") {
        return None;
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    Some(stream)
}

const SLOW_BODY_EXPECTING: &[u8] = b"POST /panel/sign-in HTTP/1.1\r\nHost: x\r\nexpect: 100-continue\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 60000\r\n\r\n";

/// Reads from `stream` until the peer closes it; how long that took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 1024];
    let read_all = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.is_ok()
}

#[tokio::test]
async fn headers_that_never_end_and_idle_keep_alives_are_closed_in_time() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[
            ("ZAPGATE_HEADER_TIMEOUT_SECS", "1"),
            ("ZAPGATE_IDLE_TIMEOUT_SECS", "2"),
        ])
        .await;
    let addr = address(&gw);

    // A byte every 200 ms: never a whole header.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..50 {
            if slow.write_all(b"a").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut byte = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut byte)).await
            {
                return true;
            }
        }
        false
    };
    assert!(
        trickle.await,
        "a connection trickling its headers stayed open 10 s"
    );

    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a silent connection stayed open"
    );

    // A keep-alive connection that asks once and then says nothing: it may idle, then
    // it is closed.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = idle.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200 OK"));
    let answered = tokio::time::Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)).await,
        "an idle keep-alive connection stayed open"
    );
    assert!(
        answered.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}: the idle time is not the header time",
        answered.elapsed()
    );
    gw.stop().await;

    // A second request trickled on a keep-alive connection gets the header time from
    // its first byte, not the idle time.
    let gw = world
        .gateway_with(&[
            ("ZAPGATE_HEADER_TIMEOUT_SECS", "1"),
            ("ZAPGATE_IDLE_TIMEOUT_SECS", "60"),
        ])
        .await;
    let mut kept = TcpStream::connect(address(&gw)).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = kept.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200 OK"));
    kept.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let trickle = async {
        while kept.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut byte = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), kept.read(&mut byte)).await
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .expect("a trickled second request was closed within the header time, not the idle time");
    gw.stop().await;
}

#[tokio::test]
async fn event_streams_are_bounded_per_instance_and_in_all() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_MAX_EVENT_STREAMS", "20")])
        .await;
    let (a, b) = (
        gw.api.create_instance("a").await,
        gw.api.create_instance("b").await,
    );
    let mut open_a = Vec::new();
    for _ in 0..16 {
        open_a.push(gw.api.events(&a, None).await);
    }
    let refused = |status: reqwest::StatusCode| status.as_u16() == 429;
    let events_url = |i: &common::Instance| {
        format!(
            "{}/instances/{}/token/{}/events",
            gw.api.base, i.id, i.token
        )
    };
    let response = gw.api.http.get(events_url(&a)).send().await.unwrap();
    assert!(refused(response.status()));
    assert_eq!(response.headers()["retry-after"], "10");
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({ "error": "Too many event streams are open for this; close one and try again" })
    );
    let mut open_b = Vec::new();
    for _ in 0..4 {
        open_b.push(gw.api.events(&b, None).await);
    }
    let response = gw.api.http.get(events_url(&b)).send().await.unwrap();
    assert!(refused(response.status()));
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({ "error": "The gateway has as many event streams open as it allows; try again later" })
    );
    // A stream closed gives its place back.
    drop(open_a.pop());
    let reopened = async {
        loop {
            let response = gw.api.http.get(events_url(&b)).send().await.unwrap();
            if response.status() == 200 {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _again = tokio::time::timeout(Duration::from_secs(10), reopened)
        .await
        .expect("a closed stream's place is given back");
    gw.stop().await;
}

#[tokio::test]
async fn guessing_tokens_in_parallel_is_stopped_per_address() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("guessed").await;
    let guesses = (0..60).map(|i| {
        let http = gw.api.http.clone();
        let url = format!("{}/instances", gw.api.base);
        async move {
            let response = http
                .get(url)
                .bearer_auth(format!("guess-{i}"))
                .send()
                .await
                .unwrap();
            let retry = response.headers().get("retry-after").cloned();
            (response.status().as_u16(), retry)
        }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let wrong = answers.iter().filter(|(s, _)| *s == 401).count();
    let refused = answers
        .iter()
        .filter(|(s, r)| *s == 429 && r.is_some())
        .count();
    assert_eq!((wrong, refused), (10, 50), "{answers:?}");

    // While the address is held back, even the right token is refused: guessing learns
    // nothing. The instance routes and the panel's sign-in count the same failures.
    let (status, body) = gw
        .api
        .call(reqwest::Method::GET, "/instances", None, Some(ADMIN))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("Too many failed authentications from your address; try again in "),
        "{body}"
    );
    let (status, by_instance) = gw.api.instance_get(&inst, "status").await;
    assert_eq!((status, &by_instance["error"]), (429, &body["error"]));
    let sign_in = gw
        .api
        .http
        .post(format!("{}/panel/sign-in", gw.api.base))
        .form(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(sign_in.status(), 429);

    // Another address is not held back.
    let other = client_from(2);
    let response = other
        .get(format!("{}/instances", gw.api.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_guesses_are_counted_by_the_forwarded_client() {
    let world = World::new().await;
    // The test is the proxy, on 127.0.0.1; 127.0.0.2 is a client reaching the gateway
    // directly.
    let gw = world
        .gateway_with(&[("ZAPGATE_TRUSTED_PROXIES", "127.0.0.1")])
        .await;
    let instances = format!("{}/instances", gw.api.base);
    let ask = |from: &'static str, token: &'static str| {
        let (http, url) = (gw.api.http.clone(), instances.clone());
        async move {
            http.get(url)
                .header("X-Forwarded-For", from)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for _ in 0..10 {
        assert_eq!(ask("198.51.100.7", "guess").await, 401);
    }
    assert_eq!(ask("198.51.100.7", ADMIN).await, 429);
    // Another client behind the same proxy is not held back.
    assert_eq!(ask("198.51.100.8", ADMIN).await, 200);
    // A client's own X-Forwarded-For is not believed: it cannot dodge the limit.
    let direct = client_from(2);
    for i in 0..11 {
        let status = direct
            .get(&instances)
            .header("X-Forwarded-For", format!("203.0.113.{i}"))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, if i < 10 { 401 } else { 429 }, "guess {i}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_second_gateway_on_the_same_data_directory_refuses_to_start() {
    let world = World::new().await;
    let first = world.gateway().await;
    let said = world.refused_gateway(&[], &[]).await;
    let expected = format!(
        "another zapgate (pid {}) is already using the data directory {}: stop it first, or give this gateway its own --data-dir (ZAPGATE_DATA_DIR)",
        first.pid(),
        world.data_dir().display()
    );
    assert!(said.contains(&expected), "{said}");
    // The first is untouched, and once it stops the directory is free.
    assert_eq!(
        first
            .api
            .call(reqwest::Method::GET, "/healthz", None, None)
            .await
            .0,
        200
    );
    first.kill().await;
    let second = world.gateway().await;
    second.stop().await;
}
