//! Baileys, a second WhatsApp client written independently of whatsapp-rust, run
//! unmodified in Node (`crates/wa-sim/baileys/harness.mjs`) and driven over its
//! stdin and stdout. Its own log (pino JSON lines on stderr) is kept for the checks.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

/// Where the harness and its pinned `node_modules` live (this file is included by
/// wa-sim's tests and by the gateway's bench, each in its own crate of `crates/`).
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../wa-sim/baileys")
}

/// Installs the pinned Baileys (`npm ci`) the first time a test needs it, if it is not
/// there yet (`.ci/run` installs it before the tests).
fn install(dir: &Path) {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        // npm writes this file last: a complete install.
        if dir.join("node_modules/.package-lock.json").exists() {
            return;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .status()
            .expect("npm runs (Node 20 with npm is needed for the Baileys tests)");
        assert!(
            status.success(),
            "`npm ci` in {} failed: {status}",
            dir.display()
        );
    });
}

pub struct Baileys {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Value>,
    /// Events read but not yet asked for.
    backlog: VecDeque<Value>,
    log: Arc<Mutex<Vec<String>>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Baileys {
    /// Starts Baileys against `ws_url`, keeping its credentials in `auth`.
    pub fn start(ws_url: &str, auth: &Path) -> Self {
        let dir = harness_dir();
        install(&dir);
        let mut child = Command::new("node")
            .arg("harness.mjs")
            .arg("--url")
            .arg(ws_url)
            .arg("--auth")
            .arg(auth)
            .current_dir(&dir)
            .env("BAILEYS_LOG_LEVEL", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs (Node 20 is needed for the Baileys tests)");
        let (tx, events) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(event) => {
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("baileys harness printed: {line}"),
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            events,
            backlog: VecDeque::new(),
            log,
            log_reader: Some(log_reader),
        }
    }

    /// The next event of the harness, whatever it is.
    pub async fn next_event(&mut self, within: Duration) -> Value {
        if let Some(event) = self.backlog.pop_front() {
            return event;
        }
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("Baileys exited; its log:\n{}", self.log_text()),
            Err(_) => panic!(
                "Baileys said nothing within {within:?}; its log:\n{}",
                self.log_text()
            ),
        }
    }

    /// Waits for the next `name` event (the ones it passes stay for later); fails naming
    /// the events that came instead.
    pub async fn wait_for(&mut self, name: &str, within: Duration) -> Value {
        if let Some(at) = self.backlog.iter().position(|e| e["event"] == name) {
            return self.backlog.remove(at).expect("found");
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => panic!(
                    "Baileys exited before {name}; saw {seen:?}; its log:\n{}",
                    self.log_text()
                ),
                Err(_) => panic!(
                    "no {name} from Baileys within {within:?}; saw {seen:?}; its log:\n{}",
                    self.log_text()
                ),
            };
            if event["event"] == name {
                return event;
            }
            seen.push(event.clone());
            self.backlog.push_back(event);
        }
    }

    /// Node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("harness running");
        writeln!(stdin, "{line}").expect("harness reads commands");
        stdin.flush().expect("harness reads commands");
    }

    /// Lines of Baileys' own log at error level or above (pino levels 50, 60; any line
    /// that is not pino's, such as a crash, counts too), but for the two stream errors
    /// WhatsApp sends by design: 515 after every pairing, to make the client reconnect,
    /// and 401 `device_removed` when the phone unlinks it. Baileys logs every stream
    /// error at error level, those two included.
    pub fn errors(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| {
                let Ok(entry) = serde_json::from_str::<Value>(line) else {
                    return true;
                };
                entry["level"].as_u64().unwrap_or(0) >= 50 && !by_design(&entry)
            })
            .cloned()
            .collect()
    }

    /// Every line Baileys logged at warn level.
    pub fn warnings(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| {
                serde_json::from_str::<Value>(line).is_ok_and(|entry| entry["level"] == 40)
            })
            .cloned()
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Asks the harness to close its socket and waits for Node to exit.
    pub async fn quit(&mut self) {
        self.command("quit");
        self.exited().await;
    }

    /// Waits for Node to exit (successfully) and for the last line of its log.
    pub async fn exited(&mut self) {
        drop(self.stdin.take());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Baileys did not exit within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(reader) = self.log_reader.take() {
            reader.join().expect("log reader");
        }
        assert!(
            status.success(),
            "Baileys exited with {status}; its log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Baileys {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stream error WhatsApp sends in the normal course of linking and unlinking.
fn by_design(entry: &Value) -> bool {
    let node = &entry["fullErrorNode"];
    if node["tag"] != "stream:error" {
        return false;
    }
    let restart = node["attrs"]["code"] == "515" && node["content"].is_null();
    let removed = node["attrs"]["code"] == "401"
        && node["content"][0]["tag"] == "conflict"
        && node["content"][0]["attrs"]["type"] == "device_removed";
    restart || removed
}
