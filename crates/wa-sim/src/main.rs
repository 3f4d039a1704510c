//! `wa-sim --listen 127.0.0.1:PORT`: the simulated WhatsApp service and phone.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// A simulated WhatsApp service and phone speaking the real multi-device protocol.
/// Serves the WhatsApp websocket at /ws/chat and the JSON control API at /control.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WA_SIM_LISTEN", default_value = "127.0.0.1:5222")]
    listen: SocketAddr,
    /// QR refs per pairing window (WhatsApp sends 6).
    #[arg(long, env = "WA_SIM_REFS", default_value_t = 6)]
    refs: usize,
    /// Close connections silent for this many seconds.
    #[arg(long, env = "WA_SIM_IDLE_SECS", default_value_t = 120)]
    idle_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = wa_sim::Config {
        refs_per_pairing: args.refs.max(1),
        idle_timeout: Duration::from_secs(args.idle_secs.max(1)),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        "wa-sim listening: websocket ws://{addr}/ws/chat, control http://{addr}/control"
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    wa_sim::serve(listener, config, shutdown).await?;
    Ok(())
}
