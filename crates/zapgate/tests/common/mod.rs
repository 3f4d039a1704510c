//! Runs the real `zapgate` binary (a sandbox build) against an in-process wa-sim, and
//! calls both over real HTTP. Helpers are named after the routes they call.

#![allow(dead_code, unreachable_pub)]

pub mod browser;
pub mod pg;
pub mod receiver;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use wa_sim::{Config as SimConfig, Control, WaSim};

pub const ADMIN: &str = "test-admin-token";
/// Not a variable: in a gateway's `env`, the open-file limit to run it under.
pub const NOFILE: &str = "(nofile)";
pub const VERSION: &str = "2.3000.1030000000";
/// Linking takes about a second on loopback; leave room for a loaded machine.
pub const CONNECT_WAIT: Duration = Duration::from_secs(45);

pub struct World {
    pub sim: WaSim,
    pub wa: Control,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn new() -> Self {
        Self::with_sim(SimConfig::default()).await
    }

    pub async fn with_sim(config: SimConfig) -> Self {
        let sim = WaSim::start(config).await.expect("wa-sim starts");
        Self {
            wa: Control::new(sim.control_url()),
            sim,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn gateway(&self) -> Gateway {
        Gateway::start(&self.sim.ws_url(), &self.data_dir(), &[]).await
    }

    pub async fn gateway_with(&self, env: &[(&str, &str)]) -> Gateway {
        Gateway::start(&self.sim.ws_url(), &self.data_dir(), env).await
    }

    /// A gateway on this world that must refuse to start; what it printed.
    pub async fn refused_gateway(&self, env: &[(&str, &str)], unset: &[&str]) -> String {
        Gateway::refused(&self.sim.ws_url(), &self.data_dir(), env, unset).await
    }

    /// The names the sessions database keeps the instance's sessions under: its id for
    /// its own, `set-aside/<id>/<ms>` for each set aside.
    pub async fn sessions_of(&self, i: &Instance) -> Vec<String> {
        let path = self.data_dir().join("sessions.db");
        if !path.exists() {
            return Vec::new();
        }
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true);
        let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT instance FROM session WHERE instance = ?1 OR instance LIKE 'set-aside/' || ?1 || '/%' ORDER BY id",
        )
        .bind(&i.id)
        .fetch_all(&mut db)
        .await
        .unwrap()
    }

    /// Whether the instance has a session of its own in the sessions database.
    pub async fn has_session(&self, i: &Instance) -> bool {
        self.sessions_of(i).await.contains(&i.id)
    }

    /// Waits (5 s at most) for the instance's session to be wiped: after the phone
    /// unlinks, the wipe runs beside the instance's task, just after its state changed.
    pub async fn session_wiped(&self, i: &Instance) {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.has_session(i).await {
            assert!(tokio::time::Instant::now() < until, "the session was kept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// wa-sim's counter `name` now.
    pub async fn stat(&self, name: &str) -> u64 {
        let stats = self.wa.stats().await.unwrap();
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}: {stats}"))
    }

    /// A new instance linked to `phone` by scanning its QR code, up to connected.
    pub async fn linked_instance(&self, gw: &Gateway, name: &str, phone: &str) -> Instance {
        let inst = gw.api.create_instance(name).await;
        self.wa_link(gw, &inst, phone).await;
        inst
    }

    /// A number linked on a first gateway, then taken over by a second gateway on a
    /// copy of its data (one data directory takes one gateway; a copy, as a backup
    /// restored elsewhere, logs in the same device): the first needs restoring, the
    /// second is connected.
    pub async fn taken_over(&self, name: &str, phone: &str) -> (Gateway, Gateway, Instance) {
        let first = self.gateway().await;
        let inst = self.linked_instance(&first, name, phone).await;
        let copy = self.dir.path().join("copy");
        copy_data(&self.data_dir(), &copy).await;
        let second = Gateway::start(&self.sim.ws_url(), &copy, &[]).await;
        second.api.wait_connected(&inst).await;
        first
            .api
            .wait_status(&inst, "replaced", |s| *s == restore_needed())
            .await;
        (first, second, inst)
    }

    /// The phone scans the instance's QR code; waits until the instance is connected.
    pub async fn wa_link(&self, gw: &Gateway, inst: &Instance, phone: &str) {
        let (status, qr) = gw.api.qr_code(inst).await;
        assert_eq!(status, 200, "{qr}");
        self.phone_scans(&qr, phone).await;
        gw.api.wait_connected(inst).await;
    }

    /// `phone` scans the code of a `{"value"}` answer; wa-sim must accept it.
    pub async fn phone_scans(&self, qr: &Value, phone: &str) {
        let qr = qr["value"].as_str().expect("a QR code");
        let (status, body) = self.wa.scan(qr, Some(phone)).await.unwrap();
        assert_eq!(status, 200, "the phone accepted: {body}");
    }

    /// Waits until the message `id` the contact sent was delivered and read (its
    /// outbox names the devices that said so); the message as the outbox shows it.
    pub async fn wait_read(&self, contact: &str, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, outbox) = self
                .wa
                .get(&format!("contacts/{contact}/outbox"))
                .await
                .unwrap();
            let mine = outbox
                .as_array()
                .and_then(|list| list.iter().find(|m| m["id"] == id).cloned());
            let said = |m: &Value, what: &str| m[what].as_array().is_some_and(|r| !r.is_empty());
            if let Some(mine) = mine.filter(|m| said(m, "read") && said(m, "delivered")) {
                return mine;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never read: {outbox}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `phone` unlinks its devices, as from its settings.
    pub async fn phone_unlinks(&self, phone: &str) {
        let (status, body) = self
            .wa
            .post("unlink", json!({ "phone": phone }))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

/// A consistent copy of a running gateway's databases (`VACUUM INTO`), into `to`.
pub async fn copy_data(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["zapgate.db", "sessions.db"] {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(from.join(name))
            .read_only(true);
        let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
            .await
            .unwrap();
        sqlx::query("VACUUM INTO ?")
            .bind(to.join(name).to_str().unwrap())
            .execute(&mut db)
            .await
            .unwrap();
    }
}

/// One `zapgate serve` process.
pub struct Gateway {
    child: Child,
    pub api: Api,
    pub log: Log,
}

/// Every line the gateway printed, shared with the task that reads them.
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    grew: Arc<tokio::sync::Notify>,
}

impl Log {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.grew.notify_waiters();
    }

    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (with a deadline) until `times` lines contain `needle`: a readiness point.
    pub async fn wait_for(&self, needle: &str, times: usize) {
        self.wait_until(needle, times, CONNECT_WAIT).await
    }

    /// Waits up to `wait` for a line with `needle`.
    pub async fn wait_within(&self, needle: &str, wait: Duration) {
        self.wait_until(needle, 1, wait).await
    }

    async fn wait_until(&self, needle: &str, times: usize, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let grew = self.grew.notified();
            if self.count(needle) >= times {
                return;
            }
            if tokio::time::timeout_at(deadline, grew).await.is_err() {
                panic!("the gateway never logged {needle:?} {times} times");
            }
        }
    }
}

impl Gateway {
    pub async fn start(whatsapp_url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_without(whatsapp_url, data_dir, env, &[]).await
    }

    /// A gateway with `env` set over the defaults and `unset` variables removed.
    pub async fn start_without(
        whatsapp_url: &str,
        data_dir: &Path,
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> Self {
        let database = test_database(data_dir, env).await;
        let mut command = gateway_command(whatsapp_url, data_dir, env, unset);
        if let Some(url) = database {
            command.env("ZAPGATE_DATABASE_URL", url);
        }
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("zapgate starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let log = Log::default();
        let started = tokio::time::Instant::now() + CONNECT_WAIT;
        let base = loop {
            let line = tokio::time::timeout_at(started, lines.next_line())
                .await
                .expect("zapgate started in time")
                .unwrap()
                .expect("zapgate printed its address");
            println!("{line}");
            log.push(line.clone());
            if let Some(addr) = line.split("zapgate listening on ").nth(1) {
                break addr.trim().to_owned();
            }
        };
        // Keep echoing the gateway's log so a failing test shows it.
        let echo = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                println!("{line}");
                echo.push(line);
            }
        });
        let client_token = env
            .iter()
            .find(|(k, _)| *k == "ZAPGATE_CLIENT_TOKEN")
            .map(|(_, v)| v.to_string());
        Self {
            child,
            api: Api {
                http: reqwest::Client::new(),
                base,
                client_token,
            },
            log,
        }
    }

    /// Runs a gateway that must refuse to start; returns what it printed.
    pub async fn refused(
        whatsapp_url: &str,
        data_dir: &Path,
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> String {
        let database = test_database(data_dir, env).await;
        let mut command = gateway_command(whatsapp_url, data_dir, env, unset);
        if let Some(url) = database {
            command.env("ZAPGATE_DATABASE_URL", url);
        }
        let output = tokio::time::timeout(CONNECT_WAIT, command.output())
            .await
            .expect("a refused start ends at once")
            .unwrap();
        assert!(!output.status.success(), "zapgate started");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway runs")
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the gateway.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    /// Waits for the gateway to end on its own; its exit code.
    pub async fn exited(mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the gateway ended in time")
            .unwrap()
            .code()
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        assert!(status.expect("zapgate stops on SIGTERM").unwrap().success());
    }
}

/// With `ZAPGATE_TEST_BACKEND=postgres`, the gateways of a data directory keep their
/// instances in a database of the throwaway PostgreSQL, the same one each time they
/// start on that directory (its URL is kept in it), unless `env` names a database.
async fn test_database(data_dir: &Path, env: &[(&str, &str)]) -> Option<String> {
    if std::env::var("ZAPGATE_TEST_BACKEND").as_deref() != Ok("postgres")
        || env.iter().any(|(k, _)| *k == "ZAPGATE_DATABASE_URL")
    {
        return None;
    }
    let kept = data_dir.join("test-database-url");
    if let Ok(url) = std::fs::read_to_string(&kept) {
        return Some(url);
    }
    let url = pg::database().await;
    std::fs::create_dir_all(data_dir).expect("the data directory");
    std::fs::write(&kept, &url).expect("the test database's URL is kept");
    Some(url)
}

fn gateway_command(
    whatsapp_url: &str,
    data_dir: &Path,
    env: &[(&str, &str)],
    unset: &[&str],
) -> Command {
    // Run under an open-file limit, set before the gateway starts.
    let mut command = match env.iter().find(|(k, _)| *k == NOFILE) {
        Some((_, n)) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_zapgate"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_zapgate")),
    };
    command
        .arg("serve")
        .env("ZAPGATE_LISTEN", "127.0.0.1:0")
        .env("ZAPGATE_DATA_DIR", data_dir)
        .env("ZAPGATE_ADMIN_TOKEN", ADMIN)
        .env("ZAPGATE_WHATSAPP_URL", whatsapp_url)
        .env("ZAPGATE_WHATSAPP_VERSION", VERSION)
        .env("ZAPGATE_LINK_WAIT_SECS", "10")
        .env("RUST_LOG", "info,whatsapp_rust=warn,wacore=warn")
        // Plain lines, so tests can look for what the gateway logged.
        .env("NO_COLOR", "1");
    for (k, v) in env.iter().filter(|(k, _)| *k != NOFILE) {
        command.env(k, v);
    }
    for k in unset {
        command.env_remove(k);
    }
    command
}

#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub token: String,
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub client_token: Option<String>,
}

impl Api {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        bearer: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        if let Some(token) = &self.client_token {
            request = request.header("Client-Token", token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("gateway answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// The value of one metric the gateway exposes at `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    pub async fn create_instance(&self, name: &str) -> Instance {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/instances/integrator/on-demand",
                Some(json!({ "name": name })),
                Some(ADMIN),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        Instance {
            id: body["id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn instance_get(&self, i: &Instance, route: &str) -> (u16, Value) {
        let path = format!("/instances/{}/token/{}/{route}", i.id, i.token);
        self.call(reqwest::Method::GET, &path, None, None).await
    }

    pub async fn qr_code(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "qr-code").await
    }

    pub async fn qr_code_image(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "qr-code/image").await
    }

    pub async fn phone_code(&self, i: &Instance, phone: &str) -> (u16, Value) {
        self.instance_get(i, &format!("phone-code/{phone}")).await
    }

    pub async fn status(&self, i: &Instance) -> Value {
        let (code, body) = self.instance_get(i, "status").await;
        assert_eq!(code, 200, "{body}");
        body
    }

    pub async fn disconnect(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "disconnect").await
    }

    pub async fn restart(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "restart").await
    }

    pub async fn restore_session(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "restore-session").await
    }

    pub async fn device(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "device").await
    }

    pub async fn me(&self, i: &Instance) -> (u16, Value) {
        self.instance_get(i, "me").await
    }

    /// Polls `/status` as a user's app would, until `want(status)` or the wait ends.
    pub async fn wait_status(
        &self,
        i: &Instance,
        what: &str,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
        loop {
            let status = self.status(i).await;
            if want(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {what}; last status {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_connected(&self, i: &Instance) -> Value {
        self.wait_status(i, "connected", |s| s["connected"] == json!(true))
            .await
    }
}

pub fn not_connected() -> Value {
    json!({ "connected": false, "error": "You are not connected.", "smartphoneConnected": false })
}

pub fn restore_needed() -> Value {
    json!({ "connected": false, "error": "You need to restore the session.", "smartphoneConnected": false })
}

pub fn connected() -> Value {
    json!({ "connected": true, "smartphoneConnected": true })
}

/// Decodes a `data:image/png;base64,...` QR image back to its text.
pub fn decode_qr_data_url(data_url: &str) -> String {
    use base64::Engine as _;
    let b64 = data_url
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    let png_bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let (width, height) = (frame.width as usize, frame.height as usize);
    assert!(width >= 256 && height >= 256, "image is {width}x{height}");
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    let mut image =
        rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "exactly one QR code in the image");
    grids[0].decode().expect("the QR code decodes").1
}

/// One server-sent event: its id, name and JSON data.
#[derive(Debug)]
pub struct Sse {
    pub id: String,
    pub name: String,
    pub data: Value,
}

/// An instance's event stream, read as a client reads it.
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl Api {
    /// Opens `/events`, with `Last-Event-ID` if given; fails unless it answers 200
    /// with `text/event-stream`.
    pub async fn events(&self, inst: &Instance, last_event_id: Option<&str>) -> EventStream {
        let mut request = self.http.get(format!(
            "{}/instances/{}/token/{}/events",
            self.base, inst.id, inst.token
        ));
        if let Some(token) = &self.client_token {
            request = request.header("Client-Token", token);
        }
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("gateway answers");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }
}

impl Api {
    /// Opens a link page's event stream (`page` is the page's URL).
    pub async fn link_events(&self, page: &str) -> EventStream {
        let response = self
            .http
            .get(format!("{page}/events"))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(response.status().as_u16(), 200);
        EventStream {
            response,
            buffer: String::new(),
        }
    }
}

/// An admin panel session opened over plain HTTP, used as the panel's pages use it:
/// the cookie with every call, and the page's CSRF token with every change.
pub struct PanelSession {
    http: reqwest::Client,
    /// The `Set-Cookie` of the sign-in, as given.
    pub set_cookie: String,
    cookie: String,
    pub csrf: String,
}

impl PanelSession {
    /// Signs in with `token` at the gateway at `base`; fails unless it is let in.
    pub async fn sign_in(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let answer = http
            .post(format!("{base}/panel/sign-in"))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 303);
        let set_cookie = answer.headers()["set-cookie"].to_str().unwrap().to_owned();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        let mut session = Self {
            http,
            set_cookie,
            cookie,
            csrf: String::new(),
        };
        let (status, page) = session.page(base, "/panel").await;
        assert_eq!(status, 200, "{page}");
        let meta = page.split(r#"<meta name="csrf" content=""#).nth(1).unwrap();
        session.csrf = meta.split('"').next().unwrap().to_owned();
        session
    }

    /// A GET with the session's cookie.
    async fn get(&self, base: &str, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{base}{path}"))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }

    /// A page of the panel: its status and HTML.
    pub async fn page(&self, base: &str, path: &str) -> (u16, String) {
        let answer = self.get(base, path).await;
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    /// A call to the panel's JSON routes (a change with the CSRF token).
    pub async fn call(
        &self,
        method: reqwest::Method,
        base: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method.clone(), format!("{base}{path}"))
            .header("cookie", &self.cookie);
        if method != reqwest::Method::GET {
            request = request.header("x-csrf-token", &self.csrf);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let text = answer.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Opens one of the panel's event streams.
    pub async fn events(&self, base: &str, path: &str) -> EventStream {
        let response = self.get(base, path).await;
        assert_eq!(response.status().as_u16(), 200);
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// Signs out, as the panel's button does: the status of the answer.
    pub async fn sign_out(&self, base: &str) -> u16 {
        self.http
            .post(format!("{base}/panel/sign-out"))
            .header("cookie", &self.cookie)
            .form(&[("csrf", &self.csrf)])
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

impl EventStream {
    /// The next event (keep-alive comments skipped), within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Sse {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut name, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if name.is_empty() && data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                return Sse { id, name, data };
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no event within {within:?}"))
                .expect("the stream reads")
                .expect("the stream stays open");
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// Waits for the server to end the stream (events before the end are skipped).
    pub async fn ends_within(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => panic!("the stream stayed open for {within:?}"),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None) | Err(_)) => return,
            }
        }
    }

    pub async fn next(&mut self) -> Sse {
        self.next_within(Duration::from_secs(30)).await
    }

    /// Events up to and including the first named `name`.
    pub async fn until(&mut self, name: &str) -> Sse {
        loop {
            let event = self.next().await;
            if event.name == name {
                return event;
            }
        }
    }
}

pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `name{labels} value` lines of a Prometheus text exposition, by name with labels.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub async fn scrape(gw: &Gateway) -> std::collections::HashMap<String, f64> {
    let response = gw
        .api
        .http
        .get(format!("{}/metrics", gw.api.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    parse_metrics(&response.text().await.unwrap())
}

impl Api {
    /// Sets one of the instance's webhooks (`route` like `update-webhook-connected`).
    pub async fn set_webhook(&self, i: &Instance, route: &str, url: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::PUT,
            &format!("/instances/{}/token/{}/{route}", i.id, i.token),
            Some(json!({ "value": url })),
            None,
        )
        .await
    }
}
