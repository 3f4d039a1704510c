//! Text messages through the gateway to wa-sim contacts (real Signal peers): how many
//! per second one instance and the whole gateway send, the latency from the API call to
//! the contact's inbox at a steady rate, the gateway's CPU per message, and what a
//! queued message costs while its number is down. Beside it, Baileys (one linked
//! device, in Node) sending `--baileys` texts through the same wa-sim to the same
//! contacts: its messages per second and per CPU-second.
//!
//! `cargo bench -p zapgate --bench messages -- [--instances 100] [--burst 20]
//!  [--single 500] [--rate 500] [--secs 10] [--queued 50] [--baileys 2000] [--webhooks 1]
//!  [--env K=V ...]`
//!
//! The gateway is a release sandbox build in its own process, with Z-API's pacing off
//! (`ZAPGATE_SEND_INTERVAL_MS=0`) and its message webhooks set to a receiver in this
//! process. Prints its figures, and a last line `RESULT {json}`.

#[path = "support/args.rs"]
mod args;
#[allow(dead_code, unreachable_pub)]
#[path = "../../wa-sim/tests/common/baileys.rs"]
mod baileys;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/procfs.rs"]
mod procfs;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::{Gateway, Instance, World};
use fleet::Sample;
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

const QUIET: &str = "warn,zapgate=info,zapgate::instance=warn";
/// HTTP calls in flight at once from the bench.
const CALLS: usize = 64;

struct Args {
    instances: usize,
    burst: usize,
    single: usize,
    rate: usize,
    secs: u64,
    queued: usize,
    baileys: usize,
    /// Whether the instances' message webhooks are set (`--webhooks 0`: none).
    webhooks: bool,
    env: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Self {
        let args = args::CommandLine::read();
        let get = |name: &str, default: u64| args.number(name, default) as usize;
        Self {
            instances: get("--instances", 100),
            burst: get("--burst", 20),
            single: get("--single", 500),
            rate: get("--rate", 500),
            secs: args.number("--secs", 10),
            queued: get("--queued", 50),
            baileys: get("--baileys", 2000),
            webhooks: get("--webhooks", 1) != 0,
            env: args.env(),
        }
    }
}

/// One message sent through the API: to which contact, and when the call began.
struct Sent {
    contact: String,
    id: String,
    at_ms: i64,
}

/// Sends `text` from `inst` to `contact`; the message as sent.
async fn send(gw: &Gateway, inst: &Instance, contact: &str, text: String) -> Sent {
    let at_ms = common::unix_millis();
    let path = format!("/instances/{}/token/{}/send-text", inst.id, inst.token);
    let (status, body) = gw
        .api
        .call(
            reqwest::Method::POST,
            &path,
            Some(json!({ "phone": contact, "message": text })),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    Sent {
        contact: contact.to_owned(),
        id: body["messageId"].as_str().unwrap().to_owned(),
        at_ms,
    }
}

/// Waits until each contact's inbox holds the messages of `sent` too; when each message
/// arrived (unix ms), by id. `inboxes` counts what each contact's inbox holds.
async fn arrivals(
    world: &World,
    sent: &[Sent],
    inboxes: &mut HashMap<String, usize>,
) -> HashMap<String, i64> {
    let mut want: HashMap<&str, usize> = HashMap::new();
    for s in sent {
        let held = inboxes.entry(s.contact.clone()).or_default();
        *held += 1;
        want.insert(&s.contact, *held);
    }
    let inboxes: Vec<Vec<Value>> = stream::iter(want)
        .map(|(contact, count)| async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let (status, body) = world
                    .wa
                    .get(&format!("contacts/{contact}/inbox?wait=60&count={count}"))
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{body}");
                let inbox = body.as_array().cloned().unwrap_or_default();
                if inbox.len() >= count {
                    return inbox;
                }
                assert!(
                    Instant::now() < deadline,
                    "{contact}: {} of {count}",
                    inbox.len()
                );
            }
        })
        .buffer_unordered(CALLS)
        .collect()
        .await;
    inboxes
        .into_iter()
        .flatten()
        .map(|m| {
            let at = m["receivedAt"]
                .as_i64()
                .expect("wa-sim's inbox says when a message arrived");
            (m["id"].as_str().unwrap().to_owned(), at)
        })
        .collect()
}

/// p50, p99 and the largest latency from the call to the inbox, in ms.
fn latencies(sent: &[Sent], arrived: &HashMap<String, i64>) -> Value {
    let mut ms: Vec<i64> = sent.iter().map(|s| arrived[&s.id] - s.at_ms).collect();
    ms.sort_unstable();
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    json!({ "p50Ms": at(0.5), "p99Ms": at(0.99), "maxMs": ms[ms.len() - 1], "n": ms.len() })
}

/// Messages per second from the first call to the last arrival.
fn rate(sent: &[Sent], arrived: &HashMap<String, i64>) -> f64 {
    let first = sent.iter().map(|s| s.at_ms).min().unwrap();
    let last = arrived.values().max().unwrap();
    sent.len() as f64 * 1000.0 / (last - first).max(1) as f64
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let n = args.instances;
    let world = World::new().await;
    let mut env = vec![
        ("RUST_LOG", QUIET),
        ("ZAPGATE_MAX_CONNECTIONS_PER_ADDRESS", "1024"),
        ("ZAPGATE_SEND_INTERVAL_MS", "0"),
        ("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true"),
    ];
    // Later entries win: `--env RUST_LOG=...` replaces the quiet default.
    env.extend(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let gw = world.gateway_with(&env).await;
    let instances = fleet::create(&gw, n, "sender").await;
    fleet::link(&gw, &world, &instances, "55118", 10_000_000, 32).await;
    let receiver = Receiver::start().await;
    for inst in instances.iter().filter(|_| args.webhooks) {
        for (route, path) in [
            ("update-webhook-received", "received"),
            ("update-webhook-delivery", "delivery"),
            ("update-webhook-message-status", "status"),
        ] {
            let (status, body) = gw.api.set_webhook(inst, route, &receiver.url(path)).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    let contacts: Vec<String> = stream::iter(0..n)
        .map(|i| {
            let wa = &world.wa;
            async move {
                let phone = fleet::number("55117", 20_000_000, i);
                let (status, body) = wa
                    .post("contacts", json!({ "phone": phone }))
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{body}");
                phone
            }
        })
        .buffered(16)
        .collect()
        .await;
    let pairs: Vec<(&Instance, &str)> = instances
        .iter()
        .zip(contacts.iter().map(String::as_str))
        .collect();
    println!(
        "gateway: {n} instances linked, {n} contacts (gateway pid {})",
        gw.pid()
    );
    let mut held = HashMap::new();
    // A first message each: sessions opened, numbers looked up.
    let warm: Vec<Sent> = stream::iter(&pairs)
        .map(|(inst, c)| send(&gw, inst, c, "hello".into()))
        .buffer_unordered(CALLS)
        .collect()
        .await;
    arrivals(&world, &warm, &mut held).await;
    let mut result = json!({ "instances": n });

    // One instance alone, as fast as WhatsApp acknowledges.
    let (inst, contact) = pairs[0];
    let sent: Vec<Sent> = stream::iter(0..args.single)
        .map(|i| send(&gw, inst, contact, format!("single {i}")))
        .buffered(CALLS)
        .collect()
        .await;
    let mut all = warm;
    all.extend(sent);
    let arrived = arrivals(&world, &all[n..], &mut held).await;
    let single = rate(&all[n..], &arrived);
    println!("one instance: latency {}", latencies(&all[n..], &arrived));
    println!(
        "one instance: {single:.0} messages/s ({} messages)",
        args.single
    );
    result["singleInstancePerSec"] = json!(single);

    // Every instance at once, a burst each.
    let before = Sample::of(gw.pid());
    let sent: Vec<Sent> = stream::iter(0..args.burst)
        .flat_map(|i| stream::iter(pairs.iter().map(move |p| (i, *p))))
        .map(|(i, (inst, contact))| send(&gw, inst, contact, format!("burst {i}")))
        .buffer_unordered(CALLS)
        .collect()
        .await;
    let total = sent.len();
    let mut everything = all;
    everything.extend(sent);
    let arrived = arrivals(&world, &everything[everything.len() - total..], &mut held).await;
    let after = Sample::of(gw.pid());
    let burst = &everything[everything.len() - total..];
    let per_sec = rate(burst, &arrived);
    let cpu_secs = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / 100.0;
    let burst_latency = latencies(burst, &arrived);
    println!(
        "burst: {total} messages from {n} instances, {per_sec:.0}/s, {:.3} ms of gateway CPU each ({:.0} messages per CPU-second); latency {burst_latency}",
        cpu_secs * 1000.0 / total as f64,
        total as f64 / cpu_secs.max(0.001)
    );
    result["burst"] = json!({
        "messages": total,
        "perSec": per_sec,
        "perInstancePerSec": per_sec / n as f64,
        "gatewayCpuMsPerMessage": cpu_secs * 1000.0 / total as f64,
        "messagesPerCpuSec": total as f64 / cpu_secs.max(0.001),
        "latency": burst_latency,
    });

    // A steady rate, spread over the instances: the latency a user sees.
    let (before, own_before) = (Sample::of(gw.pid()), Sample::of(std::process::id()));
    let count = args.rate * args.secs as usize;
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = tokio::time::Instant::now();
    let gw = std::sync::Arc::new(gw);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..count {
        tokio::time::sleep_until(started + every * i as u32).await;
        let (inst, contact) = pairs[i % n];
        let (gw, inst, contact) = (gw.clone(), inst.clone(), contact.to_owned());
        calls.spawn(async move { send(&gw, &inst, &contact, format!("steady {i}")).await });
    }
    let steady: Vec<Sent> = calls.join_all().await;
    let arrived = arrivals(&world, &steady, &mut held).await;
    let after = Sample::of(gw.pid());
    let own_after = Sample::of(std::process::id());
    let steady_latency = latencies(&steady, &arrived);
    let cpu_secs = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / 100.0;
    let own_secs = own_after.cpu_ticks.saturating_sub(own_before.cpu_ticks) as f64 / 100.0;
    println!(
        "steady: {count} messages at {}/s over {} s; latency {steady_latency}; gateway CPU {:.0}%, wa-sim with the bench {:.0}%",
        args.rate,
        args.secs,
        cpu_secs * 100.0 / args.secs as f64,
        own_secs * 100.0 / args.secs as f64
    );
    result["steady"] = json!({
        "ratePerSec": args.rate,
        "messages": count,
        "latency": steady_latency,
        "gatewayCpuPercent": cpu_secs * 100.0 / args.secs as f64,
        "simAndBenchCpuPercent": own_secs * 100.0 / args.secs as f64,
    });

    // Numbers down: what queued messages cost, and how fast the queues drain after.
    let queued = queued_cost(&gw, &world, &pairs, args.queued, &mut held).await;
    result["queued"] = queued;

    let delivered = receiver.delivered("delivery").len();
    result["webhooks"] = json!({
        "delivery": delivered,
        "status": receiver.delivered("status").len(),
    });
    if args.baileys > 0 {
        let figures = baileys_sends(&world, &contacts, args.baileys, &mut held).await;
        let ratio = result["burst"]["messagesPerCpuSec"].as_f64().unwrap()
            / figures["messagesPerCpuSec"].as_f64().unwrap().max(0.001);
        println!("the gateway sends {ratio:.1}x as many messages per CPU-second as Baileys");
        result["baileys"] = figures;
        result["gatewayPerCpuOverBaileys"] = json!(ratio);
    }
    println!("RESULT {result}");
}

/// Every number dropped by a wa-sim outage; `per_instance` messages queued on each
/// meanwhile: the gateway's memory and database growth per queued message, then the
/// time until every contact has them once the numbers are back.
async fn queued_cost(
    gw: &Gateway,
    world: &World,
    pairs: &[(&Instance, &str)],
    per_instance: usize,
    held: &mut HashMap<String, usize>,
) -> Value {
    let db = || used_bytes(world.data_dir().join("zapgate.db"));
    let (status, body) = world.wa.outage(3600).await.unwrap();
    assert_eq!(status, 200, "{body}");
    // Until the instances see the drop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss, bytes) = (Sample::of(gw.pid()).rss, db().await);
    let sent: Vec<Sent> = stream::iter(0..per_instance)
        .flat_map(|i| stream::iter(pairs.iter().map(move |p| (i, *p))))
        .map(|(i, (inst, contact))| send(gw, inst, contact, format!("queued while down {i}")))
        .buffer_unordered(CALLS)
        .collect()
        .await;
    let total = sent.len() as f64;
    let rss_per = Sample::of(gw.pid()).rss.saturating_sub(rss) as f64 * 1024.0 / total;
    let db_per = db().await.saturating_sub(bytes) as f64 / total;
    let (status, body) = world.wa.outage(0).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let back = Instant::now();
    arrivals(world, &sent, held).await;
    let drained = back.elapsed().as_secs_f64();
    println!(
        "queued: {total} messages while down, {rss_per:.0} B of gateway memory and {db_per:.0} B of database each; all delivered {drained:.1} s after WhatsApp came back"
    );
    json!({
        "messages": total,
        "gatewayRssBytesPerMessage": rss_per,
        "databaseBytesPerMessage": db_per,
        "drainSecs": drained,
    })
}

/// One Baileys device, linked to its own number, sends `count` texts to `contacts` in
/// turn, as many in flight as the bench's own calls: its rate, latency and CPU (Node's
/// process) per message, after a first text to each contact.
async fn baileys_sends(
    world: &World,
    contacts: &[String],
    count: usize,
    held: &mut HashMap<String, usize>,
) -> Value {
    const WAIT: Duration = Duration::from_secs(60);
    let mut node = baileys::Baileys::start(&world.sim.ws_url(), &world.dir.path().join("baileys"));
    let qr = node.wait_for("qr", WAIT).await["qr"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = world.wa.scan(&qr, Some("5511910000000")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    node.wait_for("open", WAIT).await;
    node.wait_for("history", WAIT).await;
    let jids = contacts
        .iter()
        .map(|c| format!("{c}@s.whatsapp.net"))
        .collect::<Vec<_>>()
        .join(",");
    let warm = baileys_burst(&mut node, contacts.len(), &jids).await;
    arrivals(world, &warm, held).await;
    let before = Sample::of(node.pid());
    let sent = baileys_burst(&mut node, count, &jids).await;
    let arrived = arrivals(world, &sent, held).await;
    let after = Sample::of(node.pid());
    let cpu_secs = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / 100.0;
    let per_sec = rate(&sent, &arrived);
    let latency = latencies(&sent, &arrived);
    println!(
        "Baileys: {count} messages from one device to {} contacts, {per_sec:.0}/s, {:.3} ms of Node's CPU each ({:.0} messages per CPU-second); latency {latency}",
        contacts.len(),
        cpu_secs * 1000.0 / count as f64,
        count as f64 / cpu_secs.max(0.001)
    );
    node.quit().await;
    json!({
        "messages": count,
        "perSec": per_sec,
        "cpuMsPerMessage": cpu_secs * 1000.0 / count as f64,
        "messagesPerCpuSec": count as f64 / cpu_secs.max(0.001),
        "latency": latency,
    })
}

/// Baileys sends `count` texts to `jids` (comma-separated) in turn; each as sent.
async fn baileys_burst(node: &mut baileys::Baileys, count: usize, jids: &str) -> Vec<Sent> {
    node.command(&format!("burst {count} {CALLS} {jids}"));
    let mut sent = Vec::new();
    loop {
        let event = node.next_event(Duration::from_secs(60)).await;
        match event["event"].as_str() {
            Some("sent") => sent.push(Sent {
                contact: event["to"].as_str().unwrap().replace("@s.whatsapp.net", ""),
                id: event["id"].as_str().unwrap().to_owned(),
                at_ms: event["at"].as_i64().unwrap(),
            }),
            Some("error") => panic!("Baileys could not send: {event}"),
            Some("burst") => return sent,
            _ => {}
        }
    }
}

/// The bytes of the database's pages in use (free pages left out), as a reader sees
/// the database now (what the write-ahead log holds included).
async fn used_bytes(path: std::path::PathBuf) -> u64 {
    use sqlx::Connection as _;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("the gateway's database opens");
    let used: i64 = sqlx::query_scalar(
        "SELECT (p.page_count - f.freelist_count) * s.page_size \
         FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s",
    )
    .fetch_one(&mut conn)
    .await
    .expect("SQLite says its size");
    used as u64
}
