//! Configuration: a TOML file (optional), overridden by `HEARTH_…` environment variables, checked
//! completely before anything starts.
//!
//! Every key has a default, so Hearth runs with no file at all. Environment variables name a key by
//! its path with `__` between levels: `HEARTH_SERVER_NAME`, `HEARTH_DATABASE__URL`,
//! `HEARTH_RATE_LIMITS__LOGIN__BURST`. Their values are read as TOML values when they parse as one
//! (`true`, `8`, `["0.0.0.0:8008"]`) and as plain strings otherwise. Unknown keys and bad values are
//! errors that name the key.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use ruma::OwnedServerName;
use serde::Deserialize;

/// The commented example written by `hearth generate-config`. It must parse to the defaults
/// (tested below), so it doubles as the reference of every key.
pub const EXAMPLE: &str = include_str!("config_example.toml");

/// Environment variable prefix for overrides.
const ENV_PREFIX: &str = "HEARTH_";
/// Variables with the prefix that are not config keys.
const ENV_NOT_KEYS: &[&str] = &["HEARTH_CONFIG"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The domain in user IDs (`@alice:server_name`). Cannot change once users exist.
    pub server_name: OwnedServerName,
    /// The URL clients use to reach this server; default derived from the first listener.
    pub public_baseurl: Option<String>,
    /// Addresses for the client API (HTTP).
    pub listen: Vec<SocketAddr>,
    /// Where the SQLite database and the signing key live.
    pub data_dir: PathBuf,
    /// Reverse proxies (addresses or CIDRs) whose `X-Forwarded-For` / `Forwarded` header names the
    /// client; from any other peer those headers are ignored.
    pub trusted_proxies: Vec<IpNet>,
    pub database: DatabaseConfig,
    pub registration: RegistrationConfig,
    pub auth: AuthConfig,
    pub rate_limits: RateLimitsConfig,
    pub limits: LimitsConfig,
    pub presence: PresenceConfig,
    pub websocket: WebSocketConfig,
    pub delivered_receipts: DeliveredReceiptsConfig,
    pub rooms: RoomsConfig,
    pub federation: FederationConfig,
    pub media: MediaConfig,
    pub push: PushConfig,
    pub search: SearchConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`; default: SQLite in `data_dir`.
    pub url: Option<String>,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationMode {
    /// Anyone may register (UIA stage `m.login.dummy`).
    Open,
    /// A registration token is required (UIA stage `m.login.registration_token`).
    Token,
    /// Only operators create accounts (`hearth user create`).
    Disabled,
}

impl RegistrationMode {
    /// The name used in the configuration (and the start-up log).
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationMode::Open => "open",
            RegistrationMode::Token => "token",
            RegistrationMode::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// Default: open for a development set-up (`server_name` is `localhost`, or `public_baseurl` is
    /// a loopback URL, and every listener is on loopback), token otherwise.
    pub mode: Option<RegistrationMode>,
    pub guest_access: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of access tokens given to clients that asked for a refresh token.
    pub refreshable_access_token_lifetime_secs: u64,
    /// Lifetime of refresh tokens; none means they last until used or logged out.
    pub refresh_token_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, in actions per second per key (a client address, an account, a user).
    pub per_second: f64,
    /// Actions allowed at once before the rate applies.
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub enabled: bool,
    pub register: RateLimit,
    pub login: RateLimit,
    /// Ops per WebSocket connection.
    pub websocket_ops: RateLimit,
    /// Failed password attempts per account, whatever the address.
    pub failed_login_per_account: RateLimit,
    /// Events sent per user (messages, state events, redactions; HTTP and WebSocket alike).
    pub message: RateLimit,
    /// Rooms created (and upgraded) per user.
    pub room_creation: RateLimit,
    /// Joins and knocks per user.
    pub join: RateLimit,
    /// Invites sent per user.
    pub invite: RateLimit,
    /// Display name and avatar changes per user (each one writes a member event in every room).
    pub profile: RateLimit,
    /// Explicit presence updates per user.
    pub presence: RateLimit,
    /// Typing notifications per user.
    pub typing: RateLimit,
    /// `sendToDevice` requests per user.
    pub to_device: RateLimit,
    /// Media uploads per user.
    pub media_upload: RateLimit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted on the JSON APIs; larger ones get 413 `M_TOO_LARGE`.
    pub max_request_body_bytes: usize,
    /// A request not answered within this time gets 504 (a `/sync` long-poll may take its own
    /// timeout, at most 120 s, on top; a WebSocket is not a request once upgraded).
    pub request_timeout_secs: u64,
    /// A client must send a request's headers within this time, or its connection is closed
    /// (slow-loris clients cannot hold connections open).
    pub header_read_timeout_secs: u64,
    /// Requests served at once (long-polling `/sync` and WebSockets aside); more are refused at
    /// once with 503 `M_LIMIT_EXCEEDED` rather than queued, so an overload cannot pile up.
    pub max_concurrent_requests: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    pub enabled: bool,
    /// An online user with no activity for this long becomes "unavailable".
    pub idle_after_secs: u64,
    /// A user whose clients all stopped syncing this long ago becomes "offline".
    pub offline_after_secs: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig { enabled: true, idle_after_secs: 300, offline_after_secs: 30 }
    }
}

/// Hearth's WebSocket client transport (`spec/websocket.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    pub enabled: bool,
    /// Outbound buffer per connection, in frames and in bytes; a client that lets it fill is
    /// closed with 4008 and resumes.
    pub outbound_buffer_frames: usize,
    pub outbound_buffer_bytes: usize,
    pub max_connections_per_device: usize,
    /// Browser origins allowed to connect; empty means any.
    pub allowed_origins: Vec<String>,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            enabled: true,
            outbound_buffer_frames: 256,
            outbound_buffer_bytes: 4 * 1024 * 1024,
            max_connections_per_device: 4,
            allowed_origins: Vec::new(),
        }
    }
}

/// Delivered receipts (`spec/delivered-receipts.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveredReceiptsConfig {
    pub enabled: bool,
    /// Rooms with more joined members record no delivered receipts: every message would bring
    /// one receipt per member, each shown to every member.
    pub max_room_members: u64,
}

impl Default for DeliveredReceiptsConfig {
    fn default() -> Self {
        DeliveredReceiptsConfig { enabled: true, max_room_members: 100 }
    }
}

/// The in-memory room cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Room handles (each with its room's full current state) kept in memory; beyond this the
    /// least recently used handles not in use are dropped and reloaded from the database when
    /// needed, so touching many rooms cannot grow memory without bound.
    pub max_loaded_rooms: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig { max_loaded_rooms: 10_000 }
    }
}

/// The Server-Server API: its listener, TLS, and how Hearth reaches other servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Default: on, unless `server_name` is `localhost` (a name no other server can reach).
    pub enabled: Option<bool>,
    /// Addresses of the Server-Server API listener.
    pub listen: Vec<SocketAddr>,
    /// PEM certificate chain and private key for the listener; without them it speaks plain HTTP
    /// (for a TLS-terminating proxy in front).
    pub tls_certificate: Option<PathBuf>,
    pub tls_private_key: Option<PathBuf>,
    /// PEM files of CA certificates trusted for outbound requests besides the system's roots.
    pub extra_ca_certificates: Vec<PathBuf>,
    /// DNS servers for discovery (`IP` or `IP:port`); empty means the system resolver.
    pub dns_servers: Vec<DnsServer>,
    /// Whether outbound requests may reach private, loopback and link-local addresses.
    pub allow_private_destinations: bool,
    /// When set, `/.well-known/matrix/server` delegates to this `host[:port]`.
    pub well_known_server: Option<String>,
    /// Notaries asked for other servers' keys before the servers themselves.
    pub trusted_key_servers: Vec<OwnedServerName>,
    /// PDUs kept queued for an unreachable server before its queue is cut down to the newest
    /// event of each room (it fetches the rest itself when it returns).
    pub max_queued_per_destination: usize,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            enabled: None,
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 8448))],
            tls_certificate: None,
            tls_private_key: None,
            extra_ca_certificates: Vec::new(),
            dns_servers: Vec::new(),
            allow_private_destinations: false,
            well_known_server: None,
            trusted_key_servers: Vec::new(),
            max_queued_per_destination: 1000,
        }
    }
}

/// Where media files live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaBackend {
    /// Files under `media.path` (default `data_dir/media`).
    Local,
    /// An S3-compatible object store (`media.s3`).
    S3,
}

/// An S3-compatible bucket. Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never from the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The endpoint URL; none means AWS itself.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: Option<String>,
    /// Keys are stored under this prefix in the bucket.
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`), as most S3-compatible servers want; off means
    /// virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
}

/// URL previews (`/media/preview_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UrlPreviewConfig {
    pub enabled: bool,
    /// Addresses the previewer may reach although they are private, loopback or link-local
    /// (CIDRs); every other private address is refused.
    pub allowed_ip_ranges: Vec<IpNet>,
    /// Addresses refused on top of the private ones.
    pub denied_ip_ranges: Vec<IpNet>,
    /// Largest page (or image) read for a preview.
    pub max_page_bytes: usize,
    pub timeout_secs: u64,
    pub max_redirects: usize,
    /// How long a preview is kept and served again.
    pub cache_secs: u64,
}

impl Default for UrlPreviewConfig {
    fn default() -> Self {
        UrlPreviewConfig {
            enabled: false,
            allowed_ip_ranges: Vec::new(),
            denied_ip_ranges: Vec::new(),
            max_page_bytes: 10 * 1024 * 1024,
            timeout_secs: 10,
            max_redirects: 5,
            cache_secs: 3600,
        }
    }
}

/// Push notifications to push gateways (`/pushers/set` pushers of kind `http`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Whether pushes are sent at all (pushers can be set either way).
    pub enabled: bool,
    /// Gateway addresses allowed although they are private, loopback or link-local (CIDRs);
    /// every other private address is refused, as for URL previews.
    pub allowed_ip_ranges: Vec<IpNet>,
    /// Addresses refused on top of the private ones.
    pub denied_ip_ranges: Vec<IpNet>,
    /// How long a notification waits before it is pushed: what a connected device receives
    /// meanwhile is not pushed to it, and a burst in a room becomes one push.
    pub coalesce_ms: u64,
    /// Tries per push before it is dropped (the waits between them double from one second up
    /// to five minutes).
    pub max_attempts: u32,
    pub timeout_secs: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            allowed_ip_ranges: Vec::new(),
            denied_ip_ranges: Vec::new(),
            coalesce_ms: 1500,
            max_attempts: 10,
            timeout_secs: 10,
        }
    }
}

/// `POST /search`: what a search over very common words may cost.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// Rank order ranks this many matches together, newest first block by block; a word in
    /// fewer messages is ranked over all of them.
    pub rank_window: usize,
    /// `count` is exact up to this many matches; beyond, it is estimated from the newest this
    /// many.
    pub exact_count_up_to: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig { rank_window: 1000, exact_count_up_to: 1000 }
    }
}

/// The content repository: uploads, downloads, thumbnails, other servers' media.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub backend: MediaBackend,
    /// Local backend: the directory; default `data_dir/media`.
    pub path: Option<PathBuf>,
    pub s3: S3Config,
    /// Largest upload (and largest remote file fetched); larger ones get 413 `M_TOO_LARGE`.
    pub max_upload_bytes: u64,
    /// Bytes of media each user may keep uploaded; 0 means no quota.
    pub user_quota_bytes: u64,
    /// Media created with `/media/v1/create` and not yet uploaded, per user at once.
    pub max_pending_uploads: u32,
    /// How long an `mxc://` URI from `/media/v1/create` waits for its upload.
    pub pending_upload_secs: u64,
    /// An upload whose body stops arriving for this long is abandoned; the whole upload may take
    /// at most `max_upload_secs`.
    pub upload_idle_secs: u64,
    pub max_upload_secs: u64,
    /// Like Synapse's `enable_authenticated_media`: media stored while this is on is served only
    /// through the authenticated endpoints (`/_matrix/client/v1/media/…`, federation v1), and
    /// the legacy `/_matrix/media/v3/download|thumbnail` answer 404 for it. Off, new media is
    /// served by both.
    pub enable_authenticated_media: bool,
    /// Images with more pixels than this get no thumbnail (checked before decoding, so a
    /// decompression bomb costs nothing).
    pub max_image_pixels: u64,
    /// Bytes of other servers' media kept; beyond it the least recently used are evicted.
    pub remote_cache_max_bytes: u64,
    pub url_preview: UrlPreviewConfig,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            backend: MediaBackend::Local,
            path: None,
            s3: S3Config::default(),
            max_upload_bytes: 100 * 1024 * 1024,
            user_quota_bytes: 0,
            max_pending_uploads: 5,
            pending_upload_secs: 24 * 3600,
            upload_idle_secs: 60,
            max_upload_secs: 3600,
            enable_authenticated_media: true,
            max_image_pixels: 32_000_000,
            remote_cache_max_bytes: 10 * 1024 * 1024 * 1024,
            url_preview: UrlPreviewConfig::default(),
        }
    }
}

/// A DNS server address: `IP` (port 53) or `IP:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsServer(pub SocketAddr);

impl std::str::FromStr for DnsServer {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(DnsServer(SocketAddr::new(ip, 53)));
        }
        text.parse::<SocketAddr>().map(DnsServer).map_err(|_| format!("`{text}` is not an IP address or IP:port"))
    }
}

impl<'de> Deserialize<'de> for DnsServer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `hearth=debug,sqlx=warn`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_name: "localhost".try_into().expect("valid server name"),
            public_baseurl: None,
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8008))],
            data_dir: PathBuf::from("./hearth-data"),
            trusted_proxies: Vec::new(),
            database: DatabaseConfig::default(),
            registration: RegistrationConfig::default(),
            auth: AuthConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            limits: LimitsConfig::default(),
            presence: PresenceConfig::default(),
            websocket: WebSocketConfig::default(),
            delivered_receipts: DeliveredReceiptsConfig::default(),
            rooms: RoomsConfig::default(),
            federation: FederationConfig::default(),
            media: MediaConfig::default(),
            push: PushConfig::default(),
            search: SearchConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: None, max_connections: 16, connect_timeout_secs: 10 }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { refreshable_access_token_lifetime_secs: 300, refresh_token_lifetime_secs: None }
    }
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        // Synapse's defaults: a burst of a few attempts, then one every ~6 seconds.
        let slow = RateLimit { per_second: 0.17, burst: 3 };
        RateLimitsConfig {
            enabled: true,
            register: slow,
            login: slow,
            failed_login_per_account: slow,
            websocket_ops: RateLimit { per_second: 50.0, burst: 100 },
            // Synapse allows 0.2 messages/s after a burst of 10; a lively conversation (or a bot
            // answering one) goes faster than that, so Hearth allows a message a second.
            message: RateLimit { per_second: 1.0, burst: 20 },
            // Synapse's defaults for room creation, local joins and invites.
            room_creation: RateLimit { per_second: 0.016, burst: 10 },
            join: RateLimit { per_second: 0.1, burst: 10 },
            invite: RateLimit { per_second: 0.3, burst: 10 },
            profile: RateLimit { per_second: 0.05, burst: 5 },
            presence: RateLimit { per_second: 0.1, burst: 5 },
            typing: RateLimit { per_second: 1.0, burst: 10 },
            // Synapse's limit on key requests, the bulk of to-device traffic.
            to_device: RateLimit { per_second: 20.0, burst: 100 },
            // A photo album dropped into a chat is a burst; a steady stream is one a second.
            media_upload: RateLimit { per_second: 1.0, burst: 30 },
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_body_bytes: 1024 * 1024,
            request_timeout_secs: 60,
            header_read_timeout_secs: 20,
            max_concurrent_requests: 512,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { format: LogFormat::Human, level: "info".to_owned() }
    }
}

/// An IP network: an address and how many leading bits of it count (`10.0.0.0/8`, `::1/128`); a
/// bare address is the network of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("`{text}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0-{max}"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix_len })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A configuration problem, with the key or file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads the file (if any), applies `HEARTH_…` overrides from `env`, and validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|err| ConfigError(format!("cannot read config file {}: {err}", path.display())))?;
                text.parse::<toml::Table>()
                    .map_err(|err| ConfigError(format!("config file {}: {err}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let mut from_env = Vec::new();
        for (name, raw) in env {
            if !name.starts_with(ENV_PREFIX) || ENV_NOT_KEYS.contains(&name.as_str()) {
                continue;
            }
            let key_path: Vec<String> =
                name[ENV_PREFIX.len()..].split("__").map(|part| part.to_ascii_lowercase()).collect();
            set_path(&mut table, &key_path, env_value(&raw))
                .map_err(|why| ConfigError(format!("environment variable {name}: {why}")))?;
            from_env.push((key_path.join("."), name));
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
            let key = err.path().to_string();
            let origin = from_env
                .iter()
                .find(|(path, _)| {
                    key == *path || key.starts_with(&format!("{path}.")) || key.starts_with(&format!("{path}["))
                })
                .map(|(_, var)| format!(" (set by {var})"))
                .unwrap_or_default();
            ConfigError(format!("config key `{key}`{origin}: {}", err.inner()))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("config key `{key}`: {why}")));
        if self.listen.is_empty() {
            return bad("listen", "at least one address is needed");
        }
        if let Some(url) = &self.public_baseurl
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad("public_baseurl", "must start with http:// or https://");
        }
        if let Some(url) = &self.database.url
            && !["sqlite:", "postgres://", "postgresql://"].iter().any(|scheme| url.starts_with(scheme))
        {
            return bad("database.url", "must start with sqlite://, postgres:// or postgresql://");
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1");
        }
        for (name, limit) in [
            ("register", &self.rate_limits.register),
            ("login", &self.rate_limits.login),
            ("failed_login_per_account", &self.rate_limits.failed_login_per_account),
            ("websocket_ops", &self.rate_limits.websocket_ops),
            ("message", &self.rate_limits.message),
            ("room_creation", &self.rate_limits.room_creation),
            ("join", &self.rate_limits.join),
            ("invite", &self.rate_limits.invite),
            ("profile", &self.rate_limits.profile),
            ("presence", &self.rate_limits.presence),
            ("typing", &self.rate_limits.typing),
            ("to_device", &self.rate_limits.to_device),
            ("media_upload", &self.rate_limits.media_upload),
        ] {
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
                return bad(&format!("rate_limits.{name}.per_second"), "must be a positive number");
            }
            if limit.burst == 0 {
                return bad(&format!("rate_limits.{name}.burst"), "must be at least 1");
            }
        }
        if self.websocket.outbound_buffer_frames < 2 {
            return bad("websocket.outbound_buffer_frames", "must be at least 2");
        }
        if self.websocket.max_connections_per_device == 0 {
            return bad("websocket.max_connections_per_device", "must be at least 1");
        }
        if self.limits.max_request_body_bytes < 1024 {
            return bad("limits.max_request_body_bytes", "must be at least 1024");
        }
        if self.limits.request_timeout_secs == 0 {
            return bad("limits.request_timeout_secs", "must be at least 1");
        }
        if self.limits.header_read_timeout_secs == 0 {
            return bad("limits.header_read_timeout_secs", "must be at least 1");
        }
        if self.limits.max_concurrent_requests == 0 {
            return bad("limits.max_concurrent_requests", "must be at least 1");
        }
        if self.auth.refreshable_access_token_lifetime_secs == 0 {
            return bad("auth.refreshable_access_token_lifetime_secs", "must be at least 1");
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            return bad("logging.level", &err.to_string());
        }
        self.validate_media()?;
        self.validate_federation()
    }

    fn validate_media(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("config key `media.{key}`: {why}")));
        let media = &self.media;
        if media.max_upload_bytes == 0 {
            return bad("max_upload_bytes", "must be at least 1");
        }
        if media.backend == MediaBackend::S3 {
            if media.s3.bucket.is_empty() {
                return bad("s3.bucket", "is required when `media.backend` is s3");
            }
            if let Some(endpoint) = &media.s3.endpoint
                && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            {
                return bad("s3.endpoint", "must start with http:// or https://");
            }
        }
        for (key, secs) in [
            ("pending_upload_secs", media.pending_upload_secs),
            ("upload_idle_secs", media.upload_idle_secs),
            ("max_upload_secs", media.max_upload_secs),
            ("url_preview.timeout_secs", media.url_preview.timeout_secs),
        ] {
            if secs == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if media.max_image_pixels == 0 {
            return bad("max_image_pixels", "must be at least 1");
        }
        Ok(())
    }

    /// What can be checked without reading files; the certificate files themselves are read (and
    /// the key matched against the certificate) when the listener starts, which names the key too.
    fn validate_federation(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("config key `federation.{key}`: {why}")));
        let federation = &self.federation;
        if !self.is_federation_enabled() {
            return Ok(());
        }
        if federation.listen.is_empty() {
            return bad("listen", "at least one address is needed while federation is enabled");
        }
        match (&federation.tls_certificate, &federation.tls_private_key) {
            (Some(_), None) => return bad("tls_private_key", "is needed with tls_certificate"),
            (None, Some(_)) => return bad("tls_certificate", "is needed with tls_private_key"),
            _ => {}
        }
        if let Some(delegate) = &federation.well_known_server
            && <&ruma::ServerName>::try_from(delegate.as_str()).is_err()
        {
            return bad("well_known_server", "must be a server name: host or host:port");
        }
        Ok(())
    }

    /// Whether the Server-Server API runs: as configured, else on for any name but `localhost`.
    pub fn is_federation_enabled(&self) -> bool {
        self.federation.enabled.unwrap_or(self.server_name.as_str() != "localhost")
    }

    /// Registration mode in force: the configured one, or open only on a development set-up.
    ///
    /// Listening on loopback alone is not enough: that is also how a server behind a reverse proxy
    /// on the same host listens, and such a server is on the internet. What marks a developer's
    /// machine is the name it serves: `localhost`, or a loopback base URL.
    pub fn registration_mode(&self) -> RegistrationMode {
        self.registration.mode.unwrap_or_else(|| {
            let is_dev_name =
                self.server_name.as_str() == "localhost" || self.public_baseurl.as_deref().is_some_and(is_loopback_url);
            if is_dev_name && self.listen.iter().all(|addr| addr.ip().is_loopback()) {
                RegistrationMode::Open
            } else {
                RegistrationMode::Token
            }
        })
    }

    pub fn database_url(&self) -> String {
        self.database.url.clone().unwrap_or_else(|| crate::storage::Db::sqlite_url(&self.data_dir))
    }

    /// The base URL clients should use, ending in `/`.
    pub fn public_baseurl(&self, bound: SocketAddr) -> String {
        match &self.public_baseurl {
            Some(url) if url.ends_with('/') => url.clone(),
            Some(url) => format!("{url}/"),
            None => {
                let host = if bound.ip().is_unspecified() { "localhost".to_owned() } else { bound.ip().to_string() };
                let host = if bound.is_ipv6() && !bound.ip().is_unspecified() { format!("[{host}]") } else { host };
                format!("http://{host}:{}/", bound.port())
            }
        }
    }
}

/// Whether an `http(s)://` URL's host is `localhost` or a loopback address.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reads an environment value as TOML when it is one, else as a string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    if path.iter().any(String::is_empty) {
        return Err("empty key segment".to_owned());
    }
    let mut current = table;
    for part in parents {
        let entry = current.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.toml");
        std::fs::write(&path, toml_text).unwrap();
        Config::load(Some(&path), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn example_config_parses_to_the_defaults() {
        let example = load(EXAMPLE, &[]).unwrap();
        let default = Config::default();
        assert_eq!(format!("{example:?}"), format!("{default:?}"));
    }

    #[test]
    fn no_file_means_defaults_and_open_registration_on_loopback() {
        let config = Config::load(None, Vec::new()).unwrap();
        assert_eq!(config.server_name.as_str(), "localhost");
        assert_eq!(config.listen, vec!["127.0.0.1:8008".parse().unwrap()]);
        assert_eq!(config.registration_mode(), RegistrationMode::Open);
        assert!(config.database_url().ends_with("hearth-data/hearth.db"));
    }

    #[test]
    fn public_listener_defaults_to_token_registration() {
        let config = load(r#"listen = ["0.0.0.0:8008"]"#, &[]).unwrap();
        assert_eq!(config.registration_mode(), RegistrationMode::Token);
    }

    #[test]
    fn real_domain_defaults_to_token_registration_even_on_loopback() {
        let behind_proxy =
            load("server_name = \"example.org\"\npublic_baseurl = \"https://matrix.example.org\"\n", &[]);
        assert_eq!(behind_proxy.unwrap().registration_mode(), RegistrationMode::Token);
        let no_url = load("server_name = \"example.org\"\n", &[]).unwrap();
        assert_eq!(no_url.registration_mode(), RegistrationMode::Token);
        let loopback_url = load("server_name = \"example.org\"\npublic_baseurl = \"http://127.0.0.1:8008\"\n", &[]);
        assert_eq!(loopback_url.unwrap().registration_mode(), RegistrationMode::Open);
        let explicit = load("server_name = \"example.org\"\n[registration]\nmode = \"open\"\n", &[]).unwrap();
        assert_eq!(explicit.registration_mode(), RegistrationMode::Open);
    }

    #[test]
    fn loopback_urls_are_recognised() {
        for url in ["http://localhost:8008/", "http://127.0.0.1", "https://[::1]:8448/x", "http://u@LOCALHOST"] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in ["https://example.org", "http://10.0.0.1:8008", "http://localhost.example.org/", "http://[::2]/"] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[database]\nurll = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("database") && err.contains("urll"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = load("[rate_limits.login]\nper_second = \"fast\"\nburst = 1\n", &[]).unwrap_err().to_string();
        assert!(err.contains("rate_limits.login.per_second"), "{err}");
        let err = load("[rate_limits.login]\nper_second = -1.0\nburst = 1\n", &[]).unwrap_err().to_string();
        assert!(err.contains("rate_limits.login.per_second"), "{err}");
        let err = load("server_name = \"not a name\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("server_name"), "{err}");
        let err = load("[database]\nurl = \"mysql://x\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("database.url"), "{err}");
    }

    #[test]
    fn environment_overrides_file_and_is_typed() {
        let config = load(
            "server_name = \"file.example\"\n",
            &[
                ("HEARTH_SERVER_NAME", "env.example"),
                ("HEARTH_RATE_LIMITS__LOGIN__BURST", "7"),
                ("HEARTH_RATE_LIMITS__LOGIN__PER_SECOND", "2.5"),
                ("HEARTH_LISTEN", r#"["127.0.0.1:9000"]"#),
                ("HEARTH_DATABASE__URL", "postgres://postgres@127.0.0.1/hearth"),
                ("HEARTH_CONFIG", "ignored.toml"),
                ("OTHER_THING", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.server_name.as_str(), "env.example");
        assert_eq!(config.rate_limits.login.burst, 7);
        assert_eq!(config.rate_limits.login.per_second, 2.5);
        assert_eq!(config.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
        assert_eq!(config.database_url(), "postgres://postgres@127.0.0.1/hearth");
    }

    #[test]
    fn bad_environment_override_names_the_variable() {
        let err = load("", &[("HEARTH_LIMITS__MAX_BODY", "3")]).unwrap_err().to_string();
        assert!(err.contains("HEARTH_LIMITS__MAX_BODY") && err.contains("max_body"), "{err}");
        let err = load("", &[("HEARTH_REGISTRATION__MODE", "sometimes")]).unwrap_err().to_string();
        assert!(err.contains("HEARTH_REGISTRATION__MODE"), "{err}");
    }

    #[test]
    fn trusted_proxies_are_addresses_or_cidrs() {
        let config =
            load("trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\", \"::1\", \"fd00::/8\"]\n", &[]).unwrap();
        let trusted = |ip: &str| config.trusted_proxies.iter().any(|net| net.contains(ip.parse().unwrap()));
        assert!(trusted("127.0.0.1") && trusted("10.200.3.4") && trusted("::1") && trusted("fd12::5"));
        assert!(trusted("::ffff:10.1.1.1"), "IPv4-mapped peers match IPv4 networks");
        assert!(!trusted("127.0.0.2") && !trusted("11.0.0.1") && !trusted("::2") && !trusted("fe80::1"));
        let everything: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains("203.0.113.9".parse().unwrap()));
        for bad in ["10.0.0.0/33", "example.org", "::/129", "1.2.3.4/x"] {
            let err = load(&format!("trusted_proxies = [\"{bad}\"]\n"), &[]).unwrap_err().to_string();
            assert!(err.contains("trusted_proxies"), "{bad}: {err}");
        }
    }

    #[test]
    fn federation_defaults_off_for_localhost_only() {
        let local = Config::default();
        assert!(!local.is_federation_enabled());
        let real = load("server_name = \"example.org\"\n", &[]).unwrap();
        assert!(real.is_federation_enabled());
        assert_eq!(real.federation.listen, vec!["0.0.0.0:8448".parse().unwrap()]);
        let off = load("server_name = \"example.org\"\n[federation]\nenabled = false\n", &[]).unwrap();
        assert!(!off.is_federation_enabled());
    }

    #[test]
    fn federation_keys_are_checked_and_named() {
        let config = load(
            "server_name = \"ours1.test\"\n[federation]\nlisten = [\"127.0.0.21:8448\"]\n\
             dns_servers = [\"127.0.0.53:5353\", \"10.0.0.1\"]\nwell_known_server = \"matrix.example.org:443\"\n",
            &[("HEARTH_FEDERATION__ALLOW_PRIVATE_DESTINATIONS", "true")],
        )
        .unwrap();
        assert_eq!(config.federation.dns_servers[0].0, "127.0.0.53:5353".parse().unwrap());
        assert_eq!(config.federation.dns_servers[1].0, "10.0.0.1:53".parse().unwrap());
        assert!(config.federation.allow_private_destinations);
        let named = |text: &str, key: &str| {
            let err = load(&format!("server_name = \"ours1.test\"\n[federation]\n{text}\n"), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        };
        named("listen = [\"127.0.0.21\"]", "federation.listen");
        named("dns_servers = [\"resolver.example\"]", "federation.dns_servers");
        named("tls_certificate = \"x.crt\"", "federation.tls_private_key");
        named("tls_private_key = \"x.key\"", "federation.tls_certificate");
        named("well_known_server = \"https://x/\"", "federation.well_known_server");
        named("listen = []", "federation.listen");
        named("trusted_key_servers = [\"not a name\"]", "federation.trusted_key_servers");
        let err = load("", &[("HEARTH_FEDERATION__LISTEN", "[\"nowhere\"]")]).unwrap_err().to_string();
        assert!(err.contains("HEARTH_FEDERATION__LISTEN"), "{err}");
    }

    #[test]
    fn public_baseurl_follows_the_listener() {
        let config = Config::default();
        assert_eq!(config.public_baseurl("127.0.0.1:8008".parse().unwrap()), "http://127.0.0.1:8008/");
        assert_eq!(config.public_baseurl("[::1]:8008".parse().unwrap()), "http://[::1]:8008/");
    }
}
