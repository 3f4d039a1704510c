//! A throwaway PostgreSQL for the tests: one server per test binary, in a temporary
//! directory on a free loopback port, and a fresh database for each caller. The server
//! is Debian's (`pg_config --bindir`, else `/usr/lib/postgresql/*/bin`); as root, its
//! tools run as the `postgres` user, since `initdb` refuses root. A watchdog stops the
//! server once the test binary is gone, however it ended.
//! `ZAPGATE_TEST_DATABASE_URL` (a server the tests may create databases on) replaces it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::Connection as _;

/// The server: its address (`postgres://user@host:port`) and, when started here, its
/// directory (kept until the process ends).
struct Server {
    base: String,
    _dir: Option<tempfile::TempDir>,
    /// Outlives this process on purpose: it is what stops the server after it.
    _watchdog: Option<std::process::Child>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The URL of a new, empty database of its own.
pub async fn database() -> String {
    let base = &server().base;
    let name = format!(
        "zapgate_test_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
        .await
        .expect("the test PostgreSQL takes connections");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("a database is created");
    format!("{base}/{name}")
}

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("ZAPGATE_TEST_DATABASE_URL") {
        Ok(url) => Server {
            base: url.trim_end_matches('/').to_owned(),
            _dir: None,
            _watchdog: None,
        },
        Err(_) => start(),
    })
}

/// Where PostgreSQL's programs are.
fn bindir() -> PathBuf {
    let from_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let debian = || {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .collect();
        found.sort();
        found.pop()
    };
    from_config
        .or_else(debian)
        .filter(|dir| dir.join("initdb").exists())
        .expect(
            "PostgreSQL's programs (initdb, pg_ctl) are needed for these tests: \
             `apt-get install postgresql` (scripts/test installs it)",
        )
}

/// Runs one of PostgreSQL's programs, as `postgres` when this is root.
fn run(bin: &Path, program: &str, args: &[&str]) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut command = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    };
    let output = command.args(args).output().expect("PostgreSQL's tools run");
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn start() -> Server {
    let bin = bindir();
    let dir = tempfile::Builder::new()
        .prefix("zapgate-pg-")
        .tempdir()
        .expect("a temporary directory");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // The server runs as `postgres` when this is root: it must own its directory.
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir.path())
        .status();
    let data_arg = data.to_str().expect("a UTF-8 path");
    run(
        &bin,
        "initdb",
        &["-D", data_arg, "-A", "trust", "-U", "zapgate", "--no-sync"],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // Fast and forgetful: a test's data need not survive a crash of the machine.
    let options = format!(
        "-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
        socket = dir.path().display()
    );
    let log = dir.path().join("server.log");
    run(
        &bin,
        "pg_ctl",
        &[
            "-w",
            "-D",
            data_arg,
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
            "start",
        ],
    );
    // Stops the server and removes its directory once this process is gone, however it
    // ended (statics are never dropped, and a killed test runs no destructor).
    let stop = format!(
        "while [ -d /proc/{pid} ]; do sleep 1; done; \
         {pg_ctl} -D {data_arg} -m immediate stop; rm -rf {dir}",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        dir = dir.path().display(),
    );
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut watchdog = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &stop]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &stop]);
        c
    };
    let watchdog = watchdog
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the watchdog starts");
    Server {
        base: format!("postgres://zapgate@127.0.0.1:{port}"),
        _dir: Some(dir),
        _watchdog: Some(watchdog),
    }
}
