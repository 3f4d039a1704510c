//! A real browser for the panel's tests: Debian's Chromium, headless, driven over the
//! Chrome DevTools Protocol on its own websocket. Only what the tests need: open a page,
//! run a script in it, wait for a condition, type and press keys, take a screenshot.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium's process group, killed whole when dropped (its renderers included), even
/// when a test fails before the browser is ready.
struct Chromium(Child);

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Browser {
    _chromium: Chromium,
    _profile: tempfile::TempDir,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// A fresh headless Chromium (its own empty profile) with one blank tab.
    pub async fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "the panel's browser tests need Debian's chromium (apt-get install chromium; .ci/run does)"
        );
        let profile = tempfile::tempdir().unwrap();
        use std::os::unix::process::CommandExt as _;
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--no-first-run",
                "--window-size=1000,1300",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let chromium = Chromium(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let _ = tx.send(url.trim().to_owned());
                        sent = true;
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium prints its DevTools address");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("DevTools websocket");
        let mut browser = Self {
            _chromium: chromium,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser
    }

    /// Sends a command (to the tab, once attached) and waits for its result; events
    /// that arrive meanwhile are dropped.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params).await {
            Ok(result) => result,
            Err(error) => panic!("{method} failed: {error}"),
        }
    }

    /// [`Self::call`], with DevTools' error as the caller's to judge.
    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("DevTools accepts the command");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .expect("DevTools stays open")
                .expect("DevTools frame");
            let Message::Text(text) = frame else { continue };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == json!(id) {
                if let Some(error) = answer.get("error") {
                    return Err(error.clone());
                }
                return Ok(answer["result"].clone());
            }
        }
    }

    /// Opens `url` and waits until the page and its script are loaded.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(10),
        )
        .await;
    }

    /// The value of a script run in the page (promises awaited).
    pub async fn eval(&mut self, script: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": script, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{script} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `condition` (a script) is truthy in the page; returns its value. A
    /// condition that throws (the page is still loading) counts as not yet.
    pub async fn wait_for(&mut self, condition: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        let guarded = format!(
            "(() => {{ try {{ return ({condition}); }} catch (e) {{ return false; }} }})()"
        );
        loop {
            let evaluated = self
                .try_call(
                    "Runtime.evaluate",
                    json!({ "expression": guarded, "awaitPromise": true, "returnByValue": true }),
                )
                .await;
            // The page navigating away under the script (a form sent, say) is not yet.
            let value = match evaluated {
                Ok(result) => result["result"]["value"].clone(),
                Err(error) if error.to_string().contains("navigated or closed") => Value::Null,
                Err(error) => panic!("Runtime.evaluate failed: {error}"),
            };
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("not within {within:?}: {condition}\nthe page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The page's text, as a person reads it.
    pub async fn text(&mut self) -> String {
        self.eval("document.body.innerText")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Types `text` into the focused element.
    pub async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Presses a key (`Tab`, `Enter`, ` `) with optional modifiers (8 = Shift).
    pub async fn press(&mut self, key: &str, modifiers: u8) {
        let (code, vk) = match key {
            "Tab" => ("Tab", 9),
            "Enter" => ("Enter", 13),
            " " => ("Space", 32),
            other => panic!("no key code for {other:?}"),
        };
        for kind in ["keyDown", "keyUp"] {
            let mut event = json!({
                "type": kind,
                "key": key,
                "code": code,
                "windowsVirtualKeyCode": vk,
                "modifiers": modifiers,
            });
            if kind == "keyDown" && key == "Enter" {
                event["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", event).await;
        }
    }

    /// The page as a PNG.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine as _;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }

    /// With `ZAPGATE_SCREENSHOTS=1`, saves a screenshot under `docs/screenshots` at the
    /// repository's root (the README shows them); otherwise does nothing.
    pub async fn keep_screenshot(&mut self, name: &str) {
        if std::env::var_os("ZAPGATE_SCREENSHOTS").is_none_or(|v| v != "1") {
            return;
        }
        let png = self.screenshot().await;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

/// Every QR code found in a PNG (any colour type), decoded.
pub fn qr_codes_in(png_bytes: &[u8]) -> Vec<String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let luma = |x: usize, y: usize| -> u8 {
        let at = (y * width + x) * channels;
        match channels {
            1 | 2 => pixels[at],
            _ => {
                let (r, g, b) = (
                    pixels[at] as u32,
                    pixels[at + 1] as u32,
                    pixels[at + 2] as u32,
                );
                ((r * 299 + g * 587 + b * 114) / 1000) as u8
            }
        }
    };
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, luma);
    image
        .detect_grids()
        .into_iter()
        .filter_map(|grid| grid.decode().ok().map(|(_, text)| text))
        .collect()
}
