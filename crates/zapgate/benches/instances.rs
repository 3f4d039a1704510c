//! Memory per connected idle instance, and how fast a restarted gateway reconnects them.
//!
//! `cargo bench -p zapgate --bench instances -- [--instances 100]`
//!
//! Links N instances to an in-process wa-sim through the gateway binary (a sandbox build),
//! reads the gateway's resident memory before and after, then restarts the gateway and
//! times until every instance reports connected again.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, Gateway, World};
use reqwest::Method;
use serde_json::Value;

/// The start-up lines and warnings, not every instance's state changes.
const QUIET: &str = "warn,zapgate=info,zapgate::instance=warn";

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip_while(|a| a != "--instances")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let world = World::new().await;
    let gw = world.gateway_with(&[("RUST_LOG", QUIET)]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_empty = rss_kib(gw.pid());
    let pss_empty = pss_kib(gw.pid());
    let fds_empty = open_files(gw.pid());

    let started = Instant::now();
    let cpu = cpu_ticks(gw.pid());
    let mut instances = Vec::new();
    for i in 0..n {
        instances.push(gw.api.create_instance(&format!("bench {i}")).await);
    }
    let links = instances.iter().enumerate().map(|(i, inst)| {
        let (api, wa) = (&gw.api, &world.wa);
        async move {
            let (_, qr) = api.qr_code(inst).await;
            let qr = qr["value"].as_str().expect("a QR code").to_owned();
            let phone = format!("55119{:08}", 70_000_000 + i);
            let (status, body) = wa.scan(&qr, Some(&phone)).await.unwrap();
            assert_eq!(status, 200, "{body}");
        }
    });
    futures_util::future::join_all(links).await;
    wait_all_connected(&gw, n).await;
    let link_secs = started.elapsed().as_secs_f64();
    let link_cpu = cpu_ticks(gw.pid()) - cpu;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_linked = rss_kib(gw.pid());

    gw.stop().await;
    let started = Instant::now();
    let gw = world.gateway_with(&[("RUST_LOG", QUIET)]).await;
    wait_all_connected(&gw, n).await;
    let restart_secs = started.elapsed().as_secs_f64();
    let restart_cpu = cpu_ticks(gw.pid());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_restarted = rss_kib(gw.pid());
    let pss_restarted = pss_kib(gw.pid());
    let fds_restarted = open_files(gw.pid());

    println!("zapgate with {n} instances linked to wa-sim");
    println!("  link all {n} (QR, scan, connected):      {link_secs:.1} s");
    println!(
        "  gateway CPU while linking:             {:.2} s ({:.1} ms per link)",
        link_cpu as f64 / 100.0,
        link_cpu as f64 * 10.0 / n as f64
    );
    println!("  RSS with no instance:                  {rss_empty} KiB");
    println!("  RSS with {n} connected (after linking):  {rss_linked} KiB");
    println!("  RSS with {n} connected (after restart):  {rss_restarted} KiB");
    println!(
        "  PSS empty / after restart:             {pss_empty} / {pss_restarted} KiB ({:.0} KiB per instance)",
        (pss_restarted.saturating_sub(pss_empty)) as f64 / n as f64
    );
    println!(
        "  open files empty / after restart:      {fds_empty} / {fds_restarted} ({:.1} per instance)",
        (fds_restarted.saturating_sub(fds_empty)) as f64 / n as f64
    );
    println!(
        "  per connected idle instance:           {:.0} KiB (after linking), {:.0} KiB (after restart)",
        (rss_linked.saturating_sub(rss_empty)) as f64 / n as f64,
        (rss_restarted.saturating_sub(rss_empty)) as f64 / n as f64
    );
    println!("  restart until all {n} connected:        {restart_secs:.2} s");
    println!(
        "  gateway CPU from start to all connected: {:.2} s",
        restart_cpu as f64 / 100.0
    );
    gw.stop().await;
}

async fn wait_all_connected(gw: &Gateway, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut connected = 0;
        let mut page = 1;
        loop {
            let path = format!("/instances?page={page}&pageSize=100&query=bench");
            let (_, body) = gw.api.call(Method::GET, &path, None, Some(ADMIN)).await;
            let content = body["content"].as_array().cloned().unwrap_or_default();
            connected += content
                .iter()
                .filter(|i| i["whatsappConnected"] == Value::Bool(true))
                .count();
            if content.len() < 100 {
                break;
            }
            page += 1;
        }
        if connected == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {connected} of {n} connected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the gateway runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the gateway runs");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Proportional set size (shared pages split among their users), if the kernel says.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}
