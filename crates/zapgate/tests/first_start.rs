//! A first start, and the starts that cannot go on: what the operator reads. Each
//! refused start says what went wrong and what to change, in plain words, with no
//! backtrace (even with RUST_BACKTRACE=1), and never echoes a password it was given.

mod common;

use std::time::Duration;

use common::{ADMIN, Gateway, PanelSession, World};

/// A backtrace would be printed with this, were one printed at all.
const BACKTRACES: (&str, &str) = ("RUST_BACKTRACE", "1");

/// `out` says the start failed, with `fix` as what to do, and nothing of a crash.
fn said_plainly(out: &str, fix: &str) {
    assert!(out.contains("zapgate could not start: "), "{out}");
    assert!(out.contains(&format!("what to do: {fix}")), "{out}");
    for noise in ["stack backtrace", "Caused by", "panicked", "Error: "] {
        assert!(!out.contains(noise), "{noise:?} in: {out}");
    }
}

#[tokio::test]
async fn a_first_start_says_where_the_panel_is_and_where_the_admin_token_was_put() {
    let world = World::new().await;
    let (url, dir) = (world.sim.ws_url(), world.data_dir());
    let start = || Gateway::start_without(&url, &dir, &[], &["ZAPGATE_ADMIN_TOKEN"]);
    let file = world.data_dir().join("admin-token");
    let gw = start().await;
    let wait = Duration::from_secs(5);
    gw.log
        .wait_within(&format!("admin panel and API: {}/", gw.api.base), wait)
        .await;
    gw.log
        .wait_within(&format!("API reference:       {}/docs", gw.api.base), wait)
        .await;
    let made = format!(
        "admin token:         made on this first start, in {} (keep it secret)",
        file.display()
    );
    gw.log.wait_within(&made, wait).await;
    gw.stop().await;
    // Started again: the same file, not made again; its token signs in.
    let gw = start().await;
    gw.log
        .wait_within(&format!("admin token:         in {}", file.display()), wait)
        .await;
    assert_eq!(gw.log.count("made on this first start"), 0);
    let token = std::fs::read_to_string(&file).unwrap();
    PanelSession::sign_in(&gw.api.base, token.trim()).await;
    gw.stop().await;
    // Given one: the banner says so, and shows no token.
    let gw = world.gateway().await;
    let given = "admin token:         as configured (--admin-token, ZAPGATE_ADMIN_TOKEN or the settings file)";
    gw.log.wait_within(given, wait).await;
    assert_eq!(gw.log.count(ADMIN), 0);
    gw.stop().await;
}

#[tokio::test]
async fn misconfigured_starts_say_what_to_change_and_never_show_a_backtrace() {
    let world = World::new().await;

    // The port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = world
        .refused_gateway(&[BACKTRACES, ("ZAPGATE_LISTEN", &addr)], &[])
        .await;
    said_plainly(
        &out,
        "another program (perhaps another zapgate) is listening",
    );
    assert!(out.contains(&format!("binding {addr}: ")), "{out}");

    // A file stands where the data directory should be.
    let file = world.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let inside = file.join("data");
    let out = world
        .refused_gateway(
            &[BACKTRACES, ("ZAPGATE_DATA_DIR", inside.to_str().unwrap())],
            &[],
        )
        .await;
    said_plainly(&out, "a file stands where the data directory");

    // The database URL: another kind of database, nothing at its address, no such
    // database. The password in it is never repeated.
    for (url, fix) in [
        (
            "mysql://zapgate:s3cret@127.0.0.1/zapgate".to_owned(),
            "--database-url (ZAPGATE_DATABASE_URL) takes postgres://",
        ),
        (
            "postgres://zapgate:s3cret@127.0.0.1:1/zapgate".to_owned(),
            "nothing answered at the database's host and port",
        ),
        (
            missing_database().await,
            "that database does not exist: create it",
        ),
    ] {
        let out = world
            .refused_gateway(&[BACKTRACES, ("ZAPGATE_DATABASE_URL", &url)], &[])
            .await;
        said_plainly(&out, fix);
        assert!(!out.contains("s3cret"), "{out}");
    }

    // A settings file that is not TOML: where, never the line (it may hold a password).
    let with_settings = async |name: &str, text: &str| {
        let settings = world.dir.path().join(name);
        std::fs::write(&settings, text).unwrap();
        let config = ("ZAPGATE_CONFIG", settings.to_str().unwrap());
        (
            world.refused_gateway(&[BACKTRACES, config], &[]).await,
            settings,
        )
    };
    let (out, settings) = with_settings(
        "broken.toml",
        "listen = \"127.0.0.1:8080\"\ndatabase-url = \"postgres://zapgate:s3cret@db/zapgate\n",
    )
    .await;
    assert!(
        out.contains(&format!(
            "zapgate could not start: reading the settings file {}: line 2, column ",
            settings.display()
        )),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "{out}");

    // A settings file with a misspelt setting: named, with the ones there are.
    let (out, settings) = with_settings("zapgate.toml", "lissten = \"127.0.0.1:8080\"\n").await;
    assert!(
        out.contains(&format!(
            "zapgate could not start: {}: no setting is named \"lissten\"; the settings are: listen, data-dir",
            settings.display()
        )),
        "{out}"
    );
}

/// A URL of the test PostgreSQL naming a database that is not there.
async fn missing_database() -> String {
    let url = common::pg::database().await;
    let (server, _) = url.rsplit_once('/').unwrap();
    // The test server lets its user in without a password: one given is not checked.
    let server = server.replacen("postgres://zapgate@", "postgres://zapgate:s3cret@", 1);
    assert!(server.contains("s3cret"), "{server}");
    format!("{server}/no_such_database")
}

#[tokio::test]
async fn a_data_directory_the_gateway_may_not_write_is_said_with_its_owner_to_change() {
    use std::os::unix::fs::PermissionsExt as _;
    let world = World::new().await;
    let dir = world.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.join("locked");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root may write anywhere: the gateway then runs as nobody, from a copy it may
    // run.
    let root = rustix::process::getuid().is_root();
    if root
        && std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        println!("skipped: running as root without setpriv, nothing here runs as another user");
        return;
    }
    let binary = if root {
        let copy = dir.join("zapgate");
        std::fs::copy(env!("CARGO_BIN_EXE_zapgate"), &copy).unwrap();
        copy
    } else {
        env!("CARGO_BIN_EXE_zapgate").into()
    };
    let mut command = if root {
        let mut c = tokio::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&binary);
        c
    } else {
        tokio::process::Command::new(&binary)
    };
    let output = command
        .arg("serve")
        .env("ZAPGATE_LISTEN", "127.0.0.1:0")
        .env("ZAPGATE_DATA_DIR", &data)
        .env("ZAPGATE_ADMIN_TOKEN", ADMIN)
        .env("ZAPGATE_WHATSAPP_URL", world.sim.ws_url())
        .env(BACKTRACES.0, BACKTRACES.1)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let out = String::from_utf8_lossy(&output.stderr);
    let uid = if root {
        65534
    } else {
        rustix::process::getuid().as_raw()
    };
    said_plainly(
        &out,
        &format!("the data directory must be writable by the user the gateway runs as (uid {uid})"),
    );
    assert!(out.contains(&data.display().to_string()), "{out}");
}

#[tokio::test]
async fn the_health_command_says_whether_the_gateway_here_answers() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let addr = gw.api.base.trim_start_matches("http://").to_owned();
    let health = |listen: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_zapgate"))
            .arg("health")
            .env("ZAPGATE_LISTEN", listen)
            .env(BACKTRACES.0, BACKTRACES.1)
            .output()
            .await
            .unwrap()
    };
    let answered = health(addr.clone()).await;
    assert!(answered.status.success(), "{answered:?}");
    // A wildcard address is asked on loopback, as a container's HEALTHCHECK does.
    let port = addr.rsplit_once(':').unwrap().1;
    let answered = health(format!("0.0.0.0:{port}")).await;
    assert!(answered.status.success(), "{answered:?}");
    gw.stop().await;
    // Something that is not the gateway holds the port: it takes the call and closes it.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in other.incoming() {
            drop(conn);
        }
    });
    let refused = health(addr.clone()).await;
    assert_eq!(refused.status.code(), Some(1));
    let out = String::from_utf8_lossy(&refused.stderr);
    assert!(
        out.starts_with(&format!("unhealthy: asking {addr}/healthz: ")),
        "{out}"
    );
}
