//! `zapgate serve`: parse the configuration, set up logging, bind, run.

use anyhow::Context as _;
use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use zapgate::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Serve(config) = Cli::parse().command;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,whatsapp_rust=warn,wacore=warn".into());
    // Colours only on a terminal: a log file or collector gets plain lines.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if config.log_json {
        logs.json().init();
    } else {
        logs.init();
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!("zapgate listening on http://{}", listener.local_addr()?);

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
    zapgate::run(config, listener, shutdown).await
}
