//! Many connected numbers on one box: what each costs the gateway, how fast they link
//! and come back after a restart, how the HTTP API holds up meanwhile, and the same
//! numbers held by Baileys in one Node process against the same wa-sim.
//!
//! `cargo bench -p zapgate --bench instances -- [--instances 100] [--idle-secs 120]
//!  [--link-concurrency 32] [--baileys N (default: instances up to 1,000, none past it)]
//!  [--http-secs 10] [--env K=V ...]`
//!
//! wa-sim runs in this process; the gateway (a release sandbox build) and Baileys run as
//! their own processes, measured from /proc. `scripts/bench-instances` runs it for
//! several sizes and prints the README's table. Prints its figures, and a last line
//! `RESULT {json}` for that script.

#[path = "support/args.rs"]
mod args;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/procfs.rs"]
mod procfs;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Gateway, Instance, World};
use fleet::Sample;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use wa_sim::Control;

/// The start-up lines and warnings, not every instance's state changes.
const QUIET: &str = "warn,zapgate=info,zapgate::instance=warn";

struct Args {
    instances: usize,
    idle_secs: u64,
    link_concurrency: usize,
    baileys: usize,
    http_secs: u64,
    /// `--env K=V`, repeatable: set for the gateway (allocator settings, say).
    env: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Self {
        let args = args::CommandLine::read();
        let instances = args.number("--instances", 100) as usize;
        Self {
            instances,
            idle_secs: args.number("--idle-secs", 120),
            link_concurrency: args.number("--link-concurrency", 32) as usize,
            // Past 1,000, Baileys would take longer to link than the rest of the run.
            baileys: args.number(
                "--baileys",
                if instances <= 1000 {
                    instances as u64
                } else {
                    0
                },
            ) as usize,
            http_secs: args.number("--http-secs", 10),
            env: args.env(),
        }
    }
}

/// The most open files a process held while this lives, sampled every 50 ms.
struct PeakFds {
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakFds {
    fn watch(pid: u32) -> Self {
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = most.clone();
        let task = tokio::spawn(async move {
            loop {
                seen.fetch_max(
                    procfs::open_files(pid),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { most, task }
    }

    fn stop(self) -> usize {
        self.task.abort();
        self.most.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// CPU seconds per minute per 1,000 sessions between two samples `secs` apart.
fn idle_cpu(from: &Sample, to: &Sample, secs: u64, n: usize) -> f64 {
    let cpu = to.cpu_ticks.saturating_sub(from.cpu_ticks) as f64 / 100.0;
    cpu * 60.0 / secs as f64 * 1000.0 / n as f64
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let n = args.instances;
    let world = World::new().await;
    let mut result = json!({ "instances": n, "machine": machine() });
    // wrk's 256 connections and the bench's own come from one address (loopback), as
    // through a reverse proxy: room for all of them.
    let mut env: Vec<(&str, &str)> = vec![
        ("RUST_LOG", QUIET),
        ("ZAPGATE_MAX_CONNECTIONS_PER_ADDRESS", "1024"),
    ];
    env.extend(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));

    // The gateway, empty.
    let gw = world.gateway_with(&env).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty = Sample::of(gw.pid());

    // Link every instance: its QR code through the API, scanned by wa-sim's phone.
    let instances = fleet::create(&gw, n, "bench").await;
    world.wa.reset_peaks().await.unwrap();
    let fds_linking = PeakFds::watch(gw.pid());
    let started = Instant::now();
    fleet::link(
        &gw,
        &world,
        &instances,
        "55119",
        70_000_000,
        args.link_concurrency,
    )
    .await;
    fleet::wait_all_connected(&gw, n, "bench").await;
    let link_secs = started.elapsed().as_secs_f64();
    let link_peak = world.wa.stats().await.unwrap()["peakAdmitting"].clone();
    let link_fds = fds_linking.stop();
    let after_link = Sample::of(gw.pid());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let linked = Sample::of(gw.pid());
    println!(
        "gateway: linked {n} in {link_secs:.1} s ({:.1} ms of gateway CPU per link), {} admitting at wa-sim at most",
        (after_link.cpu_ticks - empty.cpu_ticks) as f64 * 10.0 / n as f64,
        link_peak
    );

    // Idle, connected.
    let logins = world.stat("logins").await;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle = Sample::of(gw.pid());
    let dropped = world.stat("logins").await - logins;
    println!(
        "gateway: {} s idle, {:.2} CPU s per minute per 1,000, {dropped} logins again",
        args.idle_secs,
        idle_cpu(&linked, &idle, args.idle_secs, n)
    );

    // The HTTP API under load, while the sessions stay connected.
    let http = http_load(&gw, &world, &instances, args.http_secs).await;

    // A restart: every stored session logs in again, `restore-concurrency` at a time.
    gw.stop().await;
    world.wa.reset_peaks().await.unwrap();
    let started = Instant::now();
    let gw = world.gateway_with(&env).await;
    let fds_restarting = PeakFds::watch(gw.pid());
    fleet::wait_all_connected(&gw, n, "bench").await;
    let restart_secs = started.elapsed().as_secs_f64();
    let restart_fds = fds_restarting.stop();
    let restart_cpu = Sample::of(gw.pid()).cpu_ticks as f64 / 100.0;
    let restart_peak = world.wa.stats().await.unwrap()["peakAdmitting"].clone();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restarted = Sample::of(gw.pid());
    println!(
        "gateway: restarted, all {n} connected in {restart_secs:.2} s ({restart_cpu:.2} CPU s), {restart_peak} admitting at wa-sim at most"
    );
    gw.stop().await;

    let (linked_rss, linked_pss) = linked.per(&empty, n);
    let (idle_rss, idle_pss) = idle.per(&empty, n);
    let (restarted_rss, restarted_pss) = restarted.per(&empty, n);
    result["gateway"] = json!({
        "emptyRssKib": empty.rss,
        "emptyPssKib": empty.pss,
        "linkedRssKib": linked.rss,
        "idleRssKib": idle.rss,
        "restartedRssKib": restarted.rss,
        "restartedPssKib": restarted.pss,
        "perInstanceKib": {
            "linked": [linked_rss, linked_pss],
            "idle": [idle_rss, idle_pss],
            "restarted": [restarted_rss, restarted_pss],
        },
        "linkSecs": link_secs,
        "linkCpuMsPerLink": (after_link.cpu_ticks - empty.cpu_ticks) as f64 * 10.0 / n as f64,
        "linkPeakAdmitting": link_peak,
        "restartSecs": restart_secs,
        "restartCpuSecs": restart_cpu,
        "restartPeakAdmitting": restart_peak,
        "idleCpuSecsPerMinPer1000": idle_cpu(&linked, &idle, args.idle_secs, n),
        "loginsWhileIdle": dropped,
        "openFilesPerInstance": (restarted.fds.saturating_sub(empty.fds)) as f64 / n as f64,
        "openFilesEmpty": empty.fds,
        "openFilesRestarted": restarted.fds,
        "openFilesMostLinking": link_fds,
        "openFilesMostRestarting": restart_fds,
        "idleSecs": args.idle_secs,
        "http": http,
    });
    println!("gateway: {}", result["gateway"]);

    if args.baileys > 0 {
        result["baileys"] =
            baileys(&world, args.baileys, args.idle_secs, args.link_concurrency).await;
        println!("baileys: {}", result["baileys"]);
    }
    println!("RESULT {result}");
}

/// `wrk` on `/status` and `/qr-code` (answered "already connected") at 64 and 256
/// connections, each request for the next instance in turn (`httpErrors`: answers of
/// 400 and over). Also checks that no
/// session at wa-sim dropped meanwhile.
async fn http_load(gw: &Gateway, world: &World, instances: &[Instance], secs: u64) -> Value {
    if secs == 0 {
        return Value::Null;
    }
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("http: wrk is not installed (apt-get install wrk); skipped");
        return Value::Null;
    }
    let dir = tempfile::tempdir().unwrap();
    let logins = world.stat("logins").await;
    let mut runs = Vec::new();
    for route in ["status", "qr-code"] {
        let script = dir.path().join(format!("{route}.lua"));
        std::fs::write(&script, wrk_script(instances, route)).unwrap();
        for connections in [64, 256] {
            let out = tokio::process::Command::new("wrk")
                .args(["-t2", &format!("-c{connections}"), &format!("-d{secs}s")])
                .arg("-s")
                .arg(&script)
                .arg(&gw.api.base)
                .output()
                .await
                .expect("wrk runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("RESULT "))
                .unwrap_or_else(|| panic!("wrk printed no result: {text}"));
            let mut run: Value = serde_json::from_str(line).unwrap();
            run["route"] = json!(route);
            run["connections"] = json!(connections);
            println!("http: {run}");
            runs.push(run);
        }
    }
    let stats = world.wa.stats().await.unwrap();
    json!({
        "runs": runs,
        "loginsDuringLoad": world.stat("logins").await - logins,
        "connectionsAfter": stats["connections"],
    })
}

fn wrk_script(instances: &[Instance], route: &str) -> String {
    let paths: Vec<String> = instances
        .iter()
        .map(|i| format!("\"/instances/{}/token/{}/{route}\"", i.id, i.token))
        .collect();
    format!(
        r#"local paths = {{ {} }}
local threads = 0
setup = function(thread)
  thread:set("i", threads * 7919)
  threads = threads + 1
end
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {{"requests":%d,"perSecond":%.0f,"p50Ms":%.3f,"p99Ms":%.3f,"httpErrors":%d,"socketErrors":%d}}\n',
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
"#,
        paths.join(",")
    )
}

/// `hold.mjs`: Baileys holding sessions in one Node process.
struct Node {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pid: u32,
}

impl Node {
    fn spawn(world: &World, auth: &Path, n: usize, concurrency: usize) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wa-sim/baileys");
        if !dir.join("node_modules/.package-lock.json").exists() {
            let ok = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "npm ci in {} failed", dir.display());
        }
        let mut child = tokio::process::Command::new("node")
            .arg("--expose-gc")
            .arg("hold.mjs")
            .arg("--url")
            .arg(world.sim.ws_url())
            .arg("--auth")
            .arg(auth)
            .args([
                "--sessions",
                &n.to_string(),
                "--linking",
                &concurrency.to_string(),
            ])
            .current_dir(&dir)
            // Its log says "stream errored out" at error level after every pairing.
            .env("BAILEYS_LOG_LEVEL", "fatal")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        Self {
            pid: child.id().unwrap(),
            stdin: child.stdin.take().unwrap(),
            lines: BufReader::new(child.stdout.take().unwrap()).lines(),
            child,
        }
    }

    /// The next event it prints; None once it ended or printed nothing for 120 s.
    async fn next(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .ok()?
            .ok()??;
        Some(serde_json::from_str(&line).unwrap_or_else(|_| json!({ "printed": line })))
    }

    async fn send(&mut self, command: &str) {
        let _ = self
            .stdin
            .write_all(format!("{command}\n").as_bytes())
            .await;
    }

    /// How it ended, after `next` said it did.
    async fn ended(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => format!("Node ended ({status})"),
            _ => {
                let _ = self.child.kill().await;
                "Node printed nothing for 120 s".to_owned()
            }
        }
    }
}

/// The same number of sessions held by Baileys in one Node process, linked the same
/// way (each QR code scanned by wa-sim's phone), measured the same way. A Node that
/// ends (out of memory, as a rule) is recorded and started again, as a supervisor
/// would: sessions it had linked log in from their stored credentials, the others link.
async fn baileys(world: &World, n: usize, idle_secs: u64, concurrency: usize) -> Value {
    const STARTS: usize = 8;
    let auth = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut ends = Vec::new();
    let mut scans = tokio::task::JoinSet::new();
    let (mut node, empty) = 'held: loop {
        let mut node = Node::spawn(world, auth.path(), n, concurrency);
        // Node with Baileys loaded, before any socket opens.
        while node.next().await.expect("Baileys loads")["event"] != "ready" {}
        let empty = Sample::of(node.pid);
        node.send("start").await;
        let mut open = 0;
        // The most it held, sampled at each line it printed.
        let mut peak = empty;
        while open < n {
            let Some(event) = node.next().await else {
                let how = node.ended().await;
                println!(
                    "baileys: {how} with {open} of {n} sessions open, {} MiB at most",
                    peak.rss / 1024
                );
                ends.push(json!({ "how": how, "open": open, "peakRssKib": peak.rss }));
                if ends.len() == STARTS {
                    return json!({ "sessions": n, "ends": ends, "gaveUp": true });
                }
                continue 'held;
            };
            let now = Sample::of(node.pid);
            if now.rss > peak.rss {
                peak = now;
            }
            match event["event"].as_str() {
                Some("qr") => {
                    let session = event["session"].as_u64().unwrap();
                    let qr = event["qr"].as_str().unwrap().to_owned();
                    let wa = Control::new(world.sim.control_url());
                    scans.spawn(async move {
                        let phone = format!("55119{:08}", 80_000_000 + session);
                        wa.scan(&qr, Some(&phone))
                            .await
                            .map_or(0, |(status, _)| status)
                    });
                }
                Some("open") => open = event["open"].as_u64().unwrap() as usize,
                _ => {}
            }
        }
        break (node, empty);
    };
    let link_secs = started.elapsed().as_secs_f64();
    // A code replaced before its scan arrived is refused, and the next one scanned.
    let mut refused_scans = 0;
    while let Some(scan) = scans.join_next().await {
        if scan.unwrap() != 200 {
            refused_scans += 1;
        }
    }
    let after_link = Sample::of(node.pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let linked = Sample::of(node.pid);
    println!(
        "baileys: all {n} open after {link_secs:.1} s and {} restarts of Node",
        ends.len()
    );
    let logins = world.stat("logins").await;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle = Sample::of(node.pid);
    let relogins = world.stat("logins").await - logins;
    // What V8 says it holds: the JavaScript heap and the buffers outside it.
    node.send("memory").await;
    let usage = loop {
        match node.next().await {
            Some(event) if event["event"] == "memory" => break event,
            Some(_) => {}
            None => break Value::Null,
        }
    };
    node.send("quit").await;
    let _ = tokio::time::timeout(Duration::from_secs(60), node.child.wait()).await;
    let (linked_rss, linked_pss) = linked.per(&empty, n);
    let (idle_rss, idle_pss) = idle.per(&empty, n);
    json!({
        "sessions": n,
        "ends": ends,
        "emptyRssKib": empty.rss,
        "linkedRssKib": linked.rss,
        "idleRssKib": idle.rss,
        "idlePssKib": idle.pss,
        "perSessionKib": { "linked": [linked_rss, linked_pss], "idle": [idle_rss, idle_pss] },
        "linkSecs": link_secs,
        // Only meaningful when Node never ended: CPU of the last Node from its start.
        "linkCpuMsPerLink": if ends.is_empty() {
            json!((after_link.cpu_ticks - empty.cpu_ticks) as f64 * 10.0 / n as f64)
        } else {
            Value::Null
        },
        "idleCpuSecsPerMinPer1000": idle_cpu(&linked, &idle, idle_secs, n),
        "loginsWhileIdle": relogins,
        "refusedScans": refused_scans,
        "v8Kib": usage,
        "openFiles": idle.fds,
    })
}

/// What the figures were measured on.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "model": model,
        "memKib": procfs::kib_field(&meminfo, "MemTotal:"),
    })
}
