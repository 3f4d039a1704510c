//! Many instances for the benches: created, linked by wa-sim's phone scanning each QR
//! code, and the gateway process sampled from /proc.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use reqwest::Method;
use serde_json::Value;

use super::common::{ADMIN, Gateway, Instance, World};

/// `n` instances named `prefix i`.
pub(crate) async fn create(gw: &Gateway, n: usize, prefix: &str) -> Vec<Instance> {
    stream::iter(0..n)
        .map(|i| {
            let api = &gw.api;
            async move { api.create_instance(&format!("{prefix} {i}")).await }
        })
        .buffered(16)
        .collect()
        .await
}

/// Links each instance to the number `country_area` followed by `first + i` (8 digits),
/// `concurrency` at a time; returns once all are connected.
pub(crate) async fn link(
    gw: &Gateway,
    world: &World,
    instances: &[Instance],
    country_area: &str,
    first: usize,
    concurrency: usize,
) {
    stream::iter(instances.iter().enumerate())
        .for_each_concurrent(concurrency, |(i, inst)| {
            let (api, wa) = (&gw.api, &world.wa);
            async move {
                let (status, qr) = api.qr_code(inst).await;
                assert_eq!(status, 200, "{qr}");
                let qr = qr["value"].as_str().expect("a QR code");
                let phone = number(country_area, first, i);
                let (status, body) = wa.scan(qr, Some(&phone)).await.unwrap();
                assert_eq!(status, 200, "{body}");
                api.wait_connected(inst).await;
            }
        })
        .await;
}

/// The number `link` gives the `i`th instance.
pub(crate) fn number(country_area: &str, first: usize, i: usize) -> String {
    format!("{country_area}{:08}", first + i)
}

/// A process's memory and CPU, read from /proc.
#[derive(Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) rss: u64,
    pub(crate) pss: u64,
    pub(crate) cpu_ticks: u64,
    pub(crate) fds: usize,
}

impl Sample {
    pub(crate) fn of(pid: u32) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("it runs");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        Self {
            rss: super::procfs::status_kib(pid, "VmRSS:"),
            pss: std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .map_or(0, |t| super::procfs::kib_field(&t, "Pss:")),
            // utime + stime, in clock ticks (100 per second)
            cpu_ticks: fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap(),
            fds: super::procfs::open_files(pid),
        }
    }

    /// KiB per session of what this sample holds over `base`.
    pub(crate) fn per(&self, base: &Sample, n: usize) -> (f64, f64) {
        (
            self.rss.saturating_sub(base.rss) as f64 / n as f64,
            self.pss.saturating_sub(base.pss) as f64 / n as f64,
        )
    }
}

/// Waits until `n` instances named `prefix ...` are connected.
pub(crate) async fn wait_all_connected(gw: &Gateway, n: usize, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut connected = 0;
        let mut page = 1;
        loop {
            let path = format!("/instances?page={page}&pageSize=100&query={prefix}");
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
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
