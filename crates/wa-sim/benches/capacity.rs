//! How much load wa-sim carries: link N devices, log in a burst of stored sessions at
//! once, hold N logged-in connections, log them all in again, and report wa-sim's
//! memory and CPU (per link, per first login with the phone's Signal welcome, per
//! later login).
//!
//! `cargo bench -p wa-sim --bench capacity -- [--devices 2000] [--burst 1000] [--hold-secs 30]`
//!
//! wa-sim runs as its own process (the `wa-sim` binary) so its memory is measured alone.
//! The companions here are light: they drive the same wire protocol with the client
//! library's own handshake and pairing primitives (wacore), without the full client, so
//! thousands fit in this process.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wacore::companion_reg::CompanionWebClientType;
use wacore::framing::FrameDecoder;
use wacore::handshake::{IkHandshakeState, IkServerHelloOutcome, XxHandshakeState};
use wacore::noise::NoiseCipher;
use wacore::pair::{DeviceState, PairUtils};
use wacore::store::Device;
use wacore_binary::builder::NodeBuilder;
use wacore_binary::consts::WA_CONN_HEADER;
use wacore_binary::{Jid, Node, NodeContent};

struct Args {
    devices: usize,
    burst: usize,
    hold: Duration,
}

fn args() -> Args {
    let mut a = Args {
        devices: 2000,
        burst: 1000,
        hold: Duration::from_secs(30),
    };
    let argv: Vec<String> = std::env::args().collect();
    for pair in argv.windows(2) {
        let value = || pair[1].parse::<usize>().ok();
        match pair[0].as_str() {
            "--devices" => a.devices = value().unwrap_or(a.devices),
            "--burst" => a.burst = value().unwrap_or(a.burst),
            "--hold-secs" => a.hold = Duration::from_secs(value().unwrap_or(30) as u64),
            _ => {}
        }
    }
    a.burst = a.burst.min(a.devices);
    a
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args();
    let sim = SimProcess::start()?;
    let control = Control::new(&sim.base);
    control.wait_ready().await?;
    let rss_start = sim.rss_kib()?;

    // 1. Link every device (registration, QR scan by the phone, pair-device-sign, 515).
    let started = Instant::now();
    let cpu = sim.cpu_ticks()?;
    let linked = run_all(args.devices, 100, |i| {
        link(sim.ws_url(), control.clone(), i)
    })
    .await?;
    let link_secs = started.elapsed().as_secs_f64();
    let cpu_link = sim.cpu_ticks()? - cpu;
    let rss_idle = sim.rss_kib()?;

    // 2. A burst of stored sessions logging in at once (IK, as real clients resume).
    let linked = Arc::new(linked);
    let started = Instant::now();
    let cpu = sim.cpu_ticks()?;
    let burst = run_all(args.burst, args.burst, |i| {
        login(sim.ws_url(), linked[i].clone())
    })
    .await?;
    let burst_secs = started.elapsed().as_secs_f64();

    // 3. The rest, then hold them all with keepalive pings.
    let rest = run_all(args.devices - args.burst, 200, |i| {
        login(sim.ws_url(), linked[args.burst + i].clone())
    })
    .await?;
    // Each first login ends with the phone's welcome: two Signal messages, read here.
    let stats = control.stats().await?;
    let cpu_first_logins = sim.cpu_ticks()? - cpu;
    let connections = stats["connections"].as_u64().unwrap_or(0);
    let rss_held = sim.rss_kib()?;
    let cpu_before = sim.cpu_ticks()?;
    let dropped = Arc::new(AtomicUsize::new(0));
    let holders: Vec<_> = burst
        .into_iter()
        .chain(rest)
        .map(|wire| tokio::spawn(hold(wire, args.hold, dropped.clone())))
        .collect();
    let mut still_open = Vec::new();
    for h in holders {
        still_open.extend(h.await?);
    }
    let cpu_hold_secs = (sim.cpu_ticks()? - cpu_before) as f64 / 100.0;
    let after = control.stats().await?;
    drop(still_open);

    // 4. Every device logs in again: no welcome this time.
    control.wait_connections(0).await?;
    let cpu = sim.cpu_ticks()?;
    let again = run_all(args.devices, 200, |i| {
        login(sim.ws_url(), linked[i].clone())
    })
    .await?;
    let cpu_later_logins = sim.cpu_ticks()? - cpu;
    drop(again);
    let ms_each = |ticks: u64| ticks as f64 * 10.0 / args.devices.max(1) as f64;

    let per_conn = (rss_held.saturating_sub(rss_idle)) as f64 / args.devices.max(1) as f64;
    println!(
        "wa-sim capacity ({} devices, burst {}, hold {:?})",
        args.devices, args.burst, args.hold
    );
    println!(
        "  link {} devices by QR:          {link_secs:.1} s ({:.0}/s)",
        args.devices,
        args.devices as f64 / link_secs
    );
    println!(
        "  log in {} stored sessions at once: {burst_secs:.2} s",
        args.burst
    );
    println!("  connected and logged in:           {connections}");
    println!(
        "  dropped during the hold:           {}",
        dropped.load(Ordering::Relaxed)
    );
    println!(
        "  connected at the end of the hold:  {}",
        after["connections"]
    );
    println!(
        "  wa-sim CPU per link:               {:.2} ms",
        ms_each(cpu_link)
    );
    println!(
        "  wa-sim CPU per first login:        {:.2} ms (with the phone's Signal welcome, {} messages)",
        ms_each(cpu_first_logins),
        after["peerMessages"]
    );
    println!(
        "  wa-sim CPU per later login:        {:.2} ms",
        ms_each(cpu_later_logins)
    );
    println!("  wa-sim RSS: start {rss_start} KiB, idle {rss_idle} KiB, holding {rss_held} KiB");
    println!(
        "  wa-sim memory per linked device:   {:.1} KiB (idle, after linking)",
        rss_idle.saturating_sub(rss_start) as f64 / args.devices.max(1) as f64
    );
    println!("  wa-sim memory per connection:      {per_conn:.1} KiB");
    println!(
        "  wa-sim CPU during the hold:        {cpu_hold_secs:.2} s over {:?}",
        args.hold
    );
    println!(
        "  frames in/out: {}/{}",
        after["framesIn"], after["framesOut"]
    );
    if connections != args.devices as u64 || dropped.load(Ordering::Relaxed) > 0 {
        bail!("not every device stayed connected");
    }
    Ok(())
}

/// Runs `make(i)` for i in 0..n with at most `concurrency` at a time, in order.
async fn run_all<T, F, Fut>(n: usize, concurrency: usize, make: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let fut = make(i);
        tasks.push(tokio::spawn(async move {
            let out = fut.await;
            drop(permit);
            out
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

#[derive(Clone)]
struct Linked {
    device: Arc<Device>,
    server_static: [u8; 32],
}

async fn link(ws_url: String, control: Control, i: usize) -> Result<Linked> {
    let mut device = Device::new();
    let payload = waproto::codec::client_payload_to_vec(&device.get_client_payload());
    let (mut wire, outcome) = Wire::xx(&ws_url, &device, payload).await?;
    let phone = format!("55{:011}", 11_900_000_000u64 + i as u64);
    let mut scan = None;
    loop {
        let node = wire.recv().await?.context("closed while linking")?;
        if let Some(pd) = node.get_optional_child("pair-device") {
            wire.send(&PairUtils::build_ack_node(&node).context("ack")?)
                .await?;
            let first = pd
                .get_children_by_tag("ref")
                .next()
                .and_then(bytes)
                .context("no ref")?;
            let qr = PairUtils::make_qr_data(
                &state(&device),
                std::str::from_utf8(first)?,
                CompanionWebClientType::Chrome,
            );
            let (control, phone) = (control.clone(), phone.clone());
            scan = Some(tokio::spawn(async move { control.scan(&qr, &phone).await }));
        } else if let Some(ps) = node.get_optional_child("pair-success") {
            let identity = ps
                .get_optional_child("device-identity")
                .and_then(bytes)
                .context("identity")?;
            let (signed, key_index) = PairUtils::do_pair_crypto(&state(&device), identity)?;
            let id = attr(&node, "id");
            wire.send(&PairUtils::build_pair_success_response(
                &id, signed, key_index,
            ))
            .await?;
            let jid = ps
                .get_optional_child("device")
                .map(|d| attr(d, "jid"))
                .context("jid")?;
            device.pn = Some(jid.parse::<Jid>()?);
        } else if node.tag == "stream:error" && attr(&node, "code") == "515" {
            break;
        }
    }
    scan.context("never shown a QR")?.await??;
    Ok(Linked {
        device: Arc::new(device),
        server_static: outcome,
    })
}

async fn login(ws_url: String, linked: Linked) -> Result<Wire> {
    let payload = waproto::codec::client_payload_to_vec(&linked.device.get_client_payload());
    let mut wire = Wire::ik(&ws_url, &linked.device, linked.server_static, payload).await?;
    let first = wire.recv().await?.context("closed at login")?;
    if first.tag != "success" {
        bail!("login answered with <{}>", first.tag);
    }
    wire.send(&iq(
        "passive",
        "set",
        Some(NodeBuilder::new("active").build()),
    ))
    .await?;
    // The result, then <ib><offline/></ib>.
    for _ in 0..2 {
        wire.recv().await?.context("closed after login")?;
    }
    Ok(wire)
}

/// Keeps one session alive with pings until `hold` is over; `None` if it was dropped.
async fn hold(mut wire: Wire, hold: Duration, dropped: Arc<AtomicUsize>) -> Option<Wire> {
    let end = tokio::time::Instant::now() + hold;
    let mut next_ping = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            () = tokio::time::sleep_until(next_ping) => {
                next_ping += Duration::from_secs(20);
                if wire.send(&iq("w:p", "get", Some(NodeBuilder::new("ping").build()))).await.is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
            node = wire.recv() => match node {
                // The phone's welcome: acknowledged as a client does, so later logins
                // do without it.
                Ok(Some(node)) if node.tag == "message" => {
                    let receipt = NodeBuilder::new("receipt")
                        .attrs([
                            ("id", attr(&node, "id")),
                            ("to", attr(&node, "from")),
                            ("type", "peer_msg".to_owned()),
                        ])
                        .build();
                    if wire.send(&receipt).await.is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                }
                Ok(Some(_)) => {}
                _ => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
        }
    }
    Some(wire)
}

fn state(device: &Device) -> DeviceState {
    DeviceState {
        identity_key: device.identity_key.clone(),
        noise_key: device.noise_key.clone(),
        adv_secret_key: device.adv_secret_key,
    }
}

fn iq(xmlns: &'static str, kind: &'static str, child: Option<Node>) -> Node {
    use rand::RngExt as _;
    NodeBuilder::new("iq")
        .attrs([
            ("id", format!("b{:x}", rand::rng().random::<u64>())),
            ("xmlns", xmlns.to_owned()),
            ("type", kind.to_owned()),
            ("to", "s.whatsapp.net".to_owned()),
        ])
        .children(child)
        .build()
}

fn attr(node: &Node, key: &str) -> String {
    node.attrs
        .get(key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

fn bytes(node: &Node) -> Option<&[u8]> {
    match &node.content {
        Some(NodeContent::Bytes(b)) => Some(b),
        _ => None,
    }
}

/// One websocket after its Noise handshake.
struct Wire {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    frames: FrameDecoder,
    write: NoiseCipher,
    read: NoiseCipher,
    write_counter: u32,
    read_counter: u32,
}

impl Wire {
    async fn open(
        url: &str,
        hello: &[u8],
    ) -> Result<(
        WebSocketStream<MaybeTlsStream<TcpStream>>,
        FrameDecoder,
        Vec<u8>,
    )> {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        let framed = wacore::framing::encode_frame(hello, Some(&WA_CONN_HEADER))?;
        ws.send(Message::Binary(framed.into())).await?;
        let mut frames = FrameDecoder::new();
        let reply = next_frame(&mut ws, &mut frames).await?;
        Ok((ws, frames, reply))
    }

    async fn xx(url: &str, device: &Device, payload: Vec<u8>) -> Result<(Self, [u8; 32])> {
        let mut hs = XxHandshakeState::new(device.noise_key.clone(), payload, &WA_CONN_HEADER)?;
        let (mut ws, frames, reply) = Self::open(url, &hs.build_client_hello()?).await?;
        let finish = hs.read_server_hello_and_build_client_finish(&reply)?;
        ws.send(Message::Binary(
            wacore::framing::encode_frame(&finish, None)?.into(),
        ))
        .await?;
        let out = hs.finish()?;
        let server_static = out.server_cert_chain.leaf_key;
        Ok((
            Self::new(ws, frames, out.write_cipher, out.read_cipher),
            server_static,
        ))
    }

    async fn ik(
        url: &str,
        device: &Device,
        server_static: [u8; 32],
        payload: Vec<u8>,
    ) -> Result<Self> {
        let mut hs = IkHandshakeState::new(
            device.noise_key.clone(),
            server_static,
            payload,
            &WA_CONN_HEADER,
        )?;
        let (ws, frames, reply) = Self::open(url, &hs.build_client_hello()?).await?;
        match hs.read_server_hello(&reply)? {
            IkServerHelloOutcome::Continue(out) => {
                Ok(Self::new(ws, frames, out.write_cipher, out.read_cipher))
            }
            IkServerHelloOutcome::Fallback(_) => bail!("the service refused IK"),
        }
    }

    fn new(
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        frames: FrameDecoder,
        write: NoiseCipher,
        read: NoiseCipher,
    ) -> Self {
        Self {
            ws,
            frames,
            write,
            read,
            write_counter: 0,
            read_counter: 0,
        }
    }

    async fn send(&mut self, node: &Node) -> Result<()> {
        let plain = wacore_binary::marshal::marshal(node)?;
        let sealed = self
            .write
            .encrypt_with_counter(self.write_counter, &plain)?;
        self.write_counter += 1;
        let framed = wacore::framing::encode_frame(&sealed, None)?;
        self.ws.send(Message::Binary(framed.into())).await?;
        Ok(())
    }

    /// The next stanza, `None` once the service closed the socket.
    async fn recv(&mut self) -> Result<Option<Node>> {
        let mut frame = match next_frame(&mut self.ws, &mut self.frames).await {
            Ok(frame) => frame,
            Err(_) => return Ok(None),
        };
        self.read
            .decrypt_in_place_with_counter(self.read_counter, &mut frame)?;
        self.read_counter += 1;
        let unpacked = wacore_binary::util::unpack(&frame)?;
        Ok(Some(
            wacore_binary::marshal::unmarshal_ref(&unpacked)?.to_owned(),
        ))
    }
}

async fn next_frame(
    ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
    frames: &mut FrameDecoder,
) -> Result<Vec<u8>> {
    loop {
        if let Some(frame) = frames.decode_frame() {
            return Ok(frame.to_vec());
        }
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => frames.feed(&data),
            Some(Ok(Message::Close(_))) | None => bail!("closed"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

#[derive(Clone)]
struct Control {
    http: reqwest::Client,
    base: String,
}

impl Control {
    fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("{base}/control"),
        }
    }

    async fn wait_ready(&self) -> Result<()> {
        for _ in 0..100 {
            if self.stats().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("wa-sim did not start")
    }

    /// Waits until wa-sim counts `n` open connections.
    async fn wait_connections(&self, n: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.stats().await?["connections"].as_u64() != Some(n) {
            if Instant::now() > deadline {
                bail!("wa-sim never got to {n} connections");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}/stats", self.base))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn scan(&self, qr: &str, phone: &str) -> Result<()> {
        let response = self
            .http
            .post(format!("{}/scan", self.base))
            .json(&json!({ "qr": qr, "phone": phone }))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("scan refused: {}", response.text().await?);
        }
        Ok(())
    }
}

/// The `wa-sim` binary on a free loopback port.
struct SimProcess {
    child: Child,
    base: String,
}

impl SimProcess {
    fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_wa-sim"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting wa-sim")?;
        Ok(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    fn ws_url(&self) -> String {
        format!("{}/ws/chat", self.base.replace("http://", "ws://"))
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")
    }

    /// utime + stime, in clock ticks (100 per second on Linux).
    fn cpu_ticks(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let after_name = stat.rsplit_once(')').context("stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
