//! Node configuration: the one place that knows every key, its default and its rules.
//!
//! A config file is YAML. Unknown keys, wrong types and out-of-range values are
//! refused with a [`ConfigError`] that names the key; `main` prints it as one line and
//! exits with status 2. A missing file is created from [`default_file_text`], which
//! lists every key with its default and a one-line comment.

use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest value a client may store, whatever `max_value_bytes` says: bounds memory per request.
pub const MAX_VALUE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// A storage stall this many times `storage_stall_timeout` long stops the node.
pub const STALL_EXIT_FACTOR: u32 = 6;
/// Default `max_clock_offset_ms` (CockroachDB's default maximum offset is 500 ms too).
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 500;
/// `tombstone_grace_hours` is at least this many `sync_interval`s...
pub const GRACE_SYNC_ROUNDS: u32 = 10;
/// ...and this many `removal_timeout`s.
pub const GRACE_REMOVALS: u32 = 2;
/// Smallest `max_clock_offset_ms` accepted: clock readings need a round trip under
/// half of it, and below 10 ms most would be too coarse to judge by.
pub const MIN_CLOCK_OFFSET_MS: u64 = 10;
/// Largest `max_clock_offset_ms` accepted: one minute. A larger bound would let one
/// wrong clock order writes against real time by more than any client would accept.
pub const MAX_CLOCK_OFFSET_LIMIT_MS: u64 = 60_000;

/// How a write is made durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged after fsync; concurrent writes share one fsync (group commit).
    Sync,
    /// Acknowledged once the write reached the operating system's buffers.
    Buffer,
}

/// Verbosity of the JSON log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-request detail.
    Debug,
    /// Start-up, membership and sync events.
    Info,
    /// Problems that kvs works around.
    Warn,
    /// Problems that lose service.
    Error,
}

impl LogLevel {
    /// The name `tracing` filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// The `tracing` filter for a level. The storage engine's own chatter (per-table
/// detail) stays at warn.
pub fn log_filter(level: LogLevel) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::new(format!("{},fjall=warn,lsm_tree=warn", level.as_str()))
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<LogLevel, String> {
        match s {
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            _ => Err(format!("{s:?} is not one of debug, info, warn, error")),
        }
    }
}

/// Environment variable that overrides `log_level` (at start and on SIGHUP).
pub const LOG_LEVEL_ENV: &str = "KVS_LOG_LEVEL";

/// The effective log level: `KVS_LOG_LEVEL` when set, else the config's.
pub fn effective_log_level(configured: LogLevel) -> Result<LogLevel, String> {
    match std::env::var(LOG_LEVEL_ENV) {
        Ok(v) if !v.is_empty() => v.parse().map_err(|e| format!("{LOG_LEVEL_ENV}: {e}")),
        _ => Ok(configured),
    }
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    node_id: Option<String>,
    bind_address: String,
    port: u16,
    advertise_address: Option<String>,
    data_dir: PathBuf,
    seed_nodes: Vec<String>,
    read_only: bool,
    log_level: LogLevel,
    gossip_interval_min: f64,
    gossip_interval_max: f64,
    sync_interval: f64,
    catchup_interval: f64,
    bootstrap_max_age_hours: f64,
    throttle_delay_ms: u64,
    fetch_delay_ms: u64,
    max_value_bytes: u64,
    durability: Durability,
    failure_timeout: f64,
    removal_timeout: f64,
    tombstone_grace_hours: f64,
    max_clock_offset_ms: u64,
    storage_stall_timeout: f64,
    changes_retention_hours: f64,
    max_watchers: u64,
    changes_stall_timeout: f64,
    ack_timeout_ms: u64,
    trusted_proxies: Vec<String>,
    cluster_key_file: Option<PathBuf>,
    client_auth: bool,
    management_token_file: Option<PathBuf>,
    metrics_public: bool,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    tls_client_auth: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            node_id: None,
            bind_address: "127.0.0.1".into(),
            port: 8080,
            advertise_address: None,
            data_dir: PathBuf::from("./data"),
            seed_nodes: Vec::new(),
            read_only: false,
            log_level: LogLevel::Info,
            gossip_interval_min: 60.0,
            gossip_interval_max: 120.0,
            sync_interval: 300.0,
            catchup_interval: 120.0,
            bootstrap_max_age_hours: 720.0,
            throttle_delay_ms: 100,
            fetch_delay_ms: 50,
            max_value_bytes: 1024 * 1024,
            durability: Durability::Sync,
            failure_timeout: 300.0,
            removal_timeout: 600.0,
            tombstone_grace_hours: 168.0,
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
            storage_stall_timeout: 10.0,
            changes_retention_hours: 24.0,
            max_watchers: 10_000,
            changes_stall_timeout: 30.0,
            ack_timeout_ms: 2000,
            trusted_proxies: Vec::new(),
            cluster_key_file: None,
            client_auth: false,
            management_token_file: None,
            metrics_public: false,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_client_auth: false,
        }
    }
}

/// A validated configuration, with relative paths resolved and intervals as durations.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's unique name in the cluster.
    pub node_id: String,
    /// Address the HTTP server binds to.
    pub bind_address: IpAddr,
    /// Port the HTTP server binds to; 0 lets the OS pick one (the log says which).
    pub port: u16,
    /// `host:port` peers use to reach this node; `None` means bind address and bound port.
    pub advertise_address: Option<String>,
    /// Where fjall keeps this node's data (absolute, or relative to the working directory
    /// when the config itself was given by a relative path).
    pub data_dir: PathBuf,
    /// `host:port` of nodes to join through.
    pub seed_nodes: Vec<String>,
    /// Refuse client writes (403); reads still work.
    pub read_only: bool,
    /// Log verbosity.
    pub log_level: LogLevel,
    /// Shortest pause between gossip rounds.
    pub gossip_interval_min: Duration,
    /// Longest pause between gossip rounds.
    pub gossip_interval_max: Duration,
    /// Pause between regular anti-entropy syncs.
    pub sync_interval: Duration,
    /// Pause between catch-up syncs while behind.
    pub catchup_interval: Duration,
    /// How far back a bootstrapping node fetches before switching to normal.
    pub bootstrap_max_age: Duration,
    /// Pause between bootstrap page requests.
    pub throttle_delay: Duration,
    /// Pause between bootstrap fetches.
    pub fetch_delay: Duration,
    /// Largest accepted value, in bytes.
    pub max_value_bytes: u64,
    /// When a write is acknowledged.
    pub durability: Durability,
    /// Silence after which a member is reported down.
    pub failure_timeout: Duration,
    /// Silence after which a member is removed.
    pub removal_timeout: Duration,
    /// How long tombstones are kept at least; purging also waits for every member.
    pub tombstone_grace: Duration,
    /// Largest clock offset tolerated, in ms: the HLC's adoption bound and the skew
    /// beyond which client writes are refused.
    pub max_clock_offset_ms: u64,
    /// A storage commit running longer than this means storage is stuck: `/health`
    /// says `error`, writes get 503, the watchdog is not fed; after
    /// [`STALL_EXIT_FACTOR`] times this the node exits 1.
    pub storage_stall_timeout: Duration,
    /// How long the change feed keeps changes at least.
    pub changes_retention: Duration,
    /// Most change feed long-polls and streams open at once (503 beyond).
    pub max_watchers: usize,
    /// A change stream whose client takes nothing for this long while there is
    /// something to send is ended with an error event.
    pub changes_stall_timeout: Duration,
    /// Longest a write with `?ack=` waits for its peers before answering 202.
    pub ack_timeout: Duration,
    /// Proxies whose `X-Forwarded-For` / `X-Forwarded-Proto` headers are believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// The cluster keys (`cluster_key_file`, read at start): node-to-node requests
    /// are signed with the first and accepted under any; `None`: unsigned.
    pub cluster_keys: Option<crate::auth::ClusterKeys>,
    /// With `client_auth: true`, the management token (`management_token_file`, read
    /// at start): every client request needs a token then. `None`: client auth off.
    pub management_token: Option<Secret>,
    /// Whether `GET /metrics` is open without a token when client auth is on.
    pub metrics_public: bool,
    /// HTTPS on the node's port and to peers (`tls_*` keys); `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// A secret read from a file; its `Debug` hides it (a config is logged at start).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Why a config could not be used. Displayed as one line naming the key.
#[derive(Debug)]
pub struct ConfigError {
    /// The file the error is about.
    pub file: PathBuf,
    /// The key at fault, when one is.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error in {}: ", self.file.display())?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the config at `path`, creating it from the commented default when missing.
    pub fn load_or_create(path: &Path) -> Result<(Config, bool), ConfigError> {
        let err = |key: Option<&str>, message: String| ConfigError {
            file: path.to_path_buf(),
            key: key.map(str::to_string),
            message,
        };
        let created = match std::fs::metadata(path) {
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_new_file(path, default_file_text().as_bytes())
                    .map_err(|e| err(None, format!("cannot create default config: {e}")))?;
                true
            }
            Err(e) => return Err(err(None, format!("cannot read: {e}"))),
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(None, format!("cannot read: {e}")))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let config = Config::parse(&text, base).map_err(|(key, message)| err(key.as_deref(), message))?;
        Ok((config, created))
    }

    /// Reads an existing config (no creation), for reloads.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, message: String| ConfigError { file: path.to_path_buf(), key, message };
        let text = std::fs::read_to_string(path).map_err(|e| err(None, format!("cannot read: {e}")))?;
        Config::parse(&text, path.parent().unwrap_or(Path::new(""))).map_err(|(k, m)| err(k, m))
    }

    /// Parses and validates YAML text; relative `data_dir` is resolved against `base`.
    /// Errors are `(key, message)`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, (Option<String>, String)> {
        let raw: RawConfig = if is_blank_yaml(text) {
            RawConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| split_yaml_error(&e.to_string()))?
        };
        raw.validate(base)
    }

    /// The `host:port` peers are told, given the port actually bound.
    pub fn advertised(&self, bound_port: u16) -> String {
        match &self.advertise_address {
            Some(a) => a.clone(),
            None => SocketAddr::new(self.bind_address, bound_port).to_string(),
        }
    }
}

fn write_new_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // create_new: never overwrite a file another process wrote meanwhile.
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// True when the text holds no YAML content (only comments and blank lines).
fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    })
}

/// serde_yaml_ng reports a field error as `key: message at line L column C`; split off
/// the key so the message names it the same way as our own checks do.
fn split_yaml_error(msg: &str) -> (Option<String>, String) {
    let msg = msg.replace('\n', " ");
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let key = &rest[..end];
        let tail = rest[end + 1..].trim_start_matches(',').trim();
        return (Some(key.to_string()), format!("unknown key ({tail})"));
    }
    if let Some((key, rest)) = msg.split_once(": ")
        && !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '[' || c == ']')
    {
        return (Some(key.to_string()), rest.to_string());
    }
    (None, msg)
}

type FieldResult<T> = Result<T, (Option<String>, String)>;

fn field_err<T>(key: &str, message: impl Into<String>) -> FieldResult<T> {
    Err((Some(key.to_string()), message.into()))
}

fn seconds(key: &str, value: f64) -> FieldResult<Duration> {
    if !value.is_finite() || value <= 0.0 || value > 1.0e9 {
        return field_err(key, format!("must be a number of seconds greater than 0, got {value}"));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Checks a `host:port` peer address (host may be a name, IPv4, or bracketed IPv6).
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} is not host:port"));
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[') && host.ends_with(']')
            || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
    if !host_ok {
        return Err(format!("{addr:?} has an invalid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{addr:?} has an invalid port")),
    }
}

/// The machine's hostname, the default `node_id`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| check_node_id(s).is_ok())
        .unwrap_or_else(|| "kvs-node".to_string())
}

/// Checks a `node_id` (also one a peer sends).
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
        return Err(format!("{id:?} may only hold letters, digits, '.', '-' and '_'"));
    }
    Ok(())
}

impl RawConfig {
    fn validate(self, base: &Path) -> FieldResult<Config> {
        let tls = self.tls(base)?;
        let node_id = match self.node_id {
            Some(id) => {
                check_node_id(&id).or_else(|m| field_err("node_id", m))?;
                id
            }
            None => hostname(),
        };
        let bind_address: IpAddr = self
            .bind_address
            .parse()
            .or_else(|_| field_err("bind_address", format!("{:?} is not an IP address", self.bind_address)))?;
        if let Some(a) = &self.advertise_address {
            check_host_port(a).or_else(|m| field_err("advertise_address", m))?;
        } else if bind_address.is_unspecified() {
            return field_err(
                "advertise_address",
                format!("must be set when bind_address is {bind_address}: peers cannot reach an unspecified address"),
            );
        }
        for s in &self.seed_nodes {
            check_host_port(s).or_else(|m| field_err("seed_nodes", m))?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return field_err("data_dir", "must not be empty");
        }
        let data_dir = if self.data_dir.is_absolute() { self.data_dir } else { base.join(self.data_dir) };
        let gossip_interval_min = seconds("gossip_interval_min", self.gossip_interval_min)?;
        let gossip_interval_max = seconds("gossip_interval_max", self.gossip_interval_max)?;
        if gossip_interval_min > gossip_interval_max {
            return field_err(
                "gossip_interval_min",
                format!(
                    "must not exceed gossip_interval_max ({} > {})",
                    self.gossip_interval_min, self.gossip_interval_max
                ),
            );
        }
        let grace = self.tombstone_grace_hours;
        if !grace.is_finite() || grace <= 0.0 || grace > 1.0e6 {
            return field_err(
                "tombstone_grace_hours",
                format!("must be a number of hours greater than 0, got {grace}"),
            );
        }
        let hours = self.bootstrap_max_age_hours;
        if !hours.is_finite() || hours <= 0.0 || hours > 1.0e6 {
            return field_err(
                "bootstrap_max_age_hours",
                format!("must be a number of hours greater than 0, got {hours}"),
            );
        }
        if self.max_value_bytes == 0 || self.max_value_bytes > MAX_VALUE_BYTES_LIMIT {
            return field_err(
                "max_value_bytes",
                format!("must be between 1 and {MAX_VALUE_BYTES_LIMIT}, got {}", self.max_value_bytes),
            );
        }
        if !(MIN_CLOCK_OFFSET_MS..=MAX_CLOCK_OFFSET_LIMIT_MS).contains(&self.max_clock_offset_ms) {
            return field_err(
                "max_clock_offset_ms",
                format!(
                    "must be between {MIN_CLOCK_OFFSET_MS} and {MAX_CLOCK_OFFSET_LIMIT_MS}, got {}",
                    self.max_clock_offset_ms
                ),
            );
        }
        let cluster_keys = match &self.cluster_key_file {
            Some(f) => {
                Some(crate::auth::ClusterKeys::load(&base.join(f)).or_else(|m| field_err("cluster_key_file", m))?)
            }
            None => None,
        };
        if self.client_auth && self.cluster_key_file.is_none() {
            // Without a cluster key the node-to-node routes are open: anyone could push
            // a token record or read every key through them, whatever the tokens say.
            return field_err(
                "cluster_key_file",
                "client_auth: true needs a cluster key as well (kvs keygen), or the node-to-node routes bypass the tokens",
            );
        }
        let management_token = match (self.client_auth, &self.management_token_file) {
            (false, _) => None,
            (true, None) => {
                return field_err("management_token_file", "client_auth: true needs a management token file");
            }
            (true, Some(f)) => {
                let path = base.join(f);
                let text = std::fs::read_to_string(&path)
                    .or_else(|e| field_err("management_token_file", format!("cannot read {}: {e}", path.display())))?;
                let token = crate::acl::management_token(&text)
                    .or_else(|m| field_err("management_token_file", format!("{}: {m}", path.display())))?;
                Some(Secret(token))
            }
        };
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .map(|p| p.parse().or_else(|_| field_err("trusted_proxies", format!("{p:?} is not an IP address"))))
            .collect::<FieldResult<Vec<IpAddr>>>()?;
        let failure_timeout = seconds("failure_timeout", self.failure_timeout)?;
        let removal_timeout = seconds("removal_timeout", self.removal_timeout)?;
        if failure_timeout <= gossip_interval_max {
            return field_err(
                "failure_timeout",
                format!(
                    "must exceed gossip_interval_max ({} <= {}), or members flap between alive and down",
                    self.failure_timeout, self.gossip_interval_max
                ),
            );
        }
        if removal_timeout <= failure_timeout {
            return field_err(
                "removal_timeout",
                format!("must exceed failure_timeout ({} <= {})", self.removal_timeout, self.failure_timeout),
            );
        }
        let sync_interval = seconds("sync_interval", self.sync_interval)?;
        let storage_stall_timeout = seconds("storage_stall_timeout", self.storage_stall_timeout)?;
        if storage_stall_timeout > Duration::from_secs(600) || storage_stall_timeout < Duration::from_millis(100) {
            return field_err(
                "storage_stall_timeout",
                format!("must be between 0.1 and 600 seconds, got {}", self.storage_stall_timeout),
            );
        }
        let changes_stall_timeout = seconds("changes_stall_timeout", self.changes_stall_timeout)?;
        if changes_stall_timeout > Duration::from_secs(3600) || changes_stall_timeout < Duration::from_millis(100) {
            return field_err(
                "changes_stall_timeout",
                format!("must be between 0.1 and 3600 seconds, got {}", self.changes_stall_timeout),
            );
        }
        // Fractions are accepted (tests keep seconds); at least one second.
        if !self.changes_retention_hours.is_finite()
            || !(1.0 / 3600.0..=87_600.0).contains(&self.changes_retention_hours)
        {
            return field_err(
                "changes_retention_hours",
                format!("must be between 0.000278 (one second) and 87600, got {}", self.changes_retention_hours),
            );
        }
        if !(1..=60_000).contains(&self.ack_timeout_ms) {
            return field_err("ack_timeout_ms", format!("must be between 1 and 60000, got {}", self.ack_timeout_ms));
        }
        if !(1..=1_000_000).contains(&self.max_watchers) {
            return field_err("max_watchers", format!("must be between 1 and 1000000, got {}", self.max_watchers));
        }
        let tombstone_grace = Duration::from_secs_f64(grace * 3600.0);
        // A tombstone must outlive several sync rounds (or a delete that one round
        // missed is purged before the next finds it), and a member's silence long
        // enough to be removed (or a node that is merely down is treated as gone).
        let floor = (sync_interval * GRACE_SYNC_ROUNDS).max(removal_timeout * GRACE_REMOVALS);
        if tombstone_grace < floor {
            return field_err(
                "tombstone_grace_hours",
                format!(
                    "must be at least {GRACE_SYNC_ROUNDS} x sync_interval and {GRACE_REMOVALS} x removal_timeout \
                     ({:.6} hours with these settings), got {grace}",
                    floor.as_secs_f64() / 3600.0
                ),
            );
        }
        Ok(Config {
            node_id,
            bind_address,
            port: self.port,
            advertise_address: self.advertise_address,
            data_dir,
            seed_nodes: self.seed_nodes,
            read_only: self.read_only,
            log_level: self.log_level,
            gossip_interval_min,
            gossip_interval_max,
            sync_interval,
            catchup_interval: seconds("catchup_interval", self.catchup_interval)?,
            bootstrap_max_age: Duration::from_secs_f64(hours * 3600.0),
            throttle_delay: Duration::from_millis(self.throttle_delay_ms),
            fetch_delay: Duration::from_millis(self.fetch_delay_ms),
            max_value_bytes: self.max_value_bytes,
            durability: self.durability,
            failure_timeout,
            removal_timeout,
            tombstone_grace,
            max_clock_offset_ms: self.max_clock_offset_ms,
            storage_stall_timeout,
            changes_retention: Duration::from_secs_f64(self.changes_retention_hours * 3600.0),
            max_watchers: self.max_watchers as usize,
            changes_stall_timeout,
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            trusted_proxies,
            cluster_keys,
            management_token,
            metrics_public: self.metrics_public,
            tls,
        })
    }
}

impl RawConfig {
    /// The TLS files: all three or none, each readable and usable (a bad one names
    /// its key).
    fn tls(&self, base: &Path) -> FieldResult<Option<crate::tls::TlsFiles>> {
        let (cert, key, ca) = match (&self.tls_cert_file, &self.tls_key_file, &self.tls_ca_file) {
            (None, None, None) => {
                if self.tls_client_auth {
                    return field_err("tls_client_auth", "needs tls_cert_file, tls_key_file and tls_ca_file");
                }
                return Ok(None);
            }
            (Some(c), Some(k), Some(a)) => (base.join(c), base.join(k), base.join(a)),
            (None, _, _) => return field_err("tls_cert_file", "TLS needs tls_cert_file, tls_key_file and tls_ca_file"),
            (_, None, _) => return field_err("tls_key_file", "TLS needs tls_cert_file, tls_key_file and tls_ca_file"),
            (_, _, None) => {
                return field_err("tls_ca_file", "TLS needs tls_ca_file: the CA this node trusts when it calls peers");
            }
        };
        let files = crate::tls::TlsFiles { cert, key, ca, client_auth: self.tls_client_auth };
        files.check().map_err(|(k, m)| (Some(k.to_string()), m))?;
        Ok(Some(files))
    }
}

/// The commented default config, written when the config file is missing.
/// The repository's `config.yaml` is exactly this text (a test checks it).
pub fn default_file_text() -> &'static str {
    DEFAULT_CONFIG
}

const DEFAULT_CONFIG: &str = r#"# kvs node configuration. Every key is optional; the values below are the defaults.
# Intervals are in seconds and accept fractions. See README.md, "Configuration".

# Unique name of this node in the cluster (letters, digits, . - _); null: the hostname.
node_id: null
# IP address the HTTP server listens on.
bind_address: "127.0.0.1"
# TCP port the HTTP server listens on (0: any free port, logged at start).
port: 8080
# host:port peers use to reach this node; null: bind_address:port. Required with 0.0.0.0.
advertise_address: null
# Where data is stored; a relative path is resolved against this file's directory.
data_dir: "./data"
# host:port of existing nodes to join through; empty: start a new cluster.
seed_nodes: []
# Refuse client writes with 403; reads still work.
read_only: false
# Log verbosity: debug, info, warn or error.
log_level: info
# Seconds without news of a member before it is reported down (above gossip_interval_max).
failure_timeout: 300
# Seconds without news of a member before it is removed (above failure_timeout).
removal_timeout: 600
# Shortest pause between two gossip rounds, in seconds.
gossip_interval_min: 60
# Longest pause between two gossip rounds, in seconds.
gossip_interval_max: 120
# Pause between regular anti-entropy syncs with a random peer, in seconds.
sync_interval: 300
# Pause between catch-up syncs while this node is behind, in seconds.
catchup_interval: 120
# Hours a delete's tombstone is kept at least (at least 10 x sync_interval and
# 2 x removal_timeout). It is purged after that only once every member has confirmed
# it holds nothing older; a down member holds purges back until it is removed.
tombstone_grace_hours: 168
# How far back (hours) a new node fetches before it serves writes.
bootstrap_max_age_hours: 720
# Pause between bootstrap page requests, in milliseconds.
throttle_delay_ms: 100
# Pause between bootstrap fetches, in milliseconds.
fetch_delay_ms: 50
# Largest value accepted, in bytes (at most 67108864).
max_value_bytes: 1048576
# sync: acknowledge writes after fsync (group commit); buffer: after the OS has them.
durability: sync
# Largest clock offset tolerated, in milliseconds (10 to 60000). A node never moves its
# version clock more than this ahead of its wall clock to follow a peer, and a node
# whose clock is further than this from its alive peers' median refuses client writes
# (503) until it is right. Keep the nodes' clocks in sync (NTP) well within it.
max_clock_offset_ms: 500
# Seconds a storage write may take before the node reports storage stuck (a full or
# hung disk): /health says "error", client writes get 503 at once and the systemd
# watchdog is no longer fed. After 6 times this the node exits with status 1.
storage_stall_timeout: 10
# Hours the change feed (GET /changes) keeps changes at least; a cursor older than
# that gets 410 and must re-read. Each change costs about 50 bytes plus its key on disk.
changes_retention_hours: 24
# Most change feed long-polls and streams open at once; more get 503.
max_watchers: 10000
# Seconds a change stream (SSE) may go without its client taking any bytes while
# there is something to send; then it ends with an error event (the client resumes).
changes_stall_timeout: 30
# Longest a write sent with ?ack=<n>|all waits, in milliseconds (1 to 60000), for that
# many nodes to have applied it; then it answers 202 with the count (the write stays).
ack_timeout_ms: 2000
# IP addresses of reverse proxies whose X-Forwarded-For/-Proto headers are believed.
trusted_proxies: []
# File of cluster keys (base64, one a line; make one with `kvs keygen`); a relative
# path is resolved against this file's directory. When set, every node-to-node
# request is signed with the first key and accepted only under one of them (others
# get 401), so only holders of a key can join, gossip or exchange data. null: off.
cluster_key_file: null
# true: every client request but GET /health needs a token (Authorization: Bearer);
# tokens are made through /acl/tokens with the management token (README "Security").
# Needs cluster_key_file too: without it the node-to-node routes would bypass tokens.
client_auth: false
# File holding the management token (printable, 32 bytes or more), which can do
# everything; required with client_auth: true. A relative path is resolved against
# this file's directory.
management_token_file: null
# true: GET /metrics answers without a token even with client_auth: true.
metrics_public: false
# HTTPS (rustls) on this node's port, client API and node-to-node alike: this node's
# certificate chain and private key (PEM), and the CA (PEM) it trusts when it calls
# peers over HTTPS. All three or none; every node of a cluster alike. The files are
# re-read on SIGHUP (a path change needs a restart).
tls_cert_file: null
tls_key_file: null
tls_ca_file: null
# true: node-to-node requests must present a client certificate from tls_ca_file
# (this node presents its own certificate to its peers).
tls_client_auth: false
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FieldResult<Config> {
        Config::parse(text, Path::new("/etc/kvs"))
    }

    fn key_of(text: &str) -> Option<String> {
        parse(text).err().and_then(|(k, _)| k)
    }

    #[test]
    fn default_text_parses_to_defaults() {
        let c = parse(DEFAULT_CONFIG).expect("default config is valid");
        assert_eq!(c.port, 8080);
        assert_eq!(c.data_dir, Path::new("/etc/kvs/./data"));
        assert_eq!(c.durability, Durability::Sync);
        assert_eq!(c.gossip_interval_min, Duration::from_secs(60));
        assert_eq!(c.max_value_bytes, 1 << 20);
        assert_eq!(c.max_clock_offset_ms, 500);
        assert!(!c.node_id.is_empty());
    }

    #[test]
    fn default_text_names_every_key() {
        let keys: Vec<&str> = DEFAULT_CONFIG
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split_once(':').map(|(k, _)| k))
            .collect();
        // A key added to RawConfig without a line here fails this count.
        let raw = format!("{:?}", RawConfig::default());
        assert_eq!(keys.len(), raw.matches(": ").count());
        for k in keys {
            assert!(raw.contains(&format!("{k}: ")), "{k} is not a config key");
        }
    }

    #[test]
    fn empty_and_comment_only_files_mean_defaults() {
        assert_eq!(parse("").unwrap().port, 8080);
        assert_eq!(parse("# nothing\n\n").unwrap().port, 8080);
    }

    #[test]
    fn fractions_of_seconds() {
        let c = parse("sync_interval: 0.2\ngossip_interval_min: 0.1\ngossip_interval_max: 0.3").unwrap();
        assert_eq!(c.sync_interval, Duration::from_millis(200));
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(key_of("bogus: 1").as_deref(), Some("bogus"));
        assert_eq!(key_of("port: abc").as_deref(), Some("port"));
        assert_eq!(key_of("port: 70000").as_deref(), Some("port"));
        assert_eq!(key_of("port: -1").as_deref(), Some("port"));
        assert_eq!(key_of("gossip_interval_min: 5\ngossip_interval_max: 1").as_deref(), Some("gossip_interval_min"));
        assert_eq!(key_of("sync_interval: 0").as_deref(), Some("sync_interval"));
        assert_eq!(key_of("durability: maybe").as_deref(), Some("durability"));
        assert_eq!(key_of("log_level: loud").as_deref(), Some("log_level"));
        assert_eq!(key_of("bind_address: nowhere").as_deref(), Some("bind_address"));
        assert_eq!(key_of("bind_address: 0.0.0.0").as_deref(), Some("advertise_address"));
        assert_eq!(key_of("seed_nodes: [\"nohost\"]").as_deref(), Some("seed_nodes"));
        assert_eq!(key_of("max_value_bytes: 0").as_deref(), Some("max_value_bytes"));
        assert_eq!(key_of("node_id: \"a b\"").as_deref(), Some("node_id"));
        assert_eq!(key_of("read_only: 3").as_deref(), Some("read_only"));
        assert_eq!(key_of("failure_timeout: 100").as_deref(), Some("failure_timeout"));
        assert_eq!(key_of("removal_timeout: 300").as_deref(), Some("removal_timeout"));
        assert_eq!(key_of("tombstone_grace_hours: 0").as_deref(), Some("tombstone_grace_hours"));
        assert_eq!(key_of("max_clock_offset_ms: 0").as_deref(), Some("max_clock_offset_ms"));
        // 10 x a 300 s sync_interval is 0.83 h; 2 x a 600 s removal_timeout 0.33 h.
        assert_eq!(key_of("tombstone_grace_hours: 0.8").as_deref(), Some("tombstone_grace_hours"));
        assert!(parse("tombstone_grace_hours: 0.84").is_ok());
        assert_eq!(
            key_of("tombstone_grace_hours: 1\nremoval_timeout: 1900\nfailure_timeout: 400").as_deref(),
            Some("tombstone_grace_hours")
        );
        assert_eq!(key_of("max_clock_offset_ms: 9").as_deref(), Some("max_clock_offset_ms"));
        assert_eq!(key_of("max_clock_offset_ms: 60001").as_deref(), Some("max_clock_offset_ms"));
        assert_eq!(key_of("max_clock_offset_ms: -5").as_deref(), Some("max_clock_offset_ms"));
        assert_eq!(key_of("trusted_proxies: [\"nginx\"]").as_deref(), Some("trusted_proxies"));
    }

    #[test]
    fn unspecified_bind_with_advertise_is_fine() {
        let c = parse("bind_address: 0.0.0.0\nadvertise_address: \"db1.example:8080\"").unwrap();
        assert_eq!(c.advertised(8080), "db1.example:8080");
    }

    #[test]
    fn absolute_data_dir_kept() {
        assert_eq!(parse("data_dir: /var/lib/kvs").unwrap().data_dir, Path::new("/var/lib/kvs"));
    }

    #[test]
    fn repository_configs_are_valid() {
        let nodes = [include_str!("../node1.yaml"), include_str!("../node2.yaml"), include_str!("../node3.yaml")];
        for (i, text) in nodes.iter().enumerate() {
            let c = parse(text).unwrap_or_else(|e| panic!("node{}.yaml: {e:?}", i + 1));
            assert_eq!(c.node_id, format!("node{}", i + 1));
            assert_eq!(c.port, 8081 + i as u16);
            assert_eq!(c.seed_nodes.len(), i, "node1 founds, node2 seeds 1, node3 seeds 1 and 2");
        }
        assert_eq!(include_str!("../config.yaml"), DEFAULT_CONFIG);
    }

    #[test]
    fn host_port_rules() {
        assert!(check_host_port("127.0.0.1:8081").is_ok());
        assert!(check_host_port("[::1]:8081").is_ok());
        assert!(check_host_port("db-1.example:80").is_ok());
        assert!(check_host_port("db1").is_err());
        assert!(check_host_port(":80").is_err());
        assert!(check_host_port("db1:0").is_err());
        assert!(check_host_port("db 1:80").is_err());
    }
}
