//! `zapgate serve`: parse the configuration, set up logging, bind, run.
//! `zapgate demo` (sandbox builds): the same, against a simulated WhatsApp in-process.

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use zapgate::config::{Command, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match zapgate::config::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("{}", zapgate::explain::explain(&e));
            return std::process::ExitCode::FAILURE;
        }
    };
    let notes = cli.notes;
    let ran = match cli.command {
        Command::Serve(config) => {
            logs(config.log_json);
            for note in notes {
                tracing::warn!("{note}");
            }
            serve(config).await
        }
        #[cfg(feature = "sandbox")]
        Command::Demo(demo) => {
            logs(false);
            demo::run(demo).await
        }
        Command::Health(health) => {
            return match healthy(health.listen).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("unhealthy: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    };
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Said plainly, with what to change; never a backtrace.
            eprintln!("{}", zapgate::explain::explain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Without `RUST_LOG`, only the gateway's own lines below warnings: the WhatsApp
/// library logs phone numbers and pairing codes at info, under targets of its own
/// (`Client/PairCode`) that name no crate.
const DEFAULT_LOG_FILTER: &str = "warn,zapgate=info";

fn logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    // Colours only on a terminal: a log file or collector gets plain lines.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("{} {}", zapgate::explain::BINDING, config.listen))?;
    zapgate::run(config, listener, stop_on_signal()).await
}

/// `GET /healthz` of the gateway listening on `listen`: fine when it answers 200 within
/// a few seconds.
async fn healthy(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let port = listen.port();
    // A wildcard address is asked on loopback (IPv6 first, then IPv4, for a container
    // without IPv6).
    let tried: Vec<SocketAddr> = match listen {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            vec![(Ipv4Addr::LOCALHOST, port).into()]
        }
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => vec![
            (Ipv6Addr::LOCALHOST, port).into(),
            (Ipv4Addr::LOCALHOST, port).into(),
        ],
        addr => vec![addr],
    };
    let mut failed = None;
    for addr in tried {
        match ask_health(addr).await {
            Ok(()) => {
                println!("healthy: {addr} answers");
                return Ok(());
            }
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.expect("an address was tried"))
}

/// One `GET /healthz`: fine on a 200 within 5 s.
async fn ask_health(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let asked = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), asked)
        .await
        .map_err(|_| anyhow::anyhow!("asking {addr}/healthz: no answer within 5 s"))?
        .with_context(|| format!("asking {addr}/healthz"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "asking {addr}/healthz: it answered {status:?}"
    );
    Ok(())
}

/// Cancelled on Ctrl-C or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
    });
    shutdown
}

#[cfg(feature = "sandbox")]
mod demo {
    use anyhow::Context as _;
    use zapgate::config::{Config, Demo};

    /// The web version announced to the simulated WhatsApp (there is no internet to
    /// learn it from).
    const VERSION: (u32, u32, u32) = (2, 3000, 1_030_000_000);

    pub(super) async fn run(demo: Demo) -> anyhow::Result<()> {
        let sim = wa_sim::WaSim::start(wa_sim::Config::default())
            .await
            .context("starting the simulated WhatsApp")?;
        let (data_dir, temporary) = match demo.data_dir {
            Some(dir) => (dir, false),
            None => {
                let name = format!(
                    "zapgate-demo-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                );
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let (admin_token, _) = zapgate::stored_admin_token(&data_dir)?;
        let listener = tokio::net::TcpListener::bind(demo.listen)
            .await
            .with_context(|| format!("{} {}", zapgate::explain::BINDING, demo.listen))?;
        let address = listener.local_addr()?;
        let config = Config {
            config: None,
            listen: address,
            data_dir: data_dir.clone(),
            database_url: None,
            admin_token: Some(admin_token.clone()),
            client_token: None,
            whatsapp_url: sim.ws_url(),
            whatsapp_version: Some(VERSION),
            link_wait_secs: 20,
            link_rate_per_minute: 30,
            restore_concurrency: 16,
            send_interval_ms: zapgate::messaging::Pacing::ZAPI,
            public_url: None,
            advertise_url: None,
            node_name: None,
            lease_secs: 10,
            webhook_allow_private: false,
            webhook_secret: None,
            webhook_retry_hours: 24,
            max_connections: None,
            max_connections_per_address: None,
            trusted_proxies: Vec::new(),
            header_timeout_secs: 10,
            idle_timeout_secs: 120,
            max_event_streams: None,
            auth_failures_per_minute: 10,
            log_json: false,
            simulator: Some(sim.control_url()),
        };
        println!(
            "zapgate demo: WhatsApp is simulated (wa-sim, {})",
            sim.ws_url()
        );
        println!("  panel:       http://{address}/");
        println!("  API:         http://{address}/docs (its reference; /openapi.json)");
        println!("  admin token: {}", admin_token.expose());
        println!(
            "Create an instance, show its QR code, and press \"Scan with the simulated phone\"."
        );
        let kept = if temporary { " (deleted at exit)" } else { "" };
        println!("  data:        {}{kept}", data_dir.display());
        let result = zapgate::run(config, listener, super::stop_on_signal()).await;
        let _ = sim.shutdown().await;
        if temporary {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
        result
    }
}
