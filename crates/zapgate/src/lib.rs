//! zapgate: a self-hosted WhatsApp gateway with a Z-API compatible HTTP API.
//!
//! - `config`: flags and environment (`zapgate serve --help`)
//! - `api`: HTTP routes, authentication and Z-API error bodies
//! - `instance`: one task per WhatsApp number, its state machine, the registry
//! - `store`: the instance registry's persistence (SQLite)
//! - `qr`, `phone`: QR images and phone-number rules
//!
//! [`run`] serves until its shutdown token is cancelled.

pub mod api;
pub mod config;
mod data_lock;
pub mod explain;
pub mod instance;
pub mod messaging;
pub mod metrics;
pub mod phone;
pub mod qr;
pub mod server;
pub mod store;
pub mod webhooks;

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::instance::{Manager, ManagerConfig};

/// Serves the API on `listener` and keeps linked numbers connected until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    check_whatsapp_url(&config.whatsapp_url)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    // Held until the gateway has stopped: one gateway per data directory.
    let _lock = data_lock::DataDirLock::acquire(&config.data_dir).await?;
    let token_file = config.data_dir.join("admin-token");
    let (admin_token, token_from) = match &config.admin_token {
        Some(token) => (token.clone(), TokenFrom::Given),
        None => match stored_admin_token(&config.data_dir)? {
            (token, true) => (token, TokenFrom::Made),
            (token, false) => (token, TokenFrom::File),
        },
    };
    let (store, sessions, leases) = open_storage(&config, listener.local_addr().ok()).await?;
    let webhooks_due = std::sync::Arc::new(tokio::sync::Notify::new());
    let (max_sessions, max_connections) = open_file_room(config.max_connections)?;
    let limits = server::Limits {
        max_connections,
        trusted_proxies: config.trusted_proxies.clone(),
        per_address: config
            .max_connections_per_address
            .unwrap_or(max_connections / 4)
            .clamp(1, max_connections),
        header_timeout: config.header_timeout(),
        idle_timeout: config.idle_timeout(),
    };
    let max_streams = config
        .max_event_streams
        .unwrap_or(max_connections / 2)
        .max(1);
    let messaging = messaging::Hub::new(
        store.clone(),
        webhooks_due.clone(),
        messaging::MessagingConfig {
            pacing: config.send_interval_ms,
            ack_wait: messaging::ACK_WAIT,
        },
        shutdown.child_token(),
    );
    let manager = Manager::start(
        store.clone(),
        ManagerConfig {
            sessions,
            leases: leases.clone(),
            whatsapp_url: config.whatsapp_url.clone(),
            whatsapp_version: config.whatsapp_version,
            link_wait: config.link_wait(),
            link_rate_per_minute: config.link_rate_per_minute,
            restore_concurrency: config.restore_concurrency,
            webhooks_due: webhooks_due.clone(),
            max_sessions,
            messaging: messaging.clone(),
        },
        shutdown.child_token(),
    )
    .await
    .context("loading instances")?;
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    metrics.follow(&manager, shutdown.clone());
    metrics.follow_messages(&messaging, shutdown.clone());
    let deliveries = tokio_util::task::TaskTracker::new();
    webhooks::start(
        store.clone(),
        webhooks::DelivererConfig {
            metrics: metrics.clone(),
            allow_private: config.webhook_allow_private,
            secret: config.webhook_secret.clone(),
            retry_for: config.webhook_retry_for(),
        },
        webhooks_due.clone(),
        &deliveries,
        shutdown.clone(),
    );
    let listen_addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let app = api::router(
        api::Shared {
            manager: manager.clone(),
            messaging: messaging.clone(),
            store,
            admin_token,
            client_token: config.client_token.clone(),
            shutdown: shutdown.clone(),
            simulator: config.simulator.clone(),
            public_url: config.public_url(),
            listen_addr,
            webhook_policy: api::WebhookPolicy {
                allow_private: config.webhook_allow_private,
            },
            webhooks_due,
            metrics,
            failed_auth: std::sync::Arc::new(api::FailedAuth::new(config.auth_failures_per_minute)),
            streams: api::StreamSlots::new(max_streams, STREAMS_PER_INSTANCE),
            trusted_proxies: config.trusted_proxies.clone(),
            cluster: leases.clone().map(api::Cluster::new),
            described: Default::default(),
        }
        .into(),
    );
    // Said once the gateway holds its data directory and answers: what a supervisor
    // (and the tests) wait for.
    tracing::info!("zapgate listening on http://{}", listener.local_addr()?);
    // The demo says its own (with the token itself).
    if !config.log_json && config.simulator.is_none() {
        // For whoever started it by hand: where to go, and with what to sign in.
        let storage = match &leases {
            Some(leases) => format!("PostgreSQL, as node {}", leases.id()),
            None => format!("SQLite, in {}", config.data_dir.display()),
        };
        println!(
            "{}",
            ready_banner(&config, listen_addr, &token_file, token_from, &storage)
        );
    }
    tracing::info!(
        http.connections = max_connections,
        http.event_streams = max_streams,
        http.header_timeout_secs = config.header_timeout_secs,
        http.idle_timeout_secs = config.idle_timeout_secs,
        "HTTP limits"
    );
    server::serve(listener, app, limits, shutdown.clone())
        .await
        .context(explain::SERVING)?;
    if let Some(leases) = &leases {
        // The others stop counting this node at once, and take each instance it
        // frees below.
        if let Err(e) = leases.drain().await {
            tracing::warn!(error = %e, "could not tell the other nodes this one drains");
        }
    }
    manager.shutdown().await;
    messaging.stopped().await;
    if let Some(leases) = leases {
        // Every client stopped: the instances are free for the next run at once.
        if let Err(e) = leases.leave().await {
            tracing::warn!(error = %e, "could not leave the database's nodes; the lease expires instead");
        }
    }
    // Deliveries in flight get a moment; an event not settled stays in the outbox.
    deliveries.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), deliveries.wait()).await;
    Ok(())
}

/// Where the admin token came from, for the start's banner.
#[derive(Clone, Copy)]
enum TokenFrom {
    Given,
    File,
    Made,
}

/// What a start says once it answers: the panel's address, where the admin token is,
/// where the data goes.
fn ready_banner(
    config: &Config,
    listening: std::net::SocketAddr,
    token_file: &Path,
    token_from: TokenFrom,
    storage: &str,
) -> String {
    let address = match config.public_url() {
        Some(url) => format!("{}/", url.trim_end_matches('/')),
        None if listening.ip().is_unspecified() => {
            format!("http://{}:{}/", host_name(), listening.port())
        }
        None => format!("http://{listening}/"),
    };
    let token = match token_from {
        TokenFrom::Given => {
            "as configured (--admin-token, ZAPGATE_ADMIN_TOKEN or the settings file)".to_owned()
        }
        TokenFrom::File => format!("in {}", token_file.display()),
        TokenFrom::Made => format!(
            "made on this first start, in {} (keep it secret)",
            token_file.display()
        ),
    };
    format!(
        "zapgate {} is ready\n  admin panel and API: {address}\n  API reference:       {address}docs\n  admin token:         {token}\n  data:                {storage}",
        env!("CARGO_PKG_VERSION")
    )
}

/// How a node that lost its lease on a shared database exits: at once, so that its
/// WhatsApp connections close before another node may take its numbers over.
const EXIT_LEASE_LOST: i32 = 75;

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "zapgate".into())
}

/// Where the other nodes reach this one: `--advertise-url`, else the listen address
/// (a wildcard one by the host name). Never `--public-url`: behind a load balancer
/// that reaches any node.
fn advertised_url(config: &Config, listening: Option<std::net::SocketAddr>) -> String {
    if let Some(url) = config.advertise_url.as_deref() {
        return url.trim_end_matches('/').to_owned();
    }
    match listening {
        Some(addr) if addr.ip().is_unspecified() => {
            format!("http://{}:{}", host_name(), addr.port())
        }
        Some(addr) => format!("http://{addr}"),
        None => "http://unknown".into(),
    }
}

/// The instance registry and the sessions: both in the data directory's SQLite files,
/// or both in the PostgreSQL database `--database-url` names, where this node holds a
/// lease on every instance it runs and writes their sessions fenced by it.
async fn open_storage(
    config: &Config,
    listening: Option<std::net::SocketAddr>,
) -> anyhow::Result<(
    std::sync::Arc<dyn store::Store>,
    std::sync::Arc<dyn store::SessionStore>,
    Option<std::sync::Arc<store::leases::Leases>>,
)> {
    use store::leases::{Leases, NodeInfo};
    let url = config.database_url();
    if !store::is_postgres(url.expose()) {
        let store = store::connect(url.expose())
            .await
            .context("opening the database")?;
        let sessions = store::SqliteSessions::open(&config.sessions_db(), &config.sessions_dir())
            .await
            .context("opening the sessions database")?;
        return Ok((store, std::sync::Arc::new(sessions), None));
    }
    let id = Leases::new_id();
    let pg = store::PgStore::connect_as(url.expose(), &id)
        .await
        .context("opening the PostgreSQL database")?;
    let ttl = std::time::Duration::from_secs(config.lease_secs);
    let node = NodeInfo {
        name: config.node_name.clone().unwrap_or_else(host_name),
        addr: advertised_url(config, listening),
        capacity: u32::MAX >> 1,
        ttl,
    };
    let leases = Leases::join(id, pg.pool(), &pg.options(), &node)
        .await
        .context("joining as a node on the PostgreSQL database")?;
    // The previous run on this data directory is over (this one holds its lock): its
    // row goes now rather than when its lease expires.
    let previous = config.data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&previous) {
        if leases.remove_gone(id.trim()).await? {
            tracing::info!(node = %id.trim(), "the previous run's node left the database");
        }
    }
    std::fs::write(&previous, leases.id())
        .with_context(|| format!("writing {}", previous.display()))?;
    leases.reap().await.context("removing expired nodes")?;
    // At first this node takes its share of what is free; the others hand over more
    // of theirs, a few a second, until the shares are equal.
    let (instances, nodes) = leases.census().await?;
    let share = instances.div_ceil(nodes.max(1));
    let claimed = leases
        .claim(u32::try_from(share).unwrap_or(u32::MAX))
        .await
        .context("claiming the instances")?;
    let others = leases.others().await?;
    tracing::info!(
        node = %leases.id(), name = %node.name, addr = %node.addr,
        other_nodes = others.len(), instances = claimed.len(),
        "this node joined the PostgreSQL database's nodes"
    );
    let mut lost = leases.lost();
    tokio::spawn(async move {
        if lost.wait_for(|lost| *lost).await.is_ok() {
            tracing::error!(
                "this node's lease on the database was lost: exiting now, so that no WhatsApp connection of it outlives the lease"
            );
            std::process::exit(EXIT_LEASE_LOST);
        }
    });
    pg.fence_with(leases.clone());
    let sessions = std::sync::Arc::new(store::PgSessions::new(pg.pool(), leases.clone()));
    Ok((std::sync::Arc::new(pg), sessions, Some(leases)))
}

/// Open files the process keeps for itself: listener, database pool, logs, and the
/// webhook connections of a busy moment. HTTP connections are counted apart.
const FILES_RESERVED: u64 = 256;
/// Open files one running session holds: its websocket (the sessions share one
/// database), and one more for a moment while it connects.
const FILES_PER_SESSION: u64 = 2;
/// HTTP connections at once unless configured: this many, at most a quarter of the
/// open-file limit.
const DEFAULT_HTTP_CONNECTIONS: u64 = 1024;
/// Event streams one instance (or one link page) may have open at once.
const STREAMS_PER_INSTANCE: usize = 16;

/// Raises the soft open-file limit to the hard one, and shares it out: the HTTP
/// connections (`configured`, or the default) come off first, so sessions never
/// compete with them. Returns how many sessions and HTTP connections fit.
fn open_file_room(configured: Option<usize>) -> anyhow::Result<(usize, usize)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let http = match configured {
        Some(n) => n as u64,
        None => DEFAULT_HTTP_CONNECTIONS.min(now / 4).max(16),
    };
    if configured.is_some() && http + FILES_RESERVED + FILES_PER_SESSION > now {
        bail!(
            "--max-connections (ZAPGATE_MAX_CONNECTIONS) {http} leaves no room for WhatsApp sessions under the open-file limit ({now}, of which {FILES_RESERVED} are kept for the gateway): lower it, or raise the limit (ulimit -n, or LimitNOFILE= under systemd)"
        );
    }
    let room = now.saturating_sub(FILES_RESERVED).saturating_sub(http) / FILES_PER_SESSION;
    let room = usize::try_from(room)
        .unwrap_or(usize::MAX)
        .clamp(1, 1_000_000);
    tracing::info!(
        before = before.map_or("unlimited".into(), |b| b.to_string()),
        now,
        sessions = room,
        http.connections = http,
        "open-file limit"
    );
    Ok((room, usize::try_from(http).unwrap_or(usize::MAX)))
}

/// A sandbox build skips the check of WhatsApp's certificate chain, so it may only talk
/// to a WhatsApp on this machine (wa-sim).
fn check_whatsapp_url(url: &str) -> anyhow::Result<()> {
    let uri: axum::http::Uri = url
        .parse()
        .with_context(|| format!("--whatsapp-url {url:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        bail!("--whatsapp-url must be a ws:// or wss:// URL, got {url:?}");
    }
    if cfg!(feature = "sandbox") {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!(
                "this sandbox build does not verify WhatsApp's certificates and only connects to loopback, not {host:?}"
            );
        }
        tracing::warn!(
            whatsapp.url = url,
            "sandbox build: WhatsApp's certificate chain is not verified"
        );
    }
    Ok(())
}

/// The admin token kept in `<data-dir>/admin-token`, generated (0600) on first start
/// (or when the file is empty), and whether it was made now. A file that others may
/// read is refused: the token would not be secret.
pub fn stored_admin_token(data_dir: &Path) -> anyhow::Result<(Secret, bool)> {
    use rand::RngExt as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let path = data_dir.join("admin-token");
    match std::fs::metadata(&path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => bail!(
            "{} may be read by other users (mode {:o}); fix it with `chmod 600 {}`, or delete it to generate a new token",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        ),
        Ok(_) => {
            let existing = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if let Ok(token) = existing.trim().parse::<Secret>() {
                tracing::info!(path = %path.display(), "admin token read from file");
                return Ok((token, false));
            }
            tracing::warn!(path = %path.display(), "the admin token file is empty; generating a new token");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::rng().random::<u8>()))
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{token}")?;
    tracing::info!(path = %path.display(), "generated an admin token (Authorization: Bearer <token in this file>)");
    Ok((Secret::new(token), true))
}

/// Random bytes as upper-case hex, as Z-API's ids and tokens look.
pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngExt as _;
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02X}", rng.random::<u8>()))
        .collect()
}

pub(crate) fn unix_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `2026-11-25T10:00:00.000Z`, as Z-API writes dates.
pub(crate) fn iso_time(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
