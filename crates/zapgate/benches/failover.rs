//! Several gateway nodes on one PostgreSQL: what sharing costs at rest, how long the
//! numbers of a killed node take to be connected on the others, and how long a drain
//! (SIGTERM) takes to move a node's numbers.
//!
//! `cargo bench -p zapgate --bench failover -- [--per-node 1000] [--nodes 3]
//!  [--lease-secs 10] [--idle-secs 30] [--link-concurrency 32]`
//!
//! wa-sim runs in this process; the gateways (release sandbox builds) are processes of
//! their own, on a throwaway PostgreSQL (fsync off) unless `ZAPGATE_TEST_DATABASE_URL`
//! names a server. Prints its figures, and a last line `RESULT {json}`.

#[path = "support/args.rs"]
mod args;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/procfs.rs"]
mod procfs;

use std::time::{Duration, Instant};

use common::{Gateway, Instance, World, pg};
use futures_util::{StreamExt as _, stream};
use serde_json::{Value, json};
use sqlx::PgPool;

/// The start-up lines and warnings, not every instance's state changes.
const QUIET: &str = "warn,zapgate=info,zapgate::instance=warn";

struct Args {
    per_node: usize,
    nodes: usize,
    lease_secs: u64,
    idle_secs: u64,
    link_concurrency: usize,
    /// `--env K=V`, repeatable: set for every node.
    env: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Self {
        let args = args::CommandLine::read();
        Self {
            per_node: args.number("--per-node", 1000) as usize,
            nodes: args.number("--nodes", 3).max(3) as usize,
            lease_secs: args.number("--lease-secs", 10),
            idle_secs: args.number("--idle-secs", 30),
            link_concurrency: args.number("--link-concurrency", 32) as usize,
            env: args.env(),
        }
    }
}

async fn node(world: &World, url: &str, name: &str, args: &Args) -> Gateway {
    let lease = args.lease_secs.to_string();
    let mut env = vec![
        ("ZAPGATE_DATABASE_URL", url),
        ("ZAPGATE_NODE_NAME", name),
        ("ZAPGATE_LEASE_SECS", &lease),
        ("RUST_LOG", QUIET),
        ("ZAPGATE_MAX_CONNECTIONS_PER_ADDRESS", "1024"),
    ];
    env.extend(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Gateway::start(&world.sim.ws_url(), &world.dir.path().join(name), &env).await
}

/// Asks `/status` of each instance through `gw` (32 at a time) until every one says
/// connected; the seconds it took, and how many answers were 503 (moving) meanwhile.
async fn until_connected(gw: &Gateway, instances: &[Instance], within: Duration) -> (f64, u64) {
    let started = Instant::now();
    let mut pending: Vec<&Instance> = instances.iter().collect();
    let mut moving = 0;
    while !pending.is_empty() {
        let answers: Vec<(u16, Value)> = stream::iter(&pending)
            .map(|inst| gw.api.instance_get(inst, "status"))
            .buffered(32)
            .collect()
            .await;
        let mut still = Vec::new();
        for (inst, (code, body)) in pending.into_iter().zip(answers) {
            moving += u64::from(code == 503);
            if !(code == 200 && body["connected"] == json!(true)) {
                still.push(inst);
            }
        }
        pending = still;
        assert!(
            started.elapsed() < within,
            "{} not connected after {within:?}",
            pending.len()
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (started.elapsed().as_secs_f64(), moving)
}

async fn commits(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// The instances of `all` node `name` holds now.
async fn held_by(db: &PgPool, all: &[Instance], name: &str) -> Vec<Instance> {
    let held: std::collections::HashSet<String> = sqlx::query_scalar(
        "SELECT l.instance FROM zg_lease l JOIN zg_node n ON n.id = l.node WHERE n.name = $1",
    )
    .bind(name)
    .fetch_all(db)
    .await
    .unwrap()
    .into_iter()
    .collect();
    all.iter()
        .filter(|i| held.contains(&i.id))
        .cloned()
        .collect()
}

async fn shares(db: &PgPool) -> Value {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT n.name, count(l.instance) FROM zg_node n LEFT JOIN zg_lease l ON l.node = n.id \
         WHERE n.expires_at > clock_timestamp() GROUP BY n.name ORDER BY n.name",
    )
    .fetch_all(db)
    .await
    .unwrap();
    json!(
        rows.into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (k, per) = (args.nodes, args.per_node);
    let total = k * per;
    let url = pg::database().await;
    let world = World::new().await;
    let mut nodes = Vec::new();
    for i in 0..k {
        nodes.push(node(&world, &url, &format!("n{i}"), &args).await);
    }
    let db = PgPool::connect(&url).await.unwrap();
    println!(
        "{k} nodes on one PostgreSQL ({}), lease {} s, {per} numbers each",
        if std::env::var("ZAPGATE_TEST_DATABASE_URL").is_ok() {
            "the server of ZAPGATE_TEST_DATABASE_URL"
        } else {
            "a throwaway server, fsync off"
        },
        args.lease_secs
    );

    // Each node creates and links its numbers (the others may serve their calls too).
    let started = Instant::now();
    // Created on every node at once, so the shares stay near even; a number linked
    // while a node hands some over may be asked again (503, Retry-After).
    let fleets: Vec<Vec<Instance>> = futures_util::future::join_all(
        nodes
            .iter()
            .enumerate()
            .map(|(i, gw)| async move { fleet::create(gw, per, &format!("n{i}")).await }),
    )
    .await;
    let all: Vec<Instance> = fleets.concat();
    stream::iter(all.iter().enumerate())
        .for_each_concurrent(args.link_concurrency, |(i, inst)| {
            let (gw, wa) = (&nodes[i % k], &world.wa);
            async move {
                let qr = loop {
                    let (status, qr) = gw.api.qr_code(inst).await;
                    if status == 200 {
                        break qr;
                    }
                    assert_eq!(status, 503, "{qr}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                };
                let qr = qr["value"].as_str().expect("a QR code");
                let phone = fleet::number("55119", 70_000_000, i);
                let (status, body) = wa.scan(qr, Some(&phone)).await.unwrap();
                assert_eq!(status, 200, "{body}");
                until_connected(gw, std::slice::from_ref(inst), Duration::from_secs(120)).await;
            }
        })
        .await;
    let link_secs = started.elapsed().as_secs_f64();
    println!(
        "linked {total} in {link_secs:.1} s; shares {}",
        shares(&db).await
    );

    // At rest once the shares are even (a node creating its numbers held them all
    // and handed some over): what keeping the leases costs the database and the nodes.
    let target = total.div_ceil(k) as i64;
    let even = Instant::now();
    loop {
        let now = shares(&db).await;
        let most = now
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_i64)
            .max();
        if most.is_some_and(|most| most <= target + (target / 50).max(1)) {
            break;
        }
        assert!(
            even.elapsed() < Duration::from_secs(600),
            "never even: {now}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    until_connected(&nodes[0], &all, Duration::from_secs(300)).await;
    println!(
        "shares even {:.1} s after the last link: {}",
        even.elapsed().as_secs_f64(),
        shares(&db).await
    );
    let (commits_before, cpu_before) = (
        commits(&db).await,
        nodes
            .iter()
            .map(|n| fleet::Sample::of(n.pid()))
            .collect::<Vec<_>>(),
    );
    let logins_before = world.stat("logins").await;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let commits_per_sec = (commits(&db).await - commits_before) as f64 / args.idle_secs as f64;
    let idle_cpu: Vec<f64> = nodes
        .iter()
        .zip(&cpu_before)
        .map(|(n, before)| {
            (fleet::Sample::of(n.pid()).cpu_ticks - before.cpu_ticks) as f64 / 100.0 * 60.0
                / args.idle_secs as f64
        })
        .collect();
    let idle_logins = world.stat("logins").await - logins_before;
    println!(
        "at rest: {commits_per_sec:.0} commits/s on PostgreSQL, CPU s per minute per node {idle_cpu:.2?}, {idle_logins} logins again"
    );

    // A node killed: its numbers come back on the others once its lease lapsed.
    let replaced_before = world.stat("replacedLogins").await;
    let lost = held_by(&db, &all, "n0").await;
    let mut nodes = nodes.into_iter();
    let killed_node = nodes.next().unwrap();
    let killed = Instant::now();
    killed_node.kill().await;
    let survivors: Vec<Gateway> = nodes.collect();
    let (kill_secs, kill_moving) = until_connected(
        &survivors[0],
        &lost,
        Duration::from_secs(args.lease_secs + 300),
    )
    .await;
    let kill_secs = kill_secs.max(killed.elapsed().as_secs_f64());
    let kill_replaced = world.stat("replacedLogins").await - replaced_before;
    // How the survivors' renewals fared under the restore storm (the longest since
    // they joined; a node fences itself at 60% of the lease).
    let mut renewal_max = 0.0f64;
    let mut renewal_failures = 0.0;
    for gw in &survivors {
        renewal_max = renewal_max.max(gw.api.metric("zapgate_lease_renewal_max_seconds").await);
        renewal_failures += gw.api.metric("zapgate_lease_renewal_failures").await;
    }
    println!(
        "kill -9 of a node: its {} numbers connected on the others in {kill_secs:.1} s (lease {} s; {kill_moving} answers 503 meanwhile), {kill_replaced} replaced logins; shares {}",
        lost.len(),
        args.lease_secs,
        shares(&db).await
    );
    println!(
        "the survivors' lease renewals: longest round trip {:.0} ms since they joined (they fence at {:.1} s), {renewal_failures} failed",
        renewal_max * 1000.0,
        args.lease_secs as f64 * 0.6
    );

    // A node drained (SIGTERM): it stops its numbers and leaves; no lease to wait out.
    let mut survivors = survivors.into_iter();
    let drained_node = survivors.next().unwrap();
    let last = survivors.next().unwrap();
    let moved = held_by(&db, &all, "n1").await;
    let drained = Instant::now();
    drained_node.stop().await;
    let stop_secs = drained.elapsed().as_secs_f64();
    let (drain_secs, drain_moving) = until_connected(&last, &moved, Duration::from_secs(300)).await;
    let drain_secs = drain_secs + stop_secs;
    let drain_replaced = world.stat("replacedLogins").await - replaced_before - kill_replaced;
    println!(
        "SIGTERM of a node: its {} numbers connected on the others in {drain_secs:.1} s (the node took {stop_secs:.1} s to stop; {drain_moving} answers 503 meanwhile), {drain_replaced} replaced logins",
        moved.len()
    );
    let (everything, _) = until_connected(&last, &all, Duration::from_secs(60)).await;
    println!("then all {total} connected, checked in {everything:.1} s");
    for gw in survivors.chain([last]) {
        gw.stop().await;
    }
    let result = json!({
        "nodes": k, "perNode": per, "leaseSecs": args.lease_secs,
        "linkSecs": link_secs,
        "idle": { "commitsPerSec": commits_per_sec, "cpuSecsPerMinute": idle_cpu, "loginsAgain": idle_logins },
        "kill": { "instances": lost.len(), "secs": kill_secs, "renewalMaxSecs": renewal_max, "renewalFailures": renewal_failures, "moving503": kill_moving, "replacedLogins": kill_replaced },
        "drain": { "instances": moved.len(), "secs": drain_secs, "stopSecs": stop_secs, "moving503": drain_moving, "replacedLogins": drain_replaced },
    });
    println!("RESULT {result}");
}
