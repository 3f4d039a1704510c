//! Configuration: one clap struct, every field a flag with an environment fallback.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// WhatsApp's own websocket endpoint.
pub const WHATSAPP_URL: &str = "wss://web.whatsapp.com/ws/chat";

/// What `zapgate --version` says: the version, and whether this is a sandbox build.
#[cfg(feature = "sandbox")]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (sandbox build: for a simulated WhatsApp on this machine only)"
);
#[cfg(not(feature = "sandbox"))]
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser, Debug)]
#[command(
    name = "zapgate",
    version = VERSION,
    about = "A self-hosted WhatsApp gateway with a Z-API compatible HTTP API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Settings of the settings file that a flag or the environment overrode, to say
    /// once logging is set up.
    #[arg(skip)]
    pub notes: Vec<String>,
}

#[derive(Subcommand, Debug)]
// Parsed once, at start: the size of the serve variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the HTTP API and keep every linked number connected.
    Serve(Config),
    /// Try zapgate with no phone and no internet: a simulated WhatsApp (wa-sim) runs in
    /// this process, the gateway against it, and the panel offers its simulated phone.
    /// Sandbox builds only.
    #[cfg(feature = "sandbox")]
    Demo(Demo),
    /// Ask the gateway running here whether it answers (`GET /healthz`), as a container's
    /// HEALTHCHECK does: exit status 0 when it answers 200, 1 otherwise.
    Health(Health),
}

#[derive(Args, Debug, Clone)]
pub struct Health {
    /// The settings file `serve` reads, for its `listen`.
    #[arg(long, env = "ZAPGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The address the gateway listens on; a wildcard one is asked on loopback.
    #[arg(long, env = "ZAPGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

#[cfg(feature = "sandbox")]
#[derive(Args, Debug, Clone)]
pub struct Demo {
    /// Address the gateway (API and panel) listens on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the demo's database, sessions and admin token; by default a new
    /// one, deleted at exit (the simulated WhatsApp forgets its accounts at exit too).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// A TOML file of settings, named like the flags without their dashes
    /// (`listen = "0.0.0.0:8080"`, `data-dir = "/srv/zapgate"`). A flag or an
    /// environment variable given too wins over the file.
    #[arg(long, env = "ZAPGATE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address the HTTP API listens on.
    #[arg(long, env = "ZAPGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the database, WhatsApp sessions and the generated admin token.
    #[arg(long, env = "ZAPGATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Database URL; default: a SQLite file `zapgate.db` in the data directory. Never
    /// shown in `--help` or logs: it may hold a password.
    #[arg(long, env = "ZAPGATE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// Bearer token for the partner routes (create, list, cancel instances). When unset,
    /// one is generated on first start and kept in `<data-dir>/admin-token`.
    #[arg(long, env = "ZAPGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Account security token: when set, every instance route requires this value in
    /// the `Client-Token` header.
    #[arg(long, env = "ZAPGATE_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<Secret>,

    /// WhatsApp websocket URL.
    #[arg(long, env = "ZAPGATE_WHATSAPP_URL", default_value = WHATSAPP_URL)]
    pub whatsapp_url: String,

    /// WhatsApp Web version to announce, like 2.3000.1030000000. When unset, the client
    /// learns the current one from WhatsApp at each connection.
    #[arg(long, env = "ZAPGATE_WHATSAPP_VERSION", value_parser = parse_version)]
    pub whatsapp_version: Option<(u32, u32, u32)>,

    /// How long a /qr-code, /phone-code or /disconnect call waits for WhatsApp, at most
    /// 50 (requests end after 60 s).
    #[arg(long, env = "ZAPGATE_LINK_WAIT_SECS", default_value_t = 20)]
    pub link_wait_secs: u64,

    /// New linking windows plus pairing-code requests the operator (API and panel) may
    /// ask of one instance per minute; more get 429 with Retry-After. Each link page has
    /// a budget of its own of the same size, and 10 pairing codes over its life.
    #[arg(long, env = "ZAPGATE_LINK_RATE_PER_MINUTE", default_value_t = 6)]
    pub link_rate_per_minute: u32,

    /// The pause between two messages an instance sends, in milliseconds: one value or
    /// a random range MIN-MAX. A message's own delayMessage replaces it. Z-API's
    /// default, 1000-3000, paces a number like a person; 0 sends as fast as WhatsApp
    /// acknowledges.
    #[arg(long, env = "ZAPGATE_SEND_INTERVAL_MS", default_value = "1000-3000")]
    pub send_interval_ms: crate::messaging::Pacing,

    /// Stored sessions reconnecting at once after a start (each waits for its login).
    #[arg(long, env = "ZAPGATE_RESTORE_CONCURRENCY", default_value_t = 16)]
    pub restore_concurrency: usize,

    /// The address users reach the gateway at, like https://wa.example.com: the base of
    /// the link pages' URLs (when unset, the listen address, over http). When https,
    /// the panel's session cookie is marked Secure.
    #[arg(long, env = "ZAPGATE_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// On a shared PostgreSQL database: where the other gateways reach this one (they
    /// forward the calls of the instances this one runs), like http://10.0.0.5:8080.
    /// Default: the listen address (a wildcard one with the host name). Not
    /// --public-url, which behind a load balancer reaches any node.
    #[arg(long, env = "ZAPGATE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// On a shared PostgreSQL database: this gateway's name among the others (logs,
    /// metrics). Default: the host name.
    #[arg(long, env = "ZAPGATE_NODE_NAME")]
    pub node_name: Option<String>,

    /// On a shared PostgreSQL database: seconds a gateway's lease outlives its last
    /// renewal. A gateway that cannot renew for 60% of it stops its WhatsApp
    /// connections; its numbers move to the others once it expired.
    #[arg(long, env = "ZAPGATE_LEASE_SECS", default_value_t = 10)]
    pub lease_secs: u64,

    /// Allow webhooks to plain http:// URLs and to loopback, private and link-local
    /// addresses (test receivers, internal networks). Off: https:// to public addresses
    /// only, as Z-API.
    #[arg(long, env = "ZAPGATE_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,

    /// Signs every webhook: `X-Zapgate-Signature: sha256=<hex HMAC-SHA256 of
    /// "timestamp.body">`, with the timestamp sent in `X-Zapgate-Timestamp`.
    #[arg(long, env = "ZAPGATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,

    /// How long an undelivered webhook event is retried, in hours.
    #[arg(long, env = "ZAPGATE_WEBHOOK_RETRY_HOURS", default_value_t = 24)]
    pub webhook_retry_hours: u64,

    /// HTTP connections open at once. At the cap, a new connection takes the place of the
    /// oldest idle one; when all are busy it gets a 503. Default: 1024, at most a quarter
    /// of the open-file limit. These files are counted apart from the WhatsApp sessions'.
    #[arg(long, env = "ZAPGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// HTTP connections one client address (an IPv6 /64) may hold at once; default: a
    /// quarter of --max-connections. Behind a reverse proxy every client shares its
    /// address: set it to --max-connections there.
    #[arg(long, env = "ZAPGATE_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,

    /// Reverse proxies in front of the gateway, as addresses or networks
    /// (`127.0.0.1,10.0.0.0/8`): a request from one is counted by the client address
    /// it gives in `X-Forwarded-For` (the failed-authentication limit), and the proxy's
    /// connections are not held to --max-connections-per-address. From anyone else,
    /// `X-Forwarded-For` is ignored.
    #[arg(long, env = "ZAPGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Network>,

    /// Seconds a client has to send a request's headers, from their first byte (from
    /// the connect, for a connection's first request).
    #[arg(long, env = "ZAPGATE_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,

    /// Seconds a keep-alive connection may idle between requests. Longer than clients
    /// keep idle connections pooled (90 s is common), so they close first.
    #[arg(long, env = "ZAPGATE_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    pub idle_timeout_secs: u64,

    /// Event streams (server-sent events) open at once, in all; more get 429. Default:
    /// half the HTTP connections, so streams never hold every connection.
    #[arg(long, env = "ZAPGATE_MAX_EVENT_STREAMS")]
    pub max_event_streams: Option<usize>,

    /// Failed authentications (admin token, Client-Token, instance token, panel sign-in)
    /// one address may make per minute; beyond, its attempts get 429 with Retry-After.
    #[arg(long, env = "ZAPGATE_AUTH_FAILURES_PER_MINUTE", default_value_t = 10)]
    pub auth_failures_per_minute: u32,

    /// Write logs as JSON lines.
    #[arg(long, env = "ZAPGATE_LOG_JSON")]
    pub log_json: bool,

    /// The control API of a simulated WhatsApp (wa-sim) whose phone the panel may use:
    /// set by `zapgate demo` only.
    #[arg(skip)]
    pub simulator: Option<String>,
}

/// The command line, with the settings of `serve --config FILE` added where neither a
/// flag nor an environment variable gave them: flags first, then the environment, then
/// the file, then the defaults. Help, the version and flag errors end the process here,
/// as clap does.
pub fn parse() -> anyhow::Result<Cli> {
    parse_from(std::env::args_os().collect())
}

pub fn parse_from(args: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let command = Cli::command();
    let matches = command.clone().get_matches_from(&args);
    let given = match matches.subcommand() {
        Some((name @ ("serve" | "health"), sub)) => sub
            .get_one::<PathBuf>("config")
            .map(|file| (name, file.clone(), sub)),
        _ => None,
    };
    let Some((name, file, sub)) = given else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let flags = command.find_subcommand(name).expect("a command of ours");
    let settings = read_settings(&file)?;
    let known: Vec<&str> = flags
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|long| !["config", "help"].contains(long))
        .collect();
    let mut added = Vec::new();
    let mut notes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in &settings {
        let long = key.replace('_', "-");
        if !seen.insert(long.clone()) {
            anyhow::bail!("{}: {long} is set twice", file.display());
        }
        let flag = flags
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && known.contains(&long.as_str()));
        let Some(flag) = flag else {
            // `health` reads only what it needs of the file `serve` reads.
            if name == "health" {
                continue;
            }
            anyhow::bail!(
                "{}: no setting is named {key:?}; the settings are: {}",
                file.display(),
                known.join(", ")
            );
        };
        // Given as a flag or in the environment: that wins.
        match sub.value_source(flag.get_id().as_str()) {
            Some(clap::parser::ValueSource::CommandLine) => {
                notes.push(format!(
                    "{}: {long} is not used: --{long} gives it",
                    file.display()
                ));
                continue;
            }
            Some(clap::parser::ValueSource::EnvVariable) => {
                let env = flag.get_env().map(|e| e.to_string_lossy().into_owned());
                notes.push(format!(
                    "{}: {long} is not used: {} gives it",
                    file.display(),
                    env.unwrap_or_default()
                ));
                continue;
            }
            _ => {}
        }
        added.extend(setting_arg(
            &file,
            key,
            &long,
            value,
            flag.get_action().takes_values(),
        )?);
    }
    // The file's settings go right after the command, before the command line's own.
    let at = 1 + args
        .iter()
        .skip(1)
        .position(|a| a == name)
        .expect("the command was given");
    let mut args = args;
    args.splice(at + 1..at + 1, added.into_iter().map(Into::into));
    let mut cli = Cli::try_parse_from(args).map_err(|e| {
        let said = e.render().to_string();
        let first = said.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "{}: {}",
            file.display(),
            first.trim_start_matches("error: ")
        )
    })?;
    cli.notes = notes;
    Ok(cli)
}

/// A settings file's table. A syntax error is said by its line and column only: the
/// line itself may hold a password.
fn read_settings(file: &std::path::Path) -> anyhow::Result<toml::Table> {
    use anyhow::Context as _;
    let doing = || format!("{} {}", crate::explain::SETTINGS_FILE, file.display());
    let text = std::fs::read_to_string(file).with_context(doing)?;
    text.parse::<toml::Table>().map_err(|e| {
        let at = e.span().map_or(0, |span| span.start).min(text.len());
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .unwrap_or_default()
            .chars()
            .count()
            + 1;
        anyhow::anyhow!("line {line}, column {column}: {}", e.message()).context(doing())
    })
}

/// The flag a setting stands for, as `--long=value` (a boolean one as `--long`, or
/// nothing for false).
fn setting_arg(
    file: &std::path::Path,
    key: &str,
    long: &str,
    value: &toml::Value,
    takes_values: bool,
) -> anyhow::Result<Option<String>> {
    let text = |value: &toml::Value| match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    };
    let wrong = || {
        anyhow::anyhow!(
            "{}: {key} must be {}",
            file.display(),
            if takes_values {
                "a string, a number, or a list of them"
            } else {
                "true or false"
            }
        )
    };
    Ok(match (value, takes_values) {
        (toml::Value::Boolean(true), false) => Some(format!("--{long}")),
        (toml::Value::Boolean(false), false) => None,
        (toml::Value::Array(items), true) => {
            let items: Option<Vec<String>> = items.iter().map(text).collect();
            Some(format!("--{long}={}", items.ok_or_else(wrong)?.join(",")))
        }
        (value, true) => Some(format!("--{long}={}", text(value).ok_or_else(wrong)?)),
        _ => return Err(wrong()),
    })
}

/// Longest an HTTP request may take; every wait inside one is shorter.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// What a request keeps for itself beyond the link wait (answering, the database).
const REQUEST_MARGIN: Duration = Duration::from_secs(10);

impl Config {
    pub fn link_wait(&self) -> Duration {
        Duration::from_secs(self.link_wait_secs)
    }

    /// Settings that parse but do not fit together, said the way a user can fix them.
    pub fn validate(&self) -> Result<(), String> {
        let most = (REQUEST_TIMEOUT - REQUEST_MARGIN).as_secs();
        if !(1..=most).contains(&self.link_wait_secs) {
            return Err(format!(
                "--link-wait-secs (ZAPGATE_LINK_WAIT_SECS) must be 1 to {most}: requests end after {} s",
                REQUEST_TIMEOUT.as_secs()
            ));
        }
        if self.link_rate_per_minute == 0 {
            return Err(
                "--link-rate-per-minute (ZAPGATE_LINK_RATE_PER_MINUTE) must be at least 1".into(),
            );
        }
        for (flag, url) in [
            ("--public-url (ZAPGATE_PUBLIC_URL)", &self.public_url),
            (
                "--advertise-url (ZAPGATE_ADVERTISE_URL)",
                &self.advertise_url,
            ),
        ] {
            let Some(url) = url else { continue };
            let uri = url.parse::<axum::http::Uri>().ok();
            let ok = uri.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some()
                    && u.query().is_none()
            });
            if !ok {
                return Err(format!(
                    "{flag} must be an http:// or https:// address with a host, like https://wa.example.com, got {url:?}"
                ));
            }
        }
        if !(2..=300).contains(&self.lease_secs) {
            return Err("--lease-secs (ZAPGATE_LEASE_SECS) must be 2 to 300".into());
        }
        if !(1..=24 * 30).contains(&self.webhook_retry_hours) {
            return Err(
                "--webhook-retry-hours (ZAPGATE_WEBHOOK_RETRY_HOURS) must be 1 to 720 (30 days)"
                    .into(),
            );
        }
        if !(1..=300).contains(&self.header_timeout_secs) {
            return Err(
                "--header-timeout-secs (ZAPGATE_HEADER_TIMEOUT_SECS) must be 1 to 300".into(),
            );
        }
        if !(1..=3600).contains(&self.idle_timeout_secs) {
            return Err("--idle-timeout-secs (ZAPGATE_IDLE_TIMEOUT_SECS) must be 1 to 3600".into());
        }
        let at_least_one = [
            (
                "--max-connections (ZAPGATE_MAX_CONNECTIONS)",
                self.max_connections,
            ),
            (
                "--max-event-streams (ZAPGATE_MAX_EVENT_STREAMS)",
                self.max_event_streams,
            ),
            (
                "--max-connections-per-address (ZAPGATE_MAX_CONNECTIONS_PER_ADDRESS)",
                self.max_connections_per_address,
            ),
        ];
        for (flag, value) in at_least_one {
            if value.is_some_and(|n| !(1..=1_000_000).contains(&n)) {
                return Err(format!("{flag} must be 1 to 1000000"));
            }
        }
        if self.auth_failures_per_minute == 0 {
            return Err(
                "--auth-failures-per-minute (ZAPGATE_AUTH_FAILURES_PER_MINUTE) must be at least 1"
                    .into(),
            );
        }
        if self.restore_concurrency == 0 {
            return Err(
                "--restore-concurrency (ZAPGATE_RESTORE_CONCURRENCY) must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// `--public-url` without its trailing slashes.
    pub fn public_url(&self) -> Option<String> {
        self.public_url
            .as_deref()
            .map(|url| url.trim_end_matches('/').to_owned())
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn webhook_retry_for(&self) -> Duration {
        Duration::from_secs(self.webhook_retry_hours * 3600)
    }

    /// Where earlier versions kept a session file per instance; they are brought into
    /// the sessions database at start and kept under `imported/`.
    pub fn sessions_dir(&self) -> PathBuf {
        self.data_dir.join("sessions")
    }

    /// Every instance's WhatsApp session, in one SQLite database.
    pub fn sessions_db(&self) -> PathBuf {
        self.data_dir.join("sessions.db")
    }

    pub fn database_url(&self) -> Secret {
        self.database_url.clone().unwrap_or_else(|| {
            Secret::new(format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("zapgate.db").display()
            ))
        })
    }
}

fn parse_version(s: &str) -> Result<(u32, u32, u32), String> {
    let parts: Vec<u32> = s
        .split('.')
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| format!("{p:?} is not a number"))
        })
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err("expected three numbers, like 2.3000.1030000000".into()),
    }
}

/// An address or a network of them: `10.0.0.0/8`, `fd00::/8`, `192.0.2.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, address: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((ours, width), (theirs, their_width)) = (bits(self.address), bits(address));
        if width != their_width {
            return false;
        }
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        ours & mask == theirs & mask
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match s.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (s.trim(), None),
        };
        let address: std::net::IpAddr = address
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a network like 10.0.0.0/8"))?;
        let most = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= most)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {most}"))?,
        };
        Ok(Self { address, prefix })
    }
}

/// A value that never shows in logs or `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_three_dotted_numbers() {
        assert_eq!(
            parse_version("2.3000.1030000000"),
            Ok((2, 3000, 1_030_000_000))
        );
        assert!(parse_version("2.3000").is_err());
        assert!(parse_version("2.x.1").is_err());
    }

    /// `serve --config <a file of settings>` and `args`, parsed.
    fn with_file(settings: &str, args: &[&str]) -> anyhow::Result<Config> {
        match parsed_with_file("serve", settings, args)?.command {
            Command::Serve(config) => Ok(config),
            _ => unreachable!("parsed `serve`"),
        }
    }

    /// `<command> --config <a file of settings>` and `args`, parsed.
    fn parsed_with_file(command: &str, settings: &str, args: &[&str]) -> anyhow::Result<Cli> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zapgate.toml");
        std::fs::write(&file, settings).unwrap();
        let mut all: Vec<std::ffi::OsString> = vec!["zapgate".into(), command.into()];
        all.extend(["--config".into(), file.into_os_string()]);
        all.extend(args.iter().map(Into::into));
        parse_from(all)
    }

    #[test]
    fn a_flag_over_a_setting_is_noted_and_health_reads_the_listen_of_the_same_file() {
        let settings = "listen = \"127.0.0.1:9001\"\nlink-wait-secs = 30\n";
        let cli = parsed_with_file("serve", settings, &["--link-wait-secs=25"]).unwrap();
        assert_eq!(cli.notes.len(), 1, "{:?}", cli.notes);
        assert!(
            cli.notes[0]
                .ends_with("zapgate.toml: link-wait-secs is not used: --link-wait-secs gives it"),
            "{:?}",
            cli.notes
        );
        // `health` takes the address from the file, and what it does not need is let be.
        match parsed_with_file("health", settings, &[]).unwrap().command {
            Command::Health(health) => assert_eq!(health.listen, "127.0.0.1:9001".parse().unwrap()),
            _ => unreachable!("parsed `health`"),
        }
    }

    #[test]
    fn a_settings_file_fills_in_what_the_flags_did_not_give() {
        let config = with_file(
            "listen = \"0.0.0.0:9000\"\nlink-wait-secs = 30\nwebhook_allow_private = true\n\
             log-json = false\ntrusted-proxies = [\"10.0.0.0/8\", \"192.168.1.1\"]\n",
            &["--link-wait-secs", "25"],
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.link_wait_secs, 25, "the flag wins");
        assert!(config.webhook_allow_private);
        assert!(!config.log_json);
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(
            config.data_dir,
            PathBuf::from("./data"),
            "the default stays"
        );
    }

    #[test]
    fn a_settings_file_with_an_unknown_or_wrong_setting_is_refused_plainly() {
        let refused = |settings: &str| format!("{:#}", with_file(settings, &[]).unwrap_err());
        let said = refused("lissten = \"127.0.0.1:1\"");
        assert!(said.contains("no setting is named \"lissten\""), "{said}");
        assert!(said.contains("listen, data-dir"), "{said}");
        let said = refused("listen = \"nowhere\"");
        assert!(
            said.contains("zapgate.toml: invalid value 'nowhere' for '--listen"),
            "{said}"
        );
        let said = refused("webhook-allow-private = \"yes\"");
        assert!(
            said.contains("webhook-allow-private must be true or false"),
            "{said}"
        );
        let said = refused("config = \"other.toml\"");
        assert!(said.contains("no setting is named \"config\""), "{said}");
        let said = refused("listen = ");
        assert!(said.starts_with("reading the settings file"), "{said}");
        assert!(said.contains("line 1, column"), "{said}");
        let said = refused("data_dir = \"/a\"\ndata-dir = \"/b\"");
        assert!(said.ends_with("data-dir is set twice"), "{said}");
    }

    fn config(args: &[&str]) -> Config {
        match Cli::try_parse_from(["zapgate", "serve"].iter().chain(args).copied())
            .unwrap()
            .command
        {
            Command::Serve(config) => config,
            _ => unreachable!("parsed `serve`"),
        }
    }

    #[test]
    fn the_link_wait_must_fit_in_a_request() {
        assert_eq!(config(&[]).validate(), Ok(()));
        assert_eq!(config(&["--link-wait-secs", "50"]).validate(), Ok(()));
        for bad in ["0", "51", "600"] {
            let error = config(&["--link-wait-secs", bad]).validate().unwrap_err();
            assert!(error.starts_with("--link-wait-secs"), "{error}");
        }
        assert!(config(&["--link-rate-per-minute", "0"]).validate().is_err());
    }

    #[test]
    fn networks_hold_the_addresses_under_their_prefix() {
        let net: Network = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.1.2".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::a00:1".parse().unwrap()));
        let one: Network = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Network>()
                .unwrap()
                .contains("192.0.2.1".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "proxy", "10.0.0.0/x"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_database_password_never_prints() {
        let config = config(&["--database-url", "postgres://u:hunter2@db/z"]);
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
