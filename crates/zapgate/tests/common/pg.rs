//! A throwaway PostgreSQL for the tests: one server per test binary, in a temporary
//! directory on a free loopback port, and a fresh database for each caller. The server
//! is Debian's (the newest `/usr/lib/postgresql/<version>/bin` with an `initdb`, else
//! `pg_config --bindir`); as root, its tools run as the `postgres` user, since `initdb`
//! refuses root. A watchdog stops the server once the test binary is gone, however it
//! ended.
//! `ZAPGATE_TEST_DATABASE_URL` (a server the tests may create databases on) replaces it;
//! databases left there by test processes that are gone are dropped on the next start.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::Connection as _;

/// The server: its address (`postgres://user@host:port`, and any `?options` apart) and,
/// when started here, its directory (kept until the process ends).
struct Server {
    base: String,
    options: String,
    _dir: Option<tempfile::TempDir>,
    /// Outlives this process on purpose: it is what stops the server after it.
    _watchdog: Option<std::process::Child>,
}

impl Server {
    fn url(&self, database: &str) -> String {
        format!("{}/{database}{}", self.base, self.options)
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);
const PREFIX: &str = "zapgate_test_";

/// The URL of a new, empty database of its own.
pub async fn database() -> String {
    // Starting the server takes a second or two of blocking work: off the runtime.
    let server = tokio::task::spawn_blocking(server)
        .await
        .expect("the test PostgreSQL starts");
    let name = format!(
        "{PREFIX}{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres"))
        .await
        .expect("the test PostgreSQL takes connections");
    if name.ends_with("_0") && server._dir.is_none() {
        drop_orphans(&mut admin).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("a database is created");
    server.url(&name)
}

/// Drops the databases of test processes of this machine that are gone.
async fn drop_orphans(admin: &mut sqlx::PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE starts_with(datname::text, $1)",
    )
    .bind(PREFIX)
    .fetch_all(&mut *admin)
    .await
    .unwrap_or_default();
    for name in names {
        let pid = name[PREFIX.len()..].split('_').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name}"
            )))
            .execute(&mut *admin)
            .await;
        }
    }
}

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("ZAPGATE_TEST_DATABASE_URL") {
        Ok(url) => {
            let (base, options) = match url.find('?') {
                Some(at) => (&url[..at], &url[at..]),
                None => (url.as_str(), ""),
            };
            Server {
                base: base.trim_end_matches('/').to_owned(),
                options: options.to_owned(),
                _dir: None,
                _watchdog: None,
            }
        }
        Err(_) => start(),
    })
}

/// Where PostgreSQL's server programs are: a directory with `initdb` (`pg_config` may
/// name the client's, which has none).
fn bindir() -> PathBuf {
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    debian.sort();
    let from_config = || {
        Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|dir| dir.join("initdb").exists())
    };
    debian
        .pop()
        .map(|(_, bin)| bin)
        .or_else(from_config)
        .expect(
            "PostgreSQL's server programs (initdb, pg_ctl) are needed for these tests: \
         `apt-get install postgresql` (scripts/test installs it)",
        )
}

/// Whether the tools must run as `postgres`: this is root, and that user exists.
fn as_postgres() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        let exists = Command::new("id")
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            exists,
            "initdb refuses root and there is no `postgres` user to run it as: \
             install Debian's postgresql, or set ZAPGATE_TEST_DATABASE_URL"
        );
    }
    root
}

/// A command for one of PostgreSQL's programs (or `sh`), as `postgres` when this is
/// root, run from `dir` (one `postgres` can enter).
fn command(program: &Path, dir: &Path) -> Command {
    let mut c = if as_postgres() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    c.current_dir(dir);
    c
}

fn run(bin: &Path, dir: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    let output = command(&bin.join(program), dir)
        .args(args)
        .output()
        .expect("PostgreSQL's tools run");
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// `text` quoted for `sh`.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn start() -> Server {
    let bin = bindir();
    let dir = tempfile::Builder::new()
        .prefix("zapgate-pg-")
        .tempdir()
        .expect("a temporary directory");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    if as_postgres() {
        // The server runs as `postgres`: it must own its directory.
        let owned = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(owned, "chown of {} to postgres", dir.path().display());
    }
    let data_arg = data.to_str().expect("a UTF-8 path");
    run(
        &bin,
        dir.path(),
        "initdb",
        &["-D", data_arg, "-A", "trust", "-U", "zapgate", "--no-sync"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("server.log");
    // A free port now may be taken by the time the server binds it: try a few.
    let mut port = 0;
    for attempt in 1.. {
        port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Fast and forgetful: a test's data need not survive a crash of the machine.
        let options = format!(
            "-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            socket = quoted(&dir.path().display().to_string())
        );
        let started = run(
            &bin,
            dir.path(),
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
        match started {
            Ok(()) => break,
            Err(e) if attempt < 5 => eprintln!("the test PostgreSQL did not start ({e}); again"),
            Err(e) => panic!(
                "{e}\nserver.log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }
    // Stops the server and removes its directory once this process is gone, however it
    // ended (statics are never dropped, and a killed test runs no destructor). It runs
    // as this user, who can see this process in /proc whatever /proc's hidepid is.
    let stop = format!(
        "while [ -d /proc/{pid} ]; do sleep 1; done; \
         {runuser}{pg_ctl} -D {data} -m immediate stop; rm -rf {dir}",
        pid = std::process::id(),
        runuser = if as_postgres() {
            "runuser -u postgres -- "
        } else {
            ""
        },
        pg_ctl = quoted(&bin.join("pg_ctl").display().to_string()),
        data = quoted(data_arg),
        dir = quoted(&dir.path().display().to_string()),
    );
    let watchdog = Command::new("sh")
        .args(["-c", &stop])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the watchdog starts");
    Server {
        base: format!("postgres://zapgate@127.0.0.1:{port}"),
        options: String::new(),
        _dir: Some(dir),
        _watchdog: Some(watchdog),
    }
}
